"""The cpu backend's GEMMs (csrc/cpu_gemm.cpp, csrc/step_gemm_avx512.cpp): fastlstm::linear, mm
and addmm against torch on every library FASTLSTM_CPU_GEMM can choose, which library a product
runs on, and whole LSTMs against nn.LSTM with the per-step products on each library.

The AVX-512 step kernel itself is tested element by element by the C++ tests (ctest).
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastlstm
from fastlstm import _backends

if _backends.extension() is None:
    pytest.skip(f"fastlstm._C is not built: {_backends._import_extension()[1]}",
                allow_module_level=True)

from fastlstm import _cpu_gemm  # noqa: E402

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_matches_f_linear(library, dtype):
    x = torch.randn(300, 70, dtype=dtype)
    w = torch.randn(130, 70, dtype=dtype)
    tol = {torch.float32: 1e-4, torch.float64: 1e-12, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(_cpu_gemm.linear(x, w).double(),
                               torch.nn.functional.linear(x.double(), w.double()),
                               atol=tol, rtol=tol)


def test_empty_products(library):
    assert _cpu_gemm.mm(torch.randn(0, 5), torch.randn(5, 3)).shape == (0, 3)
    torch.testing.assert_close(_cpu_gemm.mm(torch.randn(4, 0), torch.randn(0, 3)),
                               torch.zeros(4, 3))
    c = torch.randn(4, 3)
    torch.testing.assert_close(_cpu_gemm.addmm(c, torch.randn(4, 0), torch.randn(0, 3)), c)


def test_linear_gradients(library):
    x = torch.randn(300, 70, requires_grad=True)
    w = torch.randn(130, 70, requires_grad=True)
    g = torch.randn(300, 130)
    grads = torch.autograd.grad(_cpu_gemm.linear(x, w), (x, w), g)
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = torch.autograd.grad(torch.nn.functional.linear(x2, w2), (x2, w2), g.double())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    assert grads[1].is_contiguous()  # lands in .grad without a copy


def test_linear_gradcheck_and_double_backward():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_cpu_gemm.linear, (x, w))
    assert torch.autograd.gradgradcheck(_cpu_gemm.linear, (x, w))


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
        _cpu_gemm.linear(torch.randn(3, 4), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not match"):
        _cpu_gemm.linear(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="must have shape"):
        _cpu_gemm.addmm(torch.randn(2, 2), torch.randn(3, 4), torch.randn(4, 2))


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
