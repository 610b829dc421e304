"""ONNX export and TorchScript tracing see nn.LSTM's own graph.

fastlstm.LSTM falls back to nn.LSTM.forward while tracing or exporting, so exporters emit the same
graph (onnx::LSTM) they emit for nn.LSTM. torch.onnx.export needs the `onnx` package even with the
TorchScript-based exporter (dynamo=False), and onnxruntime to run the result: each part skips, with
that reason, where its package is absent. The ONNX graph itself is compared through the
TorchScript exporter's model-to-graph step, which needs neither.
"""
import io
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm.lstm import modules


class Model(nn.Module):
    def __init__(self, lstm_class, bidirectional=True, proj_size=0):
        super().__init__()
        self.lstm = lstm_class(4, 6, num_layers=2, batch_first=True, bidirectional=bidirectional,
                               proj_size=proj_size)
        out_size = (proj_size or 6) * (2 if bidirectional else 1)
        self.head = nn.Linear(out_size, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.head(out), h, c


def _pair(**kwargs):
    torch.manual_seed(0)
    reference = Model(nn.LSTM, **kwargs).eval()
    fast = Model(fastlstm.LSTM, **kwargs).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _node_signature(graph):
    """Each node as text (kind, attributes, input and output types) without value names, scopes,
    source locations or module class names, which differ between the two models by design."""
    signature = []
    for node in graph.nodes():
        text = str(node).split(" # ")[0].split(", scope:")[0].strip()
        text = re.sub(r"__torch__\.[\w.]+", "<module>", text)  # the traced modules' classes
        signature.append(re.sub(r"%[\w.:]+", "%", text))
    return signature


def test_fused_path_is_bypassed_while_exporting(monkeypatch):
    """Under export, forward must not reach the fused stack at all."""
    reference, fast = _pair()

    def fail(*args, **kwargs):
        raise AssertionError("the fused stack ran during export")

    monkeypatch.setattr(modules, "lstm_stack", fail)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    x = torch.randn(2, 5, 4)
    for a, b in zip(reference(x), fast(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(), dict(bidirectional=False, proj_size=3)])
def test_trace_graph_equals_nn_lstm(kwargs):
    reference, fast = _pair(**kwargs)
    x = torch.randn(2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in recent torch
        traced_reference = torch.jit.trace(reference, (x,))
        traced_fast = torch.jit.trace(fast, (x,))
    assert _node_signature(traced_fast.inlined_graph) == _node_signature(
        traced_reference.inlined_graph)
    kinds = [node.kind() for node in traced_fast.inlined_graph.nodes()]
    assert "aten::lstm" in kinds
    # The traced graph runs nn.LSTM's op, so other lengths work and match eager fastlstm.
    longer = torch.randn(3, 7, 4)
    for a, b in zip(traced_fast(longer), fast(longer)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


class PackedLastState(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, inputs, lengths):
        packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        return self.lstm(packed)[1][0]


def test_trace_packed_sequence_matches():
    torch.manual_seed(0)
    reference = PackedLastState(nn.LSTM(3, 5, batch_first=True))
    fast = PackedLastState(fastlstm.LSTM(3, 5, batch_first=True))
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(3, 4, 3)
    lengths = torch.tensor([4, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced_reference = torch.jit.trace(reference, (x, lengths))
        traced = torch.jit.trace(fast, (x, lengths))
    assert _node_signature(traced.inlined_graph) == _node_signature(traced_reference.inlined_graph)
    torch.testing.assert_close(traced(x, lengths), reference(x, lengths), atol=1e-6, rtol=1e-6)


def _model_to_graph():
    """The TorchScript exporter's model-to-ONNX-graph step (a private function; its module moved
    between torch releases)."""
    for path in ("torch.onnx._internal.torchscript_exporter.utils", "torch.onnx.utils"):
        try:
            module = __import__(path, fromlist=["_model_to_graph"])
        except ImportError:
            continue
        function = getattr(module, "_model_to_graph", None)
        if function is not None:
            return function
    pytest.skip("this torch has no TorchScript ONNX exporter (_model_to_graph)")


@pytest.mark.parametrize("kwargs", [dict(), dict(bidirectional=False)])
def test_onnx_graph_equals_nn_lstm(kwargs):
    to_graph = _model_to_graph()
    reference, fast = _pair(**kwargs)
    x = torch.randn(2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference_graph = to_graph(reference, (x,))[0]
        fast_graph = to_graph(fast, (x,))[0]
    assert _node_signature(fast_graph) == _node_signature(reference_graph)
    assert "onnx::LSTM" in [node.kind() for node in fast_graph.nodes()]


def test_onnx_proj_size_fails_as_for_nn_lstm():
    """ONNX's LSTM has no projection: nn.LSTM with proj_size cannot be exported; neither can
    fastlstm.LSTM, with the same error."""
    to_graph = _model_to_graph()
    reference, fast = _pair(bidirectional=False, proj_size=3)
    x = torch.randn(2, 5, 4)
    errors = []
    for model in (reference, fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(Exception) as info:
                to_graph(model, (x,))
        errors.append(info.type)
    assert errors[0] is errors[1]


def test_onnx_export_and_run():
    onnx = pytest.importorskip("onnx", reason="torch.onnx.export (also with dynamo=False) needs "
                                              "the onnx package, which is not installed")
    reference, fast = _pair()
    x = torch.randn(2, 5, 4)
    exported = []
    for model in (reference, fast):
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
        exported.append(onnx.load_from_string(buffer.getvalue()))
    graphs = [[(n.op_type, list(n.input), list(n.output)) for n in m.graph.node] for m in exported]
    assert graphs[0] == graphs[1]
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = ort.InferenceSession(exported[1].SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})
    for a, b in zip(fast(x), got):
        torch.testing.assert_close(torch.from_numpy(b), a.detach(), atol=1e-5, rtol=1e-5)
