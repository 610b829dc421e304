"""Text generation: prefill the prompt once, then one decode step per new token.

A decode step carries (h, c) of every layer: embedding gather, each layer's cell step, the head,
and the draw (fastlstm.sample). The prompt is never fed again. Three ways to run the steps, same
semantics:
  cpu op      CPU float32 models with fastlstm._C built: torch.ops.fastlstm.decode_cpu runs the
              whole step (and a run of steps) in C++, so there is no per-token Python overhead
  cuda graph  CUDA: one step captured in a CUDA graph and replayed; tokens stay on the device and
              there is no host synchronization per token
  python      anything else (and when the extension is absent): the step written with torch ops
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from .. import _backends


# ------------------------------------------------------------------------------------------------
# The draw
# ------------------------------------------------------------------------------------------------

def draw(logits, temperature, top_k, top_p, generator, min_p=0.0):
    """Token ids [B] from logits [B, V]: fastlstm.sample."""
    from ..sampling import sample  # imported here: fastlstm.sampling imports this package's parent
    return sample(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)


# ------------------------------------------------------------------------------------------------
# Arguments and weights
# ------------------------------------------------------------------------------------------------

def _check_arguments(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator,
                     min_p=0.0):
    for name in ("embedding", "lstm", "head"):
        if not hasattr(model, name):
            raise TypeError(f"generate: model must have .embedding, .lstm and .head (an "
                            f"LSTMLanguageModel); it has no .{name}")
    lstm = model.lstm
    if lstm.bidirectional or lstm.proj_size or not lstm.batch_first:
        raise ValueError("generate: model.lstm must be a unidirectional, batch_first LSTM without "
                         "proj_size (a language model reads left to right)")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
        shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids)
        raise ValueError(f"generate: prompt_ids must be a [batch, prompt_length] tensor; got {shape}")
    if prompt_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"generate: prompt_ids must hold int64 token ids; got {prompt_ids.dtype}")
    if prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: prompt_ids needs at least one row and one token (the "
                         f"first prediction is conditioned on it); got {tuple(prompt_ids.shape)}")
    vocab = model.embedding.num_embeddings
    if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= vocab):
        raise ValueError(f"generate: prompt_ids must be in [0, {vocab}); got values in "
                         f"[{int(prompt_ids.min())}, {int(prompt_ids.max())}]")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p, min_p)
    device = model.head.weight.device
    if prompt_ids.device != device:
        raise ValueError(f"generate: prompt_ids is on {prompt_ids.device} but the model is on "
                         f"{device}; move one of them")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generate: generator must be a torch.Generator or None; got "
                            f"{type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generate: the generator is on {generator.device} but the model is "
                             f"on {device}; use torch.Generator(device={str(device)!r})")


def _check_sampling(temperature, top_k, top_p, min_p):
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not (temperature >= 0 and math.isfinite(temperature))):
        raise ValueError(f"generate: temperature must be a finite float >= 0 (0 = greedy); got "
                         f"{temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0 = off); got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1] (1 = off); got {top_p!r}")
    if (not isinstance(min_p, (int, float)) or isinstance(min_p, bool)
            or not 0.0 <= min_p <= 1.0):  # NaN fails the range too
        raise ValueError(f"generate: min_p must be a float in [0, 1] (0 = off); got {min_p!r}")


class _StepWeights:
    """The tensors one decode step reads, gathered once per generate call."""

    def __init__(self, model):
        lstm = model.lstm
        self.embedding = model.embedding.weight.detach().contiguous()
        self.w_ih, self.w_hh, self.bias = [], [], []
        for layer in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{layer}").detach()
            self.w_ih.append(w_ih.contiguous())
            self.w_hh.append(getattr(lstm, f"weight_hh_l{layer}").detach().contiguous())
            if lstm.bias:
                bias = (getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}"))
                self.bias.append(bias.detach().contiguous())
            else:
                self.bias.append(torch.zeros(w_ih.shape[0], dtype=w_ih.dtype, device=w_ih.device))
        self.head_weight = model.head.weight.detach().contiguous()
        self.head_bias = None if model.head.bias is None else model.head.bias.detach().contiguous()
        self.dtype = self.head_weight.dtype
        self.num_layers = lstm.num_layers

    def step(self, token, h, c):
        """One decode step in torch ops: token [B] -> logits [B, V]; h, c [L, B, H] updated."""
        x = F.embedding(token, self.embedding)
        for layer in range(self.num_layers):
            gates = torch.addmm(self.bias[layer], x, self.w_ih[layer].t())
            gates.addmm_(h[layer], self.w_hh[layer].t())
            in_gate, forget_gate, cell_gate, out_gate = gates.float().chunk(4, 1)
            c_new = forget_gate.sigmoid() * c[layer].float() + in_gate.sigmoid() * cell_gate.tanh()
            h_new = out_gate.sigmoid() * c_new.tanh()
            c[layer].copy_(c_new)
            h[layer].copy_(h_new)
            x = h[layer]
        return F.linear(x, self.head_weight, self.head_bias)


def _step_weights(model):
    """_StepWeights, or for a model quantized by fastlstm.quantize its packed weights and their
    C++ decode op (torch.ops.fastlstm.quant_decode_cpu)."""
    from ..quant import quantized_step_weights
    return quantized_step_weights(model) or _StepWeights(model)


# ------------------------------------------------------------------------------------------------
# Decoder
# ------------------------------------------------------------------------------------------------

_fake_registered = False


def _cpu_op():
    """torch.ops.fastlstm.decode_cpu when fastlstm._C is built with it, else None."""
    global _fake_registered
    if _backends.extension() is None or not hasattr(torch.ops.fastlstm, "decode_cpu"):
        return None
    op = torch.ops.fastlstm.decode_cpu
    if not _fake_registered:
        # Shapes for tracing (torch.compile, opcheck): h and c are mutated in place, the result
        # is the drawn tokens [B, num_steps].
        @torch.library.register_fake("fastlstm::decode_cpu")
        def _(token, h, c, embedding, w_ih, w_hh, bias, head_weight, head_bias, temperature,
              top_k, top_p, generator, num_steps, min_p=0.0):
            return token.new_empty(token.shape[0], num_steps)
        _fake_registered = True
    return op


class Decoder:
    """Incremental generation: prefill once, then `next(n)` returns the next n tokens [B, n].

    generate() is Decoder(...).next(max_new_tokens); the command line uses next() in chunks to
    print text as it comes. The sampling settings (temperature, top_k, top_p, min_p) may be
    changed between next() calls; each call draws with the values it finds (the CUDA graph is
    captured again when they changed since its capture).
    """

    def __init__(self, model, prompt_ids, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                 *, min_p=0.0, mode="auto"):
        _check_arguments(model, prompt_ids, 0, temperature, top_k, top_p, generator, min_p)
        if mode not in ("auto", "python", "cpu_op", "cuda_graph"):
            raise ValueError(f"mode must be auto, python, cpu_op or cuda_graph; got {mode!r}")
        self.model = model
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.min_p = float(min_p)
        self.generator = generator
        self.weights = _step_weights(model)
        self.device = self.weights.head_weight.device
        self.batch = prompt_ids.shape[0]
        self.mode = self._choose_mode(mode)
        self.token = None  # the last token fed or drawn, [B] int64
        self.pending_logits = None  # logits of the next token, when the prefill computed them
        with self._inference():
            if self.mode == "cpu_op":
                # Prefill: all but the last prompt token through the sequence kernel. The last
                # one is the decode op's first input, so its step, the head and the first draw
                # run in the same C++ call as the tokens after it (a one-token prompt needs no
                # Python step at all: 0.9 ms of module calls per generate() at H=256).
                self.token = prompt_ids[:, -1].long().contiguous()
                if prompt_ids.shape[1] > 1:
                    _out, (h, c) = model.lstm(model.embedding(prompt_ids[:, :-1].long()))
                else:
                    lstm = model.lstm
                    h = torch.zeros(lstm.num_layers, self.batch, lstm.hidden_size,
                                    dtype=self.weights.dtype, device=self.device)
                    c = torch.zeros_like(h)
            else:
                # Prefill: the whole prompt through the sequence kernel, the head on its last
                # step only.
                out, (h, c) = model.lstm(model.embedding(prompt_ids.long()))
                self.pending_logits = model.head(out[:, -1])
        self.h = h.contiguous()
        # c is carried in float32 between steps whatever the model's dtype, as the kernels keep
        # it within a sequence (the CPU op's models are float32 already).
        self.c = c.float().contiguous()
        self._graph = None
        self._graph_settings = None  # the sampling settings the graph was captured with

    def _choose_mode(self, mode):
        quantized = getattr(self.weights, "quantized", False)
        has_op = self.weights.cpu_op_available() if quantized else _cpu_op() is not None
        if mode != "auto":
            if mode == "cpu_op" and (not has_op or self.device.type != "cpu"):
                raise RuntimeError("mode='cpu_op' needs a CPU model and fastlstm._C built with "
                                   "decode_cpu")
            if mode == "cuda_graph" and self.device.type != "cuda":
                raise RuntimeError("mode='cuda_graph' needs a CUDA model")
            return mode
        if self.device.type == "cpu" and self.weights.dtype == torch.float32 and has_op:
            return "cpu_op"
        if self.device.type == "cuda":
            return "cuda_graph"
        return "python"

    @contextlib.contextmanager
    def _inference(self):
        # No dropout while generating; each module's mode is put back as it was.
        modes = [(module, module.training) for module in self.model.modules()]
        if any(training for _, training in modes):
            self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def _settings(self):
        """The sampling settings, checked: they are plain attributes a caller may change."""
        _check_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        return (float(self.temperature), int(self.top_k), float(self.top_p), float(self.min_p))

    def _draw(self, logits):
        return draw(logits, self.temperature, self.top_k, self.top_p, self.generator, self.min_p)

    def next(self, count: int) -> torch.Tensor:
        """The next `count` tokens, int64 [B, count] on the model's device."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"count must be an int >= 0; got {count!r}")
        out = torch.empty(self.batch, count, dtype=torch.int64, device=self.device)
        if count == 0:
            return out
        settings = self._settings()
        # On CUDA the model's device is made current: Triton kernels and torch.cuda.graph's
        # capture stream use the current device, whatever device the tensors are on.
        device = (torch.cuda.device(self.device) if self.device.type == "cuda"
                  else contextlib.nullcontext())
        with self._inference(), device:
            done = 0
            if self.pending_logits is not None:
                self.token = self._draw(self.pending_logits)
                self.pending_logits = None
                out[:, 0] = self.token
                done = 1
            if done < count:
                if self.mode == "cpu_op":
                    self._run_cpu_op(out, done)
                elif self.mode == "cuda_graph":
                    self._run_cuda_graph(out, done, settings)
                else:
                    self._run_python(out, done)
        if self.device.type == "cuda":
            # one synchronization per call, none per token: a row the sampler found bad
            # (NaN logits) comes back as -1 and is reported here
            from ..sampling.sampler import check_tokens
            check_tokens(out)
        return out

    def _run_python(self, out, start):
        for index in range(start, out.shape[1]):
            logits = self.weights.step(self.token, self.h, self.c)
            self.token = self._draw(logits)
            out[:, index] = self.token

    def _run_cpu_op(self, out, start):
        w = self.weights
        if getattr(w, "quantized", False):
            tokens = w.decode(self.token, self.h, self.c, self.temperature, self.top_k,
                              self.top_p, getattr(self, "min_p", 0.0), self.generator,
                              out.shape[1] - start)
            out[:, start:] = tokens
            self.token = tokens[:, -1].contiguous()
            return
        tokens = _cpu_op()(self.token, self.h, self.c, w.embedding, w.w_ih, w.w_hh, w.bias,
                           w.head_weight, w.head_bias, self.temperature, self.top_k, self.top_p,
                           self.generator, out.shape[1] - start,
                           **({"min_p": self.min_p} if self.min_p > 0.0 else {}))
        out[:, start:] = tokens
        self.token = tokens[:, -1].contiguous()

    # -- CUDA: one decode step captured in a CUDA graph ------------------------------------------

    _GRAPH_HISTORY = 256  # tokens the graph records on the device before they are copied out

    def _graph_step(self):
        """The captured step: reads and writes only the static buffers below."""
        logits = self.weights.step(self._feed_token, self.h, self.c)
        token = self._draw(logits)
        # A bad row (NaN logits) draws -1 on CUDA without a sync; feed a valid id so the next
        # gather stays in bounds, and report the -1 after the run (check_tokens).
        self._feed_token.copy_(token.clamp_min(0))
        self._history.index_copy_(1, self._history_index, token.unsqueeze(1))
        self._history_index.add_(1)

    def _cuda_generator(self):
        if self.generator is not None:
            return self.generator
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]

    def _build_graph(self):
        generator = self._cuda_generator()
        self._feed_token = self.token.clamp_min(0)
        self._history = torch.empty(self.batch, self._GRAPH_HISTORY, dtype=torch.int64,
                                    device=self.device)
        self._history_index = torch.zeros(1, dtype=torch.int64, device=self.device)
        saved = (self.h.clone(), self.c.clone(), self._feed_token.clone(), generator.get_state())
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            # a generator other than the default one must be known to the graph, so that every
            # replay advances its offset and draws fresh numbers
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError("this torch cannot capture draws from a user generator in a "
                                   "CUDA graph (no CUDAGraph.register_generator_state)")
            graph.register_generator_state(self.generator)
        try:
            # Warm-up on a side stream (lazy initialization, cuBLAS workspaces), as capture needs.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._graph_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            with torch.cuda.graph(graph):
                self._graph_step()
        finally:
            # The warm-up steps ran for real: put back the state and the random stream they used.
            self.h.copy_(saved[0])
            self.c.copy_(saved[1])
            self._feed_token.copy_(saved[2])
            generator.set_state(saved[3])
        self._graph = graph

    def _run_cuda_graph(self, out, start, settings):
        # The captured draw holds the sampling settings as constants: capture again when they
        # changed (a capture costs a few steps' time; a settings change is rare).
        if self._graph is not None and settings != self._graph_settings:
            self._graph = None
        if self._graph is None:
            try:
                self._graph_settings = settings
                self._build_graph()
            except RuntimeError as error:
                warnings.warn(f"generate: CUDA graph capture failed ({error}); decoding step by "
                              f"step instead", RuntimeWarning, stacklevel=3)
                self.mode = "python"
                self._graph = None
                return self._run_python(out, start)
        self._feed_token.copy_(self.token.clamp_min(0))
        index = start
        while index < out.shape[1]:
            count = min(self._GRAPH_HISTORY, out.shape[1] - index)
            self._history_index.zero_()
            for _ in range(count):
                self._graph.replay()
            out[:, index:index + count] = self._history[:, :count]
            index += count
        self.token = out[:, -1].clone()


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             generator=None, *, min_p=0.0) -> torch.Tensor:
    """Continue each prompt row with `max_new_tokens` sampled tokens.

    Args:
        model: an LSTMLanguageModel (anything with .embedding, a batch_first .lstm and .head).
        prompt_ids: int64 [B, T0] on the model's device, T0 >= 1. Run once (prefill).
        max_new_tokens: how many tokens to produce.
        temperature: float >= 0; 0 is greedy (argmax).
        top_k: keep the k most likely tokens (0: off). top_p: nucleus mass in (0, 1] (1: off).
        min_p: keep the tokens at least min_p times as likely as the most likely one, in [0, 1]
            (0: off); applied after top_k and top_p (see fastlstm.sample).
        generator: torch.Generator on the model's device (None: the default generator); the
            same generator state gives the same tokens.

    Returns int64 [B, max_new_tokens] on the model's device. The model runs in eval mode (no
    dropout) and is put back in its previous mode afterwards.
    """
    _check_arguments(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator,
                     min_p)
    decoder = Decoder(model, prompt_ids, temperature, top_k, top_p, generator, min_p=min_p)
    return decoder.next(max_new_tokens)
