"""Tests of the Triton backend: the two recurrence ops against the plain-torch specification in
fastlstm/lstm/recurrence.py, for both kernel designs, and fastlstm.LSTM(backend="triton") against
nn.LSTM. Without a GPU the kernels run on the CPU under TRITON_INTERPRET=1 (see conftest.py).

Tolerances, fp32: ATOL_OUT on outputs, states, gates and cells; ATOL_GRAD on gradients (both
absolute, rtol 0). Low precision on the GPU: the error against an fp64 reference is at most
LOW_PRECISION_FACTOR times the error nn.LSTM (cuDNN) makes in the same dtype.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastlstm
from fastlstm.lstm import recurrence as _recurrence

triton_lstm = pytest.importorskip("fastlstm.lstm.triton.recurrence", reason="triton is not installed")

ATOL_OUT = 1e-5
ATOL_GRAD = 1e-4
ATOL_FP64 = 1e-12
LOW_PRECISION_FACTOR = 2.0

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DESIGNS = ("sequence", "step")


@pytest.fixture(autouse=True)
def _no_tf32():
    """On a GPU, nn.LSTM (cuDNN) may multiply fp32 in TF32 unless told not to; every fp32
    comparison here needs fp32."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


@pytest.fixture(params=DESIGNS)
def design(request, monkeypatch):
    monkeypatch.setattr(triton_lstm, "DESIGN", request.param)
    return request.param


def assert_close(name, got, want, atol, rtol=0.0):
    """|got - want| <= atol + rtol * |want| everywhere (rtol 0 unless a test says otherwise)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    if got.numel() == 0:
        return
    error = (got.double() - want.double()).abs()
    allowed = atol + rtol * want.double().abs()
    worst = int((error / allowed).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
    first_bad = (~(error <= allowed)).nonzero()  # NaN counts as a mismatch
    assert len(first_bad) == 0, (
        f"{name}: error {error.reshape(-1)[worst].item():.3g} > {atol:g} + {rtol:g} x |want| at "
        f"{index} (got {got.reshape(-1)[worst].item():.6g}, want "
        f"{want.reshape(-1)[worst].item():.6g}); first mismatch at "
        f"{tuple(first_bad[0].tolist())}, {len(first_bad)} mismatches; max abs error "
        f"{error.max().item():.3g}")


def lengths_for(batch, steps, generator):
    """Sorted (longest first) sequence lengths in [1, steps], the first exactly steps."""
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator).tolist()
    lengths[0] = steps
    return sorted(lengths, reverse=True)


def make_case(batch, hidden, proj, steps, packed, dtype=torch.float32, seed=0):
    """Inputs of recurrence_forward/backward; proj == hidden means no projection."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(
            dtype=dtype, device=DEVICE)

    if packed:
        lengths = lengths_for(batch, steps, generator)
        batch_sizes = torch.tensor([sum(length > t for length in lengths) for t in range(steps)],
                                   dtype=torch.int64)
        rows = int(batch_sizes.sum())
    else:
        batch_sizes = torch.empty(0, dtype=torch.int64)
        rows = steps * batch
    w_hr = randn(proj, hidden, scale=0.5) if proj != hidden else None
    forward_args = (randn(rows, 4 * hidden), batch_sizes, randn(batch, proj), randn(batch, hidden),
                    randn(4 * hidden, proj, scale=0.5), w_hr)
    grads = (randn(rows, proj), randn(batch, proj), randn(batch, hidden))
    return forward_args, grads


FORWARD_NAMES = ("out", "h_n", "c_n", "gates", "cells")
BACKWARD_NAMES = ("grad_xg", "grad_h0", "grad_c0", "grad_h_total")

# (batch, hidden, proj, steps): proj == hidden means no projection. Odd sizes, B = 1, T = 1.
OP_SHAPES = [
    (3, 5, 5, 4),
    (1, 7, 7, 3),
    (4, 13, 13, 1),
    (3, 7, 5, 4),
    (2, 5, 3, 3),
    (1, 13, 7, 2),
]


def check_ops(batch, hidden, proj, steps, packed, reverse, dtype, atol_out, atol_grad, seed=0):
    (xg, batch_sizes, h0, c0, w_hh, w_hr), (grad_out, grad_hn, grad_cn) = make_case(
        batch, hidden, proj, steps, packed, dtype, seed)
    got = triton_lstm.recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, True)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr,
                                                    reverse, True)
    for name, g, w in zip(FORWARD_NAMES, got, want):
        assert_close(name, g, w, atol_out)
    # The backward op runs on the reference's saved tensors so that each op is checked alone.
    gates, cells = want[3], want[4]
    got = triton_lstm.recurrence_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr,
                                          gates, cells, reverse)
    want = _recurrence.reference_recurrence_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0,
                                                     w_hh, w_hr, gates, cells, reverse)
    for name, g, w in zip(BACKWARD_NAMES, got, want):
        assert_close(name, g, w, atol_grad)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("batch,hidden,proj,steps", OP_SHAPES)
def test_ops_fp32(design, batch, hidden, proj, steps, packed, reverse):
    check_ops(batch, hidden, proj, steps, packed, reverse, torch.float32, ATOL_OUT, ATOL_GRAD)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("proj", [6, 4])
def test_ops_fp64(design, packed, reverse, proj):
    check_ops(3, 6, proj, 4, packed, reverse, torch.float64, ATOL_FP64, ATOL_FP64)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("proj", [21, 18])
def test_ops_many_tiles(design, monkeypatch, proj, reverse):
    """Several batch and hidden tiles per launch, and several K chunks per tile."""
    monkeypatch.setattr(triton_lstm, "_step_tiles", lambda batch, n, k: (16, 16, 16))
    monkeypatch.setattr(triton_lstm, "_sequence_block_b", lambda batch: 16)
    check_ops(35, 21, proj, 3, True, reverse, torch.float32, ATOL_OUT, ATOL_GRAD)


def test_forward_without_save(design):
    (xg, batch_sizes, h0, c0, w_hh, w_hr), _ = make_case(3, 5, 4, 3, True)
    got = triton_lstm.recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, False, False)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, False,
                                                    False)
    for name, g, w in zip(FORWARD_NAMES, got, want):
        assert_close(name, g, w, ATOL_OUT)
    assert got[3].shape == (0, 20) and got[4].shape == (0, 5)


def test_empty_sequence(design):
    h0, c0 = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    xg = torch.empty(0, 20, device=DEVICE)
    w_hh = torch.randn(20, 5, device=DEVICE)
    out, h_n, c_n, gates, cells = triton_lstm.recurrence_forward(
        xg, torch.empty(0, dtype=torch.int64), h0, c0, w_hh, None, False, True)
    assert out.shape == (0, 5) and gates.shape == (0, 20) and cells.shape == (0, 5)
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    assert h_n.data_ptr() != h0.data_ptr()  # outputs of a custom op never alias its inputs


def test_non_contiguous_inputs(design):
    (xg, batch_sizes, h0, c0, w_hh, w_hr), grads = make_case(3, 5, 4, 3, False)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, True,
                                                    True)
    strided = [t.t().contiguous().t() for t in (xg, h0, c0, w_hh, w_hr)]
    assert not any(t.is_contiguous() for t in strided)
    got = triton_lstm.recurrence_forward(strided[0], batch_sizes, *strided[1:], True, True)
    for name, g, w in zip(FORWARD_NAMES, got, want):
        assert_close(name, g, w, ATOL_OUT)
    grads = [t.t().contiguous().t() for t in grads]
    gates, cells = [t.t().contiguous().t() for t in want[3:]]
    got = triton_lstm.recurrence_backward(*grads, batch_sizes, strided[2], strided[3], strided[4],
                                          gates, cells, True)
    want = _recurrence.reference_recurrence_backward(*grads, batch_sizes, c0, w_hh, w_hr,
                                                     want[3], want[4], True)
    for name, g, w in zip(BACKWARD_NAMES, got, want):
        assert_close(name, g, w, ATOL_GRAD)


def test_select_design(monkeypatch):
    limit = triton_lstm.SEQUENCE_MAX_SIZE
    assert triton_lstm.select_design(limit, 0, 4) == "sequence"
    assert triton_lstm.select_design(5, 3, 4) == "sequence"
    assert triton_lstm.select_design(limit + 1, 0, 4) == "step"
    assert triton_lstm.select_design(16, limit + 1, 4) == "step"
    monkeypatch.setattr(triton_lstm, "DESIGN", "step")
    assert triton_lstm.select_design(5, 0, 4) == "step"
    monkeypatch.setattr(triton_lstm, "DESIGN", "sequence")
    with pytest.raises(ValueError, match=f"hidden_size and proj_size up to {limit}"):
        triton_lstm.select_design(limit + 1, 0, 4)
    monkeypatch.setattr(triton_lstm, "DESIGN", "fast")
    with pytest.raises(ValueError, match="DESIGN must be"):
        triton_lstm.select_design(5, 0, 4)


class _DoesNotFit:
    """Stands in for a sequence-fused kernel whose launch finds too little shared memory."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches += 1
            raise triton_lstm.OutOfResources(300000, 232448, "shared memory")
        return launch


@pytest.mark.parametrize("proj", [5, 3])
def test_sequence_falls_back_to_step_when_it_does_not_fit(monkeypatch, proj):
    monkeypatch.setattr(triton_lstm, "DESIGN", "sequence")
    monkeypatch.setattr(triton_lstm, "_SEQUENCE_DOES_NOT_FIT", set())
    forward_kernel, backward_kernel = _DoesNotFit(), _DoesNotFit()
    monkeypatch.setattr(triton_lstm, "_lstm_fwd_sequence_kernel", forward_kernel)
    monkeypatch.setattr(triton_lstm, "_lstm_bwd_sequence_kernel", backward_kernel)
    for _ in range(2):  # the second call remembers the shape and does not try again
        check_ops(3, 5, proj, 3, True, True, torch.float32, ATOL_OUT, ATOL_GRAD)
    assert forward_kernel.launches == 1 and backward_kernel.launches == 1


def test_bad_inputs(monkeypatch):
    (xg, batch_sizes, h0, c0, w_hh, w_hr), _ = make_case(3, 5, 4, 3, True)
    forward = triton_lstm.recurrence_forward

    def call(**changes):
        args = dict(xg=xg, batch_sizes=batch_sizes, h0=h0, c0=c0, w_hh=w_hh, w_hr=w_hr)
        args.update(changes)
        return forward(args["xg"], args["batch_sizes"], args["h0"], args["c0"], args["w_hh"],
                       args["w_hr"], False, True)

    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 4\)"):
        call(h0=h0[:2])
    with pytest.raises(ValueError, match=r"c0 must have dtype torch.float32"):
        call(c0=c0.double())
    with pytest.raises(ValueError, match=r"w_hh must have shape \(20, 4\)"):
        call(w_hh=w_hh[:, :3])
    with pytest.raises(ValueError, match=r"w_hr must have shape \(4, 5\)"):
        call(w_hr=w_hr.t())
    with pytest.raises(ValueError, match="without w_hr, h0 must have hidden_size=5"):
        call(w_hr=None)
    with pytest.raises(ValueError, match="xg must have shape"):
        call(xg=xg[:, :19])
    with pytest.raises(ValueError, match="batch_sizes must be a 1-D int64 CPU tensor"):
        call(batch_sizes=batch_sizes.int())
    rows7 = torch.randn(7, 20, device=DEVICE)  # valid packed batch_sizes: [3, 2, 2]
    call(xg=rows7, batch_sizes=torch.tensor([3, 2, 2]))
    with pytest.raises(ValueError, match="batch_sizes sum to 6 but there are 7 rows"):
        call(xg=rows7, batch_sizes=torch.tensor([3, 2, 1]))
    with pytest.raises(ValueError, match="non-increasing"):
        call(xg=rows7, batch_sizes=torch.tensor([2, 3, 2]))
    with pytest.raises(ValueError, match="at most the batch 3"):
        call(xg=rows7, batch_sizes=torch.tensor([4, 3]))
    with pytest.raises(ValueError, match="divisible by the batch 3"):
        call(xg=rows7, batch_sizes=torch.empty(0, dtype=torch.int64))
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="xg has dtype torch.float16"):
            call(xg=xg.half(), h0=h0.half(), c0=c0.half(), w_hh=w_hh.half(), w_hr=w_hr.half())
        monkeypatch.setattr(triton_lstm, "_interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            call()


def test_backward_needs_saved_tensors():
    (xg, batch_sizes, h0, c0, w_hh, w_hr), (grad_out, grad_hn, grad_cn) = make_case(3, 5, 4, 3,
                                                                                   True)
    _, _, _, gates, cells = triton_lstm.recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr,
                                                           False, False)
    with pytest.raises(RuntimeError, match="save=True"):
        triton_lstm.recurrence_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr,
                                        gates, cells, False)


def test_opcheck():
    (xg, batch_sizes, h0, c0, w_hh, w_hr), (grad_out, grad_hn, grad_cn) = make_case(2, 5, 3, 3,
                                                                                   True)
    inputs = [t.requires_grad_() for t in (xg, h0, c0, w_hh, w_hr)]
    # test_aot_dispatch_dynamic is left to test_torch_compile_fullgraph, which also runs
    # AOTAutograd over the op (and is several times cheaper under the interpreter).
    torch.library.opcheck(triton_lstm.recurrence_forward,
                          (inputs[0], batch_sizes, *inputs[1:], True, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    _, _, _, gates, cells = _recurrence.reference_recurrence_forward(
        xg.detach(), batch_sizes, h0.detach(), c0.detach(), w_hh.detach(), w_hr.detach(), True,
        True)
    torch.library.opcheck(triton_lstm.recurrence_backward,
                          (grad_out, grad_hn, grad_cn, batch_sizes, c0.detach(), w_hh.detach(),
                           w_hr.detach(), gates, cells, True),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# Module level: fastlstm.LSTM(backend="triton") against nn.LSTM.
# ----------------------------------------------------------------------------------------------

def twin_modules(dtype=torch.float32, **kwargs):
    reference = nn.LSTM(**kwargs).to(device=DEVICE, dtype=dtype)
    module = fastlstm.LSTM(**kwargs, backend="triton").to(device=DEVICE, dtype=dtype)
    module.load_state_dict(reference.state_dict())
    return reference, module


def run_and_grad(module, input, hx):
    """Forward, then backward of a fixed random weighting of every output; returns tensors."""
    data = input.data if hasattr(input, "batch_sizes") else input
    output, (h_n, c_n) = module(input, hx)
    output_data = output.data if hasattr(output, "batch_sizes") else output
    generator = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum()
               for t in (output_data, h_n, c_n))
    states = [] if hx is None else list(hx)
    leaves = [t for t in (data, *states) if t.requires_grad]
    grads = torch.autograd.grad(loss, [*leaves, *module.parameters()])
    return [output_data, h_n, c_n], list(grads)


def compare_modules(reference, module, input, hx, leaf_inputs):
    want_out, want_grads = run_and_grad(reference, input, hx)
    got_out, got_grads = run_and_grad(module, input, hx)
    for name, g, w in zip(("output", "h_n", "c_n"), got_out, want_out):
        assert_close(name, g, w, ATOL_OUT)
    names = [*leaf_inputs, *[n for n, _ in reference.named_parameters()]]
    for name, g, w in zip(names, got_grads, want_grads):
        assert_close(f"grad {name}", g, w, ATOL_GRAD)


def test_module_dense(design):
    reference, module = twin_modules(input_size=3, hidden_size=7, num_layers=2)
    x = torch.randn(4, 2, 3, device=DEVICE, requires_grad=True)
    hx = (torch.randn(2, 2, 7, device=DEVICE, requires_grad=True),
          torch.randn(2, 2, 7, device=DEVICE, requires_grad=True))
    compare_modules(reference, module, x, hx, ["input", "h0", "c0"])


def test_module_bidirectional_proj_packed_unsorted(design):
    reference, module = twin_modules(input_size=3, hidden_size=6, num_layers=2,
                                     bidirectional=True, proj_size=4)
    sequences = [torch.randn(length, 3, device=DEVICE) for length in (2, 5, 1, 3)]
    packed = pack_sequence(sequences, enforce_sorted=False)
    packed.data.requires_grad_()
    hx = (torch.randn(4, 4, 4, device=DEVICE, requires_grad=True),
          torch.randn(4, 4, 6, device=DEVICE, requires_grad=True))
    compare_modules(reference, module, packed, hx, ["input", "h0", "c0"])


def test_module_batch_first_no_bias_default_state(design):
    reference, module = twin_modules(input_size=4, hidden_size=5, batch_first=True, bias=False,
                                     bidirectional=True)
    x = torch.randn(1, 3, 4, device=DEVICE, requires_grad=True)
    want_out, want_grads = run_and_grad(reference, x, None)
    got_out, got_grads = run_and_grad(module, x, None)
    for name, g, w in zip(("output", "h_n", "c_n"), got_out, want_out):
        assert_close(name, g, w, ATOL_OUT)
    names = ["input", *[n for n, _ in reference.named_parameters()]]
    for name, g, w in zip(names, got_grads, want_grads):
        assert_close(f"grad {name}", g, w, ATOL_GRAD)


def test_module_unbatched(design):
    reference, module = twin_modules(input_size=3, hidden_size=5, proj_size=2)
    x = torch.randn(3, 3, device=DEVICE)
    want, (want_h, want_c) = reference(x)
    got, (got_h, got_c) = module(x)
    for name, g, w in (("output", got, want), ("h_n", got_h, want_h), ("c_n", got_c, want_c)):
        assert_close(name, g, w, ATOL_OUT)


def test_lstm_cell(design):
    reference = nn.LSTMCell(3, 5).to(DEVICE)
    cell = fastlstm.LSTMCell(3, 5, backend="triton").to(DEVICE)
    cell.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    hx = (torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE))
    want = reference(x, hx)
    got = cell(x, hx)
    for name, g, w in zip(("h", "c"), got, want):
        assert_close(name, g, w, ATOL_OUT)
    want_grads = torch.autograd.grad(sum(t.sum() for t in want), [x, *reference.parameters()])
    got_grads = torch.autograd.grad(sum(t.sum() for t in got), [x, *cell.parameters()])
    for name, g, w in zip(["input", *[n for n, _ in reference.named_parameters()]], got_grads,
                          want_grads):
        assert_close(f"grad {name}", g, w, ATOL_GRAD)


def test_module_float64(design):
    reference, module = twin_modules(dtype=torch.float64, input_size=3, hidden_size=5,
                                     proj_size=3, bidirectional=True)
    x = torch.randn(3, 2, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    want_out, want_grads = run_and_grad(reference, x, None)
    got_out, got_grads = run_and_grad(module, x, None)
    for name, g, w in zip(("output", "h_n", "c_n"), got_out, want_out):
        assert_close(name, g, w, ATOL_FP64)
    for g, w in zip(got_grads, want_grads):
        assert_close("grad", g, w, ATOL_FP64)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastlstm.LSTM(3, 6, proj_size=4, backend="triton")
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        output, (h_n, c_n) = self.lstm(x)
        return self.head(output).sum() + h_n.sum() + c_n.sum()


@pytest.mark.parametrize("compile_backend", [
    "aot_eager",
    # Inductor adds C++ codegen for the graph around the opaque ops (~25 s here), hence slow.
    pytest.param("inductor", marks=pytest.mark.slow),
])
def test_torch_compile_fullgraph(compile_backend):
    """fullgraph compile traces through fastlstm.LSTM: the Triton ops are opaque custom ops with
    fake kernels, and their autograd formula is traced into the backward graph."""
    model = _Holder().to(DEVICE)
    x = torch.randn(3, 2, 3, device=DEVICE)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    # Dynamo refuses any nn.LSTM subclass unless allow_rnn is set.
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        loss = compiled(x)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    torch._dynamo.reset()
    assert_close("loss", loss, eager, ATOL_OUT)
    for (name, _), g, w in zip(model.named_parameters(), grads, eager_grads):
        assert_close(f"grad {name}", g, w, ATOL_GRAD)


# ----------------------------------------------------------------------------------------------
# GPU: low precision against an fp64 reference, relative to cuDNN's own error.
# ----------------------------------------------------------------------------------------------

def _errors(module, dtype, x, hx, reference_out):
    x = x.detach().to(dtype).requires_grad_()
    hx = tuple(s.detach().to(dtype).requires_grad_() for s in hx)
    (outputs, grads) = run_and_grad(module, x, hx)
    return [(g.double() - w).abs().max().item() for g, w in zip(outputs + grads, reference_out)]


@pytest.mark.cuda
@pytest.mark.parametrize("proj_size", [0, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_against_cudnn(design, dtype, proj_size):
    hidden = 48 if design == "sequence" else 160
    kwargs = dict(input_size=32, hidden_size=hidden, num_layers=2, proj_size=proj_size)
    reference = nn.LSTM(**kwargs).to(device=DEVICE, dtype=torch.float64)
    cudnn = nn.LSTM(**kwargs).to(device=DEVICE, dtype=dtype)
    module = fastlstm.LSTM(**kwargs, backend="triton").to(device=DEVICE, dtype=dtype)
    cudnn.load_state_dict(reference.state_dict())
    module.load_state_dict(reference.state_dict())
    real_hidden = proj_size or hidden
    x = torch.randn(24, 8, 32, device=DEVICE, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(2, 8, real_hidden, device=DEVICE, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 8, hidden, device=DEVICE, dtype=torch.float64, requires_grad=True))
    outputs, grads = run_and_grad(reference, x, hx)
    reference_out = [t.detach() for t in outputs + grads]
    cudnn_errors = _errors(cudnn, dtype, x, hx, reference_out)
    triton_errors = _errors(module, dtype, x, hx, reference_out)
    names = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0",
             *[f"grad {n}" for n, _ in reference.named_parameters()]]
    worse = [f"{name}: triton {t:.3g} > {LOW_PRECISION_FACTOR} x cudnn {c:.3g}"
             for name, t, c in zip(names, triton_errors, cudnn_errors)
             if t > LOW_PRECISION_FACTOR * c]
    assert not worse, "; ".join(worse)


@pytest.mark.cuda
def test_cuda_fp32_against_fp64(design):
    kwargs = dict(input_size=16, hidden_size=48, num_layers=1, bidirectional=True, proj_size=24)
    reference, module = twin_modules(dtype=torch.float64, **kwargs)
    module = module.float()
    sequences = [torch.randn(length, 16, device=DEVICE, dtype=torch.float64)
                 for length in (7, 3, 9, 1)]
    packed = pack_sequence(sequences, enforce_sorted=False)
    want_out, _ = run_and_grad(reference, packed, None)
    packed32 = pack_sequence([s.float() for s in sequences], enforce_sorted=False)
    got_out, _ = run_and_grad(module, packed32, None)
    for name, g, w in zip(("output", "h_n", "c_n"), got_out, want_out):
        assert_close(name, g.double(), w, ATOL_OUT)


# ----------------------------------------------------------------------------------------------
# GPU: many programs per launch (several batch and hidden tiles) at GPU-sized shapes.
# ----------------------------------------------------------------------------------------------

# (design, batch, hidden, proj, steps); proj == hidden means no projection. On the GPU the step
# kernels tile the batch and the hidden units by at most 32 and the sequence kernels the batch
# by 16, so each shape has several programs per launch, odd sizes and partial tiles.
GPU_OP_CASES = [
    ("sequence", 70, 48, 48, 6),
    ("sequence", 37, 61, 61, 5),
    ("sequence", 50, 40, 24, 7),
    ("sequence", 33, 64, 17, 4),
    ("step", 70, 200, 200, 6),
    ("step", 37, 61, 61, 5),
    ("step", 50, 150, 70, 7),
    ("step", 33, 100, 130, 4),
    ("step", 1, 300, 300, 3),
]


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("case", GPU_OP_CASES, ids=lambda c: "{}-B{}H{}P{}T{}".format(*c))
def test_ops_gpu_many_tiles(monkeypatch, case, packed, reverse):
    design, batch, hidden, proj, steps = case
    monkeypatch.setattr(triton_lstm, "DESIGN", design)
    # fp32 on the GPU: the error grows with the reduction length, hence a relative term.
    (xg, batch_sizes, h0, c0, w_hh, w_hr), (grad_out, grad_hn, grad_cn) = make_case(
        batch, hidden, proj, steps, packed, seed=5)
    scale = 1.0 / max(hidden, proj) ** 0.5  # keep the gates out of saturation
    w_hh = w_hh * scale
    w_hr = None if w_hr is None else w_hr * scale
    got = triton_lstm.recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, True)
    want = _recurrence.reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr,
                                                    reverse, True)
    for name, g, w in zip(FORWARD_NAMES, got, want):
        assert_close(name, g, w, ATOL_OUT, 1e-5)
    gates, cells = want[3], want[4]
    got = triton_lstm.recurrence_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr,
                                          gates, cells, reverse)
    want = _recurrence.reference_recurrence_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0,
                                                     w_hh, w_hr, gates, cells, reverse)
    for name, g, w in zip(BACKWARD_NAMES, got, want):
        assert_close(name, g, w, ATOL_GRAD, 1e-4)


GPU_MODULE_CASES = [
    ("sequence", dict(input_size=24, hidden_size=61, num_layers=2, bidirectional=True), 37, 6),
    ("sequence", dict(input_size=16, hidden_size=48, num_layers=2, bidirectional=True,
                      proj_size=20), 40, 7),
    ("step", dict(input_size=24, hidden_size=200, num_layers=2, bidirectional=True), 37, 6),
    ("step", dict(input_size=16, hidden_size=150, num_layers=2, bidirectional=True,
                  proj_size=70), 40, 7),
]


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("case", GPU_MODULE_CASES,
                         ids=lambda c: f"{c[0]}-H{c[1]['hidden_size']}P{c[1].get('proj_size', 0)}")
def test_module_gpu_many_tiles(monkeypatch, case, packed):
    """fastlstm.LSTM(backend="triton") against nn.LSTM (cuDNN, fp32 without TF32): two layers,
    both directions, batches of several tiles, every output and gradient."""
    design, kwargs, batch, steps = case
    monkeypatch.setattr(triton_lstm, "DESIGN", design)
    reference, module = twin_modules(**kwargs)
    generator = torch.Generator().manual_seed(8)
    if packed:
        lengths = lengths_for(batch, steps, generator)
        lengths = lengths[1::2] + lengths[::2]  # unsorted
        sequences = [torch.randn(n, kwargs["input_size"], generator=generator).to(DEVICE)
                     for n in lengths]
        input = pack_sequence(sequences, enforce_sorted=False)
        input.data.requires_grad_()
    else:
        input = torch.randn(steps, batch, kwargs["input_size"], generator=generator).to(DEVICE)
        input.requires_grad_()
    out_size = kwargs.get("proj_size", 0) or kwargs["hidden_size"]
    layers = kwargs["num_layers"] * 2
    hx = (torch.randn(layers, batch, out_size, generator=generator).to(DEVICE).requires_grad_(),
          torch.randn(layers, batch, kwargs["hidden_size"],
                      generator=generator).to(DEVICE).requires_grad_())
    want_out, want_grads = run_and_grad(reference, input, hx)
    got_out, got_grads = run_and_grad(module, input, hx)
    for name, g, w in zip(("output", "h_n", "c_n"), got_out, want_out):
        assert_close(name, g, w, ATOL_OUT, 1e-5)
    names = ["input", "h0", "c0", *[n for n, _ in reference.named_parameters()]]
    for name, g, w in zip(names, got_grads, want_grads):
        assert_close(f"grad {name}", g, w, ATOL_GRAD, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_many_tiles_packed_bidirectional(design, dtype):
    """err(triton in dtype) <= LOW_PRECISION_FACTOR * err(cuDNN in dtype), both against nn.LSTM
    in float64, with several batch and hidden tiles per launch, packed unsorted input, two
    layers and both directions: every output and every gradient."""
    hidden = 61 if design == "sequence" else 200
    kwargs = dict(input_size=24, hidden_size=hidden, num_layers=2, bidirectional=True)
    reference = nn.LSTM(**kwargs).to(device=DEVICE, dtype=torch.float64)
    cudnn = nn.LSTM(**kwargs).to(device=DEVICE, dtype=dtype)
    module = fastlstm.LSTM(**kwargs, backend="triton").to(device=DEVICE, dtype=dtype)
    cudnn.load_state_dict(reference.state_dict())
    module.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(9)
    lengths = lengths_for(40, 12, generator)
    lengths = lengths[1::2] + lengths[::2]
    sequences = [torch.randn(n, 24, generator=generator, dtype=torch.float64).to(DEVICE)
                 for n in lengths]
    hx = (torch.randn(4, 40, hidden, generator=generator, dtype=torch.float64).to(DEVICE),
          torch.randn(4, 40, hidden, generator=generator, dtype=torch.float64).to(DEVICE))

    def run(model, cast):
        packed = pack_sequence([s.to(cast) for s in sequences], enforce_sorted=False)
        packed.data.requires_grad_()
        states = tuple(s.to(cast).requires_grad_() for s in hx)
        outputs, grads = run_and_grad(model, packed, states)
        return [t.detach().double() for t in outputs + grads]

    exact = run(reference, torch.float64)
    cudnn_errors = [(t - e).abs().max().item() for t, e in zip(run(cudnn, dtype), exact)]
    triton_errors = [(t - e).abs().max().item() for t, e in zip(run(module, dtype), exact)]
    names = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0",
             *[f"grad {n}" for n, _ in reference.named_parameters()]]
    assert len(names) == len(exact)
    worse = [f"{name}: triton {t:.3g} > {LOW_PRECISION_FACTOR} x cudnn {c:.3g}"
             for name, t, c in zip(names, triton_errors, cudnn_errors)
             if t > LOW_PRECISION_FACTOR * c]
    assert not worse, "; ".join(worse)


# ----------------------------------------------------------------------------------------------
# GPU: per-step arguments do not make Triton compile again; CUDA graph capture.
# ----------------------------------------------------------------------------------------------

def _compiled_variants(kernel):
    """How many compiled kernels a @triton.jit function holds, over all devices."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # Triton 3.2+: device -> (kernel_cache, ...)
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(cache) for cache in kernel.cache.values())  # Triton 3.0, 3.1


def _run_ops(batch_sizes, batch, hidden, proj, reverse, seed=0):
    """Forward (saving) and backward of the ops on packed rows with these batch sizes."""
    generator = torch.Generator().manual_seed(seed)
    rows = int(sum(batch_sizes))

    def randn(*shape):
        return (0.3 * torch.randn(*shape, generator=generator)).to(DEVICE)

    sizes = torch.tensor(batch_sizes, dtype=torch.int64)
    w_hr = randn(proj, hidden) if proj != hidden else None
    c0, w_hh = randn(batch, hidden), randn(4 * hidden, proj)
    out = triton_lstm.recurrence_forward(randn(rows, 4 * hidden), sizes, randn(batch, proj), c0,
                                         w_hh, w_hr, reverse, True)
    triton_lstm.recurrence_backward(randn(rows, proj), randn(batch, proj), randn(batch, hidden),
                                    sizes, c0, w_hh, w_hr, out[3], out[4], reverse)


@pytest.mark.cuda
def test_kernels_compile_once_for_all_step_values(monkeypatch):
    """Triton specializes integer arguments equal to 1 or divisible by 16; the per-step ones
    (offsets, live rows) and the sequence kernels' T and B must not be, or new step values
    compile new kernels. A first round compiles what these shapes need (both batch tile sizes);
    a second round with other step values, 1 and multiples of 16 among them, compiles nothing."""
    names = ("_lstm_fwd_step_kernel", "_lstm_fwd_proj_kernel", "_lstm_bwd_dh_kernel",
             "_lstm_bwd_step_kernel", "_lstm_fwd_sequence_kernel", "_lstm_bwd_sequence_kernel")
    kernels = {name: getattr(triton_lstm, name) for name in names}
    rounds = (
        [("step", [37, 35, 21, 19, 3]), ("sequence", [37, 35, 21, 19, 3])],
        [("step", [48, 32, 17, 16, 1]), ("step", [33, 33, 33, 32, 31, 30, 1, 1]),
         ("sequence", [48, 32, 17, 16, 1]), ("sequence", [1] * 16), ("sequence", [16, 16])],
    )
    counts = []
    for round_ in rounds:
        for design, batch_sizes in round_:
            monkeypatch.setattr(triton_lstm, "DESIGN", design)
            for proj in (40, 24):
                for reverse in (False, True):
                    _run_ops(batch_sizes, batch_sizes[0], 40, proj, reverse)
        torch.cuda.synchronize()
        counts.append({name: _compiled_variants(kernel) for name, kernel in kernels.items()})
    assert all(counts[0][name] > 0 for name in names), counts[0]
    grown = {name: (counts[0][name], counts[1][name]) for name in names
             if counts[1][name] != counts[0][name]}
    assert not grown, f"kernels compiled again for new step values (before, after): {grown}"


@pytest.mark.cuda
def test_packed_forward_backward_in_cuda_graph(design):
    """Captured in a CUDA graph, a packed forward + backward must replay like eager calls on new
    data, also after eager calls with other packed layouts of as many steps (the step tables of
    the sequence kernels must not come from host memory baked into the graph)."""
    (xg, batch_sizes, h0, c0, w_hh, w_hr), grads = make_case(6, 40, 24, 9, True, seed=3)
    static = [xg, h0, c0, w_hh, w_hr, *grads]

    def step():
        out = triton_lstm.recurrence_forward(static[0], batch_sizes, static[1], static[2],
                                             static[3], static[4], False, True)
        back = triton_lstm.recurrence_backward(*static[5:], batch_sizes, static[2], static[3],
                                               static[4], out[3], out[4], False)
        return list(out[:3]) + list(back)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and load the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for other in ([6, 6, 5, 5, 5, 5, 5, 5, 5], [6, 2, 2, 2, 1, 1, 1, 1, 1]):
        _run_ops(other, 6, 40, 24, False, seed=4)
    generator = torch.Generator().manual_seed(7)
    for target in static:  # new data, same shapes
        target.copy_(torch.randn(target.shape, generator=generator).to(DEVICE) * target.std())
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    names = ("out", "h_n", "c_n", *BACKWARD_NAMES)
    for name, got, want in zip(names, captured, eager):
        assert torch.equal(got, want), (
            f"{name}: graph replay differs from eager by "
            f"{(got.double() - want.double()).abs().max().item():.3g}")
