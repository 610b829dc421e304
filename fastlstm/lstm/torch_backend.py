"""Backend "torch": one LSTM layer written step by step with torch ops.

Readable and slow on purpose: it is the ground truth the fused kernels are checked against (and is
itself checked against nn.LSTM). Autograd differentiates it. Any device, any floating dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .recurrence import ZONEOUT_C_STREAM, ZONEOUT_H_STREAM, acc_dtype, step_layout, zoneout_keep


def lstm_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, *, zoneout=None,
               w_hh_mask=None):
    """One layer, one direction, over rows in the packed layout (see _recurrence).

    x [N, I], batch_sizes: CPU int64 [T] or None for dense rows ([B] * T), h0 [B, P], c0 [B, H].
    Regularizers (see _stack): zoneout = (z_h, z_c, seed, expected) with the masks of
    recurrence.zoneout_keep; w_hh_mask [4H, P] multiplies W_hh (weight drop).
    Returns out [N, P], h_n [B, P], c_n [B, H].
    """
    batch = h0.shape[0]
    dtype = x.dtype
    # float16 / bfloat16: gates, the cell state and the projection in float32, h rounded to the
    # input dtype each step (the contract of the fused kernels, see _recurrence).
    acc = acc_dtype(dtype) if dtype in (torch.float16, torch.bfloat16) else dtype
    bias = None if b_ih is None else b_ih + b_hh
    input_gates = F.linear(x, w_ih, bias)
    # Batch 0 has no rows; one empty step still links the outputs to every weight, so their
    # gradients are zeros as with nn.LSTM, not None.
    layout = step_layout(batch_sizes, x.shape[0], batch) or [(0, 0)]
    if w_hh_mask is not None:
        w_hh = w_hh * w_hh_mask
    keep_h = keep_c = None
    if zoneout is not None:
        zoneout_h, zoneout_c, seed, expected = zoneout
        if zoneout_h > 0:
            keep_h = zoneout_keep(x.shape[0], h0.shape[1], zoneout_h, seed, ZONEOUT_H_STREAM,
                                  expected, acc_dtype(dtype), x.device).to(acc)
        if zoneout_c > 0:
            keep_c = zoneout_keep(x.shape[0], c0.shape[1], zoneout_c, seed, ZONEOUT_C_STREAM,
                                  expected, acc_dtype(dtype), x.device).to(acc)
    w_hh_acc = w_hh.to(acc)
    w_hr_acc = None if w_hr is None else w_hr.to(acc)
    h, c = h0, c0.to(acc)
    outputs = [None] * len(layout)
    order = range(len(layout) - 1, -1, -1) if reverse else range(len(layout))
    for t in order:
        offset, live = layout[t]
        gates = input_gates[offset:offset + live].to(acc) + F.linear(h[:live].to(acc), w_hh_acc)
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, 1)
        c_live = forget_gate.sigmoid() * c[:live] + in_gate.sigmoid() * cell_gate.tanh()
        h_live = out_gate.sigmoid() * c_live.tanh()
        if w_hr_acc is not None:
            h_live = F.linear(h_live, w_hr_acc)
        if keep_c is not None:  # zoneout: keep the previous c where the mask says so
            keep = keep_c[offset:offset + live]
            c_live = keep * c[:live] + (1 - keep) * c_live
        if keep_h is not None:
            keep = keep_h[offset:offset + live]
            h_live = keep * h[:live].to(h_live.dtype) + (1 - keep) * h_live
        h_live = h_live.to(dtype)
        outputs[t] = h_live
        if live == batch:
            h, c = h_live, c_live
        else:  # rows past `live` are finished (forward) or not yet started (reverse)
            h = torch.cat([h_live, h[live:]], 0)
            c = torch.cat([c_live, c[live:]], 0)
    return torch.cat(outputs, 0), h, c.to(dtype)
