"""Shared test helpers: building matched fastlstm/nn modules and comparing results."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

# Tolerances, stated once: absolute, on outputs/states and on gradients.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
}


def cpu_backends():
    """Backends that run on this machine's CPU (triton only under TRITON_INTERPRET=1)."""
    return fastlstm.available_backends("cpu")


def assert_close(name, actual, expected, atol):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    diff = (actual - expected).abs()
    if diff.numel() and diff.max().item() > atol:
        flat = int(diff.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        raise AssertionError(
            f"{name}: max abs error {diff.max().item():.3e} > {atol:.1e}; first worst at index "
            f"{index}: got {actual[index].item():.8g}, expected {expected[index].item():.8g}")


def matched_lstm(backend, dtype=torch.float32, **kwargs):
    """A fastlstm.LSTM and an nn.LSTM with the same weights."""
    ours = fastlstm.LSTM(backend=backend, dtype=dtype, **kwargs)
    theirs = nn.LSTM(dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run_and_grad(module, inputs, hx, weight_fn):
    """Forward, a loss that touches every output, and gradients of inputs, hx and parameters."""
    output, (h_n, c_n) = module(inputs, hx)
    out = output.data if isinstance(output, PackedSequence) else output
    loss = (out * weight_fn(out)).sum() + (h_n * weight_fn(h_n)).sum() + (c_n * weight_fn(c_n)).sum()
    leaves = []
    if isinstance(inputs, PackedSequence):
        leaves.append(inputs.data)
    else:
        leaves.append(inputs)
    if hx is not None:
        leaves.extend(hx)
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=False)
    return out, h_n, c_n, grads


def fixed_weights(t):
    """Deterministic, non-uniform loss weights so every element's gradient differs."""
    return torch.linspace(-1.0, 1.5, t.numel(), dtype=t.dtype).reshape(t.shape)


def make_packed(x, lengths, enforce_sorted):
    return pack_padded_sequence(x, torch.tensor(lengths), batch_first=False,
                                enforce_sorted=enforce_sorted)


def backend_params(device):
    """pytest params for every backend that runs on `device` here (a skipped "cuda" without a GPU)."""
    import pytest
    if device == "cuda" and not torch.cuda.is_available():
        return [pytest.param("cuda", marks=pytest.mark.cuda)]
    return [pytest.param(name) for name in fastlstm.available_backends(device)]
