"""Forward and backward are bitwise reproducible run to run, also under
torch.use_deterministic_algorithms(True)."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm

from helpers import backend_params as _backends_for  # noqa: E402


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _sizes(backend, device):
    if backend == "triton" and device == "cpu":
        return dict(steps=3, batch=3, input_size=3, hidden=4)
    if device == "cuda":
        return dict(steps=16, batch=8, input_size=32, hidden=64)
    return dict(steps=9, batch=5, input_size=7, hidden=12)


def _run(backend, device, packed):
    """Build a model from a fixed seed, run forward + backward with dropout, return everything."""
    s = _sizes(backend, device)
    torch.manual_seed(1234)
    model = fastlstm.LSTM(s["input_size"], s["hidden"], num_layers=2, bidirectional=True,
                          dropout=0.25, device=device, backend=backend).train()
    x = torch.randn(s["steps"], s["batch"], s["input_size"], device=device, requires_grad=True)
    hx = (torch.randn(4, s["batch"], s["hidden"], device=device, requires_grad=True),
          torch.randn(4, s["batch"], s["hidden"], device=device, requires_grad=True))
    if packed:
        lengths = torch.arange(s["batch"], 0, -1).clamp(max=s["steps"])
        out, (h, c) = model(pack_padded_sequence(x, lengths), hx)
        out = out.data
    else:
        out, (h, c) = model(x, hx)
    weights = torch.randn(out.shape, device=device)
    ((out * weights).sum() + h.square().sum() + c.sin().sum()).backward()
    results = {"out": out, "h_n": h, "c_n": c, "grad_x": x.grad, "grad_h0": hx[0].grad,
               "grad_c0": hx[1].grad}
    results.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    return {name: value.detach().cpu() for name, value in results.items()}


def _assert_bitwise_equal(first, second):
    assert first.keys() == second.keys()
    for name in first:
        a, b = first[name], second[name]
        if not torch.equal(a, b):
            index = (a != b).nonzero()[0].tolist()
            raise AssertionError(f"{name} differs between runs, first at {index}: "
                                 f"{a[tuple(index)].item()!r} vs {b[tuple(index)].item()!r}")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_bitwise_reproducible_cpu(backend, packed):
    _assert_bitwise_equal(_run(backend, "cpu", packed), _run(backend, "cpu", packed))


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_deterministic_algorithms_cpu(backend, deterministic_algorithms):
    _assert_bitwise_equal(_run(backend, "cpu", True), _run(backend, "cpu", True))


def test_seed_changes_dropout():
    """The runs above are equal because of the seed, not because dropout is inert."""
    model = fastlstm.LSTM(3, 4, num_layers=2, dropout=0.5, backend="torch").train()
    x = torch.randn(5, 2, 3)
    torch.manual_seed(1)
    first = model(x)[0]
    torch.manual_seed(2)
    second = model(x)[0]
    assert not torch.equal(first, second)


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", _backends_for("cuda"))
def test_bitwise_reproducible_cuda(backend, packed):
    _assert_bitwise_equal(_run(backend, "cuda", packed), _run(backend, "cuda", packed))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _backends_for("cuda"))
def test_deterministic_algorithms_cuda(backend, deterministic_algorithms, monkeypatch):
    """Either a deterministic path (bitwise equal runs) or torch's usual error for an op
    without one, which names use_deterministic_algorithms."""
    # cuBLAS is deterministic only with a fixed workspace; without this torch raises for every
    # GEMM, nn.LSTM's included, which would say nothing about fastlstm.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        first = _run(backend, "cuda", True)
    except RuntimeError as error:
        assert "use_deterministic_algorithms" in str(error) or "deterministic" in str(error)
        return
    _assert_bitwise_equal(first, _run(backend, "cuda", True))
