"""fastlstm.LSTM's regularizers (weight_drop, locked_dropout, zoneout) on every backend.

Each backend is checked against a plain-torch specification written here, step by step and
sequence by sequence, run with the same masks: weight-drop and locked-dropout masks recorded
through fastlstm.lstm.stack.mask_observer, zoneout masks rebuilt from the recorded seed with this
file's own implementation of the hash in fastlstm/lstm/recurrence.py. Outputs, final states and every
gradient are compared.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from fastlstm.lstm import recurrence as _recurrence, stack as _stack

from helpers import cpu_backends

BACKENDS = cpu_backends()
REGS = dict(weight_drop=0.3, locked_dropout=0.25, zoneout=(0.2, 0.35))
# The backends checked against the specification; triton once per kernel design (the
# sequence-fused and the step-fused kernels are separate code).
CASES = [b for b in BACKENDS if b != "triton"] + (
    ["triton:sequence", "triton:step"] if "triton" in BACKENDS else [])


def _use(monkeypatch, case):
    """The backend name of a case, with the Triton design it names forced."""
    backend, _, design = case.partition(":")
    if design:
        from fastlstm.lstm.triton import recurrence as triton_lstm
        monkeypatch.setattr(triton_lstm, "DESIGN", design)
    return backend


# ---- the specification --------------------------------------------------------------------

def _hash32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) % (1 << 32)
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) % (1 << 32)
    return x ^ (x >> 16)


def spec_keep(rows, units, probability, seed, stream):
    """Zoneout keep mask [rows, units] from the hash, written independently of the package."""
    seed %= 1 << 64
    key = _hash32((seed % (1 << 32)) ^ _hash32((seed >> 32) ^ _hash32(stream + 1)))
    element = torch.arange(rows * units, dtype=torch.int64) % (1 << 32)
    u = _hash32((_hash32(element ^ key) + key) % (1 << 32))
    return (u < int(probability * 2 ** 32)).reshape(rows, units)


def record_masks(monkeypatch):
    seen = {"weight_drop": {}, "locked_dropout": [], "zoneout_seed": []}

    def observer(kind, layer, direction, value):
        if kind == "weight_drop":
            seen[kind][(layer, direction)] = value.detach().clone()
        else:
            seen[kind].append(value.detach().clone() if torch.is_tensor(value) else value)
    monkeypatch.setattr(_stack, "mask_observer", observer)
    return seen


def spec_lstm(module, x, lengths, h0, c0, masks, training):
    """The regularized LSTM, one sequence and step at a time, in x's dtype.

    x [T, B, I] padded, sequences in packed (descending length) order; lengths [B]. Returns the
    padded output [T, B, D*P] and (h_n, c_n) [L*D, B, *], differentiable w.r.t. x, h0, c0 and the
    module's parameters.
    """
    steps, batch = x.shape[0], x.shape[1]
    directions = 2 if module.bidirectional else 1
    hidden, proj = module.hidden_size, module.proj_size or module.hidden_size
    zoneout = module.zoneout if isinstance(module.zoneout, tuple) else (module.zoneout,) * 2
    # Packed row index of (t, b): rows of step t come after those of every earlier step.
    live = [(lengths > t).sum().item() for t in range(steps)]
    offsets = [sum(live[:t]) for t in range(steps)]
    num_rows = sum(live)
    locked = list(masks["locked_dropout"])
    layer_input = x
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        if layer > 0 and training and module.locked_dropout > 0:
            layer_input = layer_input * locked.pop(0)  # [B, F]: the same mask every step
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih = getattr(module, "weight_ih" + suffix)
            w_hh = getattr(module, "weight_hh" + suffix)
            if training and module.weight_drop > 0:
                w_hh = w_hh * masks["weight_drop"][(layer, direction)]
            bias = (getattr(module, "bias_ih" + suffix) + getattr(module, "bias_hh" + suffix)
                    if module.bias else 0)
            w_hr = getattr(module, "weight_hr" + suffix) if module.proj_size else None
            keep_h = keep_c = None
            if zoneout[0] > 0 or zoneout[1] > 0:
                if training:
                    seed = _stack.layer_seed(masks["zoneout_seed"][0], index)
                    keep_h = spec_keep(num_rows, proj, zoneout[0], seed, 0).to(x.dtype)
                    keep_c = spec_keep(num_rows, hidden, zoneout[1], seed, 1).to(x.dtype)
                else:
                    keep_h = torch.full((num_rows, proj), zoneout[0], dtype=x.dtype)
                    keep_c = torch.full((num_rows, hidden), zoneout[1], dtype=x.dtype)
            out = [[None] * batch for _ in range(steps)]
            for b in range(batch):
                h, c = h0[index, b], c0[index, b]
                order = range(lengths[b])
                for t in (reversed(order) if direction else order):
                    gates = layer_input[t, b] @ w_ih.t() + bias + h @ w_hh.t()
                    i, f, g, o = gates.chunk(4)
                    c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
                    h_new = o.sigmoid() * c_new.tanh()
                    if w_hr is not None:
                        h_new = h_new @ w_hr.t()
                    if keep_h is not None:
                        row = offsets[t] + b
                        c_new = keep_c[row] * c + (1 - keep_c[row]) * c_new
                        h_new = keep_h[row] * h + (1 - keep_h[row]) * h_new
                    h, c = h_new, c_new
                    out[t][b] = h
                for t in range(lengths[b], steps):
                    out[t][b] = torch.zeros_like(h)
                h_n.append(h)
                c_n.append(c)
            outputs.append(torch.stack([torch.stack(row) for row in out]))
        layer_input = torch.cat(outputs, -1)
    L, D = module.num_layers, directions
    h_n = torch.stack(h_n).view(L * D, batch, proj)
    c_n = torch.stack(c_n).view(L * D, batch, hidden)
    return layer_input, (h_n, c_n)


def _pairs(module):
    return [(name, p) for name, p in module.named_parameters()]


def run_against_spec(monkeypatch, backend, dtype, *, layers=2, bidirectional=False, proj=0,
                     packed=False, training=True, regs=REGS, batch_first=False, tol=None):
    backend = _use(monkeypatch, backend)
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 5, 3, 4, 6
    module = fastlstm.LSTM(inputs, hidden, layers, bidirectional=bidirectional, proj_size=proj,
                           batch_first=batch_first, backend=backend, dtype=dtype, **regs)
    module.train(training)
    directions = 2 if bidirectional else 1
    x = torch.randn(steps, batch, inputs, dtype=dtype)
    lengths = torch.tensor([5, 4, 2]) if packed else torch.full((batch,), steps)
    h0 = torch.randn(layers * directions, batch, proj or hidden, dtype=dtype)
    c0 = torch.randn(layers * directions, batch, hidden, dtype=dtype)
    x_ours, h0_ours, c0_ours = (t.clone().requires_grad_() for t in (x, h0, c0))
    masks = record_masks(monkeypatch)
    if packed:
        inp = pack_padded_sequence(x_ours, lengths)
    else:
        inp = x_ours.transpose(0, 1) if batch_first else x_ours
    out, (h_n, c_n) = module(inp, (h0_ours, c0_ours))
    if packed:
        out = pad_packed_sequence(out)[0]
    elif batch_first:
        out = out.transpose(0, 1)
    weight = torch.randn_like(out)
    (out * weight).sum().add_(h_n.square().sum()).add_(c_n.sum()).backward()
    ours = [out, h_n, c_n, x_ours.grad, h0_ours.grad, c0_ours.grad] + [
        p.grad.clone() for _, p in _pairs(module)]
    module.zero_grad()

    x_spec, h0_spec, c0_spec = (t.clone().requires_grad_() for t in (x, h0, c0))
    s_out, (s_h, s_c) = spec_lstm(module, x_spec, lengths, h0_spec, c0_spec, masks, training)
    (s_out * weight).sum().add_(s_h.square().sum()).add_(s_c.sum()).backward()
    theirs = [s_out, s_h, s_c, x_spec.grad, h0_spec.grad, c0_spec.grad] + [
        p.grad for _, p in _pairs(module)]
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"] + [
        f"grad {name}" for name, _ in _pairs(module)]
    tol = tol or (1e-10 if dtype == torch.float64 else 2e-5)
    for name, a, b in zip(names, ours, theirs):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    return masks


# ---- each backend against the specification ------------------------------------------------

@pytest.mark.parametrize("backend", CASES)
@pytest.mark.parametrize("bidirectional,proj,packed", [
    (False, 0, False), (True, 0, False), (False, 3, False), (False, 0, True), (True, 3, True)])
def test_training_matches_spec(monkeypatch, backend, bidirectional, proj, packed):
    masks = run_against_spec(monkeypatch, backend, torch.float64, bidirectional=bidirectional,
                             proj=proj, packed=packed)
    directions = 2 if bidirectional else 1
    assert len(masks["weight_drop"]) == 2 * directions
    assert len(masks["locked_dropout"]) == 1
    assert len(masks["zoneout_seed"]) == 1


@pytest.mark.parametrize("backend", CASES)
def test_training_matches_spec_fp32_batch_first(monkeypatch, backend):
    run_against_spec(monkeypatch, backend, torch.float32, batch_first=True, bidirectional=True)


@pytest.mark.parametrize("backend,regs", [
    (backend, regs) for backend in CASES
    for regs in [dict(weight_drop=0.5), dict(locked_dropout=0.5), dict(zoneout=0.3),
                 dict(zoneout=(0.0, 0.4)), dict(zoneout=(0.4, 0.0))]])
def test_each_regularizer_alone(monkeypatch, backend, regs):
    run_against_spec(monkeypatch, backend, torch.float64, regs=regs, bidirectional=True)


@pytest.mark.parametrize("backend", CASES)
@pytest.mark.parametrize("proj,packed", [(0, False), (3, True)])
def test_eval_uses_expectation(monkeypatch, backend, proj, packed):
    """Eval: weight_drop and locked_dropout are the identity, zoneout its expectation."""
    masks = run_against_spec(monkeypatch, backend, torch.float64, proj=proj, packed=packed,
                             training=False, bidirectional=True)
    assert masks == {"weight_drop": {}, "locked_dropout": [], "zoneout_seed": []}


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_without_zoneout_is_plain_lstm(backend):
    torch.manual_seed(0)
    regularized = fastlstm.LSTM(4, 6, 2, backend=backend, weight_drop=0.5, locked_dropout=0.5)
    plain = fastlstm.LSTM(4, 6, 2, backend=backend)
    plain.load_state_dict(regularized.state_dict())
    regularized.eval(), plain.eval()
    x = torch.randn(5, 3, 4)
    assert torch.equal(regularized(x)[0], plain(x)[0])


# ---- the cpu kernels at sizes that take their threaded paths ---------------------------------

@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("batch,hidden", [(16, 64), (64, 96)])
@pytest.mark.parametrize("packed,bidirectional", [(False, False), (True, True)])
@pytest.mark.parametrize("training", [True, False])
def test_cpu_split_paths_match_torch_backend(batch, hidden, packed, bidirectional, training):
    """At T >= 8 the cpu op packs W_hh for its own step GEMM (the weight mask applied there) and
    splits rows or units among threads; the torch backend draws the same masks."""
    results = []
    for backend in ("torch", "cpu"):
        torch.manual_seed(1)
        module = fastlstm.LSTM(16, hidden, 2, bidirectional=bidirectional, backend=backend,
                               **REGS).train(training)
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(12, batch, 16, generator=generator, requires_grad=True)
        inp = x
        if packed:
            lengths = torch.randint(1, 13, (batch,), generator=generator)
            lengths[0] = 12
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
        torch.manual_seed(5)
        out, (h, c) = module(inp)
        out = out.data if packed else out
        (out.square().sum() + h.sum() + c.square().sum()).backward()
        results.append([out, h, c, x.grad] + [p.grad for p in module.parameters()])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_matches_torch_backend(dtype):
    results = []
    for backend in ("torch", "cpu"):
        torch.manual_seed(1)
        module = fastlstm.LSTM(16, 64, 1, backend=backend, dtype=dtype, **REGS)
        x = torch.randn(12, 32, 16, dtype=dtype, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(5)
        out, (h, c) = module(x)
        out.float().square().sum().backward()
        results.append([out, h, c, module.weight_hh_l0.grad, module.weight_ih_l0.grad])
    for want, got in zip(*results):
        # Both round h to dtype every step; the fused kernels' fast exp/tanh differ from torch's
        # in the last bits, which low precision can round either way.
        scale = want.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= 0.01 * scale + 1e-3


# ---- gradcheck -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("proj", [0, 2])
def test_gradcheck_float64(backend, proj):
    torch.manual_seed(0)
    module = fastlstm.LSTM(3, 4, 2, bidirectional=True, proj_size=proj, backend=backend,
                           dtype=torch.float64, **REGS)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())

    names = [name for name, _ in module.named_parameters()]

    def function(x, *weights):
        torch.manual_seed(7)  # the same masks at every evaluation
        out, (h, c) = torch.func.functional_call(module, dict(zip(names, weights)), (x,))
        return out, h, c

    weights = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(function, (x, *weights), eps=1e-6, atol=1e-6)


# ---- drop-in behaviour when off, arguments, masks --------------------------------------------

def test_state_dict_and_repr_match_nn_lstm():
    ours = fastlstm.LSTM(4, 6, 2, bidirectional=True, proj_size=3, **REGS)
    theirs = nn.LSTM(4, 6, 2, bidirectional=True, proj_size=3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_buffers()] == []
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert repr(fastlstm.LSTM(4, 6, 2)) == repr(nn.LSTM(4, 6, 2))
    assert repr(fastlstm.LSTM(4, 6, weight_drop=0.0, zoneout=(0, 0))) == repr(nn.LSTM(4, 6))
    assert repr(ours).endswith(
        "weight_drop=0.3, locked_dropout=0.25, zoneout=(0.2, 0.35))")
    assert "zoneout=0.1)" in repr(fastlstm.LSTM(4, 6, zoneout=0.1))
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_defaults_off_bitwise_identical(backend, training):
    """Regularizers off: exactly the computation without them (no op argument added)."""
    torch.manual_seed(0)
    module = fastlstm.LSTM(4, 6, 2, dropout=0.0, bidirectional=True, backend=backend)
    explicit = fastlstm.LSTM(4, 6, 2, bidirectional=True, backend=backend, weight_drop=0.0,
                             locked_dropout=0.0, zoneout=0.0)
    explicit.load_state_dict(module.state_dict())
    module.train(training), explicit.train(training)
    x = torch.randn(9, 3, 4)
    out, (h, c) = module(x)
    weights = module._layer_weights()
    with torch.no_grad():
        rows, h2, c2 = _stack.lstm_stack(
            x.reshape(-1, 4), None, torch.zeros(4, 3, 6), torch.zeros(4, 3, 6), weights,
            num_layers=2, bidirectional=True, dropout=0.0, training=training,
            backend=fastlstm._backends.resolve(backend, "cpu"))
    assert torch.equal(out.detach(), rows.view(9, 3, 12))
    assert torch.equal(h.detach(), h2) and torch.equal(c.detach(), c2)
    assert torch.equal(explicit(x)[0], out)


@pytest.mark.parametrize("kwargs,name", [
    (dict(weight_drop=1.0), "weight_drop"), (dict(weight_drop=-0.1), "weight_drop"),
    (dict(locked_dropout=1.5), "locked_dropout"), (dict(locked_dropout="0.1"), "locked_dropout"),
    (dict(zoneout=1.0), "zoneout"), (dict(zoneout=(0.1, 1.0)), "zoneout"),
    (dict(zoneout=(0.1, 0.2, 0.3)), "zoneout"), (dict(zoneout=True), "zoneout"),
    (dict(weight_drop=None), "weight_drop")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fastlstm.LSTM(4, 6, **kwargs)


def test_zoneout_hash_matches_package():
    """The package's mask function and this file's independent hash agree."""
    for seed, stream, p in [(0, 0, 0.3), (123456789123, 1, 0.05), (2 ** 62 + 5, 0, 0.9)]:
        ours = _recurrence.zoneout_keep(7, 33, p, seed, stream, False, torch.float32, "cpu")
        assert torch.equal(ours, spec_keep(7, 33, p, seed, stream).float())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_rates_and_reproducibility(monkeypatch, p):
    keep = _recurrence.zoneout_keep(4096, 64, p, 99, 0, False, torch.float64, "cpu")
    assert abs(keep.mean().item() - p) < 0.01  # 262144 draws: sd < 0.001
    masks = record_masks(monkeypatch)
    module = fastlstm.LSTM(4, 64, 2, weight_drop=p, locked_dropout=p, zoneout=p,
                           backend="torch")
    x = torch.randn(3, 300, 4)
    torch.manual_seed(3)
    first = module(x)[0]
    torch.manual_seed(3)
    again = module(x)[0]
    assert torch.equal(first, again)
    weight = masks["weight_drop"][(0, 0)]
    assert abs((weight == 0).double().mean().item() - p) < 0.01
    values = weight.unique().tolist()
    assert len(values) == 2 and values[0] == 0 and abs(values[1] - 1 / (1 - p)) < 1e-6
    locked = masks["locked_dropout"][0]
    assert locked.shape == (300, 64)
    assert masks["zoneout_seed"][0] == masks["zoneout_seed"][1]
    module(x)
    assert masks["zoneout_seed"][2] != masks["zoneout_seed"][0]


def test_weight_drop_keeps_parameters():
    """The module's weight_hh is the parameter itself, unchanged, and receives the gradient."""
    module = fastlstm.LSTM(4, 6, weight_drop=0.5, backend="torch")
    before = module.weight_hh_l0.detach().clone()
    parameter = module.weight_hh_l0
    module(torch.randn(3, 2, 4))[0].sum().backward()
    assert module.weight_hh_l0 is parameter and torch.equal(parameter.detach(), before)
    assert parameter.grad is not None and (parameter.grad == 0).any()


def test_convert_and_old_pickles_have_regularizers_off():
    module = fastlstm.convert(nn.LSTM(4, 6))
    assert module.weight_drop == module.locked_dropout == module.zoneout == 0.0
    state = fastlstm.LSTM(4, 6)
    for name in ("weight_drop", "locked_dropout", "zoneout"):
        delattr(state, name)
    assert state(torch.randn(2, 1, 4))[0].shape == (2, 1, 6)
    assert repr(state) == repr(nn.LSTM(4, 6))


# ---- GPU kernels at sizes of several tiles, against the torch backend on the same device ------

GPU_CASES = [
    # (backend, Triton design, hidden, proj)
    ("triton", "sequence", 48, 0), ("triton", "sequence", 40, 24),
    ("triton", "step", 160, 0), ("triton", "step", 144, 80),
    # cuda: H = 48 without projection fits the persistent kernels, so zoneout must move the
    # choice to the step kernels; the others run the step kernels anyway.
    ("cuda", None, 48, 0), ("cuda", None, 160, 0), ("cuda", None, 144, 80),
]


def _gpu_run(backend, hidden, proj, packed, training, regs):
    """Outputs and gradients of a 2-layer bidirectional LSTM on CUDA, with the masks a fixed
    seed draws (the same for every backend: weight-drop and locked-dropout masks come from the
    CUDA generator in the same order, the zoneout seed from the CPU one)."""
    torch.manual_seed(1)
    module = fastlstm.LSTM(24, hidden, 2, bidirectional=True, proj_size=proj, backend=backend,
                           device="cuda", **regs).train(training)
    with torch.no_grad():  # keep the gates out of saturation at these sizes
        for parameter in module.parameters():
            parameter.mul_(0.5)
    generator = torch.Generator().manual_seed(2)
    batch, steps = 40, 19
    x = torch.randn(steps, batch, 24, generator=generator).cuda().requires_grad_()
    inp = x
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    torch.manual_seed(5)
    out, (h, c) = module(inp)
    out = out.data if packed else out
    weight = torch.randn(out.shape, generator=generator).cuda()
    ((out * weight).sum() + h.square().sum() + c.sum()).backward()
    return [out, h, c, x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "{}-{}-H{}P{}".format(*c))
def test_gpu_kernels_match_torch_backend(monkeypatch, case, packed, training):
    backend, design, hidden, proj = case
    if design is not None:
        from fastlstm.lstm.triton import recurrence as triton_lstm
        monkeypatch.setattr(triton_lstm, "DESIGN", design)
    want = _gpu_run("torch", hidden, proj, packed, training, REGS)
    got = _gpu_run(backend, hidden, proj, packed, training, REGS)
    for index, (a, b) in enumerate(zip(got, want)):
        # fp32: the kernels and cuBLAS sum in different orders over a few hundred terms.
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m: f"#{index}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "{}-{}-H{}P{}".format(*c))
def test_gpu_zoneout_masks_act(monkeypatch, case):
    """Zoneout changes the result (its masks are not silently ignored), and z = 0 is the plain
    model."""
    backend, design, hidden, proj = case
    if design is not None:
        from fastlstm.lstm.triton import recurrence as triton_lstm
        monkeypatch.setattr(triton_lstm, "DESIGN", design)
    plain = _gpu_run(backend, hidden, proj, False, True, {})
    off = _gpu_run(backend, hidden, proj, False, True, dict(zoneout=0.0))
    on = _gpu_run(backend, hidden, proj, False, True, dict(zoneout=0.3))
    assert all(torch.equal(a, b) for a, b in zip(plain, off))
    assert not torch.allclose(plain[0], on[0], atol=1e-3)


@pytest.mark.cuda
def test_cuda_persistent_kernel_leaves_zoneout_to_step_kernel(monkeypatch):
    """Forcing the persistent kernel (which has no zoneout) with zoneout on is an error that says
    so; without zoneout the same shape runs it."""
    monkeypatch.setenv("FASTLSTM_CUDA_KERNEL", "persistent")
    module = fastlstm.LSTM(24, 48, backend="cuda", device="cuda", zoneout=0.2)
    x = torch.randn(10, 8, 24, device="cuda")
    with pytest.raises(RuntimeError, match="zoneout is handled by the step kernel only"):
        module(x)
    module.zoneout = 0.0
    module(x)[0].sum().backward()


# ---- torch.compile ---------------------------------------------------------------------------

def _compile_case(backend):
    torch.manual_seed(0)
    module = fastlstm.LSTM(5, 6, 2, bidirectional=True, backend=backend, **REGS)
    x = torch.randn(4, 3, 5)
    return module, x


def _train_step(model, module, x, seed):
    torch.manual_seed(seed)  # the same masks in eager and compiled runs
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, (h, c) = model(x)
    (out.square().sum() + h.sum() + c.sum()).backward()
    return [out.detach(), h.detach(), c.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend", CASES)
def test_compile_fullgraph_training_with_regularizers(monkeypatch, backend):
    """Training with every regularizer on compiles to one graph (the zoneout seed is a tensor
    passed to the ops, not an int read at trace time), reproduces eager exactly under
    aot_eager, and draws new masks at every call rather than baking one draw into the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    backend = _use(monkeypatch, backend)
    torch._dynamo.reset()
    module, x = _compile_case(backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    for seed in (11, 12):
        want = _train_step(module, module, x, seed)
        got = _train_step(compiled, module, x, seed)
        for index, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6,
                                       msg=lambda m: f"seed {seed}, #{index}: {m}")
    assert counter.frame_count == 1
    first = _train_step(compiled, module, x, 11)
    second = _train_step(compiled, module, x, 12)
    assert not torch.equal(first[0], second[0])
    assert counter.frame_count == 1  # no recompilation for a new seed
    torch._dynamo.reset()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
def test_compile_inductor_training_with_regularizers():
    """Inductor (whose random numbers are its own, so masks differ from eager) compiles training
    with the regularizers into one graph; new masks every call, and eval equals eager."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    module, x = _compile_case("cpu")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    first = _train_step(compiled, module, x, 11)
    second = _train_step(compiled, module, x, 12)
    assert counter.frame_count == 1
    assert all(t.isfinite().all() for t in first + second)
    assert not torch.equal(first[0], second[0])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], module(x)[0], atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


# ---- the cpu kernels' other instruction sets -------------------------------------------------

_ISA_SCRIPT = """
import torch, fastlstm
results = []
for backend in ("torch", "cpu"):
    torch.manual_seed(1)
    module = fastlstm.LSTM(16, 40, 2, bidirectional=True, backend=backend,
                           zoneout=(0.3, 0.45), weight_drop=0.2)
    x = torch.randn(12, 9, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    torch.manual_seed(5)
    out, (h, c) = module(x)
    (out.square().sum() + h.sum() + c.square().sum()).backward()
    results.append([out, h, c, x.grad] + [p.grad for p in module.parameters()])
for want, got in zip(*results):
    torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)
print("ok")
"""


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_zoneout_on_each_instruction_set(isa):
    """FASTLSTM_CPU_ISA caps the cpu kernels' instruction set: the zoneout hash has its own
    AVX2 code, and the baseline copy another, which an AVX-512 machine would never run."""
    import os
    import subprocess
    import sys
    if isa == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("the CPU has no AVX2")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, FASTLSTM_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
