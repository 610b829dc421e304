"""Which backend runs a given call: availability, the "auto" choice, and clear errors.

The four backends (see README):
  torch   reference written with torch ops, any device and dtype; autograd does its backward
  triton  fused Triton kernels: CUDA, or the CPU under TRITON_INTERPRET=1
  cuda    CUDA C++ kernels in the compiled extension fastlstm._C
  cpu     fused C++ CPU kernels in the same extension
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")


@functools.lru_cache(maxsize=None)
def _import_extension():
    """Import fastlstm._C; return (module or None, reason it is missing)."""
    try:
        module = importlib.import_module("fastlstm._C")
    except ImportError as error:  # not built, or built against another torch
        return None, f"the compiled extension fastlstm._C could not be imported ({error})"
    return module, ""


def extension():
    return _import_extension()[0]


def extension_has_cuda() -> bool:
    module = extension()
    return bool(module is not None and getattr(module, "has_cuda", lambda: False)())


@functools.lru_cache(maxsize=None)
def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    try:
        importlib.import_module("fastlstm.lstm.triton.recurrence")
    except ImportError as error:
        return False, f"fastlstm's Triton kernels could not be imported ({error})"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device) -> str | None:
    """None if `backend` can run on `device` here and now, else the reason in words."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'"
    if backend == "torch":
        return None
    if backend == "triton":
        ok, reason = _triton_importable()
        if not ok:
            return reason + "; install triton"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (f"triton runs on CUDA devices, or on the CPU only when TRITON_INTERPRET=1 is set "
                f"before triton is imported; got a {device.type} tensor")
    module, reason = _import_extension()
    if module is None:
        return reason + "; build it with `pip install --no-build-isolation -e .`"
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors; got a {device.type} tensor"
        return None
    # cuda
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors; got a {device.type} tensor"
    if not extension_has_cuda():
        return ("fastlstm._C was built without CUDA kernels (no nvcc or a CPU-only torch at build "
                "time); rebuild with FASTLSTM_BUILD_CUDA=1")
    return None


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on `device` here and now, fastest first."""
    device = torch.device(device)
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "triton", "torch")
    return [name for name in order if why_unavailable(name, device) is None]


def check_backend_name(backend: str) -> None:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(
            f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")


def _resolve_for_trace(backend, device, dtype):
    return resolve(backend, device, dtype)


# Availability is fixed for the life of a process: under torch.compile the choice is made once, at
# trace time, and becomes a constant of the graph (no import machinery is traced).
resolve_constant = torch.compiler.assume_constant_result(_resolve_for_trace)


def resolve(backend: str, device, dtype=None) -> str:
    """The backend that runs a call on `device`: `backend` itself, or the first available for auto."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            candidates = ("cuda", "triton", "torch")
        elif device.type == "cpu":
            candidates = ("cpu", "torch")
        else:
            candidates = ("torch",)
        for name in candidates:
            if why_unavailable(name, device) is None and supports_dtype(name, device, dtype):
                return name
        return "torch"
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"fastlstm backend {backend!r} cannot run here: {reason}. "
                           f"Available on {device}: {available_backends(device)}")
    if not supports_dtype(backend, device, dtype):
        raise RuntimeError(f"fastlstm backend {backend!r} does not support dtype {dtype} on "
                           f"{device.type}; use backend='torch' (any dtype) or convert the input")
    return backend


def supports_dtype(backend: str, device, dtype) -> bool:
    if dtype is None or backend == "torch":
        return True
    device = torch.device(device)
    if backend == "cpu":
        return dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if backend == "triton" and device.type == "cpu":
        return dtype in (torch.float32, torch.float64)
    return dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
