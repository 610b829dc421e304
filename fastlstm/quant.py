"""Quantized CPU inference: int8 or bf16 weights for LSTMs, linear layers and language models.

fastlstm.quantize(model, dtype) returns a copy of `model` whose LSTMs and linear layers hold
int8 weights with one float32 scale per output row (symmetric), or bf16 weights, and run in the
kernels of csrc/quant/quant_cpu.cpp. See quantize() for the contract and the error bounds.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import _backends

__all__ = ["quantize", "QuantizedLSTM", "QuantizedLinear", "kernel_names"]

_PANEL = 16  # output rows per packed panel (csrc/quant/quant_kernels.h)
_GROUP = {torch.int8: 4, torch.bfloat16: 2}  # K values per 32-bit lane of a panel


_fakes_registered = False


def _register_fakes() -> None:
    """Shapes of the ops' results for tracing (torch.compile, opcheck)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("fastlstm::quant_linear_cpu")
    def _(x, packed, scale, sums, bias, out_features):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("fastlstm::quant_lstm_layer_cpu")
    def _(x, h0, c0, w_ih, w_ih_scale, w_ih_sums, w_hh, w_hh_scale, w_hh_sums, bias, reverse):
        return x.new_empty(x.shape[0], x.shape[1], h0.shape[1]), h0.new_empty(h0.shape), \
            c0.new_empty(c0.shape)

    @torch.library.register_fake("fastlstm::quant_decode_cpu")
    def _(token, h, c, embedding, w_ih, w_ih_scale, w_ih_sums, w_hh, w_hh_scale, w_hh_sums, bias,
          head_weight, head_scale, head_sums, head_bias, temperature, top_k, top_p, min_p,
          generator, num_steps):
        return token.new_empty(token.shape[0], num_steps)


def _ops():
    """torch.ops.fastlstm with the quantized ops, or a RuntimeError saying what is missing."""
    if _backends.extension() is None or not hasattr(torch.ops.fastlstm, "quant_lstm_layer_cpu"):
        reason = _backends._import_extension()[1] or "fastlstm._C was built without them"
        raise RuntimeError(f"fastlstm.quantize: the quantized CPU kernels are unavailable: "
                           f"{reason}; build the extension (`pip install --no-build-isolation -e .`)")
    _register_fakes()
    return torch.ops.fastlstm


def kernel_names() -> tuple[str, str]:
    """The kernel sets the quantized ops run here: (int8, bf16), e.g. ("avx512-vnni",
    "avx512-bf16"); FASTLSTM_QUANT_KERNELS=avx2 or =portable forces a lower one (read once per
    process)."""
    return tuple(_ops().quant_kernels_cpu())


def _weight_format(dtype) -> torch.dtype:
    if dtype in (torch.qint8, torch.int8):
        return torch.int8
    if dtype == torch.bfloat16:
        return torch.bfloat16
    raise ValueError(f"fastlstm.quantize: dtype must be torch.qint8 (int8 weights with per-row "
                     f"scales) or torch.bfloat16; got dtype={dtype!r}")


# ------------------------------------------------------------------------------------------------
# Quantizing and packing weights
# ------------------------------------------------------------------------------------------------

def quantize_rows(weight: torch.Tensor):
    """float [N, K] -> (int8 [N, K], float32 scale [N]): symmetric, one scale per row,
    scale = max|W[n, :]| / 127, Wq = round(W / scale) in [-127, 127] (a zero row: scale 0)."""
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _lstm_row_order(hidden: int) -> torch.Tensor:
    """Source row (of W [4H, K]) of each packed row, -1 for padding: the gates of each block of
    16 units in four consecutive panels (csrc/quant/quant_cpu.cpp)."""
    hidden_pad = -(-hidden // _PANEL) * _PANEL
    packed = torch.arange(4 * hidden_pad)
    block, within = packed // (4 * _PANEL), packed % (4 * _PANEL)
    gate, lane = within // _PANEL, within % _PANEL
    unit = block * _PANEL + lane
    return torch.where(unit < hidden, gate * hidden + unit, torch.full_like(unit, -1))


def _plain_row_order(rows: int) -> torch.Tensor:
    padded = torch.arange(-(-rows // _PANEL) * _PANEL)
    return torch.where(padded < rows, padded, torch.full_like(padded, -1))


def _gather_rows(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tensor[order] along dim 0, zero where order is -1."""
    out = tensor.new_zeros((order.numel(),) + tuple(tensor.shape[1:]))
    valid = order >= 0
    out[valid] = tensor[order[valid]]
    return out


def pack(weight: torch.Tensor, scale: torch.Tensor | None, order: torch.Tensor):
    """Pack a quantized weight [N, K] (int8 with its scale [N], or bf16) in the kernels' layout:
    rows in `order`, zero-padded, as [N_pad / 16, K_pad / g, 16, g] (g = 4 for int8, 2 for bf16).
    Returns (packed, scale [N_pad] float32, sums [N_pad] int32); bf16 gets empty scale and sums."""
    group = _GROUP[weight.dtype]
    rows = _gather_rows(weight, order)
    depth = weight.shape[1]
    depth_pad = -(-depth // group) * group
    if depth_pad != depth:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], depth_pad - depth)], 1)
    packed = rows.reshape(-1, _PANEL, depth_pad // group, group).permute(0, 2, 1, 3).contiguous()
    if weight.dtype == torch.int8:
        return (packed, _gather_rows(scale.float(), order).contiguous(),
                rows.sum(1, dtype=torch.int32).contiguous())
    empty_float = torch.empty(0, dtype=torch.float32)
    return packed, empty_float, torch.empty(0, dtype=torch.int32)


def _stored(weight: torch.Tensor, fmt: torch.dtype):
    """What a quantized module keeps of a float weight: (int8 weight, scale) or (bf16, None)."""
    if fmt == torch.int8:
        return quantize_rows(weight)
    return weight.detach().to(torch.bfloat16).contiguous(), None


def _check_inference(module: nn.Module, tensors) -> None:
    name = type(module).__name__
    if module.training:
        raise RuntimeError(f"{name}: quantized modules run inference only; call .eval() on the "
                           f"model (it is in training mode)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name}: quantized modules have no backward; an input requires grad. "
                           f"Run under torch.no_grad() / torch.inference_mode(), or detach it")


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """nn.Linear for inference with int8 (per-output-row scales) or bf16 weights, on the CPU.

    Buffers: ``weight`` (int8 or bfloat16 [out_features, in_features]), ``scale`` (float32
    [out_features], int8 only) and ``bias`` (float32 [out_features] or None), all in the
    state_dict. forward(x [..., in_features] float32) -> float32 [..., out_features].
    """

    def __init__(self, linear: nn.Linear, dtype=torch.qint8):
        super().__init__()
        fmt = _weight_format(dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantized_dtype = fmt
        weight, scale = _stored(linear.weight, fmt)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        self._pack()

    def _pack(self) -> None:
        order = _plain_row_order(self.out_features)
        self._packed = pack(self.weight, self.scale, order)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.quantized_dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_inference(self, [x])
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise RuntimeError(f"QuantizedLinear: input must be a float32 CPU tensor; got "
                               f"{x.dtype} on {x.device}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise RuntimeError(f"QuantizedLinear: input must be [..., {self.in_features}]; got "
                               f"{tuple(x.shape)}")
        packed, scale, sums = self._packed
        rows = x.reshape(-1, self.in_features)
        out = _ops().quant_linear_cpu(rows, packed, scale, sums, self.bias, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)


class QuantizedLSTM(nn.Module):
    """nn.LSTM for inference with int8 (per-output-row scales) or bf16 weights, on the CPU.

    Same attributes as the LSTM it came from (input_size, hidden_size, num_layers, bias,
    batch_first, bidirectional; proj_size is 0) and the same buffers' names as its parameters
    (weight_ih_l0 int8 or bfloat16 [4H, input_size], weight_ih_l0_scale float32 [4H] for int8,
    bias_ih_l0 float32 [4H], ...). forward(input, hx=None) as nn.LSTM's: input [T, B, I] ([B, T, I]
    with batch_first, or unbatched [T, I]) float32, hx = (h_0, c_0) each
    [num_layers * num_directions, B, H] (taken as float32) -> (output [T, B, D * H], (h_n, c_n)).
    No PackedSequence, no dropout (inference only).
    """

    def __init__(self, lstm: nn.LSTM, dtype=torch.qint8):
        super().__init__()
        fmt = _weight_format(dtype)
        if lstm.proj_size:
            raise ValueError("fastlstm.quantize: an LSTM with proj_size > 0 is not supported by "
                             "the quantized kernels")
        for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "bidirectional"):
            setattr(self, name, getattr(lstm, name))
        self.proj_size = 0
        self.dropout = 0.0
        self.quantized_dtype = fmt
        self._names = []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                self._names.append(suffix)
                for kind in ("ih", "hh"):
                    weight, scale = _stored(getattr(lstm, f"weight_{kind}{suffix}"), fmt)
                    self.register_buffer(f"weight_{kind}{suffix}", weight)
                    if scale is not None:
                        self.register_buffer(f"weight_{kind}{suffix}_scale", scale)
                    if self.bias:
                        bias = getattr(lstm, f"bias_{kind}{suffix}").detach().float().clone()
                        self.register_buffer(f"bias_{kind}{suffix}", bias)
        self._pack()

    def _pack(self) -> None:
        order = _lstm_row_order(self.hidden_size)
        self._packed = []
        for suffix in self._names:
            layer = []
            for kind in ("ih", "hh"):
                weight = getattr(self, f"weight_{kind}{suffix}")
                scale = getattr(self, f"weight_{kind}{suffix}_scale", None)
                layer.extend(pack(weight, scale, order))
            if self.bias:
                bias = getattr(self, f"bias_ih{suffix}") + getattr(self, f"bias_hh{suffix}")
            else:
                bias = torch.zeros(4 * self.hidden_size)
            layer.append(_gather_rows(bias.float(), order).contiguous())
            self._packed.append(tuple(layer))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text + f", dtype={self.quantized_dtype}"

    def forward(self, input, hx=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"QuantizedLSTM: input must be a Tensor (PackedSequence is not "
                            f"supported); got {type(input).__name__}")
        _check_inference(self, [input] + (list(hx) if isinstance(hx, (tuple, list)) else []))
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        if input.dtype != torch.float32 or input.device.type != "cpu":
            raise RuntimeError(f"QuantizedLSTM: input must be a float32 CPU tensor; got "
                               f"{input.dtype} on {input.device}")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.shape[-1]}")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        directions = 2 if self.bidirectional else 1
        state_shape = (self.num_layers * directions, batch, self.hidden_size)
        if hx is None:
            h0 = c0 = torch.zeros(state_shape)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise RuntimeError("QuantizedLSTM: hx must be a tuple (h_0, c_0) of two tensors")
            h0, c0 = hx
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            for index, tensor in enumerate((h0, c0)):
                if tuple(tensor.shape) != state_shape:
                    raise RuntimeError(f"Expected hidden[{index}] size {state_shape}, got "
                                       f"{tuple(tensor.shape)}")
            h0, c0 = h0.float(), c0.float()
        ops = _ops()
        x = x.contiguous()
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                out, h, c = ops.quant_lstm_layer_cpu(
                    x, h0[index].contiguous(), c0[index].contiguous(), *self._packed[index],
                    bool(direction))
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if directions == 1 else torch.cat(outputs, 2)
        output = x.transpose(0, 1) if self.batch_first else x
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)


# ------------------------------------------------------------------------------------------------
# quantize()
# ------------------------------------------------------------------------------------------------

def _convert(module: nn.Module, dtype) -> nn.Module:
    if isinstance(module, nn.LSTM):
        return QuantizedLSTM(module, dtype)
    if isinstance(module, nn.Linear):
        return QuantizedLinear(module, dtype)
    for name, child in list(module.named_children()):
        converted = _convert(child, dtype)
        if converted is not child:
            setattr(module, name, converted)
    return module


def quantize(model: nn.Module, dtype=torch.qint8) -> nn.Module:
    """A copy of `model` for CPU inference whose LSTMs and linear layers have quantized weights.

    Args:
        model: an nn.Module on the CPU: an LSTMLanguageModel (Embedding -> fastlstm.LSTM ->
            Linear), a bare fastlstm.LSTM / nn.LSTM or nn.Linear, or any module holding them.
            Every nn.LSTM (fastlstm.LSTM included) becomes a QuantizedLSTM and every nn.Linear a
            QuantizedLinear; everything else (embeddings, norms) stays float32.
        dtype: torch.qint8 (torch.int8 is taken too): int8 weights, symmetric, one float32 scale
            per output row, with activations quantized per row on the fly (dynamic quantization,
            as torch.ao's quantize_dynamic does); or torch.bfloat16: bf16 weights, activations
            rounded to bf16, float32 accumulation. Anything else is a ValueError.

    Returns a new module in eval mode; `model` is left unchanged (its parameters are copied, not
    shared). The result is for inference only: calling it in training mode, or with an input that
    requires grad under grad mode, raises a RuntimeError. Its remaining float parameters (the
    embedding) have requires_grad=False. fastlstm.lm.generate runs a quantized language model's
    decode loop in one C++ op (torch.ops.fastlstm.quant_decode_cpu), as it does for float32.

    Kernels (csrc/quant/quant_kernels*.cpp): AVX-512 VNNI for int8 and AVX512-BF16 for bf16, else AVX2,
    else portable C++, picked at run time; every path computes the same int8 dot products exactly.

    Error bound. Relative error ||y_q - y|| / ||y|| against the float32 model, random weights
    as nn.LSTM / nn.Linear initialize them (U(-1/sqrt(H), 1/sqrt(H)), H = 256), 2 layers, T = 64,
    inputs N(0, 1): on the LSTM outputs (and c_n) about 0.85% for int8 and 0.25% for bf16; on the
    logits of an LSTMLanguageModel (V=1000, E=64, H=256, L=2) 0.45% and 0.13%. Stated bound, and
    what the tests hold them to: int8 < 2%, bf16 < 0.5% (torch.ao's dynamic int8 LSTM makes about
    2% on the same model). `python -m pytest tests/quant/test_quantize.py -k bound -s` prints them.
    Against a float64 computation from the dequantized weights with the same activation
    quantization, every kernel set agrees to float32 rounding (2e-5 absolute on outputs of
    magnitude <= 1): the quantization is the only approximation.
    """
    fmt = _weight_format(dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlstm.quantize: model must be an nn.Module; got "
                        f"{type(model).__name__}")
    _ops()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type != "cpu":
            raise ValueError(f"fastlstm.quantize: the quantized kernels run on the CPU; {name} is "
                             f"on {tensor.device} (move the model with .cpu() first)")
    for name, module in model.named_modules():
        if isinstance(module, nn.LSTM):
            for pname, parameter in module.named_parameters():
                if not parameter.dtype.is_floating_point:
                    raise ValueError(f"fastlstm.quantize: {name}.{pname} is {parameter.dtype}; "
                                     f"expected a floating-point LSTM")
    converted = _convert(copy.deepcopy(model), fmt)
    converted.eval()
    for parameter in converted.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.float()  # the quantized modules take float32 in
        parameter.requires_grad_(False)
    return converted


# ------------------------------------------------------------------------------------------------
# Generation: the weights of a quantized language model's decode step
# ------------------------------------------------------------------------------------------------

class QuantizedStepWeights:
    """What fastlstm.lm.generate's decoder reads of a quantized LSTMLanguageModel: the packed
    weights, the C++ decode op over them (decode) and the step in torch ops (step)."""

    quantized = True
    dtype = torch.float32  # of the state (h, c) and the logits

    def __init__(self, model):
        lstm, head = model.lstm, model.head
        if lstm.quantized_dtype != head.quantized_dtype:
            raise ValueError(f"generate: model.lstm is quantized to {lstm.quantized_dtype} but "
                             f"model.head to {head.quantized_dtype}; quantize the whole model "
                             f"with one dtype")
        self.model = model
        self.embedding = model.embedding.weight.detach().float().contiguous()
        self.num_layers = lstm.num_layers
        self.layers = lstm._packed  # per layer: w_ih, scale, sums, w_hh, scale, sums, bias
        self.head = head._packed
        self.head_weight = head.weight  # its device is the decoder's
        self.head_bias = head.bias

    @staticmethod
    def cpu_op_available() -> bool:
        try:
            _ops()
        except RuntimeError:
            return False
        return True

    def decode(self, token, h, c, temperature, top_k, top_p, min_p, generator, num_steps):
        """num_steps decode steps in C++: token [B] -> tokens [B, num_steps]; h, c updated."""
        columns = list(zip(*self.layers))
        head_weight, head_scale, head_sums = self.head
        return _ops().quant_decode_cpu(
            token, h, c, self.embedding, list(columns[0]), list(columns[1]), list(columns[2]),
            list(columns[3]), list(columns[4]), list(columns[5]), list(columns[6]), head_weight,
            head_scale, head_sums, self.head_bias, float(temperature), int(top_k), float(top_p),
            float(min_p), generator, int(num_steps))

    def step(self, token, h, c):
        """One decode step with the quantized modules: token [B] -> logits [B, V]; h, c
        [L, B, H] updated in place."""
        x = torch.nn.functional.embedding(token, self.embedding)
        ops = _ops()
        for layer in range(self.num_layers):
            out, h_new, c_new = ops.quant_lstm_layer_cpu(
                x.unsqueeze(0).contiguous(), h[layer].contiguous(), c[layer].contiguous(),
                *self.layers[layer], False)
            h[layer].copy_(h_new)
            c[layer].copy_(c_new)
            x = out[0]
        return self.model.head(x)


def quantized_step_weights(model):
    """QuantizedStepWeights for a language model quantized by fastlstm.quantize, else None."""
    if isinstance(getattr(model, "lstm", None), QuantizedLSTM):
        if not isinstance(getattr(model, "head", None), QuantizedLinear):
            raise ValueError("generate: model.lstm is quantized but model.head is not; use "
                             "fastlstm.quantize on the whole model")
        return QuantizedStepWeights(model)
    return None
