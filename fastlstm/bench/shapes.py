"""The shapes each benchmark suite measures, in one place.

`fastlstm bench`, the pytest-benchmark suites in benchmarks/ and benchmarks/gpu_check.sh all read
them from here, so a figure in BENCHMARKS.md and a pytest-benchmark run measure the same problem.
"""
from __future__ import annotations

import dataclasses
import itertools


@dataclasses.dataclass(frozen=True)
class LSTMShape:
    """A training or forward problem: nn.LSTM(input_size, hidden_size, num_layers) on [T, B, I]."""

    batch: int
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int = 1

    @property
    def label(self) -> str:
        return (f"B={self.batch} T={self.steps} I={self.input_size} H={self.hidden_size} "
                f"L={self.num_layers}")

    @property
    def tokens(self) -> int:
        return self.batch * self.steps

    def forward_flops(self) -> int:
        """Multiply-adds x 2 of the forward pass: input projection and recurrence of every layer."""
        flops = 0
        for layer in range(self.num_layers):
            inputs = self.input_size if layer == 0 else self.hidden_size
            flops += 2 * self.tokens * 4 * self.hidden_size * (inputs + self.hidden_size)
        return flops

    def train_flops(self) -> int:
        """Forward + backward: the backward pass does two GEMMs (data and weight gradients) for
        each forward GEMM, so three times the forward work. Pointwise gate math is left out: it
        is O(H) per token against O(H^2)."""
        return 3 * self.forward_flops()


@dataclasses.dataclass(frozen=True)
class SampleShape:
    """A sampling problem: logits [B, V], optionally filtered by top-k / top-p."""

    batch: int
    vocab: int
    top_k: int = 0
    top_p: float = 1.0

    # --shapes gives B and V only; the filtered rows are the default shapes'
    PARSED_FIELDS = 2

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def label(self) -> str:
        text = f"B={self.batch} V={self.vocab}"
        if self.top_k:
            text += f" top-k={self.top_k}"
        if self.top_p < 1.0:
            text += f" top-p={self.top_p:g}"
        return text


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """A batch-1 generation problem: Embedding(V, E) -> LSTM(E, H, L) -> Linear(H, V) -> draw."""

    vocab: int
    embed: int
    hidden_size: int
    num_layers: int
    batch: int = 1

    @property
    def label(self) -> str:
        text = f"V={self.vocab} E={self.embed} H={self.hidden_size} L={self.num_layers}"
        return text if self.batch == 1 else f"{text} B={self.batch}"

    def weight_elements(self) -> int:
        """Elements a decode step must read: one embedding row, every layer's W_ih, W_hh and
        biases, and the output head (weight and bias)."""
        count = self.embed
        for layer in range(self.num_layers):
            inputs = self.embed if layer == 0 else self.hidden_size
            count += 4 * self.hidden_size * (inputs + self.hidden_size) + 8 * self.hidden_size
        count += self.vocab * self.hidden_size + self.vocab
        return count


SUITES = ("train", "forward", "decode", "sample")
# Suites run only when named with --suites: quant (quantized CPU inference,
# fastlstm/bench/quant.py).
OPT_IN_SUITES = ("quant",)

# This machine's (CPU) figures, as the performance goals state them.
CPU_TRAIN = (
    LSTMShape(32, 128, 128, 256, 2),
    LSTMShape(16, 256, 512, 512, 1),
    LSTMShape(64, 64, 128, 128, 1),
    LSTMShape(8, 200, 64, 128, 2),
)
# Filtered rows (top-k 50, top-p 0.9) sit beside the plain ones of the same B and V.
FILTER_TOP_K, FILTER_TOP_P = 50, 0.9
CPU_SAMPLE = (SampleShape(1, 65), SampleShape(1, 33278), SampleShape(64, 33278),
              SampleShape(8, 128256),
              SampleShape(1, 33278, FILTER_TOP_K, FILTER_TOP_P),
              SampleShape(64, 33278, FILTER_TOP_K, FILTER_TOP_P))
CPU_DECODE = (DecodeShape(65, 64, 256, 2), DecodeShape(10000, 256, 512, 2))

# The GPU grid: training for every (B, T, H) below with I = H, one layer.
GPU_GRID_BATCH = (1, 8, 16, 64, 256)
GPU_GRID_STEPS = (128, 1024)
GPU_GRID_HIDDEN = (256, 768, 1024)
# Headline shapes first, so a run cut short by a time limit still has them: FlashRNN's (B=16,
# T=1024, H=768) and the small-batch shapes where a persistent kernel should beat cuDNN.
GPU_TRAIN_HEADLINE = (
    LSTMShape(16, 1024, 768, 768, 1),
    LSTMShape(16, 1024, 256, 256, 1),
    LSTMShape(16, 1024, 512, 512, 1),
    LSTMShape(16, 1024, 1024, 1024, 1),
    LSTMShape(8, 1024, 512, 512, 1),
    LSTMShape(1, 1024, 512, 512, 1),
)
GPU_TRAIN_GRID = tuple(
    LSTMShape(batch, steps, hidden, hidden, 1)
    for hidden, steps, batch in itertools.product(GPU_GRID_HIDDEN, GPU_GRID_STEPS, GPU_GRID_BATCH))
GPU_SAMPLE = (SampleShape(64, 128256), SampleShape(1, 128256), SampleShape(1, 65),
              SampleShape(64, 33278), SampleShape(8, 262144),
              SampleShape(1, 128256, FILTER_TOP_K, FILTER_TOP_P),
              SampleShape(64, 128256, FILTER_TOP_K, FILTER_TOP_P))
GPU_DECODE = (DecodeShape(65, 64, 1024, 2), DecodeShape(65, 64, 256, 2),
              DecodeShape(10000, 256, 512, 2))

# --quick: tiny problems that run in seconds even on the torch reference backend.
QUICK_TRAIN = (LSTMShape(4, 16, 16, 32, 1), LSTMShape(2, 8, 8, 16, 2))
QUICK_SAMPLE = (SampleShape(1, 65), SampleShape(4, 1000),
                SampleShape(4, 1000, FILTER_TOP_K, FILTER_TOP_P))
QUICK_DECODE = (DecodeShape(65, 16, 32, 1),)


def default_shapes(suite: str, device: str, quick: bool = False) -> tuple:
    """The shapes a suite measures by default on a device type ("cpu" or "cuda")."""
    if suite == "quant":
        from . import quant
        return quant.QUICK_SHAPES if quick else quant.CPU_SHAPES
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}; got {suite!r}")
    if quick:
        return {"train": QUICK_TRAIN, "forward": QUICK_TRAIN, "decode": QUICK_DECODE,
                "sample": QUICK_SAMPLE}[suite]
    if device == "cuda":
        return {"train": GPU_TRAIN_HEADLINE + GPU_TRAIN_GRID,
                "forward": GPU_TRAIN_HEADLINE, "decode": GPU_DECODE, "sample": GPU_SAMPLE}[suite]
    return {"train": CPU_TRAIN, "forward": CPU_TRAIN, "decode": CPU_DECODE,
            "sample": CPU_SAMPLE}[suite]


_SHAPE_FIELDS = {"train": (LSTMShape, "BxTxIxHxL or BxTxIxH"),
                 "forward": (LSTMShape, "BxTxIxHxL or BxTxIxH"),
                 "sample": (SampleShape, "BxV"),
                 "decode": (DecodeShape, "VxExHxL or VxExHxLxB")}


def parse_shape(suite: str, text: str):
    """Parse one shape of `suite` written as numbers joined by 'x' (e.g. train '16x1024x768x768x1')."""
    if suite == "quant":
        from . import quant
        return quant.parse(text)
    if suite not in _SHAPE_FIELDS:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}; got {suite!r}")
    kind, form = _SHAPE_FIELDS[suite]
    try:
        numbers = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"--shapes: {suite} shape {text!r} must be {form} (positive integers "
                         f"joined by 'x')") from None
    required = len([f for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING])
    total = getattr(kind, "PARSED_FIELDS", len(dataclasses.fields(kind)))
    if not required <= len(numbers) <= total or min(numbers) <= 0:
        raise ValueError(f"--shapes: {suite} shape {text!r} must be {form} (positive integers "
                         f"joined by 'x')")
    return kind(*numbers)


def parse_shapes_option(values: list[str]) -> dict[str, tuple]:
    """--shapes SUITE=SHAPE[,SHAPE...] (repeatable) -> {suite: shapes}; 'gpu-grid' names the
    whole GPU training grid and 'gpu-headline' its headline shapes."""
    chosen: dict[str, list] = {}
    for value in values:
        suite, sep, rest = value.partition("=")
        suite = suite.strip()
        if not sep or suite not in SUITES + OPT_IN_SUITES or not rest.strip():
            raise ValueError(f"--shapes expects SUITE=SHAPE[,SHAPE...] with SUITE one of "
                             f"{', '.join(SUITES + OPT_IN_SUITES)}; got {value!r}")
        for text in rest.split(","):
            text = text.strip()
            if text in ("gpu-grid", "gpu-headline"):
                if suite not in ("train", "forward"):
                    raise ValueError(f"--shapes: {text} names training shapes; got it for {suite}")
                chosen.setdefault(suite, []).extend(
                    GPU_TRAIN_GRID if text == "gpu-grid" else GPU_TRAIN_HEADLINE)
            elif text:
                chosen.setdefault(suite, []).append(parse_shape(suite, text))
    return {suite: tuple(dict.fromkeys(shapes)) for suite, shapes in chosen.items()}
