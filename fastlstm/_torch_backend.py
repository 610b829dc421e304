"""Backend "torch": one LSTM layer written step by step with torch ops.

Readable and slow on purpose: it is the ground truth the fused kernels are checked against (and is
itself checked against nn.LSTM). Autograd differentiates it. Any device, any floating dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._recurrence import acc_dtype, step_layout


def lstm_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """One layer, one direction, over rows in the packed layout (see _recurrence).

    x [N, I], batch_sizes: CPU int64 [T] or None for dense rows ([B] * T), h0 [B, P], c0 [B, H].
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
        h_live = h_live.to(dtype)
        outputs[t] = h_live
        if live == batch:
            h, c = h_live, c_live
        else:  # rows past `live` are finished (forward) or not yet started (reverse)
            h = torch.cat([h_live, h[live:]], 0)
            c = torch.cat([c_live, c[live:]], 0)
    return torch.cat(outputs, 0), h, c.to(dtype)
