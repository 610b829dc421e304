"""Fused sampling: fastlstm.sample and fastlstm.Sampler (sampler.py), their Triton kernel
(triton_kernels.py); the CPU and CUDA kernels are in fastlstm._C (csrc/sampling/)."""
from .sampler import Sampler, sample

__all__ = ["Sampler", "sample"]
