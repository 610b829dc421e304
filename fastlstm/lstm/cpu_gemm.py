"""The cpu backend's layer-wide GEMMs in Python: fastlstm::mm and fastlstm::addmm, which the
weight and input gradients use (the forward's input projection is inside the recurrence op).

They compute what torch.mm and torch.addmm do, on the faster CPU library for the
product: oneDNN for large float32 products on processors other than Intel's (where torch's MKL
does not use AVX-512), torch's BLAS otherwise. The choice and its measurements are in
csrc/cpu/gemm.cpp; FASTLSTM_CPU_GEMM=auto|blas|own forces it. fastlstm/lstm/ops.py imports
this module once fastlstm._C (which defines the ops) is loaded.
"""
from __future__ import annotations

import torch

_ops = torch.ops.fastlstm


def library(a: torch.Tensor, b: torch.Tensor) -> str:
    """"onednn" or "blas": where a @ b would run now."""
    return _ops.gemm_library(a, b)


@torch.library.register_fake("fastlstm::mm")
def _mm_fake(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


@torch.library.register_fake("fastlstm::addmm")
def _addmm_fake(c, a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; differentiable through torch.mm when autograd records (double backward)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return a.mm(b)
    return _ops.mm(a, b)


def addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b, as a new tensor."""
    if torch.is_grad_enabled() and (c.requires_grad or a.requires_grad or b.requires_grad):
        return torch.addmm(c, a, b)
    return _ops.addmm(c, a, b)
