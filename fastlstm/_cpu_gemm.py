"""The cpu backend's layer-wide GEMMs: fastlstm::linear, fastlstm::mm and fastlstm::addmm.

They compute what F.linear, torch.mm and torch.addmm do, on the faster CPU library for the
product: oneDNN for large float32 products on processors other than Intel's (where torch's MKL
does not use AVX-512), torch's BLAS otherwise. The choice and its measurements are in
csrc/cpu_gemm.cpp; FASTLSTM_CPU_GEMM=auto|onednn|blas forces it. fastlstm/_extension.py imports
this module once fastlstm._C (which defines the ops) is loaded.
"""
from __future__ import annotations

import torch

_ops = torch.ops.fastlstm


def library(a: torch.Tensor, b: torch.Tensor) -> str:
    """"onednn" or "blas": where a @ b would run now."""
    return _ops.gemm_library(a, b)


@torch.library.register_fake("fastlstm::linear")
def _linear_fake(input, weight):
    return input.new_empty(input.shape[0], weight.shape[0])


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


def _linear_setup_context(ctx, inputs, output):
    input, weight = inputs
    ctx.save_for_backward(input if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None)


def _linear_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    grad = grad.contiguous()
    grad_input = mm(grad, weight) if ctx.needs_input_grad[0] else None
    grad_weight = mm(grad.t(), input) if ctx.needs_input_grad[1] else None
    return grad_input, grad_weight


torch.library.register_autograd("fastlstm::linear", _linear_backward,
                                setup_context=_linear_setup_context)


def linear(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """input [N, K] @ weight[M, K]^T, as F.linear(input, weight) without a bias."""
    return _ops.linear(input, weight)
