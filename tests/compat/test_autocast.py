"""Autocast: fastlstm gives the dtypes nn.LSTM / nn.LSTMCell give, and errors no worse than theirs.

Low-precision results are judged against a float64 reference, relative to the error nn.LSTM makes
under the same autocast: err(fastlstm) <= 2 * err(nn) + slack.
"""

import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import _backends

from helpers import backend_params as _backends_for  # noqa: E402


# Slack: half a unit in the last place of the low-precision format at magnitude 1 (LSTM outputs
# and states here are O(1)), the error of rounding the exact result once. It keeps the
# comparison meaningful when nn.LSTM happens to land within rounding of the reference.
_HALF_ULP = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}


def _max_err(value, reference):
    return (value.double() - reference.double()).abs().max().item()


def _run(module, x, hx):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out, (h, c) = module(x, hx)
    weights = torch.linspace(-1, 1, out.numel(), device=x.device).reshape(out.shape)
    (out.float() * weights).sum().add(h.float().sum()).add(c.float().sum()).backward()
    grads = [p.grad for p in module.parameters()] + [x.grad]
    return (out, h, c), grads


def _check_lstm(backend, device, dtype, sizes, proj_size=0):
    steps, batch, input_size, hidden = sizes
    reference = nn.LSTM(input_size, hidden, num_layers=2, device=device, proj_size=proj_size)
    fast = fastlstm.LSTM(input_size, hidden, num_layers=2, device=device, proj_size=proj_size,
                         backend=backend)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(steps, batch, input_size, device=device)
    exact_module = nn.LSTM(input_size, hidden, num_layers=2, device=device, proj_size=proj_size,
                           dtype=torch.float64)
    exact_module.load_state_dict(reference.state_dict())
    exact_outs, exact_grads = _run(exact_module, x.double(), None)

    with torch.autocast(device, dtype=dtype):
        nn_outs, nn_grads = _run(reference, x, None)
        if not _backends.supports_dtype(backend, device, dtype):
            with pytest.raises(RuntimeError, match="does not support dtype"):
                fast(x)
            return
        fast_outs, fast_grads = _run(fast, x, None)

    for name, a, b in zip(("output", "h_n", "c_n"), nn_outs, fast_outs):
        assert b.dtype == a.dtype, f"{name}: fastlstm gives {b.dtype}, nn.LSTM gives {a.dtype}"
    slack = _HALF_ULP[dtype]
    for name, a, b, exact in zip(("output", "h_n", "c_n"), nn_outs, fast_outs, exact_outs):
        err_nn, err_fast = _max_err(a, exact), _max_err(b, exact)
        assert err_fast <= 2 * err_nn + slack, f"{name}: error {err_fast:.3g}, nn.LSTM {err_nn:.3g}"
    names = [n for n, _ in reference.named_parameters()] + ["input"]
    for name, a, b, exact in zip(names, nn_grads, fast_grads, exact_grads):
        assert b.dtype == a.dtype, f"grad {name}: {b.dtype} vs nn.LSTM {a.dtype}"
        # Gradients sum over steps and rows, so they are not O(1): scale the slack to them.
        scale = max(exact.abs().max().item(), 1.0)
        err_nn, err_fast = _max_err(a, exact), _max_err(b, exact)
        assert err_fast <= 2 * err_nn + slack * scale, (
            f"grad {name}: error {err_fast:.3g}, nn.LSTM {err_nn:.3g}")


def test_nn_lstm_cpu_autocast_dtypes():
    """What fastlstm matches: CPU autocast lists lstm as a bf16 op, not lstm_cell."""
    x = torch.randn(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = nn.LSTM(4, 5)(x)
        cell_h, cell_c = nn.LSTMCell(4, 5)(x[0])
    assert (out.dtype, h.dtype, c.dtype) == (torch.bfloat16,) * 3
    assert (cell_h.dtype, cell_c.dtype) == (torch.float32,) * 2


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_lstm_cpu_bf16(backend):
    sizes = (3, 2, 3, 4) if backend == "triton" else (7, 3, 8, 16)
    _check_lstm(backend, "cpu", torch.bfloat16, sizes)


@pytest.mark.parametrize("gemm", ["blas", "own"])
@pytest.mark.parametrize("threads", [1, 2])
def test_lstm_cpu_bf16_long_sequences(gemm, threads, monkeypatch):
    """Enough steps and rows for the cpu backend's packed, threaded path: with `own` (AVX-512
    CPUs) the input projection is fused into the steps, computed in float32."""
    monkeypatch.setenv("FASTLSTM_CPU_GEMM", gemm)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_lstm("cpu", "cpu", torch.bfloat16, (12, 40, 24, 64))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_lstm_cpu_bf16_proj(backend):
    """With proj_size, nn.LSTM on the CPU keeps the cell state in float32 under autocast."""
    sizes = (3, 2, 3, 4) if backend == "triton" else (7, 3, 8, 16)
    _check_lstm(backend, "cpu", torch.bfloat16, sizes, proj_size=2)


def _raised_or_dtypes(function):
    try:
        return tuple(t.dtype for t in function())
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)


@pytest.mark.parametrize("backend", _backends_for("cpu"))
@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("x_dtype,hx_dtype", [
    (torch.float64, None), (torch.float64, torch.float64), (torch.float32, torch.float64),
    (torch.float64, torch.bfloat16)])
def test_lstm_autocast_leaves_float64_alone(backend, proj_size, x_dtype, hx_dtype):
    """Autocast never casts float64: an all-float64 nn.LSTM runs in float64, and float64 mixed
    with cast tensors is an error."""
    reference = nn.LSTM(3, 4, proj_size=proj_size, dtype=torch.float64)
    fast = fastlstm.LSTM(3, 4, proj_size=proj_size, dtype=torch.float64, backend=backend)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 2, 3, dtype=x_dtype)
    hx = None if hx_dtype is None else (torch.randn(1, 2, proj_size or 4, dtype=hx_dtype),
                                        torch.randn(1, 2, 4, dtype=hx_dtype))

    def call(module):
        out, (h, c) = module(x, hx)
        return out, h, c

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _raised_or_dtypes(lambda: call(reference))
        assert _raised_or_dtypes(lambda: call(fast)) == expected
        if expected == (torch.float64,) * 3:
            for a, b in zip(call(fast), call(reference)):
                assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", _backends_for("cpu"))
@pytest.mark.parametrize("x_dtype,module_dtype,h_dtype,c_dtype", [
    (torch.float64, torch.float64, torch.float64, torch.float32),
    (torch.float64, torch.float64, torch.float64, torch.bfloat16),
    (torch.float32, torch.float64, torch.float64, torch.float64),
    (torch.float64, torch.float32, torch.float64, torch.float64),
    (torch.float32, torch.float32, torch.float64, torch.float32)])
def test_cell_autocast_leaves_float64_alone(backend, x_dtype, module_dtype, h_dtype, c_dtype):
    reference = nn.LSTMCell(3, 4, dtype=module_dtype)
    fast = fastlstm.LSTMCell(3, 4, dtype=module_dtype, backend=backend)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, dtype=x_dtype)
    hx = (torch.randn(2, 4, dtype=h_dtype), torch.randn(2, 4, dtype=c_dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _raised_or_dtypes(lambda: reference(x, hx))
        assert _raised_or_dtypes(lambda: fast(x, hx)) == expected
        if expected == (torch.float64,) * 2:
            for a, b in zip(fast(x, hx), reference(x, hx)):
                assert (a - b).abs().max().item() < 1e-10


def _cell_hx(kind, batch, hidden):
    if kind is None:
        return None
    if kind == "mixed":
        return (torch.randn(batch, hidden, dtype=torch.bfloat16), torch.randn(batch, hidden))
    return (torch.randn(batch, hidden, dtype=kind), torch.randn(batch, hidden, dtype=kind))


@pytest.mark.parametrize("backend", _backends_for("cpu"))
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hx_kind", [None, torch.float32, torch.bfloat16, "mixed"])
def test_cell_cpu_bf16(backend, input_dtype, hx_kind):
    reference = nn.LSTMCell(6, 8)
    fast = fastlstm.LSTMCell(6, 8, backend=backend)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6).to(input_dtype)
    hx = _cell_hx(hx_kind, 3, 8)
    exact_module = nn.LSTMCell(6, 8, dtype=torch.float64)
    exact_module.load_state_dict(reference.state_dict())
    exact = exact_module(x.double(), None if hx is None else tuple(t.double() for t in hx))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x, hx)
        run_dtype = expected[1].dtype
        if not _backends.supports_dtype(backend, "cpu", run_dtype):
            with pytest.raises(RuntimeError, match="does not support dtype"):
                fast(x, hx)
            return
        got = fast(x, hx)
    for name, a, b, e in zip(("h", "c"), expected, got, exact):
        assert b.dtype == a.dtype, f"{name}: fastlstm gives {b.dtype}, nn.LSTMCell gives {a.dtype}"
        err_nn, err_fast = _max_err(a, e), _max_err(b, e)
        assert err_fast <= 2 * err_nn + _HALF_ULP[torch.bfloat16], (
            f"{name}: error {err_fast:.3g}, nn.LSTMCell {err_nn:.3g}")


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_autocast_off_inside_is_plain_fp32(backend):
    """An autocast region that is disabled must not change anything."""
    if backend == "triton":
        sizes = (2, 2, 3, 4)
    else:
        sizes = (4, 2, 5, 6)
    steps, batch, input_size, hidden = sizes
    fast = fastlstm.LSTM(input_size, hidden, backend=backend)
    x = torch.randn(steps, batch, input_size)
    plain = fast(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        inside = fast(x)
    assert inside[0].dtype == torch.float32
    assert torch.equal(inside[0], plain[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends_for("cuda"))
def test_lstm_cuda(backend, dtype):
    _check_lstm(backend, "cuda", dtype, (16, 8, 32, 64))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends_for("cuda"))
def test_cell_cuda(backend, dtype):
    reference = nn.LSTMCell(32, 64, device="cuda")
    fast = fastlstm.LSTMCell(32, 64, device="cuda", backend=backend)
    fast.load_state_dict(reference.state_dict())
    exact_module = nn.LSTMCell(32, 64, device="cuda", dtype=torch.float64)
    exact_module.load_state_dict(reference.state_dict())
    x = torch.randn(8, 32, device="cuda")
    hx = (torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda"))
    exact = exact_module(x.double(), tuple(t.double() for t in hx))
    with torch.autocast("cuda", dtype=dtype):
        expected = reference(x, hx)
        got = fast(x, hx)
    for name, a, b, e in zip(("h", "c"), expected, got, exact):
        assert b.dtype == a.dtype, f"{name}: fastlstm gives {b.dtype}, nn.LSTMCell gives {a.dtype}"
        assert _max_err(b, e) <= 2 * _max_err(a, e) + _HALF_ULP[dtype], name


@pytest.mark.cuda
@pytest.mark.parametrize("cudnn", [True, False])
@pytest.mark.parametrize("backend", _backends_for("cuda"))
def test_lstm_cuda_dtype_follows_cudnn(backend, cudnn):
    """nn.LSTM's cuDNN path runs in float16 under autocast whatever autocast's dtype; without
    cuDNN it runs in autocast's dtype. fastlstm.LSTM returns the same dtypes in both cases."""
    reference = nn.LSTM(8, 16, device="cuda")
    fast = fastlstm.LSTM(8, 16, device="cuda", backend=backend)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 3, 8, device="cuda")
    with torch.backends.cudnn.flags(enabled=cudnn), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = reference(x)
        got = fast(x)
    assert expected[0].dtype == (torch.float16 if cudnn else torch.bfloat16)
    for a, b in ((expected[0], got[0]), (expected[1][0], got[1][0]), (expected[1][1], got[1][1])):
        assert b.dtype == a.dtype
