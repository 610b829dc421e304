"""`fastlstm bench`: fastlstm against what a PyTorch user would otherwise run, side by side.

Suites (see DESIGN.md, "Benchmarks"):
  train    forward + backward of fastlstm.LSTM against nn.LSTM (oneDNN on the CPU, cuDNN on CUDA)
  forward  inference forward, same baseline
  decode   per-token latency of fastlstm.lm.generate at batch 1 against the eager
           nn.LSTM + nn.Linear + softmax + torch.multinomial + .item() loop (on the CPU also with
           oneDNN disabled), beside the floor: the step's weight bytes over memory bandwidth
  sample   fastlstm.sample against torch.multinomial(torch.softmax(z / T, -1), 1), beside the
           floor: logits bytes over memory bandwidth
  quant    (only when named) int8 / bf16 models from fastlstm.quantize on the CPU: decode against
           fastlstm float32 and the torch.ao int8 eager loop, forward against torch.ao's int8 LSTM

Every comparison is timed interleaved and reported as the median of per-round ratios; records go
to benchmarks/results/ as JSON lines (records.py holds the schema), tables to the terminal, and
--plot / --markdown / --update-doc redraw plots and BENCHMARKS.md from recorded results.
"""
from . import plot, records, report, runner, shapes, timing, workloads  # noqa: F401
from .cli import main

__all__ = ["main", "shapes", "workloads", "timing", "records", "report", "plot", "runner"]
