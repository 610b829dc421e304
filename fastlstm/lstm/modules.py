"""fastlstm.LSTM and fastlstm.LSTMCell: nn.LSTM / nn.LSTMCell whose recurrence runs fused.

Only `forward` differs from the parent classes: same constructor (plus keyword-only `backend`),
parameters, state_dict keys, repr and errors.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .. import _backends
from .stack import Regularizers, layer_function, lstm_stack


def _autocast_dtype(device_type: str):
    """The dtype autocast would run an LSTM in on this device type, or None when it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no per-device query
        enabled = (torch.is_autocast_enabled() if device_type == "cuda"
                   else torch.is_autocast_cpu_enabled())
    except RuntimeError:  # a device type autocast does not know (meta): never autocast
        return None
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:
        return (torch.get_autocast_gpu_dtype() if device_type == "cuda"
                else torch.get_autocast_cpu_dtype())


def _lstm_autocast_dtype(device_type: str):
    """The dtype autocast runs nn.LSTM in. On CUDA with cuDNN that is float16 whatever autocast's
    dtype: ATen's autocast wrapper of the cuDNN RNN casts to half (AutocastRNN.cpp), so
    nn.LSTM under autocast(dtype=torch.bfloat16) returns float16, and so does fastlstm.LSTM."""
    dtype = _autocast_dtype(device_type)
    if (dtype is not None and device_type == "cuda" and torch.backends.cudnn.enabled
            and torch.backends.cudnn.is_available()):
        return torch.float16
    return dtype


def _autocast_cast(tensor, dtype):
    """What autocast does to one argument of a low-precision op: floating tensors become `dtype`,
    except float64 ones, which it leaves alone (as it does non-floating tensors)."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def _check_autocast_dtypes(module_name, input, named_tensors):
    """After autocast's casts, float64 tensors mixed with others fail in nn's kernels too."""
    for name, tensor in named_tensors:
        if tensor is not None and tensor.dtype != input.dtype:
            raise RuntimeError(
                f"{module_name}: under autocast the input runs in {input.dtype} but {name} in "
                f"{tensor.dtype} (autocast does not cast float64 tensors); make them all float64 "
                f"or none")


def _check_same_device(input, tensors, what):
    for tensor in tensors:
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(
                f"Input and {what} tensors are not at the same device, found input tensor at "
                f"{input.device} and {what} tensor at {tensor.device}")


def _bypass_fused() -> bool:
    """Exporters and TorchScript tracing see nn.LSTM's own graph."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and onnx.is_in_onnx_export())


class _BackendChoice:
    """The keyword-only `backend` argument both modules add to their parent's constructor."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        _backends.check_backend_name(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def extra_repr(self) -> str:
        text = super().extra_repr()
        backend = getattr(self, "backend", "auto")  # modules pickled before `backend` existed
        return text if backend == "auto" else f"{text}, backend={backend!r}"


def _check_rate(name, value):
    """A dropout-like probability in [0, 1), as a float; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"LSTM: {name} must be a number in [0, 1); got {value!r}")
    return float(value)


def _check_zoneout(value):
    """zoneout: one probability for h and c, or a pair (z_h, z_c)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"LSTM: zoneout must be a number in [0, 1) or a pair (z_h, z_c) of "
                             f"them; got {value!r}")
        return _check_rate("zoneout[0] (z_h)", value[0]), _check_rate("zoneout[1] (z_c)", value[1])
    rate = _check_rate("zoneout", value)
    return rate, rate


class LSTM(_BackendChoice, nn.LSTM):
    __doc__ = (
        "Drop-in :class:`torch.nn.LSTM` whose recurrence runs in fused kernels.\n\n"
        "Takes nn.LSTM's arguments plus keyword-only ``backend`` ('auto', 'cpu', 'cuda', "
        "'triton' or 'torch'; see fastlstm.available_backends). Shapes, outputs and errors are "
        "nn.LSTM's: input [T, B, input_size] (or [B, T, input_size] with batch_first, "
        "[T, input_size] unbatched, or a PackedSequence), optional hx = (h_0 "
        "[num_layers * num_directions, B, proj_size or hidden_size], c_0 [num_layers * "
        "num_directions, B, hidden_size]); returns output [T, B, num_directions * (proj_size or "
        "hidden_size)] and (h_n, c_n). fp32/fp64 everywhere; fp16/bf16 on CUDA with fp32 "
        "accumulation and fp32 cell state.\n\n"
        "Keyword-only regularizers (AWD-LSTM), off by default, inside the fused kernels; none "
        "adds a parameter or buffer:\n"
        "  weight_drop: DropConnect on every weight_hh_l*: one Bernoulli mask per forward, layer "
        "and direction, scaled by 1/(1-p); the parameters are used, never replaced.\n"
        "  locked_dropout: variational dropout of the input of every layer after the first: one "
        "mask per sequence and feature, the same at every step (not on the layer-0 input nor "
        "the output; the model around the LSTM applies those).\n"
        "  zoneout: float, or (z_h, z_c): per step and unit, h (c) keeps its previous value "
        "with probability z_h (z_c).\n"
        "All act in training only; in eval weight_drop and locked_dropout are the identity and "
        "zoneout uses its expectation h = z h_prev + (1 - z) h_new. Masks come from torch's "
        "generator (torch.manual_seed).\n"
    )

    def __init__(self, *args, weight_drop: float = 0.0, locked_dropout: float = 0.0,
                 zoneout=0.0, **kwargs):
        weight_drop = _check_rate("weight_drop", weight_drop)
        locked_dropout = _check_rate("locked_dropout", locked_dropout)
        zoneout_h, zoneout_c = _check_zoneout(zoneout)
        super().__init__(*args, **kwargs)
        self.weight_drop = weight_drop
        self.locked_dropout = locked_dropout
        self.zoneout = zoneout_h if zoneout_h == zoneout_c else (zoneout_h, zoneout_c)

    def _regularizers(self) -> Regularizers:
        # Modules pickled or converted before the regularizers existed have none.
        zoneout = getattr(self, "zoneout", 0.0)
        zoneout_h, zoneout_c = zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)
        return Regularizers(float(getattr(self, "weight_drop", 0.0)),
                            float(getattr(self, "locked_dropout", 0.0)),
                            float(zoneout_h), float(zoneout_c))

    def extra_repr(self) -> str:
        text = super().extra_repr()
        for name in ("weight_drop", "locked_dropout", "zoneout"):
            value = getattr(self, name, 0.0)
            if value != 0.0 and value != (0.0, 0.0):
                text += f", {name}={value!r}"
        return text

    def _layer_weights(self):
        directions = 2 if self.bidirectional else 1
        weights = []
        for layer in range(self.num_layers):
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                weights.append((
                    getattr(self, "weight_ih" + suffix),
                    getattr(self, "weight_hh" + suffix),
                    getattr(self, "bias_ih" + suffix) if self.bias else None,
                    getattr(self, "bias_hh" + suffix) if self.bias else None,
                    getattr(self, "weight_hr" + suffix) if self.proj_size > 0 else None,
                ))
        return weights

    def _check_packed_hidden_traced(self, input, hx, batch_sizes, max_batch_size, real_hidden):
        """check_forward_args for packed input while torch.compile traces. The packed batch size
        (batch_sizes[0], read on the host) is a data-dependent size there, which nn.LSTM's
        check_hidden_size cannot compare with hx's (the trace fails); the same checks are made
        here with the batch size compared at run time instead (a tensor assertion), so a mismatch
        still raises RuntimeError."""
        self.check_input(input, batch_sizes)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        for state, size, template in ((hx[0], real_hidden, "Expected hidden[0] size {}, got {}"),
                                      (hx[1], self.hidden_size,
                                       "Expected hidden[1] size {}, got {}")):
            if isinstance(state, torch.Tensor) and state.dim() == 3:
                # A tensor comparison, so the check stays in the graph and runs at every call.
                torch._assert_async(batch_sizes[0] == state.size(1),
                                    "LSTM: hx's batch size differs from the packed input's")
                self.check_hidden_size(state, (layers, state.size(1), size), template)
            else:
                self.check_hidden_size(state, (layers, max_batch_size, size), template)

    def forward(self, input, hx=None):  # noqa: C901 - mirrors nn.LSTM.forward step by step
        if _bypass_fused():
            return super().forward(input, hx)
        self._update_flat_weights()
        orig_input = input
        batch_sizes = None
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0]) if batch_sizes.numel() else 0
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"LSTM: input must be a Tensor or a PackedSequence, got "
                                f"{type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None

        if hx is None:
            shape = (self.num_layers * num_directions, max_batch_size)
            hx = (torch.zeros(*shape, real_hidden_size, dtype=input.dtype, device=input.device),
                  torch.zeros(*shape, self.hidden_size, dtype=input.dtype, device=input.device))
            self.check_forward_args(input, hx, batch_sizes)
        else:
            # A bare tensor is indexed as nn.LSTM indexes it (hx[0], hx[1]), so it fails with
            # nn.LSTM's error types (IndexError, or the 3-D check below).
            if isinstance(hx, (tuple, list)) and len(hx) != 2:
                # nn.LSTM reads hx[1] of a dense input first (IndexError when it is missing).
                error = IndexError if len(hx) < 2 and batch_sizes is None else RuntimeError
                raise error(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors; got "
                            f"{len(hx)} tensors")
            if batch_sizes is None:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should also be 3-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            if batch_sizes is not None and torch.compiler.is_compiling():
                self._check_packed_hidden_traced(input, hx, batch_sizes, max_batch_size,
                                                 real_hidden_size)
            else:
                self.check_forward_args(input, hx, batch_sizes)
            hx = self.permute_hidden(hx, sorted_indices)
            if not isinstance(hx, (tuple, list)):
                # nn.LSTM passes hx on to its kernel, which takes only a tuple of tensors.
                raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors; got "
                                f"{type(hx).__name__}")

        if batch_sizes is None and input.size(1 if self.batch_first else 0) == 0:
            # nn.LSTM's error, raised by its kernel after the argument checks above.
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        weights = self._layer_weights()
        _check_same_device(input, hx, "hidden")
        _check_same_device(input, [w for ws in weights for w in ws], "parameter")
        autocast_dtype = _lstm_autocast_dtype(input.device.type)
        c_n_dtype = None
        if autocast_dtype is not None and input.is_floating_point():
            # What autocast does for nn.LSTM: run the whole op in the autocast dtype (float64
            # tensors excepted: an all-float64 call runs in float64).
            c0_dtype = hx[1].dtype
            cast = lambda t: _autocast_cast(t, autocast_dtype)  # noqa: E731
            input = cast(input)
            hx = (cast(hx[0]), cast(hx[1]))
            weights = [tuple(cast(w) for w in ws) for ws in weights]
            _check_autocast_dtypes("LSTM", input, [("hx[0]", hx[0]), ("hx[1]", hx[1])] + [
                (name, cast(w)) for name, w in zip(self._flat_weights_names, self._flat_weights)])
            if self.proj_size > 0 and input.device.type != "cuda":
                # With proj_size the CPU runs nn.LSTM's composite (oneDNN has no projection):
                # only the matmuls are cast, and the cell state stays in promote(dtype, c_0 dtype).
                c_n_dtype = torch.promote_types(input.dtype, c0_dtype)
        else:
            for index, tensor in enumerate(hx):
                if tensor.dtype != input.dtype:
                    raise RuntimeError(
                        f"LSTM: hx[{index}] has dtype {tensor.dtype} but input has dtype "
                        f"{input.dtype}; they must match")

        backend = _backends.resolve_constant(self.backend, input.device, input.dtype)
        with torch.autocast(input.device.type, enabled=False) if autocast_dtype else contextlib.nullcontext():
            if batch_sizes is None:
                steps_first = input.transpose(0, 1) if self.batch_first else input
                steps, batch = steps_first.shape[0], steps_first.shape[1]
                rows = steps_first.reshape(steps * batch, self.input_size)
                out_rows, h_n, c_n = lstm_stack(
                    rows, None, hx[0], hx[1], weights, num_layers=self.num_layers,
                    bidirectional=self.bidirectional, dropout=float(self.dropout),
                    training=self.training, backend=backend, regularizers=self._regularizers())
                output = out_rows.reshape(steps, batch, out_rows.shape[-1])
                if self.batch_first:
                    output = output.transpose(0, 1)
            else:
                output, h_n, c_n = lstm_stack(
                    input, batch_sizes, hx[0], hx[1], weights, num_layers=self.num_layers,
                    bidirectional=self.bidirectional, dropout=float(self.dropout),
                    training=self.training, backend=backend, regularizers=self._regularizers())

        if c_n_dtype is not None:
            c_n = c_n.to(c_n_dtype)
        hidden = (h_n, c_n)
        if isinstance(orig_input, PackedSequence):
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)


class LSTMCell(_BackendChoice, nn.LSTMCell):
    __doc__ = (
        "Drop-in :class:`torch.nn.LSTMCell` whose step runs in a fused kernel.\n\n"
        "Takes nn.LSTMCell's arguments plus keyword-only ``backend``. input [B, input_size] or "
        "[input_size]; hx = (h [B, hidden_size], c [B, hidden_size]) or None; returns (h', c').\n"
    )

    def forward(self, input, hx=None):
        if _bypass_fused():
            return super().forward(input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
        if hx is not None:
            # nn.LSTMCell's kernel takes exactly a tuple of two tensors.
            if not isinstance(hx, (tuple, list)):
                raise TypeError(f"LSTMCell: hx must be a tuple (h_0, c_0) of two tensors; got "
                                f"{type(hx).__name__}")
            if len(hx) != 2:
                raise RuntimeError(f"LSTMCell: hx must be a tuple (h_0, c_0) of two tensors; got "
                                   f"{len(hx)} tensors")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                                device=input.device)
            hx = (zeros, zeros)
        else:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if not is_batched else hx
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected "
                               f"{self.input_size}")
        for index, tensor in enumerate(hx):
            if tensor.size(0) != input.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{index} "
                                   f"batch size {tensor.size(0)}")
            if tensor.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got "
                                   f"{tensor.size(1)}, expected {self.hidden_size}")
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None)
        _check_same_device(input, hx, "hidden")
        _check_same_device(input, weights, "parameter")
        autocast_dtype = _autocast_dtype(input.device.type)
        if autocast_dtype is not None and input.is_floating_point():
            # Autocast casts floating tensors to its dtype, float64 ones excepted.
            low = lambda t: _autocast_cast(t, autocast_dtype)  # noqa: E731
            run_dtype = low(input).dtype
            checked = [("hx[0]", low(hx[0]))] + [
                (name, low(w)) for name, w in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                                                  weights)]
            if input.device.type != "cuda":
                # Only CUDA autocast lists lstm_cell as a low-precision op. Elsewhere (the CPU)
                # nn.LSTMCell runs its composite: gates in the autocast dtype, then the cell update
                # with c_0, so h' and c' come out in promote(gate dtype, c_0 dtype).
                run_dtype = torch.promote_types(run_dtype, hx[1].dtype)
            else:
                checked.append(("hx[1]", low(hx[1])))
            _check_autocast_dtypes("LSTMCell", low(input), checked)
            cast = lambda t: None if t is None else t.to(run_dtype)  # noqa: E731
            input, hx, weights = cast(input), (cast(hx[0]), cast(hx[1])), tuple(
                cast(w) for w in weights)
        else:
            for index, tensor in enumerate(hx):
                if tensor.dtype != input.dtype:
                    raise RuntimeError(f"LSTMCell: hx[{index}] has dtype {tensor.dtype} but input "
                                       f"has dtype {input.dtype}; they must match")
                if weights[0].dtype != input.dtype:
                    raise RuntimeError(f"LSTMCell: input has dtype {input.dtype} but weight_ih "
                                       f"has dtype {weights[0].dtype}; they must match")
        backend = _backends.resolve_constant(self.backend, input.device, input.dtype)
        run_layer = layer_function(backend)
        with torch.autocast(input.device.type, enabled=False) if autocast_dtype else contextlib.nullcontext():
            _out, h, c = run_layer(input, None, hx[0], hx[1], *weights, reverse=False)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


def convert(module: nn.Module) -> nn.Module:
    """Turn every nn.LSTM / nn.LSTMCell inside `module` (itself included) into its fastlstm class.

    In place: the modules keep their parameters (nothing is copied), so optimizers and state
    dicts that refer to them stay valid. Subclasses of nn.LSTM other than fastlstm's are left
    alone. Returns `module`.
    """
    for submodule in module.modules():
        if type(submodule) is nn.LSTM:
            submodule.__class__ = LSTM
            submodule.backend = "auto"
            submodule.weight_drop = submodule.locked_dropout = submodule.zoneout = 0.0
        elif type(submodule) is nn.LSTMCell:
            submodule.__class__ = LSTMCell
            submodule.backend = "auto"
    return module
