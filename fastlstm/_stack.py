"""Multi-layer, bidirectional LSTM over rows in the packed layout, for any backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backends


def _fused_layer(forward_op, projection_in_op: bool = False):
    """One layer through a backend's recurrence op. With `projection_in_op` (the cpu backend's
    op) the op takes x, W_ih and the bias and computes the input gates itself; otherwise the
    input projection is one GEMM here (F.linear), bias included."""
    def lstm_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
        bias = None if b_ih is None else b_ih + b_hh
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
        if projection_in_op:
            args = args + (None if bias is None else bias.contiguous(), w_ih.contiguous())
        out, h_n, c_n, _gates, _cells = forward_op(*args)
        return out, h_n, c_n
    return lstm_layer


def layer_function(backend: str):
    """The function that runs one layer and direction on `backend`."""
    if backend == "torch":
        from ._torch_backend import lstm_layer
        return lstm_layer
    if backend == "triton":
        from . import triton_lstm
        return _fused_layer(triton_lstm.recurrence_forward)
    from . import _extension  # cpu and cuda: the ops of fastlstm._C
    if backend == "cpu":
        # The cpu op adds the bias in its cell pass (F.linear with a bias first copies it into
        # every row of the [N, 4H] output: 0.5 ms of a 19 ms training step at B=64, T=64,
        # H=128) and, where its own step GEMM runs, computes each step's x @ W_ih^T right before
        # h @ W_hh^T, so the [N, 4H] input gates never go through memory (csrc/lstm_cpu.cpp).
        return _fused_layer(_extension.recurrence_forward, projection_in_op=True)
    return _fused_layer(_extension.recurrence_forward)


def lstm_stack(x, batch_sizes, h0_all, c0_all, layer_weights, *, num_layers, bidirectional,
               dropout, training, backend):
    """Run the whole stack.

    x [N, I] rows in the packed layout; h0_all [L*D, B, P]; c0_all [L*D, B, H];
    layer_weights[l*D + d] = (w_ih, w_hh, b_ih, b_hh, w_hr) with None for absent tensors.
    Returns out [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H].
    """
    run_layer = layer_function(backend)
    directions = 2 if bidirectional else 1
    layer_input = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            out, h, c = run_layer(layer_input, batch_sizes, h0_all[index], c0_all[index],
                                  *layer_weights[index], reverse=direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, torch.stack(h_n, 0), torch.stack(c_n, 0)


__all__ = ["lstm_stack", "layer_function", "_backends"]
