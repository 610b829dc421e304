"""Let torch.compile trace fastlstm.LSTM without a graph break.

Dynamo refuses to trace any nn.LSTM instance unless torch._dynamo.config.allow_rnn is set, because
nn.LSTM's fused ATen op does not survive compilation (with allow_rnn=True, compiling a plain
nn.LSTM with inductor fails on the CPU in torch 2.14). fastlstm.LSTM only calls ops that carry fake
kernels and autograd formulas, so for *its* instances, and only those, we answer as allow_rnn=True
would. Plain nn.LSTM keeps Dynamo's default behaviour; the global flag is never changed.

Dynamo is imported lazily by torch.compile (and costs seconds to import), so the adjustment is
applied when torch._dynamo.variables.builder is first imported, or at once if it already is.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_BUILDER = "torch._dynamo.variables.builder"


def _patch(builder_module) -> None:
    builder = getattr(builder_module, "VariableBuilder", None)
    original = getattr(builder, "wrap_module", None)
    if original is None or getattr(original, "_fastlstm", False):
        return
    try:
        from torch._dynamo import config
    except ImportError:
        return
    if not hasattr(config, "allow_rnn"):
        return

    def wrap_module(self, value):
        from .lstm import LSTM
        if isinstance(value, LSTM) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._fastlstm = True
    wrap_module.__wrapped__ = original
    builder.wrap_module = wrap_module


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _BUILDER:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)

        loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if _BUILDER in sys.modules:
        _patch(sys.modules[_BUILDER])
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
