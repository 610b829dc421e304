"""The ops of the compiled extension fastlstm._C (backends `cpu` and `cuda`), ready for autograd.

Importing this module imports fastlstm._C, whose C++ side registers fastlstm::recurrence_forward
and fastlstm::recurrence_backward (schemas in csrc/common/registration.cpp, kernels in csrc/lstm/cpu/lstm_cpu.cpp and
csrc/lstm/cuda/lstm_cuda.cu), then attaches their fake kernels (for torch.compile) and the autograd formula
of fastlstm/lstm/recurrence.py. The contract of both ops is written out there.
"""
from __future__ import annotations

import torch

from .. import _backends
from . import recurrence as _recurrence

_C = _backends.extension()
if _C is None:
    raise ImportError(
        f"fastlstm backends 'cpu' and 'cuda' need {_backends._import_extension()[1]}; build it "
        "with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), "
        "or use backend='torch'")

from . import cpu_gemm as _cpu_gemm  # noqa: E402  (the ops it registers come with fastlstm._C)

# On CPU tensors the weight gradients use the CPU backend's GEMMs (fastlstm/lstm/cpu_gemm.py).
_recurrence.register("fastlstm::recurrence_forward", torch.ops.fastlstm.recurrence_backward,
                     backward_qualname="fastlstm::recurrence_backward",
                     mm=_cpu_gemm.mm, addmm=_cpu_gemm.addmm)

recurrence_forward = torch.ops.fastlstm.recurrence_forward
"""recurrence_forward(xg [N, 4H], batch_sizes [T] int64 (empty: dense), h0 [B, P], c0 [B, H],
w_hh [4H, P], w_hr [P, H] or None, reverse, save, bias [4H] or None, w_ih [4H, I] or None (CPU:
then the first argument is x [N, I])) -> (out [N, P], h_n [B, P],
c_n [B, H],
gates [N, 4H] or [0, 4H], cells [N, H] or [0, H]); see fastlstm/lstm/recurrence.py."""

recurrence_backward = torch.ops.fastlstm.recurrence_backward

has_cuda = _C.has_cuda
