"""The cpu backend's GEMMs (csrc/cpu/gemm.cpp, csrc/cpu/step_gemm_avx512.cpp): fastlstm::mm and addmm
against torch on every library FASTLSTM_CPU_GEMM can choose, which library a product runs on, the
recurrence op's own input projection (w_ih) against the op fed x @ W_ih^T, and whole LSTMs
against nn.LSTM with the per-step products on each library.

The AVX-512 step kernel itself is tested element by element by the C++ tests (ctest).
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastlstm
from fastlstm import _backends
from fastlstm.lstm import recurrence as _recurrence

if _backends.extension() is None:
    pytest.skip(f"fastlstm._C is not built: {_backends._import_extension()[1]}",
                allow_module_level=True)

from fastlstm.lstm import cpu_gemm as _cpu_gemm  # noqa: E402

LIBRARIES = ["blas", "own"]


@pytest.fixture(params=LIBRARIES)
def library(request, monkeypatch):
    monkeypatch.setenv("FASTLSTM_CPU_GEMM", request.param)
    return request.param


def _onednn_usable():
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


# 256 x 128 x 64 = 2^21 multiply-adds: the smallest products oneDNN takes.
BIG = (256, 128, 64)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_mm_and_addmm_match_torch(library, transpose_a, transpose_b):
    m, k, n = BIG
    a = torch.randn(k, m).t() if transpose_a else torch.randn(m, k)
    b = torch.randn(n, k).t() if transpose_b else torch.randn(k, n)
    c = torch.randn(m, n)
    expected = a.double() @ b.double()
    torch.testing.assert_close(_cpu_gemm.mm(a, b).double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(_cpu_gemm.addmm(c, a, b).double(), c.double() + expected,
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_addmm_few_rows_transposed_operands(library, rows):
    # oneDNN's sum post-op (beta != 0) corrupted the heap for one row and a transposed mat2.
    a = torch.randn(rows, 2049)
    b = torch.randn(1024, 2049).t()
    c = torch.randn(rows, 1024)
    expected = c.double() + a.double() @ b.double()
    for _ in range(3):
        torch.testing.assert_close(_cpu_gemm.addmm(c, a, b).double(), expected, atol=1e-3,
                                   rtol=1e-5)
        a_transposed = a.t().contiguous().t()  # a view with strides (1, rows)
        torch.testing.assert_close(_cpu_gemm.addmm(c, a_transposed, b).double(), expected,
                                   atol=1e-3, rtol=1e-5)
    junk = [torch.randn(j * 10) for j in range(200)]  # reuses the heap around the result
    assert len(junk) == 200
    torch.testing.assert_close(c.double() + a.double() @ b.double(), expected)


def test_empty_products(library):
    assert _cpu_gemm.mm(torch.randn(0, 5), torch.randn(5, 3)).shape == (0, 3)
    torch.testing.assert_close(_cpu_gemm.mm(torch.randn(4, 0), torch.randn(0, 3)),
                               torch.zeros(4, 3))
    c = torch.randn(4, 3)
    torch.testing.assert_close(_cpu_gemm.addmm(c, torch.randn(4, 0), torch.randn(0, 3)), c)


def test_library_choice(monkeypatch):
    a, b = torch.randn(BIG[0], BIG[1]), torch.randn(BIG[1], BIG[2])
    monkeypatch.setenv("FASTLSTM_CPU_GEMM", "blas")
    assert _cpu_gemm.library(a, b) == "blas"
    monkeypatch.setenv("FASTLSTM_CPU_GEMM", "own")
    assert _cpu_gemm.library(a, b) == ("onednn" if _onednn_usable() else "blas")
    # Below the size threshold, and outside float32, torch's BLAS runs the product.
    assert _cpu_gemm.library(a[:8], b) == "blas"
    assert _cpu_gemm.library(a.double(), b.double()) == "blas"
    # torch.backends.mkldnn disabled: never oneDNN.
    with torch.backends.mkldnn.flags(enabled=False):
        assert _cpu_gemm.library(a, b) == "blas"
        torch.testing.assert_close(_cpu_gemm.mm(a, b), a @ b, atol=1e-4, rtol=1e-5)


def test_bad_library_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLSTM_CPU_GEMM", "mkl")
    with pytest.raises(RuntimeError, match="FASTLSTM_CPU_GEMM must be auto, blas or own"):
        _cpu_gemm.mm(torch.randn(300, 300), torch.randn(300, 300))
    lstm = fastlstm.LSTM(8, 16, backend="cpu")
    with pytest.raises(RuntimeError, match="FASTLSTM_CPU_GEMM"):
        lstm(torch.randn(10, 3, 8))


def test_argument_errors():
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _cpu_gemm.mm(torch.randn(3, 4), torch.randn(5, 2))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        _cpu_gemm.mm(torch.randn(3, 4, 1), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="same dtype"):
        _cpu_gemm.mm(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must have shape"):
        _cpu_gemm.addmm(torch.randn(2, 2), torch.randn(3, 4), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="mat1's dtype"):
        _cpu_gemm.addmm(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 4),
                        torch.randn(4, 2))


def _compare_with_nn_lstm(module, inputs, atol):
    reference = nn.LSTM(module.input_size, module.hidden_size, module.num_layers,
                        bidirectional=module.bidirectional)
    reference.load_state_dict(module.state_dict())
    out, (h, c) = module(inputs)
    out_ref, (h_ref, c_ref) = reference(inputs)
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        out, out_ref = out.data, out_ref.data
    for got, want in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    loss = out.square().sum() + h.sum() + c.sum()
    loss_ref = out_ref.square().sum() + h_ref.sum() + c_ref.sum()
    grads = torch.autograd.grad(loss, list(module.parameters()))
    grads_ref = torch.autograd.grad(loss_ref, list(reference.parameters()))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=50 * atol, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,hidden", [(64, 128), (40, 48), (13, 100), (5, 64)])
def test_lstm_matches_nn_lstm(library, threads, batch, hidden):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        module = fastlstm.LSTM(24, hidden, 2, bidirectional=True, backend="cpu")
        _compare_with_nn_lstm(module, torch.randn(20, batch, 24), atol=2e-5)
    finally:
        torch.set_num_threads(previous)


def test_packed_lstm_matches_nn_lstm(library):
    # Steps with every live row count from 37 down to 1: each remainder of the step kernel.
    lengths = list(range(40, 3, -1))
    sequences = [torch.randn(length, 16) for length in lengths]
    module = fastlstm.LSTM(16, 96, backend="cpu")
    _compare_with_nn_lstm(module, pack_sequence(sequences), atol=2e-5)


# ---- the recurrence op's input projection (w_ih) -------------------------------------------

forward_op = torch.ops.fastlstm.recurrence_forward


def _batch_sizes(lengths):
    return torch.tensor([sum(length > t for length in lengths) for t in range(max(lengths))],
                        dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [3, 12])  # below and above the steps that pack W (fused: 8+)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_projection_in_op_matches_input_gates(library, dtype, steps, packed, reverse, threads):
    batch, input_size, hidden = 37, 20, 48
    if packed:
        lengths = [steps] + sorted(torch.randint(1, steps + 1, (batch - 1,)).tolist(),
                                   reverse=True)
        batch_sizes = _batch_sizes(lengths)
    else:
        batch_sizes = torch.empty(0, dtype=torch.int64)
    rows = int(batch_sizes.sum()) if packed else batch * steps
    x = torch.randn(rows, input_size, dtype=dtype)
    w_ih = torch.randn(4 * hidden, input_size, dtype=dtype) * input_size ** -0.5
    w_hh = torch.randn(4 * hidden, hidden, dtype=dtype) * hidden ** -0.5
    h0 = torch.randn(batch, hidden, dtype=dtype)
    c0 = torch.randn(batch, hidden, dtype=dtype)
    bias = torch.randn(4 * hidden, dtype=dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = forward_op(x, batch_sizes, h0, c0, w_hh, None, reverse, True, bias, w_ih)
        xg = (x.double() @ w_ih.double().t()).to(dtype)
        want = forward_op(xg, batch_sizes, h0, c0, w_hh, None, reverse, True, bias)
    finally:
        torch.set_num_threads(previous)
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("out", "h_n", "c_n", "gates", "cells"), got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("steps", [3, 12])
def test_projection_in_op_gradients(library, steps):
    batch, input_size, hidden = 9, 6, 16
    args = [torch.randn(batch * steps, input_size, dtype=torch.float64),
            torch.randn(batch, hidden, dtype=torch.float64),
            torch.randn(batch, hidden, dtype=torch.float64),
            torch.randn(4 * hidden, hidden, dtype=torch.float64) * 0.3,
            torch.randn(4 * hidden, dtype=torch.float64),
            torch.randn(4 * hidden, input_size, dtype=torch.float64) * 0.3]
    args = [a.requires_grad_() for a in args]
    empty = torch.empty(0, dtype=torch.int64)

    def fused(x, h0, c0, w_hh, bias, w_ih):
        return forward_op(x, empty, h0, c0, w_hh, None, False, True, bias, w_ih)[:3]

    assert torch.autograd.gradcheck(fused, args)
    # float32 on the fused path against the float64 gradients
    args32 = [a.detach().float().requires_grad_() for a in args]
    outputs = fused(*args32)
    weights = [torch.randn_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, args32, weights)
    outputs64 = fused(*args)
    grads64 = torch.autograd.grad(outputs64, args, [w.double() for w in weights])
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


def test_projection_in_op_opcheck():
    x = torch.randn(40, 6, requires_grad=True)
    w_ih = torch.randn(64, 6, requires_grad=True)
    w_hh = torch.randn(64, 16, requires_grad=True)
    h0, c0 = torch.randn(4, 16), torch.randn(4, 16)
    bias = torch.randn(64, requires_grad=True)
    torch.library.opcheck(forward_op, (x, torch.empty(0, dtype=torch.int64), h0, c0, w_hh, None,
                                       False, True, bias, w_ih))


def test_projection_argument_errors():
    x, h0, c0 = torch.randn(40, 6), torch.randn(4, 16), torch.randn(4, 16)
    w_hh = torch.randn(64, 16)
    empty = torch.empty(0, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="w_ih"):
        forward_op(x, empty, h0, c0, w_hh, None, False, False, None, torch.randn(64, 7))
    with pytest.raises(RuntimeError, match="w_ih"):
        forward_op(x, empty, h0, c0, w_hh, None, False, False, None, torch.randn(60, 6))
    with pytest.raises(RuntimeError, match="w_ih"):
        forward_op(x, empty, h0, c0, w_hh, None, False, False, None,
                   torch.randn(64, 6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,hidden,threads,packed", [
    (40, 64, 2, False),   # split by rows
    (6, 300, 2, True),    # split by units (W_hh past 1 MiB), packed sequences
    (6, 48, 1, False),
])
def test_low_precision_split_path(library, dtype, batch, hidden, threads, packed):
    """fp16/bf16 layers on the threaded split path (float32 copies, h rounded every step; bf16
    products on the AVX512-BF16 kernel where the CPU has it) against the specification, with the
    input gates given and with the op projecting x itself."""
    steps, input_size = 12, 24
    generator = torch.Generator().manual_seed(batch + hidden)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    if packed:
        lengths = [steps] + sorted(torch.randint(1, steps + 1, (batch - 1,),
                                                 generator=generator).tolist(), reverse=True)
        batch_sizes = _batch_sizes(lengths)
    else:
        batch_sizes = torch.empty(0, dtype=torch.int64)
    rows = int(batch_sizes.sum()) if packed else batch * steps
    x = randn(rows, input_size)
    w_ih = randn(4 * hidden, input_size, scale=input_size ** -0.5)
    w_hh = randn(4 * hidden, hidden, scale=hidden ** -0.5)
    h0, c0 = randn(batch, hidden, scale=0.5), randn(batch, hidden, scale=0.5)
    bias = randn(4 * hidden, scale=0.1)
    xg = (x.float() @ w_ih.float().t()).to(dtype)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, None, False,
                                                    True, bias)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        given = forward_op(xg, batch_sizes, h0, c0, w_hh, None, False, True, bias)
        projected = forward_op(x, batch_sizes, h0, c0, w_hh, None, False, True, bias, w_ih)
    finally:
        torch.set_num_threads(previous)
    eps = torch.finfo(dtype).eps
    # Float32 sums in another order can flip a rounding of h by one unit; the op's own
    # projection is not rounded to `dtype` (the specification's input gates are): a few more.
    for got, atol in ((given, 2 * eps), (projected, 6 * eps)):
        for name, a, b in zip(("out", "h_n", "c_n", "gates", "cells"), got, want):
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0, msg=name)
