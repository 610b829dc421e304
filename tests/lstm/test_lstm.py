"""Conformance of fastlstm.LSTM / LSTMCell with nn.LSTM / nn.LSTMCell, for every CPU backend.

Each case builds both modules with the same weights and compares outputs, h_n, c_n and the
gradients of the input, h_0, c_0 and every parameter (tolerances in tests/helpers.py).
"""
from __future__ import annotations

import itertools
import pickle
import warnings

import pytest
import torch
from torch import nn

import fastlstm
from helpers import (TOLERANCES, assert_close, cpu_backends, fixed_weights, make_packed,
                     matched_lstm, run_and_grad)

BACKENDS = cpu_backends()
# Every backend runs the full grid, the Triton interpreter included (tiny shapes keep it quick).
SLOW_BACKENDS: set = set()

INPUT_KINDS = ("dense", "packed_sorted", "packed_unsorted", "unbatched")
FULL_GRID = list(itertools.product((1, 2, 3), (False, True), (False, True), (0, 3), (True, False),
                                   INPUT_KINDS))


def _covering_subset(grid):
    """A small subset that covers every value of every factor and every (kind, proj, bidir) triple."""
    chosen, seen = [], set()
    for case in grid:
        layers, bidirectional, batch_first, proj, bias, kind = case
        key = (kind, proj, bidirectional)
        if key not in seen:
            seen.add(key)
            chosen.append(case)
    # Make sure 3 layers, batch_first and bias=False each appear.
    chosen.append((3, True, True, 3, False, "packed_unsorted"))
    chosen.append((2, False, True, 0, False, "dense"))
    return chosen


def _grid_params():
    params = []
    for backend in BACKENDS:
        cases = _covering_subset(FULL_GRID) if backend in SLOW_BACKENDS else FULL_GRID
        for case in cases:
            params.append(pytest.param(backend, *case, id=f"{backend}-L{case[0]}-"
                                       f"{'bi' if case[1] else 'uni'}-{'bf' if case[2] else 'tf'}-"
                                       f"p{case[3]}-{'b' if case[4] else 'nob'}-{case[5]}"))
    return params


def _inputs(kind, batch_first, steps, batch, input_size, dtype, hidden, proj, layers, directions,
            with_hx=True):
    generator = torch.Generator().manual_seed(1234)
    real_hidden = proj or hidden
    if kind == "unbatched":
        x = torch.randn(steps, input_size, dtype=dtype, generator=generator)
        hx = (torch.randn(layers * directions, real_hidden, dtype=dtype, generator=generator),
              torch.randn(layers * directions, hidden, dtype=dtype, generator=generator))
    else:
        x = torch.randn(steps, batch, input_size, dtype=dtype, generator=generator)
        hx = (torch.randn(layers * directions, batch, real_hidden, dtype=dtype, generator=generator),
              torch.randn(layers * directions, batch, hidden, dtype=dtype, generator=generator))
    if kind in ("packed_sorted", "packed_unsorted"):
        lengths = sorted([steps, steps - 1, 1, steps - 2][:batch], reverse=True)
        if kind == "packed_unsorted":
            lengths = [lengths[2], lengths[0], lengths[3], lengths[1]][:batch]
        x = x.requires_grad_()
        packed = make_packed(x.detach(), lengths, enforce_sorted=kind == "packed_sorted")
        packed.data.requires_grad_()
        inputs = packed
    else:
        if batch_first and kind == "dense":
            x = x.transpose(0, 1).contiguous()
        inputs = x.requires_grad_()
    if not with_hx:
        return inputs, None
    return inputs, tuple(t.requires_grad_() for t in hx)


def _clone_inputs(inputs, hx):
    from torch.nn.utils.rnn import PackedSequence
    if isinstance(inputs, PackedSequence):
        cloned = PackedSequence(inputs.data.detach().clone().requires_grad_(), inputs.batch_sizes,
                                inputs.sorted_indices, inputs.unsorted_indices)
    else:
        cloned = inputs.detach().clone().requires_grad_()
    return cloned, None if hx is None else tuple(t.detach().clone().requires_grad_() for t in hx)


def _compare(backend, dtype, layers, bidirectional, batch_first, proj, bias, kind, *, steps=4,
             batch=4, input_size=3, hidden=5, with_hx=True):
    ours, theirs = matched_lstm(backend, dtype, input_size=input_size, hidden_size=hidden,
                                num_layers=layers, bias=bias, batch_first=batch_first,
                                bidirectional=bidirectional, proj_size=proj)
    directions = 2 if bidirectional else 1
    inputs, hx = _inputs(kind, batch_first, steps, batch, input_size, dtype, hidden, proj, layers,
                         directions, with_hx)
    inputs2, hx2 = _clone_inputs(inputs, hx)
    atol, grad_atol = TOLERANCES[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM's "proj_size not supported with oneDNN" notice
        expected = run_and_grad(theirs, inputs2, hx2, fixed_weights)
    actual = run_and_grad(ours, inputs, hx, fixed_weights)
    for name, a, e in zip(("output", "h_n", "c_n"), actual[:3], expected[:3]):
        assert_close(name, a, e, atol)
    names = ["grad input"] + (["grad h_0", "grad c_0"] if hx is not None else []) + [
        f"grad {n}" for n, _ in ours.named_parameters()]
    for name, a, e in zip(names, actual[3], expected[3]):
        assert_close(name, a, e, grad_atol)


@pytest.mark.parametrize("backend,layers,bidirectional,batch_first,proj,bias,kind", _grid_params())
def test_conformance_grid_fp32(backend, layers, bidirectional, batch_first, proj, bias, kind):
    _compare(backend, torch.float32, layers, bidirectional, batch_first, proj, bias, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_float64(backend, kind):
    if not fastlstm._backends.supports_dtype(backend, "cpu", torch.float64):
        pytest.skip(f"{backend} does not run float64 on the CPU")
    _compare(backend, torch.float64, 2, True, False, 3, True, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps,batch,hidden,input_size", [
    (1, 1, 5, 3),     # T = 1, batch 1
    (1, 3, 7, 2),     # T = 1
    (6, 1, 13, 4),    # batch 1, odd hidden
    (3, 2, 16, 16),   # powers of two
    (5, 3, 1, 1),     # hidden 1
    (2, 5, 33, 9),    # hidden just past a power of two
])
def test_odd_sizes(backend, steps, batch, hidden, input_size):
    for proj in (0, 1 if hidden > 1 else 0):
        _compare(backend, torch.float32, 2, True, False, proj, True, "dense", steps=steps,
                 batch=batch, hidden=hidden, input_size=input_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_without_hx(backend, kind):
    _compare(backend, torch.float32, 2, True, True, 0, True, kind, with_hx=False)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    if not fastlstm._backends.supports_dtype(backend, "cpu", torch.float64):
        pytest.skip(f"{backend} does not run float64 on the CPU")
    torch.manual_seed(0)
    module = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, backend=backend,
                           dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())

    def function(x, h0, c0, *weights):
        with torch.nn.utils.stateless._reparametrize_module(
                module, dict(zip([n for n, _ in module.named_parameters()], weights))):
            out, (h, c) = module(x, (h0, c0))
        return out, h, c

    assert torch.autograd.gradcheck(function, (x, h0, c0, *params))
    packed = make_packed(torch.randn(3, 2, 3, dtype=torch.float64), [3, 2], True)
    data = packed.data.clone().requires_grad_()

    def packed_function(data, h0, c0):
        from torch.nn.utils.rnn import PackedSequence
        out, (h, c) = module(PackedSequence(data, packed.batch_sizes), (h0, c0))
        return out.data, h, c

    assert torch.autograd.gradcheck(packed_function, (data, h0, c0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module_kind", ["lstm", "cell"])
def test_double_backward_is_exact_or_an_error(backend, module_kind):
    """Second derivatives equal nn.LSTM's (torch backend) or raise; never silently wrong."""
    if not fastlstm._backends.supports_dtype(backend, "cpu", torch.float64):
        pytest.skip(f"{backend} does not run float64 on the CPU")
    if module_kind == "lstm":
        ours, theirs = matched_lstm(backend, torch.float64, input_size=2, hidden_size=3)
        x = torch.randn(2, 1, 2, dtype=torch.float64, requires_grad=True)
    else:
        ours = fastlstm.LSTMCell(2, 3, backend=backend, dtype=torch.float64)
        theirs = nn.LSTMCell(2, 3, dtype=torch.float64)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)

    def first_grad(module):
        output = module(x)[0]
        return torch.autograd.grad(output.pow(2).sum(), x, create_graph=True)[0]

    expected = torch.autograd.grad(first_grad(theirs).pow(2).sum(), x)[0]
    grad_x = first_grad(ours)  # create_graph=True alone is fine on every backend
    assert_close("first derivative", grad_x.detach(), first_grad(theirs).detach(),
                 TOLERANCES[torch.float64][1])
    if backend == "torch":
        assert_close("second derivative", torch.autograd.grad(grad_x.pow(2).sum(), x)[0],
                     expected, TOLERANCES[torch.float64][1])
    else:
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(grad_x.pow(2).sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", "batch_first", "cell"])
def test_batch_zero_forward_and_backward(backend, kind):
    """Batch 0 gives empty outputs and zero gradients for every parameter, as in nn.LSTM."""
    if kind == "cell":
        ours = fastlstm.LSTMCell(3, 5, backend=backend)
        theirs = nn.LSTMCell(3, 5)
        theirs.load_state_dict(ours.state_dict())
        x = torch.zeros(0, 3)
    else:
        ours, theirs = matched_lstm(backend, input_size=3, hidden_size=5, num_layers=2,
                                    bidirectional=True, proj_size=2,
                                    batch_first=kind == "batch_first")
        x = torch.zeros(0, 4, 3) if kind == "batch_first" else torch.zeros(4, 0, 3)
    results = []
    for module in (ours, theirs):
        inputs = x.clone().requires_grad_()
        output = module(inputs)
        tensors = [output[0], *output[1]] if kind != "cell" else list(output)
        sum(t.sum() for t in tensors).backward()
        results.append(([t.shape for t in tensors], inputs.grad,
                        [p.grad for p in module.parameters()]))
    assert results[0][0] == results[1][0]
    assert results[0][1].shape == results[1][1].shape
    for (name, _), a, e in zip(ours.named_parameters(), results[0][2], results[1][2]):
        assert a is not None, f"grad {name} is None"
        assert_close(f"grad {name}", a, e, 0.0)


def test_meta_device_gives_nn_lstm_shapes():
    """Modules built on the meta device (deferred initialization) run as nn.LSTM's do there."""
    for kwargs in (dict(), dict(bidirectional=True, proj_size=2, batch_first=True)):
        ours = fastlstm.LSTM(3, 5, num_layers=2, device="meta", **kwargs)
        theirs = nn.LSTM(3, 5, num_layers=2, device="meta", **kwargs)
        for x in (torch.empty(4, 2, 3, device="meta"), torch.empty(4, 3, device="meta")):
            got, expected = ours(x), theirs(x)
            assert [t.shape for t in (got[0], *got[1])] == [
                t.shape for t in (expected[0], *expected[1])]
            assert got[0].device.type == "meta"
    cell, reference = fastlstm.LSTMCell(3, 5, device="meta"), nn.LSTMCell(3, 5, device="meta")
    x = torch.empty(2, 3, device="meta")
    assert [t.shape for t in cell(x)] == [t.shape for t in reference(x)]


# ----------------------------------------------------------------------------------------------
# Dropout between layers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_eval_is_deterministic_and_matches(backend):
    ours, theirs = matched_lstm(backend, input_size=3, hidden_size=5, num_layers=3, dropout=0.5)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 2, 3)
    first, second, expected = ours(x)[0], ours(x)[0], theirs(x)[0]
    assert torch.equal(first, second)
    assert_close("output", first, expected, TOLERANCES[torch.float32][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_zeroes_between_layers(backend):
    # p = 1 zeroes every inter-layer activation: deterministic, so comparable with nn.LSTM.
    ours, theirs = matched_lstm(backend, input_size=3, hidden_size=5, num_layers=2, dropout=1.0)
    ours.train(), theirs.train()
    x = torch.randn(4, 2, 3)
    assert_close("output", ours(x)[0], theirs(x)[0], TOLERANCES[torch.float32][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_training_is_applied_between_layers_only(backend):
    module = fastlstm.LSTM(3, 5, num_layers=2, dropout=0.5, backend=backend)
    module.train()
    x = torch.randn(4, 2, 3)
    torch.manual_seed(1)
    a = module(x)[0]
    torch.manual_seed(2)
    b = module(x)[0]
    assert not torch.equal(a, b), "dropout between layers had no effect in training"
    torch.manual_seed(1)
    assert torch.equal(a, module(x)[0]), "dropout is not reproducible under the same seed"
    single = fastlstm.LSTM(3, 5, num_layers=1, backend=backend)
    single.train()
    assert torch.equal(single(x)[0], single(x)[0])


# ----------------------------------------------------------------------------------------------
# LSTMCell
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_lstm_cell(backend, bias, batched, with_hx):
    ours = fastlstm.LSTMCell(3, 5, bias=bias, backend=backend)
    theirs = nn.LSTMCell(3, 5, bias=bias)
    theirs.load_state_dict(ours.state_dict())
    shape = (4, 3) if batched else (3,)
    state_shape = (4, 5) if batched else (5,)
    x = torch.randn(shape, requires_grad=True)
    hx = (torch.randn(state_shape, requires_grad=True),
          torch.randn(state_shape, requires_grad=True)) if with_hx else None
    results = []
    for module in (ours, theirs):
        h, c = module(x, hx)
        loss = (h * fixed_weights(h)).sum() + (c * fixed_weights(c)).sum()
        leaves = [x] + (list(hx) if hx else []) + list(module.parameters())
        results.append((h, c, torch.autograd.grad(loss, leaves)))
    atol, grad_atol = TOLERANCES[torch.float32]
    assert_close("h", results[0][0], results[1][0], atol)
    assert_close("c", results[0][1], results[1][1], atol)
    for a, e in zip(results[0][2], results[1][2]):
        assert_close("grad", a, e, grad_atol)


# ----------------------------------------------------------------------------------------------
# Module identity: subclassing, parameters, state_dict, repr, convert, backends
# ----------------------------------------------------------------------------------------------

def test_is_a_subclass_with_identical_parameters_and_state_dict():
    ours = fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    theirs = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    assert isinstance(ours, nn.LSTM)
    assert isinstance(fastlstm.LSTMCell(3, 4), nn.LSTMCell)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())       # loadable both ways
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    assert repr(fastlstm.LSTMCell(3, 4)) == repr(nn.LSTMCell(3, 4))
    assert "backend='torch'" in repr(fastlstm.LSTM(3, 5, backend="torch"))


def test_convert_in_place_shares_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.LSTM(3, 5, batch_first=True)
            self.cell = nn.LSTMCell(5, 5)

        def forward(self, x):
            out, _ = self.encoder(x)
            return self.cell(out[:, -1])[0]

    model = Model()
    x = torch.randn(2, 4, 3)
    expected = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    assert fastlstm.convert(model) is model
    assert type(model.encoder) is fastlstm.LSTM and type(model.cell) is fastlstm.LSTMCell
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert_close("output", model(x), expected, TOLERANCES[torch.float32][0])
    bare = nn.LSTM(2, 3)
    assert fastlstm.convert(bare) is bare and type(bare) is fastlstm.LSTM


def test_available_backends_on_cpu():
    import os
    names = fastlstm.available_backends("cpu")
    assert "torch" in names and "cuda" not in names
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton")
        assert "triton" in names


def test_unavailable_backend_is_a_clear_error():
    module = fastlstm.LSTM(3, 5, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        module(torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="backend must be"):
        fastlstm.LSTM(3, 5, backend="cudnn")


def test_pickle_keeps_backend():
    module = fastlstm.LSTM(3, 5, backend="torch")
    clone = pickle.loads(pickle.dumps(module))
    assert clone.backend == "torch"
    x = torch.randn(2, 1, 3)
    assert torch.equal(clone(x)[0], module(x)[0])


# ----------------------------------------------------------------------------------------------
# Errors: same exception types as nn.LSTM
# ----------------------------------------------------------------------------------------------

CONSTRUCTOR_CASES = [
    dict(input_size=3, hidden_size=0),
    dict(input_size=3, hidden_size=-1),
    dict(input_size=3, hidden_size=5, num_layers=0),
    dict(input_size=3, hidden_size=5, dropout=1.5),
    dict(input_size=3, hidden_size=5, dropout=-0.1),
    dict(input_size=3, hidden_size=5, proj_size=5),
    dict(input_size=3, hidden_size=5, proj_size=-1),
    dict(input_size=3, hidden_size=2.5),
    dict(input_size=3, hidden_size=5, dropout="x"),
]


def _raised(function):
    try:
        function()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_CASES)
def test_constructor_errors_match(kwargs):
    expected = _raised(lambda: nn.LSTM(**kwargs))
    assert expected is not None
    assert _raised(lambda: fastlstm.LSTM(**kwargs)) is expected


def _forward_error_cases():
    return {
        "4-D input": (lambda: torch.randn(2, 3, 4, 3), None),
        "1-D input": (lambda: torch.randn(3), None),
        "wrong input_size": (lambda: torch.randn(4, 2, 7), None),
        "hx wrong batch": (lambda: torch.randn(4, 2, 3),
                           lambda: (torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))),
        "hx wrong hidden": (lambda: torch.randn(4, 2, 3),
                            lambda: (torch.zeros(2, 2, 4), torch.zeros(2, 2, 5))),
        "cx wrong hidden": (lambda: torch.randn(4, 2, 3),
                            lambda: (torch.zeros(2, 2, 5), torch.zeros(2, 2, 6))),
        "hx 2-D for batched": (lambda: torch.randn(4, 2, 3),
                               lambda: (torch.zeros(2, 5), torch.zeros(2, 5))),
        "hx 3-D for unbatched": (lambda: torch.randn(4, 3),
                                 lambda: (torch.zeros(2, 1, 5), torch.zeros(2, 1, 5))),
        "input dtype differs": (lambda: torch.randn(4, 2, 3, dtype=torch.float64), None),
        "hx wrong layers": (lambda: torch.randn(4, 2, 3),
                            lambda: (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))),
        "hx one stacked tensor": (lambda: torch.randn(4, 2, 3), lambda: torch.zeros(2, 2, 2, 5)),
        "hx three tensors": (lambda: torch.randn(4, 2, 3),
                             lambda: (torch.zeros(2, 2, 5),) * 3),
        "hx one tensor in a tuple": (lambda: torch.randn(4, 2, 3),
                                     lambda: (torch.zeros(2, 2, 5),)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_forward_error_cases()))
def test_forward_errors_match(backend, case):
    make_input, make_hx = _forward_error_cases()[case]
    ours = fastlstm.LSTM(3, 5, num_layers=2, backend=backend)
    theirs = nn.LSTM(3, 5, num_layers=2)
    x = make_input()
    hx = make_hx() if make_hx else None
    expected = _raised(lambda: theirs(x, hx))
    assert expected is not None, f"nn.LSTM accepted case {case!r}"
    actual = _raised(lambda: ours(x, hx))
    assert actual is expected, f"{case}: fastlstm raised {actual}, nn.LSTM raised {expected}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["3-D input", "wrong input_size", "hx wrong batch", "hx 3-D",
                                  "hx one stacked tensor", "hx one tensor", "hx three tensors"])
def test_cell_errors_match(backend, case):
    ours, theirs = fastlstm.LSTMCell(3, 5, backend=backend), nn.LSTMCell(3, 5)
    x, hx = {
        "3-D input": (torch.randn(1, 2, 3), None),
        "wrong input_size": (torch.randn(2, 4), None),
        "hx wrong batch": (torch.randn(2, 3), (torch.zeros(3, 5), torch.zeros(3, 5))),
        "hx 3-D": (torch.randn(2, 3), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))),
        "hx one stacked tensor": (torch.randn(2, 3), torch.zeros(2, 2, 5)),
        "hx one tensor": (torch.randn(2, 3), (torch.zeros(2, 5),)),
        "hx three tensors": (torch.randn(2, 3), (torch.zeros(2, 5),) * 3),
    }[case]
    expected = _raised(lambda: theirs(x, hx))
    assert expected is not None
    assert _raised(lambda: ours(x, hx)) is expected
