"""Multi-layer, bidirectional LSTM over rows in the packed layout, for any backend.

The regularizers of fastlstm.LSTM live here and in the recurrence ops:
  weight_drop     DropConnect on W_hh: one Bernoulli(1 - p) mask [4H, P] per forward, layer and
                  direction, scaled by 1 / (1 - p) as F.dropout scales. The module's parameter is
                  never replaced: the backends multiply by W_hh * mask and W_hh's gradient is the
                  masked product's gradient times the mask. The cpu op takes the mask itself and
                  applies it while packing W_hh for its own step GEMM (no extra pass; on the BLAS
                  paths it multiplies a copy). torch, triton and cuda (whose kernels read W_hh in
                  place, without a packing pass to fold it into) get the masked temporary
                  w_hh * mask from here: one elementwise pass over [4H, P] per layer and
                  direction, against the T GEMMs with W_hh that follow.
  locked_dropout  variational dropout on the input of every layer after the first (AWD-LSTM's
                  dropouth): one Bernoulli mask [B, features] per forward and layer, the same at
                  every step, scaled by 1 / (1 - p). Not on the layer-0 input nor on the final
                  output (AWD-LSTM's dropouti / dropout): those belong to the model around the
                  LSTM (fastlstm.lm.LSTMLanguageModel applies them).
  zoneout         inside the recurrence ops (it changes what the next step sees): see
                  recurrence.py. Every backend has it (the cuda backend in its step kernels:
                  the persistent kernels leave zoneout to them). One seed per forward from torch's generator; layer/direction
                  index picks the stream, so every mask is reproducible from torch.manual_seed.
All three act in training only; in evaluation weight_drop and locked_dropout are the identity and
zoneout uses its expectation (h = z h_prev + (1 - z) h_new).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .. import _backends
from .recurrence import acc_dtype

# Test hook: when set, called as mask_observer(kind, layer, direction, mask) for every random
# mask a forward draws ("weight_drop" [4H, P] scaled, "locked_dropout" [B, F] scaled) and once
# per forward as mask_observer("zoneout_seed", None, None, seed) with the seed as an int.
mask_observer = None


@dataclasses.dataclass(frozen=True)
class Regularizers:
    weight_drop: float = 0.0
    locked_dropout: float = 0.0
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.weight_drop or self.locked_dropout or self.zoneout_h or self.zoneout_c)


def _observe(kind, layer, direction, value):
    if mask_observer is not None:
        mask_observer(kind, layer, direction, value)


def _dropout_mask(shape, p, like):
    """Bernoulli(1 - p) scaled by 1 / (1 - p), in `like`'s dtype and device: uniform draws u in
    [0, 1), kept where u >= p, in place (on the CPU, bernoulli_ with a probability draws one
    element at a time and took 4x as long as this uniform fill: 0.9 ms against 0.2 ms for a
    [512, 128] W_hh)."""
    mask = torch.rand(shape, dtype=like.dtype, device=like.device).ge_(p)
    return mask.mul_(1.0 / (1 - p))


def layer_seed(seed, index: int):
    """The zoneout seed of layer/direction `index` of a forward drawn `seed` (an int, or the
    int64 tensor the forward passes to the ops). Seeds are drawn below 2^62 and the offset is
    too, so the sum stays an int64 without wrapping around, in tensors as in ints."""
    offset = (index * 0x9E3779B97F4A7C15) & ((1 << 62) - 1)
    if torch.is_tensor(seed):
        return seed + offset
    return (seed + offset) & ((1 << 63) - 1)


def _fused_layer(forward_op, projection_in_op: bool = False, takes_mask: bool = False,
                 cpp_schema: bool = False):
    """One layer through a backend's recurrence op. With `projection_in_op` (the cpu backend's
    op) the op takes x, W_ih and the bias and computes the input gates itself; otherwise the
    input projection is one GEMM here (F.linear), bias included. `takes_mask`: the op applies a
    weight-drop mask itself (the cpu op); otherwise it gets w_hh * mask. `cpp_schema`: the op
    has the C++ schema, with bias and w_ih before the regularizers' arguments."""
    def lstm_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, *,
                   zoneout=None, w_hh_mask=None):
        bias = None if b_ih is None else b_ih + b_hh
        if w_hh_mask is not None and not takes_mask:
            w_hh, w_hh_mask = w_hh * w_hh_mask, None
        if projection_in_op:
            first = x.contiguous()
        else:
            # Step 1 of every layer: the input projection of all steps as one GEMM.
            first = F.linear(x, w_ih, bias).contiguous()
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (first, h0, c0, w_hh, w_hr, bias) + ((w_ih,) if projection_in_op else ()))
        if batch_sizes is None:
            batch_sizes = torch.empty(0, dtype=torch.int64)
        args = (first, batch_sizes, h0.contiguous(), c0.contiguous(),
                w_hh.contiguous(), None if w_hr is None else w_hr.contiguous(), reverse, save)
        if cpp_schema:  # the C++ ops' bias and w_ih come before the regularizers' arguments
            if projection_in_op or zoneout is not None or w_hh_mask is not None:
                args = args + ((None if bias is None else bias.contiguous(),
                                w_ih.contiguous()) if projection_in_op else (None, None))
        if zoneout is not None or w_hh_mask is not None:
            args = args + (zoneout or (0.0, 0.0, None, False))
            if w_hh_mask is not None:
                args = args + (w_hh_mask.contiguous(),)
        out, h_n, c_n, _gates, _cells = forward_op(*args)
        return out, h_n, c_n
    return lstm_layer


def layer_function(backend: str):
    """The function that runs one layer and direction on `backend`."""
    if backend == "torch":
        from .torch_backend import lstm_layer
        return lstm_layer
    if backend == "triton":
        from .triton import recurrence as triton_lstm
        return _fused_layer(triton_lstm.recurrence_forward)
    from . import ops as _extension  # cpu and cuda: the ops of fastlstm._C
    if backend == "cpu":
        # The cpu op adds the bias in its cell pass (F.linear with a bias first copies it into
        # every row of the [N, 4H] output: 0.5 ms of a 19 ms training step at B=64, T=64,
        # H=128) and, where its own step GEMM runs, computes each step's x @ W_ih^T right before
        # h @ W_hh^T, so the [N, 4H] input gates never go through memory (csrc/lstm/cpu/lstm_cpu.cpp).
        return _fused_layer(_extension.recurrence_forward, projection_in_op=True, takes_mask=True,
                            cpp_schema=True)
    return _fused_layer(_extension.recurrence_forward, cpp_schema=True)


def _locked_dropout(x, batch_sizes, batch, p):
    """x [N, F] rows in the packed layout times one mask [B, F] per batch row, every step."""
    mask = _dropout_mask((batch, x.shape[1]), p, x)
    _observe("locked_dropout", None, None, mask)
    if batch_sizes is None:
        return (x.view(-1, batch, x.shape[1]) * mask).view(x.shape)
    sizes = batch_sizes.to(torch.int64).cpu()
    offsets = torch.cumsum(sizes, 0) - sizes
    rows = torch.arange(x.shape[0]) - torch.repeat_interleave(offsets, sizes)
    return x * mask.index_select(0, rows.to(x.device))


def lstm_stack(x, batch_sizes, h0_all, c0_all, layer_weights, *, num_layers, bidirectional,
               dropout, training, backend, regularizers: Regularizers | None = None):
    """Run the whole stack.

    x [N, I] rows in the packed layout; h0_all [L*D, B, P]; c0_all [L*D, B, H];
    layer_weights[l*D + d] = (w_ih, w_hh, b_ih, b_hh, w_hr) with None for absent tensors.
    Returns out [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H].
    """
    run_layer = layer_function(backend)
    directions = 2 if bidirectional else 1
    reg = regularizers if regularizers is not None and regularizers.active else None
    zoneout_on = reg is not None and (reg.zoneout_h > 0 or reg.zoneout_c > 0)
    seed = None
    if zoneout_on and training:
        # One draw from torch's (CPU) generator per forward; no device sync on CUDA. It stays a
        # tensor, passed to the ops as one: torch.compile traces it as a value of the graph
        # (an int would need its value at trace time, which a fresh draw does not have).
        seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64)
        if mask_observer is not None:
            _observe("zoneout_seed", None, None, int(seed))
    batch = h0_all.shape[1]
    layer_input = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        if reg is not None and reg.locked_dropout > 0 and training and layer > 0:
            layer_input = _locked_dropout(layer_input, batch_sizes, batch, reg.locked_dropout)
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            options = {}
            if reg is not None:
                w_hh = layer_weights[index][1]
                if reg.weight_drop > 0 and training:
                    mask = _dropout_mask(w_hh.shape, reg.weight_drop, w_hh)
                    _observe("weight_drop", layer, direction, mask)
                    options["w_hh_mask"] = mask
                if zoneout_on:
                    options["zoneout"] = (float(reg.zoneout_h), float(reg.zoneout_c),
                                          None if seed is None else layer_seed(seed, index),
                                          not training)
            out, h, c = run_layer(layer_input, batch_sizes, h0_all[index], c0_all[index],
                                  *layer_weights[index], reverse=direction == 1, **options)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, torch.stack(h_n, 0), torch.stack(c_n, 0)


__all__ = ["lstm_stack", "layer_function", "Regularizers", "layer_seed", "_backends", "acc_dtype"]
