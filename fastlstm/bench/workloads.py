"""What each suite runs: a fastlstm call and the baselines a user would otherwise write.

Each builder returns a Workload: zero-argument callables over inputs made once, with the same
weights on both sides, plus the work done per call (tokens, FLOPs, bytes) from which floors and
rates follow. A builder raises Unavailable, with the reason, when the fastlstm side cannot run in
this install (a backend or a module missing): the suite records that instead of failing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable

import torch
from torch import nn

from .. import _backends
from .shapes import DecodeShape, LSTMShape, SampleShape

SAMPLE_TEMPERATURE = 0.8
DECODE_TEMPERATURE = 0.8


class Unavailable(Exception):
    """The fastlstm side of a comparison cannot run here; the message says why."""


@dataclasses.dataclass
class Workload:
    fastlstm: Callable[[], object]
    baselines: dict[str, Callable[[], object]]
    backend_ran: str
    work: dict
    calls_per_unit: int = 1  # decode: one call makes this many tokens; times are per token
    graph_safe: bool = False  # the callables may be captured in a CUDA graph


def dtype_from_name(name: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in names:
        raise ValueError(f"dtype must be one of {', '.join(sorted(names))}; got {name!r}")
    return names[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run, or Unavailable with the reason (never a silent fallback)."""
    if backend == "auto":
        return _backends.resolve("auto", device, dtype)
    reason = _backends.why_unavailable(backend, device)
    if reason is not None:
        raise Unavailable(f"backend {backend} unavailable: {reason}")
    if not _backends.supports_dtype(backend, device, dtype):
        raise Unavailable(f"backend {backend} does not support {dtype_name(dtype)} on "
                          f"{device.type}")
    return backend


def onednn_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuDNN" if torch.backends.cudnn.is_available() else "CUDA (no cuDNN)"
    return "oneDNN" if torch.backends.mkldnn.is_available() else "ATen"


def _lstm_pair(shape: LSTMShape, device, dtype, backend, baseline_dtype, regularizers=None):
    import fastlstm
    baseline = nn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers).to(
        device=device, dtype=baseline_dtype)
    fused = fastlstm.LSTM(shape.input_size, shape.hidden_size, shape.num_layers,
                          backend=backend, **(regularizers or {})).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, parameter in baseline.named_parameters():
            getattr(fused, name).copy_(parameter)  # same weights, cast to the fastlstm dtype
    return fused, baseline


def _lstm_workload(shape: LSTMShape, device, dtype, backend, baseline_dtype, *, training: bool,
                   step, flops: float, graph_safe: bool = False,
                   regularizers: dict | None = None) -> Workload:
    """fastlstm.LSTM against nn.LSTM with the same weights, each timed by step(model, dtype).
    With `regularizers` (fastlstm.LSTM keyword arguments), the fastlstm model has them on and
    the same model without them is a second baseline, timed in the same rounds."""
    device = torch.device(device)
    baseline_dtype = baseline_dtype or dtype
    ran = resolve_backend(backend, device, dtype)
    fused, baseline = _lstm_pair(shape, device, dtype, backend, baseline_dtype, regularizers)
    fused.train(training)
    baseline.train(training)
    baselines = {f"nn.LSTM ({onednn_name(device)})": step(baseline, baseline_dtype)}
    if regularizers:
        plain, _ = _lstm_pair(shape, device, dtype, backend, baseline_dtype)
        plain.load_state_dict(fused.state_dict())
        plain.train(training)
        baselines["fastlstm.LSTM (regularizers off)"] = step(plain, dtype)
        graph_safe = False  # masks are drawn on the host every forward
    return Workload(
        fastlstm=step(fused, dtype),
        baselines=baselines,
        backend_ran=ran,
        work={"tokens": shape.tokens, "flops": flops},
        graph_safe=graph_safe)


def train(shape: LSTMShape, device, dtype: torch.dtype, backend: str,
          baseline_dtype: torch.dtype | None = None, regularizers: dict | None = None) -> Workload:
    """Forward + backward of one sequence batch (input gradient included, as in a network whose
    LSTM sits on an embedding), against nn.LSTM with the same weights."""
    def step(model, model_dtype):
        inputs = torch.randn(shape.steps, shape.batch, shape.input_size, device=device,
                             dtype=model_dtype, requires_grad=True)
        grad_output = torch.randn(shape.steps, shape.batch, shape.hidden_size, device=device,
                                  dtype=model_dtype)
        parameters = list(model.parameters())

        def run():
            for parameter in parameters:
                parameter.grad = None
            inputs.grad = None
            output, _ = model(inputs)
            output.backward(grad_output)
        return run

    return _lstm_workload(shape, device, dtype, backend, baseline_dtype, training=True,
                          step=step, flops=shape.train_flops(), regularizers=regularizers)


def forward(shape: LSTMShape, device, dtype: torch.dtype, backend: str,
            baseline_dtype: torch.dtype | None = None) -> Workload:
    """Inference forward (no autograd graph) of one sequence batch against nn.LSTM."""
    def step(model, model_dtype):
        inputs = torch.randn(shape.steps, shape.batch, shape.input_size, device=device,
                             dtype=model_dtype)

        def run():
            with torch.no_grad():
                return model(inputs)[0]
        return run

    return _lstm_workload(shape, device, dtype, backend, baseline_dtype, training=False,
                          step=step, flops=shape.forward_flops(), graph_safe=True)


def softmax_multinomial(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sampling baseline: what text generation in PyTorch writes by default."""
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1)


def top_k_top_p_multinomial(logits: torch.Tensor, temperature: float, top_k: int,
                            top_p: float) -> torch.Tensor:
    """The filtered sampling baseline: the usual PyTorch top-k / top-p loop (topk for the k-th
    value, then sort, softmax and cumsum for the nucleus), softmax and torch.multinomial."""
    scaled = logits / temperature
    if top_k > 0:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, -1)
        # drop a token once the tokens before it already hold top_p (the first one stays)
        drop_sorted = torch.cumsum(sorted_probs, -1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, -1), 1)


FILTERED_BASELINE = "top-k/top-p sort + multinomial"


def sample(shape: SampleShape, device, dtype: torch.dtype, backend: str,
           baseline_dtype: torch.dtype | None = None) -> Workload:
    """fastlstm.sample against softmax + torch.multinomial on the same logits (with top-k /
    top-p: against the usual sort / cumsum filtering loop before them)."""
    import fastlstm
    device = torch.device(device)
    if not hasattr(fastlstm, "sample"):
        raise Unavailable("fastlstm.sample unavailable: this install of fastlstm has no sample()")
    if backend == "auto":
        ran = "auto"
    else:
        reason = _backends.why_unavailable(backend, device)
        if reason is not None:
            raise Unavailable(f"backend {backend} unavailable: {reason}")
        ran = backend
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    logits = 3 * torch.randn(shape.batch, shape.vocab, device=device, dtype=dtype,
                             generator=generator)
    base_logits = logits.to(baseline_dtype or dtype)
    sample_fn = fastlstm.sample
    top_k, top_p = shape.top_k, shape.top_p
    if shape.filtered:
        return Workload(
            fastlstm=lambda: sample_fn(logits, SAMPLE_TEMPERATURE, top_k=top_k, top_p=top_p,
                                       backend=backend),
            baselines={FILTERED_BASELINE: lambda: top_k_top_p_multinomial(
                base_logits, SAMPLE_TEMPERATURE, top_k, top_p)},
            backend_ran=ran,
            work={"bytes": logits.numel() * logits.element_size(), "rows": shape.batch},
            graph_safe=True)
    return Workload(
        fastlstm=lambda: sample_fn(logits, SAMPLE_TEMPERATURE, backend=backend),
        baselines={"softmax + multinomial": lambda: softmax_multinomial(base_logits,
                                                                         SAMPLE_TEMPERATURE)},
        backend_ran=ran,
        work={"bytes": logits.numel() * logits.element_size(), "rows": shape.batch},
        graph_safe=True)


def eager_decode_loop(embedding: nn.Embedding, lstm: nn.LSTM, head: nn.Linear,
                      prompt_ids: torch.Tensor, new_tokens: int, temperature: float) -> list[int]:
    """The baseline generation loop: one token in, the state carried, softmax, multinomial and
    .item() per token, as a PyTorch user writes it. lstm is batch_first."""
    state = None
    token = prompt_ids[:, -1:]
    with torch.no_grad():
        if prompt_ids.shape[1] > 1:  # prefill all but the last prompt token
            _, state = lstm(embedding(prompt_ids[:, :-1]))
        generated = []
        for _ in range(new_tokens):
            output, state = lstm(embedding(token), state)
            logits = head(output[:, -1])
            probabilities = torch.softmax(logits / temperature, -1)
            next_id = torch.multinomial(probabilities, 1).item()
            generated.append(next_id)
            token = torch.tensor([[next_id]], device=prompt_ids.device)
    return generated


def decode(shape: DecodeShape, device, dtype: torch.dtype, backend: str,
           baseline_dtype: torch.dtype | None = None, new_tokens: int = 64) -> Workload:
    """Per-token latency of fastlstm.lm.generate at batch 1 against the eager loop with the same
    weights, run as PyTorch runs it by default and (on the CPU) with oneDNN disabled."""
    device = torch.device(device)
    try:
        from .. import lm
        model_class, generate = lm.LSTMLanguageModel, lm.generate
    except (ImportError, AttributeError) as error:
        raise Unavailable(f"fastlstm.lm unavailable: {error}") from None
    if shape.batch != 1:
        raise ValueError(f"decode: the eager baseline feeds one sequence; got batch {shape.batch}")
    ran = resolve_backend(backend, device, dtype)
    model = model_class(shape.vocab, shape.embed, shape.hidden_size, shape.num_layers)
    model = model.to(device=device, dtype=dtype).eval()
    model.lstm.backend = backend
    baseline_dtype = baseline_dtype or dtype
    embedding = nn.Embedding(shape.vocab, shape.embed).to(device=device, dtype=baseline_dtype)
    lstm = nn.LSTM(shape.embed, shape.hidden_size, shape.num_layers, batch_first=True).to(
        device=device, dtype=baseline_dtype)
    head = nn.Linear(shape.hidden_size, shape.vocab).to(device=device, dtype=baseline_dtype)
    with torch.no_grad():
        embedding.weight.copy_(model.embedding.weight)
        head.weight.copy_(model.head.weight)
        head.bias.copy_(model.head.bias)
        for name, parameter in lstm.named_parameters():
            parameter.copy_(getattr(model.lstm, name))
    lstm.eval()
    prompt = torch.randint(shape.vocab, (1, 1), device=device)

    def fused():
        with torch.no_grad():
            return generate(model, prompt, new_tokens, temperature=DECODE_TEMPERATURE)

    def eager(onednn: bool):
        def run():
            # flags() is a one-shot context manager: make a fresh one per call
            context = (contextlib.nullcontext() if onednn
                       else torch.backends.mkldnn.flags(enabled=False))
            with warnings.catch_warnings():
                # flags() also resets oneDNN's TF32 switch, which warns on builds without XPU
                warnings.simplefilter("ignore", UserWarning)
                context.__enter__()
            try:
                return eager_decode_loop(embedding, lstm, head, prompt, new_tokens,
                                         DECODE_TEMPERATURE)
            finally:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    context.__exit__(None, None, None)
        return run

    baselines = {"eager loop": eager(True)}
    if device.type == "cpu":
        baselines["eager loop, oneDNN off"] = eager(False)
    element = torch.empty((), dtype=dtype).element_size()
    return Workload(
        fastlstm=fused, baselines=baselines, backend_ran=ran,
        work={"tokens": new_tokens, "bytes_per_token": shape.weight_elements() * element},
        calls_per_unit=new_tokens)


def quant(shape, device, dtype: torch.dtype, backend: str,
          baseline_dtype: torch.dtype | None = None, new_tokens: int = 64) -> Workload:
    """The quant suite (fastlstm/bench/quant.py): int8 / bf16 models from fastlstm.quantize."""
    from . import quant as quant_suite
    return quant_suite.build(shape, device, dtype, backend, baseline_dtype, new_tokens)


BUILDERS = {"train": train, "forward": forward, "sample": sample, "decode": decode, "quant": quant}
