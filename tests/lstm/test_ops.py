"""The compiled extension's CPU ops: against the plain-torch specification, opcheck, gradcheck,
nn.LSTM, torch.compile, and argument errors.

The full module conformance grid (every backend) lives in tests/lstm/test_lstm.py.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm import _backends
from fastlstm.lstm import recurrence as _recurrence

if _backends.extension() is None:
    pytest.skip(f"fastlstm._C is not built: {_backends._import_extension()[1]}",
                allow_module_level=True)

from fastlstm.lstm import ops as _extension  # noqa: E402

forward_op = torch.ops.fastlstm.recurrence_forward
backward_op = torch.ops.fastlstm.recurrence_backward

# Absolute tolerances of the comparisons against the float64/float32 specification: the kernels
# and the specification compute the same sums in a different order (and the CPU kernels' tanh is
# written with exp), so float32 differs by rounding only.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _batch_sizes(lengths):
    steps = max(lengths)
    return torch.tensor([sum(length > t for length in lengths) for t in range(steps)],
                        dtype=torch.int64)


def _make_args(dtype, batch, steps, hidden, proj=0, packed=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    if packed:
        lengths = sorted(torch.randint(1, steps + 1, (batch,), generator=generator).tolist(),
                         reverse=True)
        lengths[0] = steps
        batch_sizes = _batch_sizes(lengths)
        rows = int(batch_sizes.sum())
    else:
        batch_sizes = torch.empty(0, dtype=torch.int64)
        rows = batch * steps
    width = proj or hidden
    xg = randn(rows, 4 * hidden)
    h0 = randn(batch, width, scale=0.5)
    c0 = randn(batch, hidden, scale=0.5)
    w_hh = randn(4 * hidden, width, scale=width ** -0.5)
    w_hr = randn(proj, hidden, scale=hidden ** -0.5) if proj else None
    return xg, batch_sizes, h0, c0, w_hh, w_hr


def _assert_close(actual, expected, atol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.numel() == 0:
        return
    error = (actual.double() - expected.double()).abs()
    worst = int(error.argmax())
    assert error.max() <= atol, (
        f"{what}: max abs error {error.max():.3e} > {atol:.1e} at flat index {worst} "
        f"(got {actual.flatten()[worst]:.8g}, expected {expected.flatten()[worst]:.8g})")


CASES = [
    # batch, steps, hidden, proj, packed, reverse
    (3, 5, 8, 0, False, False),
    (3, 5, 8, 0, False, True),
    (5, 7, 13, 0, True, False),
    (5, 7, 13, 0, True, True),
    (4, 6, 11, 5, False, False),
    (4, 6, 11, 5, True, True),
    (1, 9, 7, 0, False, False),   # B = 1
    (6, 1, 9, 0, False, True),    # T = 1
    (2, 4, 40, 3, False, True),   # H past one SIMD register, with a tail
    (7, 5, 33, 0, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,steps,hidden,proj,packed,reverse", CASES)
def test_ops_match_specification(dtype, batch, steps, hidden, proj, packed, reverse):
    xg, batch_sizes, h0, c0, w_hh, w_hr = _make_args(dtype, batch, steps, hidden, proj, packed)
    got = forward_op(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, True)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr,
                                                    reverse, True)
    for name, a, b in zip(("out", "h_n", "c_n", "gates", "cells"), got, want):
        _assert_close(a, b, TOL[dtype], f"forward {name}")

    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(got[0].shape, generator=generator, dtype=torch.float64).to(dtype)
    grad_hn = torch.randn(got[1].shape, generator=generator, dtype=torch.float64).to(dtype)
    grad_cn = torch.randn(got[2].shape, generator=generator, dtype=torch.float64).to(dtype)
    gates, cells = want[3], want[4]
    got_grads = backward_op(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr, gates, cells,
                            reverse)
    want_grads = _recurrence.reference_recurrence_backward(
        grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr, gates, cells, reverse)
    for name, a, b in zip(("grad_xg", "grad_h0", "grad_c0", "grad_h_total"), got_grads,
                          want_grads):
        _assert_close(a, b, TOL[dtype], f"backward {name}")


# Shapes large enough that the cpu kernels split a layer among threads: by batch rows (W_hh small,
# batch >= 32) or by hidden units with a barrier per step (small batch or large W_hh), with 2
# threads and with 3 (uneven parts, one thread more than this machine's cores).
THREADED_CASES = [
    # batch, steps, hidden, packed, reverse (8 steps or more: fewer run on one thread)
    (40, 9, 64, False, False),    # by rows
    (40, 9, 64, True, True),      # by rows, sequences starting late
    (37, 8, 72, True, False),     # by rows, uneven, H with a SIMD tail
    (8, 9, 128, False, True),     # by units
    (8, 9, 128, True, False),     # by units, packed
    (9, 8, 136, True, True),      # by units, uneven parts
    (16, 8, 264, False, False),   # by units: W_hh too large to copy per thread
]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,steps,hidden,packed,reverse", THREADED_CASES)
def test_threaded_ops_match_specification(threads, dtype, batch, steps, hidden, packed, reverse):
    xg, batch_sizes, h0, c0, w_hh, _ = _make_args(dtype, batch, steps, hidden, 0, packed, seed=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = forward_op(xg, batch_sizes, h0, c0, w_hh, None, reverse, True)
        unsaved = forward_op(xg, batch_sizes, h0, c0, w_hh, None, reverse, False)
        generator = torch.Generator().manual_seed(4)
        grads_in = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(dtype)
                    for t in got[:3]]
        got_grads = backward_op(*grads_in, batch_sizes, c0, w_hh, None, got[3], got[4], reverse)
    finally:
        torch.set_num_threads(previous)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, None,
                                                    reverse, True)
    for name, a, b in zip(("out", "h_n", "c_n", "gates", "cells"), got, want):
        _assert_close(a, b, TOL[dtype], f"forward {name}")
    for name, a, b in zip(("out", "h_n", "c_n"), unsaved, want):
        _assert_close(a, b, TOL[dtype], f"forward (save=False) {name}")
    want_grads = _recurrence.reference_recurrence_backward(
        *grads_in, batch_sizes, c0, w_hh, None, want[3], want[4], reverse)
    for name, a, b in zip(("grad_xg", "grad_h0", "grad_c0"), got_grads, want_grads):
        _assert_close(a, b, TOL[dtype], f"backward {name}")


@pytest.mark.parametrize("dtype,batch,steps,hidden,proj,packed,threads", [
    (torch.float64, 3, 5, 8, 0, False, 1),
    (torch.float64, 40, 9, 64, 0, True, 2),     # split by rows
    (torch.float32, 8, 9, 128, 0, False, 2),    # split by units
    (torch.float64, 4, 6, 11, 5, True, 1),      # with a projection
    (torch.bfloat16, 5, 7, 13, 0, True, 1),     # low precision
])
def test_bias_argument(dtype, batch, steps, hidden, proj, packed, threads):
    """recurrence_forward(..., bias) equals the op on xg + bias, and autograd's bias gradient is
    the column sum of grad_xg."""
    xg, batch_sizes, h0, c0, w_hh, w_hr = _make_args(dtype, batch, steps, hidden, proj, packed)
    bias = torch.randn(4 * hidden, dtype=torch.float64).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = forward_op(xg, batch_sizes, h0, c0, w_hh, w_hr, False, True, bias)
    finally:
        torch.set_num_threads(previous)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, False,
                                                    True, bias)
    tol = TOL.get(dtype, 2e-2)
    for name, a, b in zip(("out", "h_n", "c_n", "gates", "cells"), got, want):
        _assert_close(a, b, tol, f"forward with bias {name}")
    if dtype == torch.float64:
        bias = bias.clone().requires_grad_()
        inputs = (xg.clone().requires_grad_(), batch_sizes, h0, c0, w_hh, w_hr)
        out = forward_op(*inputs, False, True, bias)[0]
        grad_out = torch.randn_like(out)
        grad_bias, grad_xg = torch.autograd.grad(out, (bias, inputs[0]), grad_out)
        torch.testing.assert_close(grad_bias, grad_xg.sum(0))


def test_bias_argument_is_checked():
    xg, batch_sizes, h0, c0, w_hh, _ = _make_args(torch.float32, 3, 5, 8)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\*hidden\]"):
        forward_op(xg, batch_sizes, h0, c0, w_hh, None, False, True, torch.zeros(8))
    with pytest.raises(RuntimeError, match="bias must have dtype Float"):
        forward_op(xg, batch_sizes, h0, c0, w_hh, None, False, True,
                   torch.zeros(32, dtype=torch.float64))


@pytest.mark.parametrize("reverse", [False, True])
def test_rows_never_live_keep_their_state(reverse):
    """h0 may hold more rows than the first step's batch size: those rows keep h0 and c0."""
    xg, batch_sizes, h0, c0, w_hh, _ = _make_args(torch.float64, 40, 9, 64, 0, True, seed=5)
    extra = torch.randn(8, 64, dtype=torch.float64)
    h0, c0 = torch.cat([h0, extra]), torch.cat([c0, extra * 2])
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = forward_op(xg, batch_sizes, h0, c0, w_hh, None, reverse, True)
    finally:
        torch.set_num_threads(previous)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, None,
                                                    reverse, True)
    for name, a, b in zip(("out", "h_n", "c_n"), got, want):
        _assert_close(a, b, TOL[torch.float64], f"forward {name}")
    assert torch.equal(got[1][40:], extra) and torch.equal(got[2][40:], extra * 2)


@pytest.mark.parametrize("value,expect_error", [("0", False), ("64", False), ("lots", True)])
def test_buffer_cache_setting(value, expect_error):
    """FASTLSTM_CPU_CACHE_MB: 0 turns the reuse cache off, a bad value is a clear error."""
    script = (
        "import torch, fastlstm\n"
        "from torch import nn\n"
        "torch.manual_seed(0)\n"
        "ours = fastlstm.LSTM(16, 256, backend='cpu'); theirs = nn.LSTM(16, 256)\n"
        "theirs.load_state_dict(ours.state_dict())\n"
        "x = torch.randn(50, 32, 16)\n"
        "for _ in range(3):\n"
        "    a, b = ours(x)[0], theirs(x)[0]\n"
        "    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)\n"
        "    del a\n"
        "print('ok')\n")
    env = dict(os.environ, FASTLSTM_CPU_CACHE_MB=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    if expect_error:
        assert result.returncode != 0
        assert "FASTLSTM_CPU_CACHE_MB must be a whole number of megabytes" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == "ok"


def test_save_false_keeps_nothing():
    xg, batch_sizes, h0, c0, w_hh, w_hr = _make_args(torch.float32, 3, 4, 8)
    out, h_n, c_n, gates, cells = forward_op(xg, batch_sizes, h0, c0, w_hh, w_hr, False, False)
    assert gates.shape == (0, 32) and cells.shape == (0, 8)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, False,
                                                    False)
    _assert_close(out, want[0], TOL[torch.float32], "out")


def test_inputs_are_not_modified():
    args = _make_args(torch.float32, 3, 4, 8, proj=2)
    copies = [a.clone() if a is not None else None for a in args]
    out = forward_op(*args, False, True)
    grads = [torch.ones_like(t) for t in out[:3]]
    backward_op(*grads, args[1], args[3], args[4], args[5], out[3], out[4], False)
    for before, after in zip(copies, args):
        if before is not None:
            assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(dtype):
    xg, batch_sizes, h0, c0, w_hh, w_hr = _make_args(dtype, 4, 6, 12, proj=5, packed=True)
    got = forward_op(xg, batch_sizes, h0, c0, w_hh, w_hr, True, True)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, True,
                                                    True)
    assert got[3].dtype == torch.float32 and got[4].dtype == torch.float32
    # Both round h through `dtype` every step; what remains is float32 rounding, which can flip
    # a rounding of h to `dtype` by one unit (2^-8 relative for bfloat16).
    atol = 2 * torch.finfo(dtype).eps
    for name, a, b in zip(("out", "h_n", "c_n", "gates", "cells"), got, want):
        _assert_close(a, b, atol, f"forward {name}")
    grad_out = torch.randn(got[0].shape).to(dtype)
    grads = backward_op(grad_out, torch.zeros_like(got[1]), torch.zeros_like(got[2]), batch_sizes,
                        c0, w_hh, w_hr, want[3], want[4], True)
    want_grads = _recurrence.reference_recurrence_backward(
        grad_out, torch.zeros_like(got[1]), torch.zeros_like(got[2]), batch_sizes, c0, w_hh, w_hr,
        want[3], want[4], True)
    for name, a, b in zip(("grad_xg", "grad_h0", "grad_c0", "grad_h_total"), grads, want_grads):
        _assert_close(a, b, 4 * torch.finfo(dtype).eps, f"backward {name}")


OPCHECK_CASES = [
    (torch.float64, 3, 4, 5, 0, False, False),
    (torch.float32, 4, 3, 6, 2, True, True),
    (torch.float32, 1, 1, 3, 0, False, True),
]


@pytest.mark.parametrize("dtype,batch,steps,hidden,proj,packed,reverse", OPCHECK_CASES)
def test_opcheck_forward(dtype, batch, steps, hidden, proj, packed, reverse):
    xg, batch_sizes, h0, c0, w_hh, w_hr = _make_args(dtype, batch, steps, hidden, proj, packed)
    for tensor in (xg, h0, c0, w_hh, w_hr):
        if tensor is not None:
            tensor.requires_grad_(True)
    torch.library.opcheck(forward_op, (xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, True))
    torch.library.opcheck(forward_op, (xg.detach(), batch_sizes, h0.detach(), c0.detach(),
                                       w_hh.detach(), None if w_hr is None else w_hr.detach(),
                                       reverse, False))


@pytest.mark.parametrize("dtype,batch,steps,hidden,proj,packed,reverse", OPCHECK_CASES)
def test_opcheck_backward(dtype, batch, steps, hidden, proj, packed, reverse):
    xg, batch_sizes, h0, c0, w_hh, w_hr = _make_args(dtype, batch, steps, hidden, proj, packed)
    out, h_n, c_n, gates, cells = forward_op(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, True)
    args = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), batch_sizes, c0,
            w_hh, w_hr, gates, cells, reverse)
    torch.library.opcheck(backward_op, args)


@pytest.mark.parametrize("proj,bidirectional,packed", [(0, False, False), (3, True, False),
                                                       (0, True, True)])
def test_gradcheck_float64(proj, bidirectional, packed):
    torch.manual_seed(0)
    module = fastlstm.LSTM(3, 5, num_layers=2, proj_size=proj, bidirectional=bidirectional,
                           backend="cpu", dtype=torch.float64)
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]

    def run(x, *weights):
        inp = pack_padded_sequence(x, [4, 3, 1]) if packed else x
        out, (h, c) = torch.func.functional_call(module, dict(zip(names, weights)), (inp,))
        return (out.data if packed else out), h, c

    weights = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    assert torch.autograd.gradcheck(run, (x, *weights))


@pytest.mark.parametrize("kwargs", [
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(proj_size=3),
    dict(bias=False),
])
def test_module_matches_nn_lstm(kwargs):
    torch.manual_seed(0)
    ref = nn.LSTM(6, 7, **kwargs)
    fast = fastlstm.LSTM(6, 7, backend="cpu", **kwargs)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6, requires_grad=True)
    out_ref, (h_ref, c_ref) = ref(x)
    out, (h, c) = fast(x)
    for name, a, b in (("output", out, out_ref), ("h_n", h, h_ref), ("c_n", c, c_ref)):
        _assert_close(a, b, 1e-5, name)
    weights = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad((out_ref * weights).sum() + h_ref.sum() + c_ref.sum(),
                                    [x, *ref.parameters()])
    grads = torch.autograd.grad((out * weights).sum() + h.sum() + c.sum(),
                                [x, *fast.parameters()])
    names = ["input"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        _assert_close(a, b, 1e-4, f"grad {name}")


def test_module_packed_matches_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    fast = fastlstm.LSTM(4, 6, num_layers=2, bidirectional=True, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 4)
    lengths = [6, 5, 3, 1]
    packed = pack_padded_sequence(x, lengths)
    out_ref, (h_ref, c_ref) = ref(packed)
    out, (h, c) = fast(packed)
    _assert_close(out.data, out_ref.data, 1e-5, "output")
    _assert_close(h, h_ref, 1e-5, "h_n")
    _assert_close(c, c_ref, 1e-5, "c_n")


def test_auto_backend_is_cpu():
    assert _backends.resolve("auto", "cpu", torch.float32) == "cpu"
    assert "cpu" in fastlstm.available_backends("cpu")
    assert _extension.has_cuda() in (True, False)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastlstm.LSTM(5, 8, num_layers=2, batch_first=True, backend="cpu")
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, (h, _c) = self.lstm(x)
        return self.head(out).sum() + h.sum()


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(2, 4, 5)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    result = compiled(x)
    grads = torch.autograd.grad(result, list(model.parameters()))
    _assert_close(result, eager, 1e-6, "compiled loss")
    for a, b in zip(grads, eager_grads):
        _assert_close(a, b, 1e-6, "compiled grad")
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---- bad arguments: a clear error naming the tensor, before any memory is touched ------------

def _good_args():
    return list(_make_args(torch.float32, 3, 4, 8, proj=2)) + [False, True]


@pytest.mark.parametrize("index,replacement,message", [
    (0, torch.zeros(12, 31), "xg must have shape [N, 4*hidden]"),
    (0, torch.zeros(12, 32, dtype=torch.int32), "xg must be float32, float64"),
    (0, torch.zeros(32, 12).t(), "xg must be contiguous"),
    (2, torch.zeros(3, 8), "h0 must have shape [B, P]"),
    (2, torch.zeros(3, 2, dtype=torch.float64), "h0 must have dtype Float"),
    (3, torch.zeros(2, 8), "h0 must have shape [B, P]"),
    (4, torch.zeros(32, 8), "w_hh must have shape [4*hidden, P]"),
    (5, torch.zeros(2, 7), "w_hr must have shape [P, hidden]"),
    (1, torch.tensor([3, 3, 4, 2]), "batch_sizes[2] = 4 must be in [1, B]"),
    (1, torch.tensor([3, 2, 3, 1]), "batch_sizes must not increase"),
    (1, torch.tensor([3, 3, 3, 2]), "batch_sizes sum to 11"),
    (1, torch.tensor([3.0, 3.0, 3.0, 3.0]), "batch_sizes must have dtype int64"),
])
def test_forward_bad_arguments(index, replacement, message):
    args = _good_args()
    args[index] = replacement
    with pytest.raises(RuntimeError, match=_escape(message)):
        forward_op(*args)


def test_backward_bad_arguments():
    xg, batch_sizes, h0, c0, w_hh, w_hr = _make_args(torch.float32, 3, 4, 8)
    out, h_n, c_n, gates, cells = forward_op(xg, batch_sizes, h0, c0, w_hh, w_hr, False, True)
    good = [torch.zeros_like(out), torch.zeros_like(h_n), torch.zeros_like(c_n), batch_sizes, c0,
            w_hh, w_hr, gates, cells, False]
    cases = [
        (0, torch.zeros(11, 8), "grad_out must have shape [N, P]"),
        (1, torch.zeros(3, 9), "grad_hn must have shape [B, P]"),
        (2, torch.zeros(3, 8, dtype=torch.float64), "grad_cn must have dtype Float"),
        (7, torch.zeros(0, 32), "the forward was run with save=False"),
        (7, gates.double(), "gates must have dtype Float"),
        (8, torch.zeros(12, 9), "cells must have shape [N, hidden]"),
    ]
    for index, replacement, message in cases:
        args = list(good)
        args[index] = replacement
        with pytest.raises(RuntimeError, match=_escape(message)):
            backward_op(*args)


def _escape(text):
    import re
    return re.escape(text)
