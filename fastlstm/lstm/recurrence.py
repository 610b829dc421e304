"""The recurrence contract shared by every fused backend (triton, cuda, cpu).

One LSTM layer, one direction, runs as
    xg = x @ W_ih^T + (b_ih + b_hh)            one GEMM, done by torch (autograd handles it)
    out, h_n, c_n = recurrence_forward(xg, ...)  the fused part, one op per backend
The C++ op also takes the bias itself (`bias`, added to every row of xg inside the op), and the CPU
op the input weights (`w_ih`: the op then gets x and projects it itself, step by step where its own
step GEMM runs, so the [N, 4H] gates never go through memory): the cpu backend passes both.

Rows are in the *packed* layout: `xg` is [N, 4H] and time step t owns rows
offsets[t] : offsets[t] + batch_sizes[t] (offsets = exclusive cumsum of batch_sizes; batch sizes
never increase). A dense [T, B] input is the same layout with batch_sizes = [B] * T, which the ops
receive as an *empty* `batch_sizes` tensor (no host data needed). State buffers h [B, P], c [B, H]
start at h0, c0; at step t only rows b < batch_sizes[t] are live and updated; the others keep their
value. Forward direction visits t = 0..T-1, reverse visits t = T-1..0. This one rule gives the right
h_n for sequences that end early (forward) and the right start for ones that start late (reverse).

Per live row, with gate order i, f, g, o as in nn.LSTM:
    pre = xg[row] + h[b] @ W_hh^T                      (accumulated in fp32 or fp64)
    i, f, o = sigmoid(pre_i, pre_f, pre_o); g = tanh(pre_g)
    c[b] = f * c[b] + i * g                            (kept in fp32 for fp16/bf16)
    r = o * tanh(c[b]);  h[b] = r @ W_hr^T if proj else r;  out[row] = h[b]

Op schemas (namespace `fastlstm` in C++, `fastlstm_triton` for Triton):
  recurrence_forward(Tensor xg, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_hh,
                     Tensor? w_hr, bool reverse, bool save, Tensor? bias=None,
                     Tensor? w_ih=None)
      (bias [4H], C++ op only: pre = xg[row] + bias + h[b] @ W_hh^T;
       w_ih [4H, I], CPU op only: the first argument is then the layer input x [N, I] and
       xg = x @ W_ih^T is computed inside the op, fused into the steps where it can be)
      -> (out [N,P] dtype, h_n [B,P] dtype, c_n [B,H] dtype,
          gates [N,4H] acc dtype (activated i,f,g,o; [0] when not save),
          cells [N,H] acc dtype (c after each row's step; [0] when not save))
  recurrence_backward(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor batch_sizes,
                      Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor gates, Tensor cells, bool reverse)
      -> (grad_xg [N,4H] dtype (pre-activation gate gradients), grad_h0 [B,P], grad_c0 [B,H],
          grad_h_total [N,P] dtype (the whole gradient reaching each row's h; [0] without proj))
acc dtype is float64 for float64 input and float32 otherwise. The weight gradients are GEMMs over
all rows, done here in Python: dW_hh = grad_xg^T @ h_prev, dW_hr = grad_h_total^T @ (o*tanh(c)).

Regularizers (fastlstm.LSTM's weight_drop, zoneout; locked dropout needs nothing from the ops).
Both C++ ops take, after their other arguments,
    float zoneout_h=0, float zoneout_c=0, Tensor? zoneout_seed=None, bool zoneout_expected=False,
    Tensor? w_hh_mask=None
  zoneout_seed is a one-element int64 CPU tensor (None: seed 0): drawn every forward, it is a
  value of the graph under torch.compile rather than a constant to guard on.
  zoneout: per row and unit, h and c keep their previous value with a keep weight k:
      c_new = f * c_prev + i * g;  c = k_c * c_prev + (1 - k_c) * c_new
      h_new = o * tanh(c_new) (@ W_hr^T);  h = k_h * h_prev + (1 - k_h) * h_new;  out[row] = h
    k = zoneout_keep(...) below: 1 with probability zoneout_h (zoneout_c), else 0, from a
    counter-based hash of (zoneout_seed, stream, row, unit), so that the backward regenerates the
    forward's masks exactly and no [N, H] mask goes through memory; with zoneout_expected
    (evaluation) k is the probability itself. `cells` saves the state c (after the mix); the
    backward recomputes c_new = f * c_prev + i * g. With w_hr, grad_h_total is the gradient
    reaching h_new (before the mix).
  w_hh_mask [4H, P] (C++ ops only; weight drop): the recurrence multiplies by W_hh * w_hh_mask
    (the cpu backend applies it while packing W_hh for its step GEMM, otherwise on a masked
    copy); its autograd multiplies W_hh's gradient by the mask. The CUDA kernels do not take it
    (their op checks that it is off), nor does the Triton op: for weight drop their caller
    passes the masked product w_hh * mask as w_hh, and autograd does the rest.
  The Triton ops take the four zoneout arguments (not w_hh_mask) after `save` / `reverse`.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_layout(batch_sizes: torch.Tensor | None, num_rows: int, batch: int):
    """[(offset, live)] per time step, in time order, as Python ints."""
    if batch_sizes is None or batch_sizes.numel() == 0:
        steps = num_rows // batch if batch else 0
        return [(t * batch, batch) for t in range(steps)]
    layout, offset = [], 0
    for live in batch_sizes.tolist():
        layout.append((offset, live))
        offset += live
    return layout


def previous_rows(batch_sizes: torch.Tensor, num_rows: int, reverse: bool) -> torch.Tensor:
    """For packed rows: index of each row's previous state in cat([rows, initial_state]).

    Row (t, b) reads the row of the same sequence at the previous visited step, or initial row
    num_rows + b when the sequence was not live there.
    """
    sizes = batch_sizes.to(torch.int64).cpu()
    steps = sizes.numel()
    offsets = torch.zeros(steps + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    step_of_row = torch.repeat_interleave(torch.arange(steps), sizes)
    b_of_row = torch.arange(num_rows) - offsets[step_of_row]
    prev_step = step_of_row + (1 if reverse else -1)
    valid = (prev_step >= 0) & (prev_step < steps)
    prev_step_clamped = prev_step.clamp(0, max(steps - 1, 0))
    valid &= b_of_row < sizes[prev_step_clamped]
    return torch.where(valid, offsets[prev_step_clamped] + b_of_row, num_rows + b_of_row)


def previous_hidden(out: torch.Tensor, h0: torch.Tensor, batch_sizes: torch.Tensor,
                    reverse: bool) -> torch.Tensor:
    """h_prev for every row: the h that row's step multiplied with W_hh."""
    batch = h0.shape[0]
    if out.shape[0] == 0:  # batch 0: no rows
        return out.new_empty(0, h0.shape[1])
    if batch_sizes.numel() == 0:
        steps = out.shape[0] // batch
        seq = out.reshape(steps, batch, -1)
        if reverse:
            prev = torch.cat([seq[1:], h0.unsqueeze(0)], 0)
        else:
            prev = torch.cat([h0.unsqueeze(0), seq[:-1]], 0)
        return prev.reshape(out.shape[0], -1)
    index = previous_rows(batch_sizes, out.shape[0], reverse).to(out.device)
    return torch.cat([out, h0], 0).index_select(0, index)


# ----------------------------------------------------------------------------------------------
# Zoneout masks: a counter-based hash, the same in every backend (csrc/common/cell.h, fastlstm/lstm/triton/recurrence.py).
# ----------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
# Both multipliers are below 2^31, so a 32-bit value times one fits in an int64: the torch version
# below is exact without unsigned or overflowing arithmetic.
_HASH_MUL1, _HASH_MUL2 = 0x7FEB352D, 0x1B873593
ZONEOUT_H_STREAM, ZONEOUT_C_STREAM = 0, 1


def _hash32(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _HASH_MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _HASH_MUL2) & _MASK32
    return x ^ (x >> 16)


def zoneout_key(seed, stream: int):
    """The 32-bit key of one mask (stream ZONEOUT_H_STREAM or ZONEOUT_C_STREAM) of a layer.

    `seed`: an int, or an int64 tensor (the ops' zoneout_seed), which gives a 0-d int64 tensor
    (no host sync, and traceable by torch.compile)."""
    if torch.is_tensor(seed):
        seed = seed.reshape(()).to(torch.int64)
        high = (seed >> 32) & _MASK32
        return _hash32_tensor((seed & _MASK32) ^ _hash32_tensor(high ^ _hash32(stream + 1)))
    seed &= (1 << 64) - 1
    return _hash32((seed & _MASK32) ^ _hash32((seed >> 32) ^ _hash32(stream + 1)))


def seed_value(seed) -> int:
    """An op's zoneout_seed (None, an int or a one-element int64 tensor) as a Python int."""
    if seed is None:
        return 0
    return int(seed.reshape(()).item()) if torch.is_tensor(seed) else int(seed)


def zoneout_threshold(probability: float) -> int:
    """keep = hash < threshold: probability * 2^32, as an integer below 2^32."""
    return min(int(probability * 4294967296.0), _MASK32)


def _hash32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _HASH_MUL2) & _MASK32
    return x ^ (x >> 16)


def zoneout_keep(num_rows: int, units: int, probability: float, seed: int, stream: int,
                 expected: bool, dtype, device) -> torch.Tensor:
    """Keep weights k [num_rows, units] of one zoneout mask: with `expected` the probability
    itself, else 1 where hash32(hash32(e ^ key) + key) < threshold with e = row * units + unit
    (mod 2^32), 0 elsewhere."""
    if expected:
        return torch.full((num_rows, units), probability, dtype=dtype, device=device)
    key = zoneout_key(seed, stream)
    if torch.is_tensor(key):
        key = key.to(device)
    element = torch.arange(num_rows * units, dtype=torch.int64, device=device) & _MASK32
    u = _hash32_tensor((_hash32_tensor(element ^ key) + key) & _MASK32)
    return (u < zoneout_threshold(probability)).to(dtype).reshape(num_rows, units)


# ----------------------------------------------------------------------------------------------
# Plain-torch implementation of the two ops: the specification the kernels are tested against.
# ----------------------------------------------------------------------------------------------

def _zoneout_masks(num_rows, proj, hidden, zoneout_h, zoneout_c, zoneout_seed, zoneout_expected,
                   acc, device):
    seed = seed_value(zoneout_seed)
    keep = lambda p, units, stream: None if p == 0 else zoneout_keep(  # noqa: E731
        num_rows, units, p, seed, stream, zoneout_expected, acc, device)
    return (keep(zoneout_h, proj, ZONEOUT_H_STREAM), keep(zoneout_c, hidden, ZONEOUT_C_STREAM))


def reference_recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, save, bias=None,
                                 zoneout_h=0.0, zoneout_c=0.0, zoneout_seed=None,
                                 zoneout_expected=False, w_hh_mask=None):
    dtype, acc = xg.dtype, acc_dtype(xg.dtype)
    bias_acc = 0 if bias is None else bias.to(acc)
    num_rows, hidden = xg.shape[0], c0.shape[1]
    batch = h0.shape[0]
    h = h0.to(acc).clone()
    c = c0.to(acc).clone()
    if w_hh_mask is not None:
        w_hh = w_hh * w_hh_mask
    w_hh_acc = w_hh.to(acc)
    w_hr_acc = w_hr.to(acc) if w_hr is not None else None
    keep_h, keep_c = _zoneout_masks(num_rows, h0.shape[1], hidden, zoneout_h, zoneout_c,
                                    zoneout_seed, zoneout_expected, acc, xg.device)
    out = xg.new_empty(num_rows, h0.shape[1])
    gates = torch.empty(num_rows if save else 0, 4 * hidden, dtype=acc, device=xg.device)
    cells = torch.empty(num_rows if save else 0, hidden, dtype=acc, device=xg.device)
    layout = step_layout(batch_sizes, num_rows, batch)
    for offset, live in (reversed(layout) if reverse else layout):
        rows = slice(offset, offset + live)
        pre = xg[rows].to(acc) + bias_acc + h[:live] @ w_hh_acc.t()
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c[:live] + i * g
        r = o * c_new.tanh()
        h_new = r @ w_hr_acc.t() if w_hr_acc is not None else r
        if keep_c is not None:
            c_new = keep_c[rows] * c[:live] + (1 - keep_c[rows]) * c_new
        if keep_h is not None:
            h_new = keep_h[rows] * h[:live] + (1 - keep_h[rows]) * h_new
        if dtype != acc:  # the next step reads h as the caller's dtype would hold it
            h_new = h_new.to(dtype).to(acc)
        c[:live] = c_new
        h[:live] = h_new
        out[rows] = h_new.to(dtype)
        if save:
            gates[rows] = torch.cat([i, f, g, o], 1)
            cells[rows] = c_new
    return out, h.to(dtype), c.to(dtype), gates, cells


def reference_recurrence_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr,
                                  gates, cells, reverse, zoneout_h=0.0, zoneout_c=0.0,
                                  zoneout_seed=None, zoneout_expected=False, w_hh_mask=None):
    dtype, acc = grad_out.dtype, acc_dtype(grad_out.dtype)
    num_rows, hidden = gates.shape[0], c0.shape[1]
    batch = c0.shape[0]
    dh = grad_hn.to(acc).clone()
    dc = grad_cn.to(acc).clone()
    if w_hh_mask is not None:
        w_hh = w_hh * w_hh_mask
    w_hh_acc = w_hh.to(acc)
    w_hr_acc = w_hr.to(acc) if w_hr is not None else None
    keep_h, keep_c = _zoneout_masks(num_rows, grad_out.shape[1], hidden, zoneout_h, zoneout_c,
                                    zoneout_seed, zoneout_expected, acc, grad_out.device)
    grad_xg = grad_out.new_empty(num_rows, 4 * hidden)
    grad_h_total = grad_out.new_empty(num_rows if w_hr is not None else 0, grad_out.shape[1])
    if batch_sizes.numel() == 0:
        prev_index = None
    else:
        prev_index = previous_rows(batch_sizes, num_rows, reverse).to(cells.device)
    cells_with_init = torch.cat([cells, c0.to(acc)], 0)
    layout = step_layout(batch_sizes, num_rows, batch)
    for offset, live in (layout if reverse else reversed(layout)):
        rows = slice(offset, offset + live)
        if prev_index is None:
            prev = (offset + (batch if reverse else -batch))
            if 0 <= prev < num_rows:
                c_prev = cells[prev:prev + live]
            else:
                c_prev = c0[:live].to(acc)
        else:
            c_prev = cells_with_init.index_select(0, prev_index[rows])
        i, f, g, o = gates[rows].chunk(4, 1)
        c = cells[rows] if keep_c is None else f * c_prev + i * g  # c_new, before the mix
        dh_row = dh[:live] + grad_out[rows].to(acc)
        carry_h = 0
        if keep_h is not None:
            carry_h = keep_h[rows] * dh_row
            dh_row = (1 - keep_h[rows]) * dh_row
        if w_hr_acc is not None:
            grad_h_total[rows] = dh_row.to(dtype)
            dr = dh_row @ w_hr_acc
        else:
            dr = dh_row
        dc_next = dc[:live] if keep_c is None else (1 - keep_c[rows]) * dc[:live]
        tc = c.tanh()
        dc_total = dc_next + dr * o * (1 - tc * tc)
        d_i = dc_total * g * i * (1 - i)
        d_f = dc_total * c_prev * f * (1 - f)
        d_g = dc_total * i * (1 - g * g)
        d_o = dr * tc * o * (1 - o)
        dpre = torch.cat([d_i, d_f, d_g, d_o], 1)
        grad_xg[rows] = dpre.to(dtype)
        dc_prev = dc_total * f
        if keep_c is not None:
            dc_prev = dc_prev + keep_c[rows] * dc[:live]
        dh[:live] = dpre @ w_hh_acc + carry_h
        dc[:live] = dc_prev
    return grad_xg, dh.to(dtype), dc.to(dtype), grad_h_total


# ----------------------------------------------------------------------------------------------
# Autograd for a backend's pair of ops, registered once per backend.
# ----------------------------------------------------------------------------------------------

def _wants_grad(ctx, index):
    """Whether input `index` needs a gradient (inputs left at their defaults may have no entry)."""
    return index < len(ctx.needs_input_grad) and ctx.needs_input_grad[index]


# Names of the optional inputs after `save`, in schema order, per op family.
CPP_EXTRA_INPUTS = ("bias", "w_ih", "zoneout_h", "zoneout_c", "zoneout_seed", "zoneout_expected",
                    "w_hh_mask")
_EXTRA_DEFAULTS = {"bias": None, "w_ih": None, "zoneout_h": 0.0, "zoneout_c": 0.0,
                   "zoneout_seed": None, "zoneout_expected": False, "w_hh_mask": None}


def _make_setup_context(extra_names):
    def setup_context(ctx, inputs, output):
        xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, save = inputs[:8]
        ctx.num_inputs = len(inputs)  # inputs left at their defaults may be missing
        extra = dict(_EXTRA_DEFAULTS)
        extra.update(zip(extra_names, inputs[8:]))
        ctx.index = {name: 8 + position for position, name in enumerate(extra_names)}
        w_ih = extra["w_ih"]
        ctx.projected = w_ih is not None
        # With w_ih, xg is the layer input x: kept for W_ih's gradient (and W_ih for x's).
        x_kept = xg if ctx.projected and _wants_grad(ctx, ctx.index["w_ih"]) else None
        w_ih_kept = w_ih if ctx.projected and _wants_grad(ctx, 0) else None
        out, _h_n, _c_n, gates, cells = output
        # gates and cells never receive gradients: without this, autograd would fill [N, 4H] and
        # [N, H] zero tensors for them on every backward (the backward below handles None).
        ctx.set_materialize_grads(False)
        ctx.reverse = reverse
        ctx.has_proj = w_hr is not None
        ctx.saved = save
        ctx.zoneout = {name: extra[name] for name in
                       ("zoneout_h", "zoneout_c", "zoneout_expected")}
        ctx.save_for_backward(batch_sizes, h0, c0, w_hh, w_hr, out, gates, cells, x_kept,
                              w_ih_kept, extra["w_hh_mask"], extra["zoneout_seed"])
    return setup_context


def _grad_w_hh(grad_xg, out, h0, batch_sizes, reverse, mm=torch.mm, addmm=torch.addmm):
    """dW_hh = grad_xg^T @ h_prev, summed over rows."""
    batch, num_rows = h0.shape[0], out.shape[0]
    if batch_sizes.numel() != 0 or batch == 0 or num_rows <= batch:
        return mm(grad_xg.t(), previous_hidden(out, h0, batch_sizes, reverse))
    # Dense input: h_prev is `out` shifted by one step, with h0 at the first visited step. Two
    # GEMMs over views instead of materializing h_prev, a copy of `out` per layer.
    if reverse:
        first = mm(grad_xg[num_rows - batch:].t(), h0)
        return addmm(first, grad_xg[:num_rows - batch].t(), out[batch:])
    first = mm(grad_xg[:batch].t(), h0)
    return addmm(first, grad_xg[batch:].t(), out[:num_rows - batch])


def make_backward(backward_op, mm=None, addmm=None):
    """The autograd formula for recurrence_forward, given the backend's backward op (and, for
    CPU tensors, the GEMMs that compute the weight gradients: torch.mm / torch.addmm unless
    given)."""

    def backward(ctx, grad_out, grad_hn, grad_cn, _grad_gates, _grad_cells):
        (batch_sizes, h0, c0, w_hh, w_hr, out, gates, cells, x, w_ih,
         w_hh_mask, zoneout_seed) = ctx.saved_tensors
        if not ctx.saved:
            raise RuntimeError("fastlstm: recurrence_forward was called with save=False, so it "
                               "kept nothing for backward; call it with save=True when training")
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        grad_hn = torch.zeros_like(h0) if grad_hn is None else grad_hn.contiguous()
        grad_cn = torch.zeros_like(c0) if grad_cn is None else grad_cn.contiguous()
        zoneout = ctx.zoneout
        regularized = zoneout["zoneout_h"] > 0 or zoneout["zoneout_c"] > 0
        extra = ()
        if regularized or w_hh_mask is not None:
            extra = (zoneout["zoneout_h"], zoneout["zoneout_c"], zoneout_seed,
                     zoneout["zoneout_expected"])
            if w_hh_mask is not None:
                extra = extra + (w_hh_mask,)
        grad_xg, grad_h0, grad_c0, grad_h_total = backward_op(
            grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr, gates, cells, ctx.reverse,
            *extra)
        grad_w_hh = grad_w_hr = None
        on_cpu = grad_xg.device.type == "cpu"
        mm_ = mm if on_cpu and mm is not None else torch.mm
        addmm_ = addmm if on_cpu and addmm is not None else torch.addmm
        if ctx.needs_input_grad[4]:
            grad_w_hh = _grad_w_hh(grad_xg, out, h0, batch_sizes, ctx.reverse, mm_, addmm_)
            if w_hh_mask is not None:  # the recurrence multiplied by W_hh * mask
                grad_w_hh = grad_w_hh.mul_(w_hh_mask)  # a fresh product: in place
        if ctx.has_proj and ctx.needs_input_grad[5]:
            hidden = c0.shape[1]
            c_new = cells
            if zoneout["zoneout_c"] > 0:  # cells hold the mixed state: c_new = f c_prev + i g
                c_prev = previous_hidden(cells, c0.to(cells.dtype), batch_sizes, ctx.reverse)
                c_new = (gates[:, hidden:2 * hidden] * c_prev
                         + gates[:, :hidden] * gates[:, 2 * hidden:3 * hidden])
            r = (gates[:, 3 * hidden:] * c_new.tanh()).to(out.dtype)
            grad_w_hr = mm_(grad_h_total.t(), r)
        grad_first = grad_xg
        if ctx.projected:  # the first input is x and the op multiplied it by W_ih^T
            grad_first = mm_(grad_xg, w_ih) if _wants_grad(ctx, 0) else None
        grads = [grad_first, None, grad_h0, grad_c0, grad_w_hh, grad_w_hr, None, None]
        grads += [None] * (ctx.num_inputs - len(grads))
        index = ctx.index
        if "bias" in index and index["bias"] < ctx.num_inputs and _wants_grad(ctx, index["bias"]):
            grads[index["bias"]] = grad_xg.sum(0)
        if ctx.projected and _wants_grad(ctx, index["w_ih"]):
            grads[index["w_ih"]] = mm_(grad_xg.t(), x)
        return tuple(grads)

    return backward


def fake_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, save, *extra, **named):
    rows = xg.shape[0] if save else 0
    acc = acc_dtype(xg.dtype)
    return (xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape),
            c0.new_empty(c0.shape), xg.new_empty(rows, 4 * c0.shape[1], dtype=acc),
            xg.new_empty(rows, c0.shape[1], dtype=acc))


def fake_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr, gates, cells, reverse,
                  *extra, **named):
    rows = grad_out.shape[0]
    return (grad_out.new_empty(rows, 4 * c0.shape[1]), grad_hn.new_empty(grad_hn.shape),
            grad_cn.new_empty(grad_cn.shape),
            grad_out.new_empty(rows if w_hr is not None else 0, grad_out.shape[1]))


def make_double_backward_error(backward_qualname: str):
    """The autograd formula of a backward op: differentiating it (double backward) is an error.

    Without a formula, autograd would treat the op's outputs as constants when a graph is built
    through the backward (create_graph=True), and second derivatives would silently be wrong.
    Raised only when a second backward actually reaches the op, as nn.LSTM does on cuDNN.
    """
    def setup_context(ctx, inputs, output):
        if backward_qualname.startswith("fastlstm_triton::"):
            ctx.backend = "triton"
        else:
            ctx.backend = "cuda" if inputs[0].device.type == "cuda" else "cpu"

    def double_backward(ctx, *grads):
        raise RuntimeError(
            f"fastlstm: the {ctx.backend} backend's LSTM backward ({backward_qualname}) is not "
            f"differentiable, so gradients of gradients (double backward) are not supported; "
            f"use backend='torch' for higher-order gradients")

    return double_backward, setup_context


def register(forward_qualname: str, backward_op, *, fake: bool = True,
             backward_qualname: str | None = None, mm=None, addmm=None,
             extra_inputs=CPP_EXTRA_INPUTS):
    """Attach fake kernels and autograd to a backend's recurrence ops; `extra_inputs` names the
    forward op's inputs after `save`, in order."""
    if fake:
        torch.library.register_fake(forward_qualname)(fake_forward)
        if backward_qualname is not None:
            torch.library.register_fake(backward_qualname)(fake_backward)
    torch.library.register_autograd(forward_qualname, make_backward(backward_op, mm, addmm),
                                    setup_context=_make_setup_context(extra_inputs))
    if backward_qualname is not None:
        double_backward, setup_context = make_double_backward_error(backward_qualname)
        torch.library.register_autograd(backward_qualname, double_backward,
                                        setup_context=setup_context)
