"""The `cuda` backend (csrc/lstm/cuda/lstm_cuda.cu): its ops against the plain-torch specification, and
fastlstm.LSTM(backend="cuda") against nn.LSTM (cuDNN), with each of its kernels forced.

FASTLSTM_CUDA_KERNEL=persistent|step picks the kernel at call time; forcing `persistent` on a
shape it cannot run is an error, so a test that forces it also proves that kernel ran.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from fastlstm import _backends
from fastlstm.lstm.recurrence import reference_recurrence_backward, reference_recurrence_forward

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
KERNELS = ("persistent", "step")


@pytest.fixture
def cuda_ops():
    """torch.ops.fastlstm with CUDA kernels registered; on a GPU machine a missing build fails."""
    reason = _backends.why_unavailable("cuda", DEVICE)
    if reason is not None:
        pytest.fail(f"the cuda backend cannot run on this GPU machine: {reason}")
    return torch.ops.fastlstm


@pytest.fixture
def no_tf32():
    """nn.LSTM on cuDNN may use TF32 for fp32 unless told not to; the fp32 checks need fp32."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    monkeypatch.setenv("FASTLSTM_CUDA_KERNEL", request.param)
    return request.param


def assert_close(actual, expected, atol, rtol, what):
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {index}: "
            f"{actual[index].item():.8g} vs {expected[index].item():.8g}; "
            f"max abs diff {(actual - expected).abs().max().item():.3g}")


# ------------------------------------------------------------------------------------------------
# Op level: torch.ops.fastlstm.recurrence_forward / recurrence_backward vs the specification
# ------------------------------------------------------------------------------------------------

def op_inputs(batch, hidden, proj, lengths, dtype, seed=0, steps=3):
    """Inputs of recurrence_forward for sequences of `lengths` (None: dense, `steps` long)."""
    gen = torch.Generator().manual_seed(seed)
    out_dim = proj or hidden
    if lengths is None:
        batch_sizes = torch.empty(0, dtype=torch.int64)
        rows = steps * batch
    else:
        steps = max(lengths)
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(steps)],
                                   dtype=torch.int64)
        rows = int(batch_sizes.sum())

    def rand(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale)

    tensors = dict(xg=rand(rows, 4 * hidden, scale=1.5), h0=rand(batch, out_dim, scale=0.5),
                   c0=rand(batch, hidden, scale=0.5),
                   w_hh=rand(4 * hidden, out_dim, scale=1.5 / out_dim ** 0.5),
                   w_hr=rand(out_dim, hidden, scale=1.0 / hidden ** 0.5) if proj else None)
    tensors = {k: (None if v is None else v.to(dtype)) for k, v in tensors.items()}
    return tensors, batch_sizes


def on_device(tensors):
    return {k: (None if v is None else v.to(DEVICE)) for k, v in tensors.items()}


def as_float64(tensors):
    return {k: (None if v is None else v.to(torch.float64)) for k, v in tensors.items()}


OP_CASES = [
    # (batch, hidden, proj, lengths): dense when lengths is None
    (4, 16, 0, None),
    (1, 7, 0, None),                 # batch 1, hidden not a multiple of anything
    (5, 300, 0, None),               # several units per block, a partial last block
    (3, 33, 0, [1]),                 # one step; two rows never live
    (6, 24, 0, [5, 5, 3, 2, 2, 1]),  # packed
    (4, 20, 9, None),                # proj_size
    (5, 18, 7, [4, 3, 3, 1, 1]),     # packed with proj_size
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"B{c[0]}H{c[1]}P{c[2]}L{c[3]}")
def test_ops_match_specification(cuda_ops, kernel, case, reverse, dtype):
    batch, hidden, proj, lengths = case
    tensors, batch_sizes = op_inputs(batch, hidden, proj, lengths, dtype)
    args = on_device(tensors)
    if kernel == "persistent" and (proj or dtype == torch.float64):
        # The persistent kernel implements neither; forcing it must say so, not fall back.
        with pytest.raises(RuntimeError, match="persistent"):
            cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"], args["c0"],
                                        args["w_hh"], args["w_hr"], reverse, True)
        return
    out = cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"], args["c0"],
                                      args["w_hh"], args["w_hr"], reverse, True)
    # The specification evaluated in float64 from the same inputs: only the kernel's own
    # rounding (fp32 accumulation) is left in the difference.
    spec = as_float64(tensors)
    expected = reference_recurrence_forward(spec["xg"], batch_sizes, spec["h0"], spec["c0"],
                                            spec["w_hh"], spec["w_hr"], reverse, True)
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, got, want in zip(("out", "h_n", "c_n", "gates", "cells"), out, expected):
        assert got.dtype == dtype, name  # gates/cells: the accumulation dtype, here the same
        assert_close(got, want, atol, atol, f"forward {name}")

    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out[0].shape, generator=gen, dtype=torch.float64).to(dtype)
    grad_hn = torch.randn(out[1].shape, generator=gen, dtype=torch.float64).to(dtype)
    grad_cn = torch.randn(out[2].shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = cuda_ops.recurrence_backward(
        grad_out.to(DEVICE), grad_hn.to(DEVICE), grad_cn.to(DEVICE), batch_sizes, args["c0"],
        args["w_hh"], args["w_hr"], out[3], out[4], reverse)
    expected_grads = reference_recurrence_backward(
        grad_out.double(), grad_hn.double(), grad_cn.double(), batch_sizes, spec["c0"],
        spec["w_hh"], spec["w_hr"], expected[3], expected[4], reverse)
    atol = 1e-11 if dtype == torch.float64 else 5e-5
    for name, got, want in zip(("grad_xg", "grad_h0", "grad_c0", "grad_h_total"), grads,
                               expected_grads):
        assert got.dtype == dtype, name
        assert_close(got, want, atol, atol, f"backward {name}")


@pytest.mark.parametrize("kernel_name", ["auto", "persistent"])
def test_shapes_beyond_the_persistent_kernel(cuda_ops, monkeypatch, kernel_name):
    """Hidden 2100 in fp32 needs >= 4 x 16 x 2100 x 4 bytes of W_hh per block on any GPU with
    <= 132 SMs, more than any block's shared memory; 2048 rows exceed what a block keeps in
    registers. The backward kernel's W_hh columns alone (16 x 8400 x 4 bytes) exceed shared
    memory too, whatever chunk of dgates it stages. `auto` must fall back to the step kernel and
    stay exact; forcing `persistent` must fail and say why."""
    monkeypatch.setenv("FASTLSTM_CUDA_KERNEL", kernel_name)
    for (batch, hidden), reason in (((2, 2100), "shared memory"), ((2048, 8), "registers")):
        tensors, batch_sizes = op_inputs(batch, hidden, 0, None, torch.float32, steps=2)
        args = on_device(tensors)
        call = (args["xg"], batch_sizes, args["h0"], args["c0"], args["w_hh"], None, True, True)
        spec = as_float64(tensors)
        expected = reference_recurrence_forward(spec["xg"], batch_sizes, spec["h0"], spec["c0"],
                                                spec["w_hh"], None, True, True)
        gen = torch.Generator().manual_seed(2)
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in expected[:3]]
        backward_call = (*[g.float().to(DEVICE) for g in grads], batch_sizes, args["c0"],
                         args["w_hh"], None, expected[3].float().to(DEVICE),
                         expected[4].float().to(DEVICE), True)
        if kernel_name == "persistent":
            with pytest.raises(RuntimeError, match=reason):
                cuda_ops.recurrence_forward(*call)
            with pytest.raises(RuntimeError, match=reason):
                cuda_ops.recurrence_backward(*backward_call)
            continue
        out = cuda_ops.recurrence_forward(*call)
        for name, got, want in zip(("out", "h_n", "c_n", "gates", "cells"), out, expected):
            assert_close(got, want, 5e-5, 5e-5, f"hidden {hidden} batch {batch}: {name}")
        got = cuda_ops.recurrence_backward(*backward_call)
        want = reference_recurrence_backward(*grads, batch_sizes, spec["c0"], spec["w_hh"], None,
                                             expected[3], expected[4], True)
        for name, g, w in zip(("grad_xg", "grad_h0", "grad_c0"), got, want):
            assert_close(g, w, 5e-5, 5e-5, f"hidden {hidden} batch {batch}: {name}")


def test_forward_without_save_matches(cuda_ops, kernel):
    tensors, batch_sizes = op_inputs(3, 40, 0, None, torch.float32)
    args = on_device(tensors)
    saved = cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"], args["c0"],
                                        args["w_hh"], None, False, True)
    unsaved = cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"], args["c0"],
                                          args["w_hh"], None, False, False)
    assert unsaved[3].shape[0] == 0 and unsaved[4].shape[0] == 0
    for got, want in zip(unsaved[:3], saved[:3]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(16, 256, None), (5, 200, [6, 4, 4, 2, 1])],
                         ids=["dense", "packed"])
def test_ops_low_precision_forward(cuda_ops, kernel, case, dtype):
    """err(kernel in dtype) <= 2 * err(specification run in dtype), both against float64."""
    batch, hidden, lengths = case
    tensors, batch_sizes = op_inputs(batch, hidden, 0, lengths, dtype, seed=3, steps=24)
    args = on_device(tensors)
    out = cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"], args["c0"],
                                      args["w_hh"], None, False, False)
    spec = as_float64(tensors)
    exact = reference_recurrence_forward(spec["xg"], batch_sizes, spec["h0"], spec["c0"],
                                         spec["w_hh"], None, False, False)
    same_dtype = reference_recurrence_forward(tensors["xg"], batch_sizes, tensors["h0"],
                                              tensors["c0"], tensors["w_hh"], None, False, False)
    for name, index in (("out", 0), ("c_n", 2)):
        err = (out[index].double().cpu() - exact[index]).abs().max().item()
        err_spec = (same_dtype[index].double() - exact[index]).abs().max().item()
        assert err <= 2 * err_spec, f"{name}: error {err:.3g} > 2 x {err_spec:.3g} ({dtype})"


def test_bad_arguments_are_named(cuda_ops):
    tensors, batch_sizes = op_inputs(3, 8, 0, None, torch.float32)
    args = on_device(tensors)
    with pytest.raises(RuntimeError, match="w_hh"):
        cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"], args["c0"],
                                    args["w_hh"][:, :5], None, False, True)
    with pytest.raises(RuntimeError, match="batch_sizes"):
        cuda_ops.recurrence_forward(args["xg"], torch.tensor([3, 3, 2], dtype=torch.int64),
                                    args["h0"], args["c0"], args["w_hh"], None, False, True)
    with pytest.raises(RuntimeError, match="h0"):
        cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"].double(), args["c0"],
                                    args["w_hh"], None, False, True)


def test_unknown_kernel_name_is_an_error(cuda_ops, monkeypatch):
    monkeypatch.setenv("FASTLSTM_CUDA_KERNEL", "fastest")
    tensors, batch_sizes = op_inputs(2, 8, 0, None, torch.float32)
    args = on_device(tensors)
    with pytest.raises(RuntimeError, match="FASTLSTM_CUDA_KERNEL"):
        cuda_ops.recurrence_forward(args["xg"], batch_sizes, args["h0"], args["c0"],
                                    args["w_hh"], None, False, True)


# ------------------------------------------------------------------------------------------------
# Module level: fastlstm.LSTM(backend="cuda") vs nn.LSTM (cuDNN)
# ------------------------------------------------------------------------------------------------

MODULE_CASES = [
    dict(input_size=5, hidden_size=7, num_layers=1, batch=3, steps=4),
    dict(input_size=8, hidden_size=32, num_layers=2, bidirectional=True, batch=4, steps=5),
    dict(input_size=6, hidden_size=20, num_layers=2, bidirectional=True, proj_size=9, batch=3,
         steps=4),
    dict(input_size=4, hidden_size=24, num_layers=1, batch_first=True, batch=5, steps=6,
         lengths=[3, 6, 1, 4, 6]),                       # packed, unsorted
    dict(input_size=7, hidden_size=15, num_layers=2, bidirectional=True, batch=4, steps=5,
         lengths=[2, 5, 5, 1], proj_size=6),             # packed, proj, bidirectional
    dict(input_size=3, hidden_size=9, num_layers=1, bias=False, batch=1, steps=1),
    dict(input_size=10, hidden_size=300, num_layers=1, batch_first=True, batch=3, steps=3),
]


def module_case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items() if k != "lengths") + (
        "-packed" if "lengths" in case else "")


def make_modules(case, dtype=torch.float32):
    import fastlstm
    options = {k: v for k, v in case.items() if k not in ("batch", "steps", "lengths")}
    reference = nn.LSTM(**options).to(DEVICE, dtype)
    fast = fastlstm.LSTM(**options, backend="cuda").to(DEVICE, dtype)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def module_inputs(case, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, steps = case["batch"], case["steps"]
    shape = (batch, steps, case["input_size"]) if case.get("batch_first") else (
        steps, batch, case["input_size"])
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    directions = 2 if case.get("bidirectional") else 1
    layers = case.get("num_layers", 1)
    out_dim = case.get("proj_size", 0) or case["hidden_size"]
    h0 = (0.5 * torch.randn(layers * directions, batch, out_dim, generator=gen)).to(DEVICE, dtype)
    c0 = (0.5 * torch.randn(layers * directions, batch, case["hidden_size"],
                            generator=gen)).to(DEVICE, dtype)
    return x, h0, c0


def run_module(module, case, x, h0, c0, seed=1):
    """Forward, then backward of a fixed random projection of every output; returns
    (outputs, gradients) with the input, state and parameter gradients by name."""
    x = x.detach().clone().requires_grad_(True)
    h0 = h0.detach().clone().requires_grad_(True)
    c0 = c0.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    if "lengths" in case:
        lengths = torch.tensor(case["lengths"])
        packed = pack_padded_sequence(x, lengths, batch_first=bool(case.get("batch_first")),
                                      enforce_sorted=False)
        out, (h_n, c_n) = module(packed, (h0, c0))
        out = out.data
    else:
        out, (h_n, c_n) = module(x, (h0, c0))
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen).to(t.device, t.dtype) for t in (out, h_n, c_n)]
    loss = sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights))
    loss.backward()
    grads = {"x": x.grad, "h0": h0.grad, "c0": c0.grad}
    plain = getattr(module, "_orig_mod", module)  # a torch.compile wrapper holds the module
    grads.update({name: p.grad for name, p in plain.named_parameters()})
    return (out, h_n, c_n), grads


@pytest.mark.parametrize("case", MODULE_CASES, ids=module_case_id)
def test_module_matches_cudnn_fp32(cuda_ops, no_tf32, kernel, case):
    if kernel == "persistent" and case.get("proj_size", 0):
        pytest.skip("the persistent kernel does not implement proj_size (forcing it is an "
                    "error, checked in test_ops_match_specification)")
    reference, fast = make_modules(case)
    x, h0, c0 = module_inputs(case)
    ref_outputs, ref_grads = run_module(reference, case, x, h0, c0)
    outputs, grads = run_module(fast, case, x, h0, c0)
    for name, got, want in zip(("output", "h_n", "c_n"), outputs, ref_outputs):
        assert_close(got, want, 2e-5, 1e-4, name)
    for name, want in ref_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(grads[name], want, 1e-4, 1e-4, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [128, 256])
def test_module_low_precision_error_within_2x_cudnn(cuda_ops, kernel, hidden, dtype):
    """err(fastlstm in dtype) <= 2 * err(nn.LSTM in dtype), both against nn.LSTM in float64,
    for outputs, final states and every gradient."""
    case = dict(input_size=64, hidden_size=hidden, num_layers=1, batch=16, steps=32)
    exact, _ = make_modules(case, torch.float64)
    reference, fast = make_modules(case, dtype)
    reference.load_state_dict(exact.state_dict())
    fast.load_state_dict(exact.state_dict())
    x, h0, c0 = module_inputs(case, torch.float64, seed=5)
    exact_outputs, exact_grads = run_module(exact, case, x, h0, c0)
    low = [t.to(dtype) for t in (x, h0, c0)]
    ref_outputs, ref_grads = run_module(reference, case, *low)
    outputs, grads = run_module(fast, case, *low)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    for name, got, ref, want in zip(("output", "h_n", "c_n"), outputs, ref_outputs,
                                    exact_outputs):
        assert err(got, want) <= 2 * err(ref, want), (
            f"{name}: error {err(got, want):.3g} > 2 x nn.LSTM's {err(ref, want):.3g} ({dtype})")
    for name, want in exact_grads.items():
        assert err(grads[name], want) <= 2 * err(ref_grads[name], want), (
            f"grad {name}: error {err(grads[name], want):.3g} > 2 x nn.LSTM's "
            f"{err(ref_grads[name], want):.3g} ({dtype})")


@pytest.mark.parametrize("case", [MODULE_CASES[1], MODULE_CASES[3]], ids=module_case_id)
def test_torch_compile_fullgraph_matches_eager(cuda_ops, no_tf32, kernel, case):
    _, fast = make_modules(case)
    x, h0, c0 = module_inputs(case)
    eager_outputs, eager_grads = run_module(fast, case, x, h0, c0)
    compiled = torch.compile(fast, fullgraph=True)
    outputs, grads = run_module(compiled, case, x, h0, c0)
    for name, got, want in zip(("output", "h_n", "c_n"), outputs, eager_outputs):
        assert_close(got, want, 1e-6, 1e-5, f"compiled {name}")
    for name, want in eager_grads.items():
        assert_close(grads[name], want, 1e-6, 1e-5, f"compiled grad {name}")


@pytest.mark.parametrize("case", [(3, 16, 0, None), (4, 12, 5, [3, 2, 2, 1])],
                         ids=["dense", "packed-proj"])
def test_opcheck(cuda_ops, kernel, case):
    """Schema, fake kernels and autograd registration of the CUDA kernels, as torch checks them."""
    from fastlstm.lstm import ops as _extension  # noqa: F401  (registers fake kernels and autograd)

    batch, hidden, proj, lengths = case
    if kernel == "persistent" and proj:
        pytest.skip("the persistent kernel does not implement proj_size")
    tensors, batch_sizes = op_inputs(batch, hidden, proj, lengths, torch.float32)
    args = on_device(tensors)
    for name in ("xg", "h0", "c0", "w_hh", "w_hr"):
        if args[name] is not None:
            args[name].requires_grad_(True)
    forward_args = (args["xg"], batch_sizes, args["h0"], args["c0"], args["w_hh"], args["w_hr"],
                    False, True)
    torch.library.opcheck(cuda_ops.recurrence_forward.default, forward_args)
    with torch.no_grad():
        out = cuda_ops.recurrence_forward(*forward_args)
    backward_args = (torch.randn_like(out[0]), torch.randn_like(out[1]),
                     torch.randn_like(out[2]), batch_sizes, args["c0"].detach(),
                     args["w_hh"].detach(),
                     None if args["w_hr"] is None else args["w_hr"].detach(), out[3], out[4],
                     False)
    torch.library.opcheck(cuda_ops.recurrence_backward.default, backward_args)


# ------------------------------------------------------------------------------------------------
# Backward in fp16/bf16 (and fp32 at sizes where the persistent kernel stages dgates in chunks)
# ------------------------------------------------------------------------------------------------

# (batch, hidden, lengths, steps). On a 132-SM H200, hidden 1024 with batch 16 makes the persistent
# backward stage its 4096 dgates columns in chunks (2 in bf16/fp16, 3 in fp32).
BACKWARD_CASES = [
    (16, 256, None, 24),
    (16, 1024, None, 12),
    (5, 200, [6, 4, 4, 2, 1], None),
    (12, 700, [9, 9, 7, 5, 5, 3, 2, 2, 1, 1, 1, 1], None),
]


def backward_errors(cuda_ops, case, dtype, reverse):
    """Errors of the CUDA backward op and of the specification run in `dtype`, both against the
    specification in float64, from the same saved forward tensors (the float64 forward's)."""
    batch, hidden, lengths, steps = case
    tensors, batch_sizes = op_inputs(batch, hidden, 0, lengths, dtype, seed=11, steps=steps or 3)
    spec = as_float64(tensors)
    forward = reference_recurrence_forward(spec["xg"], batch_sizes, spec["h0"], spec["c0"],
                                           spec["w_hh"], None, reverse, True)
    gen = torch.Generator().manual_seed(12)
    grads_in = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in forward[:3]]
    exact = reference_recurrence_backward(*grads_in, batch_sizes, spec["c0"], spec["w_hh"], None,
                                          forward[3], forward[4], reverse)
    low = [g.to(dtype) for g in grads_in]
    gates, cells = forward[3].float(), forward[4].float()
    same_dtype = reference_recurrence_backward(*low, batch_sizes, tensors["c0"], tensors["w_hh"],
                                               None, gates, cells, reverse)
    got = cuda_ops.recurrence_backward(*[g.to(DEVICE) for g in low], batch_sizes,
                                       tensors["c0"].to(DEVICE), tensors["w_hh"].to(DEVICE), None,
                                       gates.to(DEVICE), cells.to(DEVICE), reverse)
    names = ("grad_xg", "grad_h0", "grad_c0")
    return names, got[:3], same_dtype[:3], exact[:3]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", BACKWARD_CASES,
                         ids=lambda c: f"B{c[0]}H{c[1]}" + ("packed" if c[2] else "dense"))
def test_ops_low_precision_backward(cuda_ops, kernel, case, dtype, reverse):
    """err(kernel's backward in dtype) <= 2 * err(specification in dtype), both against float64:
    the gate gradients must reach dh = dgates @ W_hh in fp32, as in the specification."""
    names, got, same_dtype, exact = backward_errors(cuda_ops, case, dtype, reverse)
    for name, g, s, e in zip(names, got, same_dtype, exact):
        assert g.dtype == dtype, name
        err = (g.double().cpu() - e).abs().max().item()
        err_spec = (s.double() - e).abs().max().item()
        assert err <= 2 * err_spec, f"{name}: error {err:.3g} > 2 x {err_spec:.3g} ({dtype})"


@pytest.mark.parametrize("case", BACKWARD_CASES[1:2] + BACKWARD_CASES[3:],
                         ids=lambda c: f"B{c[0]}H{c[1]}" + ("packed" if c[2] else "dense"))
def test_ops_fp32_backward_large(cuda_ops, kernel, case):
    """fp32 backward at sizes where the persistent kernel stages dgates in several chunks."""
    names, got, _, exact = backward_errors(cuda_ops, case, torch.float32, False)
    for name, g, e in zip(names, got, exact):
        assert_close(g, e, 5e-5, 5e-5, f"fp32 {name}")


MODULE_LOW_PRECISION_CASES = [
    dict(input_size=64, hidden_size=1024, num_layers=1, batch=16, steps=12),
    dict(input_size=32, hidden_size=200, num_layers=2, bidirectional=True, batch=6, steps=10,
         lengths=[10, 3, 7, 10, 1, 6]),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", MODULE_LOW_PRECISION_CASES, ids=module_case_id)
def test_module_low_precision_large_within_2x_cudnn(cuda_ops, kernel, case, dtype):
    """As test_module_low_precision_error_within_2x_cudnn, at a size where the persistent
    backward stages dgates in chunks, and packed + bidirectional + 2 layers."""
    exact, _ = make_modules(case, torch.float64)
    reference, fast = make_modules(case, dtype)
    reference.load_state_dict(exact.state_dict())
    fast.load_state_dict(exact.state_dict())
    x, h0, c0 = module_inputs(case, torch.float64, seed=6)
    exact_outputs, exact_grads = run_module(exact, case, x, h0, c0)
    low = [t.to(dtype) for t in (x, h0, c0)]
    ref_outputs, ref_grads = run_module(reference, case, *low)
    outputs, grads = run_module(fast, case, *low)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    worse = []
    for name, got, ref, want in zip(("output", "h_n", "c_n"), outputs, ref_outputs,
                                    exact_outputs):
        if err(got, want) > 2 * err(ref, want):
            worse.append(f"{name}: {err(got, want):.3g} > 2 x {err(ref, want):.3g}")
    for name, want in exact_grads.items():
        if err(grads[name], want) > 2 * err(ref_grads[name], want):
            worse.append(f"grad {name}: {err(grads[name], want):.3g} > 2 x "
                         f"{err(ref_grads[name], want):.3g}")
    assert not worse, f"{dtype}: " + "; ".join(worse)


# ------------------------------------------------------------------------------------------------
# CUDA graphs: a captured packed forward + backward replays with new data like eager calls
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_forward_backward_in_cuda_graph(cuda_ops, kernel, dtype):
    """The packed step table must not come from host memory baked into the graph: after the
    capture, eager calls with other packed layouts of the same length run (they would reuse and
    overwrite a pinned host buffer), then the graph replays on new data and must equal eager."""
    lengths = [9, 7, 7, 4, 2, 1]
    batch, hidden = len(lengths), 64
    tensors, batch_sizes = op_inputs(batch, hidden, 0, lengths, dtype, seed=21)
    static = on_device(tensors)
    rows = int(batch_sizes.sum())
    gen = torch.Generator().manual_seed(22)
    static_grads = [torch.randn(shape, generator=gen).to(DEVICE, dtype)
                    for shape in ((rows, hidden), (batch, hidden), (batch, hidden))]

    def step():
        out = cuda_ops.recurrence_forward(static["xg"], batch_sizes, static["h0"], static["c0"],
                                          static["w_hh"], None, False, True)
        grads = cuda_ops.recurrence_backward(*static_grads, batch_sizes, static["c0"],
                                             static["w_hh"], None, out[3], out[4], False)
        return out[:3] + grads[:3]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (occupancy, allocator)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    # Other layouts with as many steps, run eagerly after the capture.
    for other in ([6, 6, 5, 5, 5, 5, 5, 5, 5], [6, 2, 2, 2, 1, 1, 1, 1, 1]):
        other_sizes = torch.tensor(other, dtype=torch.int64)
        xg = torch.randn(sum(other), 4 * hidden, generator=gen).to(DEVICE, dtype)
        result = cuda_ops.recurrence_forward(xg, other_sizes, static["h0"], static["c0"],
                                             static["w_hh"], None, False, True)
        cuda_ops.recurrence_backward(torch.randn_like(result[0]), torch.randn_like(result[1]),
                                     torch.randn_like(result[2]), other_sizes, static["c0"],
                                     static["w_hh"], None, result[3], result[4], False)

    fresh, _ = op_inputs(batch, hidden, 0, lengths, dtype, seed=24)
    for name in ("xg", "h0", "c0", "w_hh"):
        static[name].copy_(fresh[name])
    for grad in static_grads:
        grad.copy_(torch.randn(grad.shape, generator=gen).to(DEVICE, dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    names = ("out", "h_n", "c_n", "grad_xg", "grad_h0", "grad_c0")
    for name, got, want in zip(names, captured, eager):
        assert torch.equal(got, want), (
            f"{name}: graph replay differs from eager by "
            f"{(got.double() - want.double()).abs().max().item():.3g}")
