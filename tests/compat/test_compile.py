"""torch.compile of models holding fastlstm modules: one graph, same results as eager.

Dynamo refuses to trace any nn.LSTM instance unless torch._dynamo.config.allow_rnn is set;
fastlstm answers as allow_rnn=True would for its own LSTM instances only, so these tests compile
without the flag, as a user would.
"""
import importlib.util

import pytest
import torch
from torch import nn

import fastlstm

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

# The module behind each fused backend; a backend can be available (triton importable) before its
# kernels are part of the package, and is skipped, with that reason, until they are.
_BACKEND_MODULES = {"triton": "fastlstm.lstm.triton.recurrence", "cpu": "fastlstm.lstm.ops",
                    "cuda": "fastlstm.lstm.ops"}


def _backends(device, exclude=()):
    if device == "cuda" and not torch.cuda.is_available():
        return [pytest.param("cuda", marks=pytest.mark.cuda)]
    params = []
    for name in fastlstm.available_backends(device):
        if name in exclude:
            continue
        module = _BACKEND_MODULES.get(name)
        missing = module is not None and importlib.util.find_spec(module) is None
        params.append(pytest.param(name, marks=pytest.mark.skipif(
            missing, reason=f"backend {name}: {module} is not part of this build")))
    return params


CPU_BACKENDS = _backends("cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sizes(backend):
    # The Triton interpreter runs every program in Python: keep its shapes tiny.
    if backend == "triton":
        return dict(batch=2, steps=3, input_size=3, hidden=4)
    return dict(batch=3, steps=3, input_size=6, hidden=7)


class Tagger(nn.Module):
    """Linear -> 2-layer bidirectional LSTM with projection -> Linear, returning every state."""

    def __init__(self, input_size, hidden, backend, num_layers=2, bidirectional=True):
        super().__init__()
        directions = 2 if bidirectional else 1
        self.embed = nn.Linear(input_size, input_size)
        self.lstm = fastlstm.LSTM(input_size, hidden, num_layers=num_layers,
                                  bidirectional=bidirectional, batch_first=True,
                                  proj_size=hidden - 1, backend=backend)
        self.head = nn.Linear(directions * (hidden - 1), 3)

    def forward(self, x, hx=None):
        out, (h, c) = self.lstm(torch.tanh(self.embed(x)), hx)
        return self.head(out), h, c


class CellLoop(nn.Module):
    """An LSTMCell unrolled over a fixed number of steps, as in a decoder."""

    def __init__(self, input_size, hidden, backend):
        super().__init__()
        self.cell = fastlstm.LSTMCell(input_size, hidden, backend=backend)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for step in range(x.shape[0]):
            h, c = self.cell(x[step], (h, c))
            outputs.append(self.head(h))
        return torch.stack(outputs), c


def _forward_backward(run, model, x):
    """Outputs, and gradients of a fixed weighted sum of them w.r.t. every parameter and x."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    outputs = run(x)
    loss = sum((out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64,
                                              device=out.device)
                .reshape(out.shape)).sum() for out in outputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["input"] = x.grad.clone()
    return [out.detach() for out in outputs], grads


def _assert_close(eager, compiled, atol, rtol):
    eager_out, eager_grads = eager
    comp_out, comp_grads = compiled
    for index, (a, b) in enumerate(zip(eager_out, comp_out)):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m: f"output {index}: {m}")
    assert eager_grads.keys() == comp_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], atol=atol, rtol=rtol,
                                   msg=lambda m: f"grad of {name}: {m}")


def _check_model(model, x, compiler, atol, rtol):
    eager = _forward_backward(model, model, x)
    counter = CompileCounterWithBackend(compiler)
    compiled_model = torch.compile(model, fullgraph=True, backend=counter)
    compiled = _forward_backward(compiled_model, model, x)
    # fullgraph=True raises on any graph break; one frame means one graph for the whole model.
    assert counter.frame_count == 1, f"compiled {counter.frame_count} frames, expected 1"
    _assert_close(eager, compiled, atol, rtol)
    return counter


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lstm_model_fullgraph_aot_eager(backend):
    """AOTAutograd traces forward and backward through the fake kernels: results equal eager."""
    s = _sizes(backend)
    model = Tagger(s["input_size"], s["hidden"], backend)
    x = torch.randn(s["batch"], s["steps"], s["input_size"])
    _check_model(model, x, "aot_eager", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lstm_with_initial_state_fullgraph(backend):
    s = _sizes(backend)
    model = Tagger(s["input_size"], s["hidden"], backend)
    x = torch.randn(s["batch"], s["steps"], s["input_size"])
    hx = (torch.randn(4, s["batch"], s["hidden"] - 1), torch.randn(4, s["batch"], s["hidden"]))
    eager = model(x, hx)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, hx)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_model_fullgraph_aot_eager(backend):
    s = _sizes(backend)
    model = CellLoop(s["input_size"], s["hidden"], backend)
    x = torch.randn(s["steps"], s["batch"], s["input_size"])
    _check_model(model, x, "aot_eager", atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # inductor's C++ code generation takes about a minute on two cores
@pytest.mark.parametrize("backend", _backends("cpu", exclude=("triton",)))
def test_lstm_inductor(backend):
    """Inductor generates code around the LSTM: same outputs and gradients as eager to fp32
    rounding (it fuses and reorders the pointwise ops, so not bitwise)."""
    model = Tagger(5, 6, backend, num_layers=1, bidirectional=False)
    _check_model(model, torch.randn(2, 3, 5), "inductor", atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dynamic_sequence_length(backend):
    """dynamic=True over several lengths: correct for every length; the fused backends run the
    whole recurrence as one op per layer and compile once, while the torch backend is a Python
    loop over time steps that dynamo unrolls, so it specializes on the length."""
    s = _sizes(backend)
    model = Tagger(s["input_size"], s["hidden"], backend, num_layers=1, bidirectional=False)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    # Lengths unlike every other size, so dynamo's duck sizing never ties the length to one.
    other_sizes = {s["batch"], s["input_size"], s["hidden"], s["hidden"] - 1}
    lengths = [n for n in range(2, 20) if n not in other_sizes][:3]
    for steps in lengths:
        x = torch.randn(s["batch"], steps, s["input_size"])
        for a, b in zip(model(x), compiled(x)):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    if backend == "torch":
        assert counter.frame_count == len(lengths), counter.frame_count
    else:
        assert counter.frame_count == 1, (
            f"{backend}: {counter.frame_count} compiles for {len(lengths)} lengths")


def test_no_flag_needed_and_plain_nn_lstm_unchanged():
    """fastlstm.LSTM compiles without allow_rnn; a plain nn.LSTM keeps Dynamo's own refusal
    (the global flag is untouched)."""
    assert not torch._dynamo.config.allow_rnn
    model = Tagger(3, 4, "torch")
    x = torch.randn(1, 2, 3)
    for a, b in zip(model(x), torch.compile(model, fullgraph=True, backend="eager")(x)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    plain = nn.LSTM(3, 4)
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        torch.compile(plain, fullgraph=True, backend="eager")(torch.randn(2, 1, 3))


def test_sample_fullgraph():
    sample = getattr(fastlstm, "sample", None)
    if sample is None:
        pytest.skip("fastlstm.sample is not part of this build")
    logits = torch.randn(4, 11)
    greedy = torch.compile(lambda z: sample(z, temperature=0.0), fullgraph=True,
                           backend="aot_eager")
    assert torch.equal(greedy(logits), logits.argmax(-1))
    top1 = torch.compile(lambda z: sample(z, temperature=1.0, top_k=1), fullgraph=True,
                         backend="aot_eager")
    assert torch.equal(top1(logits), logits.argmax(-1))
    drawn = torch.compile(lambda z: sample(z, temperature=1.0), fullgraph=True,
                          backend="aot_eager")(logits)
    assert drawn.dtype == torch.int64 and drawn.shape == (4,)
    assert bool(((drawn >= 0) & (drawn < 11)).all())


def test_language_model_fullgraph():
    lm = pytest.importorskip("fastlstm.lm", reason="fastlstm.lm is not part of this build")
    model = lm.LSTMLanguageModel(vocab_size=13, embed_dim=5, hidden_size=6, num_layers=2)
    ids = torch.randint(0, 13, (2, 4))
    logits, (h, c) = model(ids)
    compiled_logits, (compiled_h, compiled_c) = torch.compile(
        model, fullgraph=True, backend="aot_eager")(ids)
    torch.testing.assert_close(compiled_logits, logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled_h, h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled_c, c, atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _backends("cuda"))
def test_lstm_model_fullgraph_cuda(backend):
    model = Tagger(16, 32, backend).cuda()
    x = torch.randn(4, 9, 16, device="cuda")
    _check_model(model, x, "aot_eager", atol=1e-5, rtol=1e-5)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for steps in (5, 6, 9, 12):
        compiled(torch.randn(4, steps, 16, device="cuda"))
    expected = 4 if backend == "torch" else 1
    assert counter.frame_count == expected


@pytest.mark.parametrize("backend", _backends("cpu", exclude=("triton", "torch")))
def test_packed_input_with_state_compiles_for_new_batch_sizes(backend):
    """Packed input with an initial state: the batch size read from batch_sizes is
    data-dependent when the trace has dynamic shapes (the second batch size recompiles with
    them); results equal eager's, and an hx of the wrong batch size still raises."""
    from torch.nn.utils.rnn import pack_padded_sequence
    model = fastlstm.LSTM(4, 6, batch_first=True, backend=backend)
    compiled = torch.compile(model, fullgraph=True)
    for batch, steps in ((5, 6), (4, 7), (3, 5)):
        lengths = sorted((steps - i % steps for i in range(batch)), reverse=True)
        packed = pack_padded_sequence(torch.randn(batch, steps, 4), torch.tensor(lengths),
                                      batch_first=True)
        hx = (torch.randn(1, batch, 6), torch.randn(1, batch, 6))
        expected = model(packed, hx)
        got = compiled(packed, hx)
        torch.testing.assert_close(got[0].data, expected[0].data, atol=1e-6, rtol=1e-6)
        for a, b in zip(got[1], expected[1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    wrong = (torch.randn(1, batch + 1, 6), torch.randn(1, batch + 1, 6))
    with pytest.raises(RuntimeError):
        compiled(packed, wrong)


def test_backend_change_after_compile_is_seen():
    """The backend choice is a compile-time constant guarded on the module's `backend`:
    changing it recompiles (here to a backend that cannot run, which must raise)."""
    model = fastlstm.LSTM(3, 4, backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(compiled(x)[0], model(x)[0])
    unavailable = [name for name in ("cuda", "cpu", "triton")
                   if name not in fastlstm.available_backends("cpu")]
    if not unavailable:
        pytest.skip("every backend runs on the CPU here")
    model.backend = unavailable[0]
    with pytest.raises(RuntimeError, match="cannot run here"):
        compiled(x)
