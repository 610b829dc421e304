"""The `quant` suite: quantized CPU inference (fastlstm.quantize) against what a user runs today.

  decode   generate() on an int8 / bf16 LSTMLanguageModel at batch 1 (the C++ decode op), against
           fastlstm's own float32 generate() on the same model and, for int8, the same model under
           torch.ao's quantize_dynamic({nn.LSTM, nn.Linear}, qint8) run as the eager per-token loop
           the decode suite's baseline is (nn.LSTM step + Linear + softmax + multinomial + .item())
  forward  inference forward of a stacked LSTM ([T, B, I], no autograd), against torch.ao's
           dynamic int8 LSTM and nn.LSTM in float32

Opt-in: `fastlstm bench --suites quant` (the CPU only). Shapes: `--shapes quant=int8:decode:VxExHxL`
or `quant=bf16:forward:BxTxIxHxL`.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

WEIGHTS = {"int8": torch.qint8, "bf16": torch.bfloat16}
KINDS = {"decode": ("vocab", "embed", "hidden_size", "num_layers"),
         "forward": ("batch", "steps", "input_size", "hidden_size", "num_layers")}
TEMPERATURE = 0.8


@dataclasses.dataclass(frozen=True)
class QuantShape:
    """A quantized-inference problem: `kind` decode (sizes V, E, H, L at batch 1) or forward
    (sizes B, T, I, H, L), with `weights` int8 or bf16."""

    weights: str
    kind: str
    sizes: tuple

    @property
    def label(self) -> str:
        short = {"vocab": "V", "embed": "E", "hidden_size": "H", "num_layers": "L", "batch": "B",
                 "steps": "T", "input_size": "I"}
        dims = " ".join(f"{short[name]}={size}" for name, size in zip(KINDS[self.kind], self.sizes))
        return f"{self.weights} {self.kind} {dims}"

    @property
    def per_token(self) -> bool:
        return self.kind == "decode"

    def size(self, name: str) -> int:
        return self.sizes[KINDS[self.kind].index(name)]


def parse(text: str) -> QuantShape:
    """'int8:decode:10000x256x512x2' or 'bf16:forward:32x128x128x256x2'."""
    form = "WEIGHTS:KIND:SIZES with WEIGHTS int8|bf16, KIND decode (VxExHxL) or forward (BxTxIxHxL)"
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in WEIGHTS or parts[1] not in KINDS:
        raise ValueError(f"--shapes: quant shape {text!r} must be {form}")
    try:
        sizes = tuple(int(part) for part in parts[2].lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes: quant shape {text!r} must be {form}") from None
    if len(sizes) != len(KINDS[parts[1]]) or min(sizes) <= 0:
        raise ValueError(f"--shapes: quant shape {text!r} must be {form}")
    return QuantShape(parts[0], parts[1], sizes)


# The figures the quantized kernels are held to on the CPU (README, "Quantized inference").
CPU_SHAPES = tuple(QuantShape(weights, "decode", sizes)
                   for sizes in ((10000, 256, 512, 2), (65, 64, 256, 2))
                   for weights in ("int8", "bf16")) + tuple(
    QuantShape(weights, "forward", (32, 128, 128, 256, 2)) for weights in ("int8", "bf16"))
QUICK_SHAPES = (QuantShape("int8", "decode", (65, 16, 32, 1)),
                QuantShape("bf16", "decode", (65, 16, 32, 1)),
                QuantShape("int8", "forward", (2, 8, 8, 16, 1)))


def _ao_int8(module: nn.Module) -> nn.Module:
    """torch.ao's dynamic int8 quantization of every nn.LSTM / nn.Linear inside `module`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in recent torch
        return torch.ao.quantization.quantize_dynamic(module, {nn.LSTM, nn.Linear},
                                                      dtype=torch.qint8)


class _Stack(nn.Module):
    """A module holding the LSTM, so that quantize_dynamic (which converts children) takes it."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0]


def build(shape: QuantShape, device, dtype: torch.dtype, backend: str,
          baseline_dtype: torch.dtype | None = None, new_tokens: int = 64):
    """The quant suite's Workload for one shape (see the module docstring)."""
    from .workloads import Unavailable, Workload, eager_decode_loop
    import fastlstm
    device = torch.device(device)
    if device.type != "cpu":
        raise Unavailable("the quantized kernels run on the CPU only")
    if backend not in ("auto", "cpu"):
        raise Unavailable(f"quantized inference runs in the cpu backend's kernels, not {backend}")
    try:
        fastlstm.quant.kernel_names()
    except RuntimeError as error:
        raise Unavailable(str(error)) from None
    weights = WEIGHTS[shape.weights]
    ran = "cpu"
    if shape.kind == "decode":
        from .. import lm
        vocab, embed, hidden, layers = shape.sizes
        model = lm.LSTMLanguageModel(vocab, embed, hidden, layers).eval()
        quantized = fastlstm.quantize(model, weights)
        prompt = torch.randint(vocab, (1, 1))

        def run(which):
            def call():
                with torch.no_grad():
                    return lm.generate(which, prompt, new_tokens, temperature=TEMPERATURE)
            return call

        baselines = {"fastlstm float32": run(model)}
        if shape.weights == "int8":
            eager = nn.Module()
            eager.embedding = nn.Embedding(vocab, embed)
            eager.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
            eager.head = nn.Linear(hidden, vocab)
            eager.load_state_dict(model.state_dict())
            eager = _ao_int8(eager.eval())

            def eager_loop():
                return eager_decode_loop(eager.embedding, eager.lstm, eager.head, prompt,
                                         new_tokens, TEMPERATURE)
            baselines["eager loop, torch.ao int8"] = eager_loop
        element = 1 if shape.weights == "int8" else 2
        weight_elements = 4 * hidden * (embed + hidden) + 4 * hidden * 2 * hidden * (layers - 1) \
            + vocab * hidden
        return Workload(fastlstm=run(quantized), baselines=baselines, backend_ran=ran,
                        work={"tokens": new_tokens, "bytes_per_token": weight_elements * element},
                        calls_per_unit=new_tokens)
    batch, steps, input_size, hidden, layers = shape.sizes
    lstm = nn.LSTM(input_size, hidden, layers).eval()
    quantized = fastlstm.quantize(lstm, weights)
    ao = _ao_int8(_Stack(lstm).eval())
    inputs = torch.randn(steps, batch, input_size)

    def forward(module, unwrap):
        def call():
            with torch.no_grad():
                out = module(inputs)
                return out[0] if unwrap else out
        return call

    flops = 0
    for layer in range(layers):
        flops += 2 * steps * batch * 4 * hidden * ((input_size if layer == 0 else hidden) + hidden)
    return Workload(
        fastlstm=forward(quantized, True),
        baselines={"torch.ao int8 LSTM": forward(ao, False),
                   "nn.LSTM float32": forward(lstm, True)},
        backend_ran=ran, work={"tokens": steps * batch, "flops": flops})
