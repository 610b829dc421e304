"""Fused sampling: temperature, top-k / top-p / min-p and the draw in one kernel per backend.

    sample(logits, temperature=1.0, *, top_k=0, top_p=1.0, min_p=0.0, generator=None,
           backend="auto")

draws one token per row from softmax(logits / T), after three filters applied in this order:
top-k (keep the k most likely; tokens tied with the k-th are kept too), then top-p (keep the
smallest set of most likely tokens whose mass, among those top-k kept, reaches top_p; ties with
the last one kept), then min-p (keep the tokens whose probability is at least min_p times the
largest one), renormalized. The most likely token always survives all three, and so min-p, which
is relative to it, gives the same set whether it is measured before or after renormalizing: the
kept set is the intersection of the min-p set with the top-k / top-p set. (Applying min-p before
top-p would change the mass top-p measures; it is applied last, as in Hugging Face's
generation.) min-p is a cut on the scaled logit, z / T >= max(z) / T + log(min_p), so the kernels
need no extra pass for it. A row with T == 0 is greedy: argmax, the first index on ties, like
torch.argmax (the filters cannot remove the argmax, so they do not change it).

Backends
  torch   the readable reference: softmax in float64, masks, torch.multinomial
  cpu     C++ in fastlstm._C: inverse CDF in one blocked pass over each row, blocks in parallel,
          AVX-512 or AVX2 picked at run time (csrc/sampling/sample_cpu.cpp; the environment variable
          FASTLSTM_SAMPLE_KERNELS=avx2 or =portable forces a lower build, for testing)
  cuda    CUDA C++ in fastlstm._C: Gumbel-max with Philox noise (csrc/sampling/sample_cuda.cu); top-k /
          top-p thresholds by a search over the logits' order-preserving keys, a long row split
          over several blocks when rows are few
  triton  the same Gumbel-max and searches in Triton (fastlstm/sampling/triton_kernels.py)

Random state. Every call takes fresh random bits from `generator` (the default generator of the
logits' device when None) and advances it, so equal generator states give equal tokens and
consecutive calls differ. The cpu backend draws one 64-bit seed from the generator. The cuda
backend takes (seed, offset) from the CUDA generator's Philox state and advances the offset, the
way torch's own random kernels do: while a CUDA graph is being captured that state is read from
device tensors that every replay advances, so each replay draws fresh tokens (a generator other
than the default must be registered with the graph: `graph.register_generator_state(g)`). The
triton backend draws its seed into a device tensor with `torch.randint`, which is captured the
same way.

Errors. Bad arguments (integer logits, negative or non-finite temperature, top_k < 0, top_p
outside (0, 1], min_p outside [0, 1] or not a number, a temperature tensor of the wrong shape)
raise ValueError before any kernel runs.
Bad rows (NaN, +inf, all -inf, a negative temperature inside a tensor) raise ValueError on the
CPU before returning. On CUDA the kernels check every row but the host does not wait for them
(that would cost a synchronization per token): a bad row's token is -1, which is never a valid id,
and `check_tokens(tokens)` (or `sample(..., check=True)`) synchronizes and raises the same error.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import _backends

__all__ = ["sample", "Sampler", "check_tokens"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_BACKENDS = ("cpu", "cuda")
# (backend, device type) -> resolved backend name; resolving costs microseconds that a one-row
# call cannot afford, and the answer does not change within a process.
_resolved: dict = {}


def _op_available() -> bool:
    return _backends.extension() is not None and hasattr(torch.ops.fastlstm, "sample")


# Under torch.compile the choice is made at trace time and becomes a constant of the graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device) -> str:
    key = (backend, device.type)
    name = _resolved.get(key)
    if name is None:
        _backends.check_backend_name(backend)
        name = _backends.resolve(backend, device)
        if name in _KERNEL_BACKENDS and not _op_available():
            raise RuntimeError(f"fastlstm backend {name!r} cannot sample here: fastlstm._C has no "
                               f"sample op; rebuild the extension")
        _resolved[key] = name
    return name


def _check_min_p(min_p, where="fastlstm.sample"):
    """min_p as a float in [0, 1]; ValueError naming min_p otherwise."""
    if (isinstance(min_p, bool) or not isinstance(min_p, (numbers.Real, torch.Tensor))
            or (isinstance(min_p, torch.Tensor) and (min_p.numel() != 1
                                                     or not min_p.is_floating_point()))):
        raise ValueError(f"{where}: min_p must be a float in [0, 1] (0 = off); got {min_p!r}")
    value = float(min_p)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"{where}: min_p must be in [0, 1] (0 = off); got {min_p!r}")
    return value


def _check_scalars(logits, temperature, top_k, top_p, generator=None):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"fastlstm.sample: logits must be a tensor; got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES and logits.dtype != torch.float64:
        raise ValueError(f"fastlstm.sample: logits must be float32, float16 or bfloat16; got "
                         f"{logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"fastlstm.sample: logits: expected (..., vocab) with vocab > 0; got "
                         f"{tuple(logits.shape)}")
    if isinstance(temperature, torch.Tensor):
        if temperature.shape != logits.shape[:-1]:
            raise ValueError(f"fastlstm.sample: temperature: expected a float or a tensor of shape "
                             f"{tuple(logits.shape[:-1])} (one per row); got "
                             f"{tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise ValueError(f"fastlstm.sample: temperature must be floating point; got "
                             f"{temperature.dtype}")
        if temperature.device != logits.device:
            raise RuntimeError(f"fastlstm.sample: temperature is on {temperature.device} but "
                               f"logits on {logits.device}; put them on one device")
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"fastlstm.sample: temperature must be a float or a tensor of shape "
                        f"{tuple(logits.shape[:-1])} (one per row); got "
                        f"{type(temperature).__name__}")
    elif not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"fastlstm.sample: temperature must be finite and >= 0; got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"fastlstm.sample: top_k must be an int >= 0 (0 = off); got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (numbers.Real, torch.Tensor)):
        raise TypeError(f"fastlstm.sample: top_p must be a float in (0, 1] (1 = off); got "
                        f"{type(top_p).__name__}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"fastlstm.sample: top_p must be in (0, 1] (1 = off); got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"fastlstm.sample: generator must be a torch.Generator or None; got "
                            f"{type(generator).__name__}")
        where = generator.device
        if where.type != logits.device.type or (
                where.index is not None and logits.device.index is not None
                and where.index != logits.device.index):
            # torch.multinomial's error type for a generator on another device
            raise RuntimeError(f"fastlstm.sample: generator is on {where} but logits on "
                               f"{logits.device}; use a generator of the logits' device")


def sample(logits: torch.Tensor, temperature=1.0, *, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, generator: torch.Generator | None = None, backend: str = "auto",
           check: bool = False) -> torch.Tensor:
    """Draw one token per row of `logits`.

    Args:
        logits: [..., V] float32, float16 or bfloat16 (float64 on the torch backend).
        temperature: a float >= 0, or a tensor of shape [...] (one per row); 0 = greedy (argmax).
        top_k: keep the k most likely tokens (0 = off).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (1.0 = off); applied after top_k.
        min_p: keep the tokens whose probability is >= min_p times the largest (0.0 = off);
            applied after top_k and top_p.
        generator: a torch.Generator on the logits' device; the default generator when None.
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        check: on CUDA, synchronize and raise for bad rows (NaN, +inf, all -inf, negative
            temperature) instead of returning -1 for them. The CPU always raises.
    Returns:
        int64 token ids of shape [...], on the logits' device.
    """
    _check_scalars(logits, temperature, top_k, top_p, generator)
    min_p = _check_min_p(min_p)
    top_k = int(top_k)
    name = _resolve(backend, logits.device)
    if logits.dtype == torch.float64 and name != "torch":
        if backend != "auto":
            raise ValueError(f"fastlstm.sample: backend {name!r} takes float32, float16 or "
                             f"bfloat16 logits; got float64 (use backend='torch')")
        name = "torch"
    if name in _KERNEL_BACKENDS:
        # min_p goes only when set: an extension built before it had no min_p argument.
        extra = {"min_p": min_p} if min_p > 0.0 else {}
        if isinstance(temperature, torch.Tensor):
            tokens = torch.ops.fastlstm.sample(logits, temperature, 1.0, top_k, float(top_p),
                                               generator, **extra)
        else:
            tokens = torch.ops.fastlstm.sample(logits, None, float(temperature), top_k,
                                               float(top_p), generator, **extra)
    elif name == "triton":
        from .triton_kernels import triton_sample
        tokens = triton_sample(logits, temperature, top_k, float(top_p), generator, min_p=min_p)
        if logits.device.type == "cpu":  # no device to wait for: raise now, as the cpu backend
            check_tokens(tokens, logits, temperature)
    else:
        tokens = sample_reference(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  generator=generator)
    if check and logits.device.type != "cpu":
        check_tokens(tokens, logits, temperature)
    return tokens


def check_tokens(tokens: torch.Tensor, logits: torch.Tensor | None = None,
                 temperature=None) -> None:
    """Raise ValueError if a GPU kernel marked a row bad (token -1). Synchronizes the device.

    With `logits` (and `temperature`) the message says what is wrong with the first bad row.
    """
    bad = (tokens < 0).flatten().nonzero()
    if bad.numel() == 0:
        return
    row = int(bad[0, 0])
    reason = "is invalid (NaN, +inf, all -inf, or a negative or non-finite temperature)"
    if logits is not None:
        values = logits.reshape(-1, logits.shape[-1])[row].float()
        row_temperature = (float(temperature.reshape(-1)[row])
                           if isinstance(temperature, torch.Tensor)
                           else None if temperature is None else float(temperature))
        if row_temperature is not None and not (row_temperature >= 0.0
                                                and math.isfinite(row_temperature)):
            raise ValueError(f"fastlstm.sample: temperature must be finite and >= 0; row {row} "
                             f"has {row_temperature}")
        reason = _row_reason(values)
    raise ValueError(f"fastlstm.sample: logits row {row} {reason}")


def _row_reason(values: torch.Tensor) -> str:
    if torch.isnan(values).any():
        return "contains NaN"
    if torch.isposinf(values).any():
        return "contains +inf"
    return "is all -inf (no token can be drawn)"


def sample_reference(logits: torch.Tensor, temperature=1.0, *, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The torch backend: the distribution written out with torch ops, in float64."""
    _check_scalars(logits, temperature, top_k, top_p, generator)
    min_p = _check_min_p(min_p)
    top_k = int(top_k)
    batch_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab).double()
    rows = z.shape[0]
    if isinstance(temperature, torch.Tensor):
        t = temperature.reshape(-1).to(device=z.device, dtype=torch.float64)
    else:
        t = torch.full((rows,), float(temperature), dtype=torch.float64, device=z.device)
    if rows == 0:
        return torch.empty(batch_shape, dtype=torch.long, device=logits.device)
    bad_t = ~((t >= 0) & torch.isfinite(t))
    if bad_t.any():
        row = int(bad_t.nonzero()[0, 0])
        raise ValueError(f"fastlstm.sample: temperature must be finite and >= 0; row {row} has "
                         f"{float(t[row])}")
    bad = torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | torch.isneginf(z).all(-1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"fastlstm.sample: logits row {row} {_row_reason(z[row])}")

    greedy = t == 0
    scaled = z / torch.where(greedy, torch.ones_like(t), t)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        probs = torch.where(scaled >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        total = sorted_probs.sum(-1, keepdim=True)
        keep_sorted = mass_before < top_p * total  # the first token is always kept
        smallest_kept = torch.where(keep_sorted, sorted_probs,
                                    torch.full_like(sorted_probs, math.inf)).min(-1, keepdim=True)
        probs = torch.where(probs >= smallest_kept.values, probs, torch.zeros_like(probs))
    if min_p > 0.0:
        # p >= min_p * max p, on the probabilities before renormalizing: the same ratio after.
        largest = probs.max(-1, keepdim=True).values
        probs = torch.where(probs >= min_p * largest, probs, torch.zeros_like(probs))
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tokens = torch.where(greedy, z.argmax(-1), tokens)
    return tokens.reshape(batch_shape)


def _sample_fake(logits, temperature, scalar_temperature, top_k, top_p, generator, min_p=0.0):
    return logits.new_empty(logits.shape[:-1], dtype=torch.long)


def _register_fake() -> None:
    if not _op_available():
        return
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    register("fastlstm::sample")(_sample_fake)


_register_fake()


class Sampler(nn.Module):
    """nn.Module holding sampling settings: forward(logits [..., V]) -> int64 [...].

    Args:
        temperature: float >= 0 (0 = greedy).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass in (0, 1] (1.0 = off).
        min_p: keep p >= min_p * max p, in [0, 1] (0.0 = off); after top_k and top_p.
        backend: as in `fastlstm.sample`.
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        _check_scalars(torch.empty(1), temperature, top_k, top_p)
        _check_min_p(min_p, "fastlstm.Sampler")
        _backends.check_backend_name(backend)
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.backend = backend

    def forward(self, logits: torch.Tensor, generator: torch.Generator | None = None):
        return sample(logits, self.temperature, top_k=self.top_k, top_p=self.top_p,
                      min_p=self.min_p, generator=generator, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p}")
