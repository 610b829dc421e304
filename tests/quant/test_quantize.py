"""fastlstm.quantize: int8 / bf16 CPU inference.

Each kernel path (AVX-512 VNNI / AVX512-BF16, AVX2, portable C++; FASTLSTM_QUANT_KERNELS forces a
lower one in a fresh process, see test_lower_kernels) is checked against a float64 computation
from the dequantized weights with the same activation quantization (tight: the quantization is
the only approximation), and the quantized models against float32 within the bounds
fastlstm.quantize states.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import quant
from fastlstm.lm import LSTMLanguageModel, generate
from fastlstm.lm.generate import Decoder

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.fastlstm, "quant_lstm_layer_cpu"),
    reason="fastlstm._C with the quantized ops is not built")

DTYPES = [torch.qint8, torch.bfloat16]
KERNEL_SETS = {"avx512": ("avx512-vnni", "avx512-bf16"), "avx2": ("avx2", "avx2"),
               "portable": ("portable", "portable")}


# --- float64 references ----------------------------------------------------------------------

def ref_activations(x: torch.Tensor, dtype) -> torch.Tensor:
    """What the kernels multiply for float32 rows x [..., K], as float64: int8 rows quantized as
    csrc/quant/quant_kernels.h specifies (float32 arithmetic) and dequantized, or x rounded to bf16."""
    x = x.float()
    if dtype == torch.bfloat16:
        return x.to(torch.bfloat16).double()
    amax = x.abs().amax(-1, keepdim=True)
    scale = amax / 127
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(x * inverse).clamp(-127, 127)
    return q.double() * scale.double()


def ref_weight(module_weight: torch.Tensor, scale) -> torch.Tensor:
    """A quantized module's weight, dequantized to float64."""
    if module_weight.dtype == torch.int8:
        return module_weight.double() * scale.double()[:, None]
    return module_weight.double()


def ref_lstm_layer(x, h0, c0, w_ih, w_hh, bias, out, dtype, reverse=False):
    """Float64 reference of one quantized layer, teacher-forced: step t multiplies the kernel's
    own h_{t-1} (out[t-1], quantized as the kernel quantizes it), so that a value landing on the
    other side of a rounding boundary in float32 does not make the comparison diverge; c is
    carried in float64. x [T, B, I] float32, out [T, B, H] the kernel's output. Returns
    (h [T, B, H], c_n) in float64."""
    steps = x.shape[0]
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    c = c0.double()
    h_prev32 = h0
    hs = torch.empty(out.shape, dtype=torch.float64)
    for t in order:
        gates = (ref_activations(x[t], dtype) @ w_ih.T + ref_activations(h_prev32, dtype) @ w_hh.T
                 + bias)
        i, f, g, o = gates.chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        hs[t] = o.sigmoid() * c.tanh()
        h_prev32 = out[t]
    return hs, c


def _lstm_weights(qlstm, suffix):
    w_ih = ref_weight(getattr(qlstm, "weight_ih" + suffix),
                      getattr(qlstm, f"weight_ih{suffix}_scale", None))
    w_hh = ref_weight(getattr(qlstm, "weight_hh" + suffix),
                      getattr(qlstm, f"weight_hh{suffix}_scale", None))
    bias = torch.zeros(w_ih.shape[0], dtype=torch.float64)
    if qlstm.bias:
        bias = (getattr(qlstm, "bias_ih" + suffix).double()
                + getattr(qlstm, "bias_hh" + suffix).double())
    return w_ih, w_hh, bias


def _relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


# --- tight: each kernel path against float64 -----------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 37, 50), (5, 64, 16),
                                                            (70, 130, 97), (9, 3, 1)])
def test_linear_matches_float64_reference(dtype, rows, in_features, out_features):
    torch.manual_seed(rows + in_features)
    linear = nn.Linear(in_features, out_features)
    q = fastlstm.quantize(linear, dtype)
    x = torch.randn(rows, in_features) * 3
    x[0, :2] = 0.0  # zeros and a row of zeros
    if rows > 2:
        x[1] = 0.0
    with torch.no_grad():
        got = q(x)
    expected = ref_activations(x, dtype) @ ref_weight(q.weight, q.scale).T + q.bias.double()
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-5)
    with torch.no_grad():
        assert q(x.reshape(1, rows, in_features)).shape == (1, rows, out_features)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
# (8, 40, 24, 256): the layer projects its inputs in chunks of 8 to 16 steps (csrc/quant/quant_cpu.cpp)
@pytest.mark.parametrize("batch, steps, input_size, hidden", [(3, 7, 20, 37), (1, 5, 64, 16),
                                                              (6, 4, 9, 70), (8, 40, 24, 256)])
def test_lstm_layer_matches_float64_reference(dtype, bidirectional, batch, steps, input_size,
                                               hidden):
    torch.manual_seed(batch * 100 + hidden)
    lstm = nn.LSTM(input_size, hidden, bidirectional=bidirectional)
    q = fastlstm.quantize(lstm, dtype)
    x = torch.randn(steps, batch, input_size)
    h0 = torch.randn(2 if bidirectional else 1, batch, hidden) * 0.5
    c0 = torch.randn_like(h0)
    with torch.no_grad():
        out, (h_n, c_n) = q(x, (h0, c0))
    for direction, suffix in enumerate(["_l0", "_l0_reverse"][:2 if bidirectional else 1]):
        got = out[..., direction * hidden:(direction + 1) * hidden]
        w_ih, w_hh, bias = _lstm_weights(q, suffix)
        hs, c = ref_lstm_layer(x, h0[direction], c0[direction], w_ih, w_hh, bias, got, dtype,
                               reverse=bool(direction))
        torch.testing.assert_close(got.double(), hs, rtol=0, atol=2e-5)
        torch.testing.assert_close(c_n[direction].double(), c, rtol=0, atol=2e-5)
        last = 0 if direction else steps - 1
        assert torch.equal(h_n[direction], got[last])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_stack_is_its_layers(dtype):
    """Two layers, batch_first, unbatched input and default state: the stack runs the layers
    of the tight test above, one after the other."""
    torch.manual_seed(0)
    lstm = fastlstm.LSTM(12, 40, num_layers=2, batch_first=True)
    q = fastlstm.quantize(lstm, dtype)
    firsts = []
    for layer in range(2):
        single = nn.LSTM(12 if layer == 0 else 40, 40, batch_first=True)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(single, name + "_l0").copy_(getattr(lstm, f"{name}_l{layer}"))
        firsts.append(fastlstm.quantize(single, dtype))
    x = torch.randn(3, 6, 12)
    with torch.no_grad():
        out, (h, c) = q(x)
        mid, (h0, c0) = firsts[0](x)
        end, (h1, c1) = firsts[1](mid)
        assert torch.equal(out, end)
        assert torch.equal(h, torch.cat([h0, h1])) and torch.equal(c, torch.cat([c0, c1]))
        unbatched, (hu, cu) = q(x[1])
        torch.testing.assert_close(unbatched, out[1], rtol=0, atol=1e-6)
        assert hu.shape == (2, 40)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_kernel_set_is_the_one_asked_for():
    """kernel_names() says which kernels run: the widest the CPU has, or the lower set
    FASTLSTM_QUANT_KERNELS asks for."""
    names = quant.kernel_names()
    wanted = os.environ.get("FASTLSTM_QUANT_KERNELS", "avx512")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU's instruction sets from")
    avx2 = {"avx2", "fma"} <= flags
    vnni = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    if wanted == "portable" or not avx2:
        assert names == KERNEL_SETS["portable"]
    elif wanted == "avx2" or not vnni:
        assert names == KERNEL_SETS["avx2"]
    else:
        assert names == ("avx512-vnni", "avx512-bf16" if "avx512_bf16" in flags else "avx2")


@pytest.mark.skipif(os.environ.get("FASTLSTM_QUANT_KERNELS") is not None,
                    reason="already running on chosen kernels")
@pytest.mark.parametrize("kernels", ["avx2", "portable"])
def test_lower_kernels(kernels):
    """The tight tests, generation included, again on a lower kernel set in a fresh process (on
    a CPU without the chosen instructions this repeats the best available ones)."""
    env = dict(os.environ, FASTLSTM_QUANT_KERNELS=kernels)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "float64_reference or stack or kernel_set or decoder_matches or min_p or bound"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2]


# --- the stated bounds against float32 -------------------------------------------------------

BOUNDS = {torch.qint8: 0.02, torch.bfloat16: 0.005}


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound_against_float32(dtype):
    """The bounds fastlstm.quantize's docstring states: relative error of the outputs of a
    2-layer LSTM (H=256, T=64, inputs N(0, 1)) and of an LSTMLanguageModel's logits
    (V=1000, E=64, H=256, L=2), weights as nn.LSTM / nn.Linear initialize them. `-s` prints the
    measured errors (and, for int8, torch.ao's dynamic int8 LSTM's on the same model)."""
    for seed in range(2):
        torch.manual_seed(seed)
        lstm = fastlstm.LSTM(256, 256, 2, batch_first=True).eval()
        model = LSTMLanguageModel(1000, 64, 256, 2).eval()
        x = torch.randn(4, 64, 256)
        ids = torch.randint(1000, (4, 64))
        with torch.no_grad():
            expected, (h, c) = lstm(x)
            got, (hq, cq) = fastlstm.quantize(lstm, dtype)(x)
            logits, _ = model(ids)
            logits_q, _ = fastlstm.quantize(model, dtype)(ids)
        errors = {"outputs": _relative_error(got, expected), "c_n": _relative_error(cq, c),
                  "logits": _relative_error(logits_q, logits)}
        for name, value in errors.items():
            assert value < BOUNDS[dtype], (name, value)
        # and not vacuously: the quantization does change the result
        assert errors["outputs"] > 1e-4
        if dtype == torch.qint8:  # torch.ao's dynamic int8 LSTM on the same model, for scale
            holder = nn.Module()
            holder.lstm = nn.LSTM(256, 256, 2, batch_first=True)
            holder.lstm.load_state_dict(lstm.state_dict())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao = torch.ao.quantization.quantize_dynamic(holder, {nn.LSTM}, dtype=torch.qint8)
            with torch.no_grad():
                errors["torch.ao outputs"] = _relative_error(ao.lstm(x)[0], expected)
            assert errors["outputs"] < errors["torch.ao outputs"]
        print(f"{dtype} seed {seed}: relative error " +
              ", ".join(f"{name} {value:.2%}" for name, value in errors.items()))


# --- generation -------------------------------------------------------------------------------

def _lm(vocab=97, embed=20, hidden=100, layers=2, seed=0):
    torch.manual_seed(seed)
    model = LSTMLanguageModel(vocab, embed, hidden, layers)
    # larger weights than the default init, so the greedy path is not a constant token
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model.eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_decoder_matches_python_steps(dtype, threads):
    """The C++ decode op gives the tokens (greedy and sampled) and the state of the Python
    decoder stepping the quantized modules, on 1 and 2 threads (tails: vocab 97, embed 20,
    hidden 100)."""
    q = fastlstm.quantize(_lm(), dtype)
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(4))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for temperature, top_k, top_p in ((0.0, 0, 1.0), (0.9, 30, 1.0), (1.2, 0, 0.8)):
            decoders = [Decoder(q, prompt, temperature, top_k, top_p,
                                generator=torch.Generator().manual_seed(2), mode=mode)
                        for mode in ("python", "cpu_op")]
            outs = [decoder.next(25) for decoder in decoders]
            assert torch.equal(outs[0], outs[1]), (temperature, outs)
            torch.testing.assert_close(decoders[0].h, decoders[1].h, rtol=0, atol=1e-6)
            torch.testing.assert_close(decoders[0].c, decoders[1].c, rtol=0, atol=1e-6)
            assert len(set(outs[0].flatten().tolist())) > 5, "degenerate sequence"
    finally:
        torch.set_num_threads(previous)
    assert Decoder(q, prompt).mode == "cpu_op"


@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_quantized_lm_is_reproducible(dtype):
    model = _lm(vocab=65, embed=16, hidden=64)
    q = fastlstm.quantize(model, dtype)
    prompt = torch.randint(0, 65, (2, 5))
    runs = [generate(q, prompt, 40, temperature=0.8, top_k=20,
                     generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert runs[0].shape == (2, 40) and runs[0].dtype == torch.int64
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < 65
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # greedy decoding of the quantized model mostly agrees with the float32 model's
    greedy_q = generate(q, prompt, 20, temperature=0.0)
    greedy = generate(model, prompt, 20, temperature=0.0)
    assert (greedy_q == greedy).float().mean() > 0.5


def _decode_args(q, batch, temperature, min_p, steps=1, seed=0):
    weights = quant.quantized_step_weights(q)
    columns = [list(column) for column in zip(*weights.layers)]
    h = torch.randn(q.num_layers, 1, q.hidden_size, generator=torch.Generator().manual_seed(3))
    h = (h * 0.5).expand(-1, batch, -1).contiguous()
    c = h.clone()
    token = torch.full((batch,), 5, dtype=torch.long)
    head_weight, head_scale, head_sums = weights.head
    return [token, h, c, weights.embedding, *columns, head_weight, head_scale, head_sums,
            weights.head_bias, temperature, 0, 1.0, min_p, torch.Generator().manual_seed(seed),
            steps]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_min_p(dtype):
    """min_p keeps exactly the tokens with p >= min_p * max p: thousands of draws of one step
    from one state never leave that set and reach most of it; min_p = 1 is greedy."""
    q = fastlstm.quantize(_lm(vocab=50, embed=8, hidden=32), dtype)
    temperature, batch = 1.5, 4000
    # the logits of the step, from the Python step over the same modules
    args = _decode_args(q, 1, temperature, 0.0)
    with torch.no_grad():
        logits = quant.quantized_step_weights(q).step(args[0], args[1], args[2])[0]
    # min_p just below the 6th most likely token's p / max p: six tokens pass
    scaled = logits.double() / temperature
    sixth = scaled.sort(descending=True).values[5]
    min_p = float(torch.exp(sixth - scaled.max())) * 0.999
    keep = scaled >= scaled.max() + torch.log(torch.tensor(min_p, dtype=torch.float64))
    assert int(keep.sum()) == 6
    args = _decode_args(q, batch, temperature, min_p)
    drawn = torch.ops.fastlstm.quant_decode_cpu(*args)[:, 0]
    seen = torch.zeros(50, dtype=torch.bool)
    seen[drawn] = True
    assert not (seen & ~keep).any(), "drew a token below min_p * max p"
    assert (seen & keep).sum() == keep.sum()
    greedy_args = _decode_args(q, 4, temperature, 1.0)
    assert torch.equal(torch.ops.fastlstm.quant_decode_cpu(*greedy_args)[:, 0],
                       torch.full((4,), int(logits.argmax())))
    off = _decode_args(q, batch, temperature, 0.0)
    seen_off = torch.zeros(50, dtype=torch.bool)
    seen_off[torch.ops.fastlstm.quant_decode_cpu(*off)[:, 0]] = True
    assert (seen_off & ~keep).any(), "min_p = 0 must not filter"


# --- modes, state and errors ------------------------------------------------------------------

def test_quantize_copies_and_converts_a_language_model():
    model = _lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = fastlstm.quantize(model, torch.qint8)
    assert q is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(q.lstm, quant.QuantizedLSTM) and isinstance(q.head, quant.QuantizedLinear)
    assert q.lstm.weight_hh_l1.dtype == torch.int8 and q.lstm.weight_hh_l1_scale.shape == (400,)
    assert q.head.weight.dtype == torch.int8
    assert not q.training and not any(p.requires_grad for p in q.parameters())
    assert "dtype=torch.int8" in repr(q.lstm)
    qb = fastlstm.quantize(model, torch.bfloat16)
    assert qb.lstm.weight_ih_l0.dtype == torch.bfloat16 and qb.head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip(dtype):
    q = fastlstm.quantize(_lm(seed=0), dtype)
    other = fastlstm.quantize(_lm(seed=1), dtype)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert not torch.equal(q(ids)[0], other(ids)[0])
        other.load_state_dict(q.state_dict())
        assert torch.equal(q(ids)[0], other(ids)[0])


def test_quantize_errors():
    model = _lm()
    for dtype in (torch.float16, torch.quint8, "int8", None):
        with pytest.raises(ValueError, match="dtype"):
            fastlstm.quantize(model, dtype)
    with pytest.raises(TypeError, match="nn.Module"):
        fastlstm.quantize(torch.zeros(3), torch.qint8)
    with pytest.raises(ValueError, match="proj_size"):
        fastlstm.quantize(nn.LSTM(4, 8, proj_size=3), torch.qint8)
    q = fastlstm.quantize(model, torch.qint8)
    ids = torch.randint(0, 97, (2, 6))
    q.train()
    with pytest.raises(RuntimeError, match="inference only.*eval"):
        q(ids)
    q.eval()
    q.embedding.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        q(ids)
    with torch.no_grad():
        q(ids)  # no grad mode: fine
    q.embedding.weight.requires_grad_(False)
    lstm = q.lstm
    with pytest.raises(ValueError, match="2D or 3D"):
        lstm(torch.randn(2, 3, 4, 20))
    with pytest.raises(RuntimeError, match="input_size"):
        lstm(torch.randn(2, 3, 21))
    with pytest.raises(RuntimeError, match="float32"):
        lstm(torch.randn(2, 3, 20, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"hidden\[0\] size"):
        lstm(torch.randn(2, 3, 20), (torch.zeros(2, 3, 100), torch.zeros(2, 2, 100)))
    with pytest.raises(RuntimeError, match=r"hidden\[1\] size"):
        lstm(torch.randn(2, 3, 20), (torch.zeros(2, 2, 100), torch.zeros(2, 3, 100)))
    with pytest.raises(TypeError, match="PackedSequence"):
        lstm(nn.utils.rnn.pack_sequence([torch.randn(3, 20)]))
    with pytest.raises(RuntimeError, match=r"\[\.\.\., 100\]"):
        q.head(torch.randn(2, 99))


def test_op_errors_and_opcheck():
    q = fastlstm.quantize(_lm(), torch.qint8)
    ops = torch.ops.fastlstm
    args = _decode_args(q, 2, 0.0, 0.0, steps=3)
    torch.library.opcheck(ops.quant_decode_cpu.default, tuple(args))
    tokens = ops.quant_decode_cpu(*args)
    assert tokens.shape == (2, 3)
    bad = list(args)
    bad[-3] = 1.5
    with pytest.raises(ValueError, match="min_p"):
        ops.quant_decode_cpu(*bad)
    bad = list(args)
    bad[0] = torch.tensor([0, 97])
    with pytest.raises(RuntimeError, match="outside the embedding"):
        ops.quant_decode_cpu(*bad)
    packed = q.lstm._packed[0]
    x = torch.randn(4, 2, 20)
    h0 = torch.zeros(2, 100)
    torch.library.opcheck(ops.quant_lstm_layer_cpu.default, (x, h0, h0, *packed, False))
    with pytest.raises(RuntimeError, match="w_ih was packed for 20"):
        ops.quant_lstm_layer_cpu(torch.randn(4, 2, 21), h0, h0, *packed, False)
    with pytest.raises(RuntimeError, match="h0 must be"):
        ops.quant_lstm_layer_cpu(x, torch.zeros(3, 100), h0, *packed, False)
    weight, scale, sums = q.head._packed
    torch.library.opcheck(ops.quant_linear_cpu.default, (torch.randn(3, 100), weight, scale, sums,
                                                         q.head.bias, 97))
    with pytest.raises(RuntimeError, match="scale must be"):
        ops.quant_linear_cpu(torch.randn(3, 100), weight, scale[:-1], sums, q.head.bias, 97)
    with pytest.raises(RuntimeError, match="int8 or bfloat16"):
        ops.quant_linear_cpu(torch.randn(3, 100), weight.float(), scale, sums, q.head.bias, 97)


# --- the bench suite --------------------------------------------------------------------------

def test_bench_quant_suite_runs(tmp_path, capsys):
    """`fastlstm bench --suites quant` (opt-in): records for int8 and bf16, decode and forward,
    each timed against its baselines."""
    from fastlstm import bench
    from fastlstm.bench import records, shapes
    assert "quant" not in shapes.SUITES  # not in the default run
    out = tmp_path / "quant.jsonl"
    code = bench.main(["--quick", "--suites", "quant", "--repeats", "2", "--out", str(out),
                       "--quiet", "--shapes",
                       "quant=int8:decode:65x16x32x1,bf16:forward:2x4x8x16x1"])
    text = capsys.readouterr().out
    assert code == 0, text
    made = records.load([str(out)])
    assert {(r["shape_label"], r["baseline"]) for r in made} == {
        ("int8 decode V=65 E=16 H=32 L=1", "fastlstm float32"),
        ("int8 decode V=65 E=16 H=32 L=1", "eager loop, torch.ao int8"),
        ("bf16 forward B=2 T=4 I=8 H=16 L=1", "torch.ao int8 LSTM"),
        ("bf16 forward B=2 T=4 I=8 H=16 L=1", "nn.LSTM float32")}
    for record in made:
        assert record["status"] == "ok" and record["suite"] == "quant"
        assert record["ratio_median"] > 0 and len(record["ratios"]) == 2
        assert record["unit"] == ("s/token" if "decode" in record["shape_label"] else "s")
    with pytest.raises(ValueError, match="WEIGHTS:KIND:SIZES"):
        shapes.parse_shapes_option(["quant=int4:decode:65x16x32x1"])
    assert bench.main(["--suites", "quant", "--device", "cpu", "--backends", "torch", "--quick",
                       "--out", "none", "--quiet"]) == 0
    assert "skipped" in capsys.readouterr().out
