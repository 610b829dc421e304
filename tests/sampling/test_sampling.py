"""fastlstm.sample: drawn frequencies against softmax(z / T) in float64 (chi-square), top-k/top-p/
min-p support, ties, masked tokens, greedy rows, generator reproducibility and every bad input,
per backend."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastlstm
from fastlstm.sampling import sampler as sampling
from fastlstm._backends import why_unavailable

DRAWS = 20000
# Every test uses a fixed generator seed, so a pass or a failure is reproducible; 1e-4 keeps the
# chance that a correct sampler fails any one of these tests below 1 in 10,000.
P_VALUE_FLOOR = 1e-4

CPU_BACKENDS = [name for name in ("torch", "cpu", "triton") if why_unavailable(name, "cpu") is None]


def chi_square_p_value(tokens, probs):
    """p-value of the drawn tokens against probs (float64); bins expected < 5 are pooled."""
    # scipy is imported here, not at collection: without it only the chi-square tests skip.
    stats = pytest.importorskip("scipy.stats", reason="chi-square tests need scipy")
    counts = torch.bincount(tokens.flatten().cpu(), minlength=probs.numel()).double()
    expected = probs.double().cpu() * tokens.numel()
    assert counts[expected == 0].sum() == 0, (
        f"tokens of probability 0 drawn: {torch.nonzero((expected == 0) & (counts > 0)).flatten()}")
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big & (expected > 0)].sum().reshape(1)])
    expected_bins = torch.cat([expected[big], expected[~big & (expected > 0)].sum().reshape(1)])
    if expected_bins[-1] == 0:
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    statistic = float(((observed_bins - expected_bins) ** 2 / expected_bins).sum())
    return float(stats.chi2.sf(statistic, max(1, observed_bins.numel() - 1)))


def reference_probs(z, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """softmax(z / T) in float64 with top-k (ties with the k-th kept), then top-p (ties with the
    last kept), then min-p (p >= min_p * max p), renormalized."""
    scaled = z.double() / temperature
    probs = torch.softmax(scaled, -1)
    if top_k:
        kth = torch.topk(scaled, top_k).values[-1]
        probs = torch.where(scaled >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_probs = torch.sort(probs, descending=True).values
        before = torch.cumsum(sorted_probs, 0) - sorted_probs
        smallest_kept = sorted_probs[before < top_p * probs.sum()].min()
        probs = torch.where(probs >= smallest_kept, probs, 0.0)  # ties with the last kept too
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def make_logits(vocab, seed, masked=3):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(vocab, generator=generator, dtype=torch.float64) * 1.5
    z[torch.randperm(vocab, generator=generator)[:masked]] = -math.inf
    return z


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vocab, temperatures", [(37, [0.5, 1.0, 2.0]), (1500, [1.0])])
def test_distribution_over_temperatures(backend, vocab, temperatures):
    """One call draws DRAWS rows at each temperature (a per-row temperature tensor); V = 1500
    spans several blocks of the CPU kernel and several programs per row in Triton."""
    z = make_logits(vocab, seed=vocab)
    logits = z.float().expand(DRAWS * len(temperatures), vocab).contiguous()
    temperature = torch.tensor(temperatures).repeat_interleave(DRAWS)
    tokens = fastlstm.sample(logits, temperature, backend=backend,
                             generator=torch.Generator().manual_seed(1))
    assert tokens.dtype == torch.int64 and tokens.shape == (DRAWS * len(temperatures),)
    for index, t in enumerate(temperatures):
        drawn = tokens[index * DRAWS:(index + 1) * DRAWS]
        p = chi_square_p_value(drawn, reference_probs(z.float().double(), t))
        assert p > P_VALUE_FLOOR, f"{backend}, V={vocab}, T={t}: chi-square p = {p:.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (12, 0.8)])
def test_distribution_top_k_top_p(backend, top_k, top_p):
    vocab = 40
    z = make_logits(vocab, seed=7)
    logits = z.float().expand(DRAWS, vocab).contiguous()
    tokens = fastlstm.sample(logits, 0.8, top_k=top_k, top_p=top_p, backend=backend,
                             generator=torch.Generator().manual_seed(2))
    probs = reference_probs(z.float().double(), 0.8, top_k, top_p)
    p = chi_square_p_value(tokens, probs)
    assert p > P_VALUE_FLOOR, f"{backend}, top_k={top_k}, top_p={top_p}: chi-square p = {p:.2e}"
    assert set(tokens.unique().tolist()) <= set(torch.nonzero(probs).flatten().tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_distribution_low_precision(backend, dtype):
    vocab = 50
    z = make_logits(vocab, seed=11).to(dtype)
    logits = z.expand(DRAWS, vocab).contiguous()
    tokens = fastlstm.sample(logits, 1.3, backend=backend,
                             generator=torch.Generator().manual_seed(3))
    p = chi_square_p_value(tokens, reference_probs(z.double(), 1.3))
    assert p > P_VALUE_FLOOR, f"{backend}, {dtype}: chi-square p = {p:.2e}"


# --- min-p -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.1), (12, 1.0, 0.1), (0, 0.8, 0.1),
                                                 (15, 0.9, 0.1)])
def test_distribution_min_p(backend, top_k, top_p, min_p):
    """min-p alone and after top-k / top-p: p >= min_p * max p of softmax(z / T). At T = 1.5
    min-p keeps 11 tokens in each case, fewer than top-k / top-p alone (37, 12, 16, 12)."""
    vocab = 40
    z = make_logits(vocab, seed=17)
    logits = z.float().expand(DRAWS, vocab).contiguous()
    tokens = fastlstm.sample(logits, 1.5, top_k=top_k, top_p=top_p, min_p=min_p,
                             backend=backend, generator=torch.Generator().manual_seed(12))
    probs = reference_probs(z.float().double(), 1.5, top_k, top_p, min_p)
    without = reference_probs(z.float().double(), 1.5, top_k, top_p)
    assert 1 < int((probs > 0).sum()) < int((without > 0).sum()), "min-p should cut here"
    p = chi_square_p_value(tokens, probs)
    assert p > P_VALUE_FLOOR, f"{backend}, {top_k}, {top_p}, {min_p}: chi-square p = {p:.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_min_p_comes_after_top_p(backend):
    """The documented order: top-p measures the mass before min-p cuts. p = (.4, .3, .2, .1),
    top_p = 0.75, min_p = 0.3: top-p keeps the first three, min-p (p >= 0.12) keeps them too;
    min-p first would keep three, renormalize to (.44, .33, .22), and top-p would then keep two."""
    z = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    logits = z.expand(DRAWS, 4).contiguous()
    tokens = fastlstm.sample(logits, 1.0, top_p=0.75, min_p=0.3, backend=backend,
                             generator=torch.Generator().manual_seed(13))
    expected = torch.tensor([4.0, 3.0, 2.0, 0.0], dtype=torch.float64) / 9
    assert torch.allclose(reference_probs(z.double(), 1.0, 0, 0.75, 0.3), expected)
    p = chi_square_p_value(tokens, expected)
    assert p > P_VALUE_FLOOR, f"{backend}: chi-square p = {p:.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_min_p_one_keeps_only_the_most_likely(backend):
    generator = torch.Generator().manual_seed(14)
    logits = torch.randn(50, 300, generator=generator)
    tokens = fastlstm.sample(logits, 1.5, min_p=1.0, backend=backend, generator=generator)
    assert torch.equal(tokens, logits.argmax(-1))
    # min-p leaves greedy rows alone: the argmax always passes it
    assert torch.equal(fastlstm.sample(logits, 0.0, min_p=0.5, backend=backend),
                       logits.argmax(-1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_min_p(backend):
    logits = torch.randn(3, 10)
    for min_p in (-0.1, 1.5, math.nan, math.inf, "0.1", None, True, torch.ones(2)):
        with pytest.raises(ValueError, match="min_p"):
            fastlstm.sample(logits, 1.0, min_p=min_p, backend=backend)
    with pytest.raises(ValueError, match="min_p"):
        fastlstm.Sampler(min_p=2.0)


# --- ties ----------------------------------------------------------------------------------------

def tied_logits(vocab, tied, seed):
    """Logits below 0 with the max, 2.0, at every index of `tied`."""
    z = -torch.rand(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    z[list(tied)] = 2.0
    return z


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties(backend):
    """Several tokens share the max: greedy takes the first; sampling spreads over them, with the
    k-th's ties kept by top-k and the last kept token's ties by top-p."""
    vocab, tied = 60, (9, 23, 24, 51)
    z = tied_logits(vocab, tied, seed=3)
    logits = z.float().expand(DRAWS, vocab).contiguous()
    for top_k, top_p in ((0, 1.0), (2, 1.0), (0, 0.05), (0, 1.0)):
        assert torch.equal(fastlstm.sample(logits[:5], 0.0, top_k=top_k, top_p=top_p,
                                           backend=backend), torch.full((5,), 9))
    for top_k, top_p, min_p in ((0, 1.0, 0.0), (2, 1.0, 0.0), (0, 0.05, 0.0), (0, 1.0, 0.9)):
        tokens = fastlstm.sample(logits, 0.7, top_k=top_k, top_p=top_p, min_p=min_p,
                                 backend=backend, generator=torch.Generator().manual_seed(15))
        probs = reference_probs(z.float().double(), 0.7, top_k, top_p, min_p)
        if top_k or top_p < 1.0 or min_p:
            assert set(torch.nonzero(probs).flatten().tolist()) == set(tied)
        p = chi_square_p_value(tokens, probs)
        assert p > P_VALUE_FLOOR, f"{backend}, {top_k}, {top_p}, {min_p}: p = {p:.2e}"


# --- Triton: rows split over several programs, under the interpreter ----------------------------

def _triton_or_skip():
    if "triton" not in CPU_BACKENDS:
        pytest.skip(why_unavailable("triton", "cpu") or "triton unavailable")
    from fastlstm.sampling.triton_kernels import triton_sample
    return triton_sample


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.0), (20, 1.0, 0.0), (0, 0.6, 0.0),
                                                 (30, 0.9, 0.0), (0, 1.0, 0.05), (25, 0.8, 0.1)])
def test_triton_split_rows_match_one_program(top_k, top_p, min_p):
    """A row split over 2 or 5 programs (per-split partial masses, merged in a fixed order)
    draws exactly the tokens of one program per row: the same thresholds, the same noise."""
    triton_sample = _triton_or_skip()
    logits = 2 * torch.randn(6, 1200, generator=torch.Generator().manual_seed(21))
    logits[2, :600] = -math.inf
    logits[4, 100:110] = logits[4].max()  # ties at the max across a split boundary
    temperature = torch.tensor([0.5, 1.0, 1.5, 0.0, 0.8, 1.0])
    drawn = [triton_sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(9),
                           min_p=min_p, splits=splits) for splits in (1, 2, 5)]
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], drawn[2]), drawn
    assert int(drawn[0][3]) == int(logits[3].argmax())
    assert int(drawn[0][2]) >= 600


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.0), (24, 0.85, 0.0),
                                                 (0, 0.9, 0.08)])
def test_triton_split_rows_distribution(top_k, top_p, min_p):
    """Chi-square of the split path (V = 130: three programs a row) against softmax(z / T)."""
    triton_sample = _triton_or_skip()
    vocab, draws = 130, 8000
    z = make_logits(vocab, seed=23)
    logits = z.float().expand(draws, vocab).contiguous()
    tokens = triton_sample(logits, 0.9, top_k, top_p, torch.Generator().manual_seed(16),
                           min_p=min_p, splits=3)
    p = chi_square_p_value(tokens, reference_probs(z.float().double(), 0.9, top_k, top_p, min_p))
    assert p > P_VALUE_FLOOR, f"{top_k}, {top_p}, {min_p}: chi-square p = {p:.2e}"


def test_triton_split_rows_ties_and_errors():
    triton_sample = _triton_or_skip()
    vocab, tied = 300, (7, 150, 299)
    z = tied_logits(vocab, tied, seed=4).float()
    logits = z.expand(3000, vocab).contiguous()
    greedy = triton_sample(logits[:4], 0.0, 2, 0.5, None, splits=4)
    assert torch.equal(greedy, torch.full((4,), 7))
    tokens = triton_sample(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(3), splits=4)
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[list(tied)] = 1.0 / 3
    p = chi_square_p_value(tokens, expected)
    assert p > P_VALUE_FLOOR, f"chi-square p = {p:.2e}"
    bad = z.expand(3, vocab).clone()
    bad[1, 200] = math.nan
    bad[2] = -math.inf
    marked = triton_sample(bad, 1.0, 5, 0.9, None, min_p=0.1, splits=4)
    assert int(marked[0]) in tied and marked[1:].tolist() == [-1, -1]


def test_chi_square_rejects_a_wrong_distribution():
    """The check has power: draws at T = 1 judged against softmax(z / 0.8) fail it."""
    z = make_logits(37, seed=37)
    logits = z.float().expand(DRAWS, 37).contiguous()
    tokens = fastlstm.sample(logits, 1.0, backend="torch",
                             generator=torch.Generator().manual_seed(4))
    assert chi_square_p_value(tokens, reference_probs(z, 0.8)) < P_VALUE_FLOOR


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_greedy_rows_equal_argmax(backend):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 300, generator=generator)
    logits[2, 10] = logits[2, 200] = logits[2].max() + 1  # a tie: the first index wins
    logits[5, :100] = -math.inf
    temperature = torch.rand(64, generator=generator) + 0.5
    temperature[::2] = 0.0
    tokens = fastlstm.sample(logits, temperature, backend=backend, generator=generator)
    greedy = logits.argmax(-1)
    assert torch.equal(tokens[::2], greedy[::2])
    assert tokens[2] == 10
    assert torch.equal(fastlstm.sample(logits, 0.0, top_k=3, top_p=0.5, backend=backend), greedy)
    for dtype in (torch.float16, torch.bfloat16):
        low = logits.to(dtype)
        assert torch.equal(fastlstm.sample(low, 0.0, backend=backend), low.argmax(-1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_tokens_never_drawn(backend):
    logits = torch.full((4000, 20), -math.inf)
    logits[:, 7] = -30.0  # tiny logits, still the only finite tokens
    logits[:, 13] = -31.0
    tokens = fastlstm.sample(logits, 5.0, backend=backend)
    assert set(tokens.unique().tolist()) <= {7, 13}
    assert set(fastlstm.sample(logits, 5.0, top_k=1, backend=backend).unique().tolist()) == {7}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_generator_reproducible_and_advanced(backend):
    logits = torch.randn(2, 3, 500)
    generator = torch.Generator().manual_seed(123)
    state = generator.get_state()
    first = fastlstm.sample(logits, 1.0, generator=generator, backend=backend)
    assert first.shape == (2, 3)
    assert not torch.equal(generator.get_state(), state), "the generator was not advanced"
    second = fastlstm.sample(logits, 1.0, generator=generator, backend=backend)
    generator.set_state(state)
    assert torch.equal(fastlstm.sample(logits, 1.0, generator=generator, backend=backend), first)
    many = torch.stack([fastlstm.sample(logits, 1.0, generator=generator, backend=backend)
                        for _ in range(3)])
    assert not torch.equal(first, second) or not torch.equal(many[1], many[2])
    torch.manual_seed(9)
    default_first = fastlstm.sample(logits, 1.0, backend=backend)
    torch.manual_seed(9)
    assert torch.equal(fastlstm.sample(logits, 1.0, backend=backend), default_first)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input(backend):
    good = torch.randn(3, 10)

    def call(logits=good, temperature=1.0, **kwargs):
        return fastlstm.sample(logits, temperature, backend=backend, **kwargs)

    nan = good.clone()
    nan[1, 4] = math.nan
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        call(nan)
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        call(nan, 0.0)
    all_masked = good.clone()
    all_masked[2] = -math.inf
    with pytest.raises(ValueError, match="row 2 is all -inf"):
        call(all_masked)
    with pytest.raises(ValueError, match="row 2 is all -inf"):
        call(all_masked, top_k=2, top_p=0.5)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        call(temperature=-0.5)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        call(temperature=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"temperature: expected a float or a tensor of shape \(3,\)"):
        call(temperature=torch.ones(4))
    for top_k in (-1, True, 2.0):
        with pytest.raises(ValueError, match="top_k must be an int >= 0"):
            call(top_k=top_k)
    for temperature in ("1", None, [1.0, 1.0, 1.0]):
        with pytest.raises(TypeError, match="temperature must be a float or a tensor"):
            call(temperature=temperature)
    with pytest.raises(TypeError, match="top_p must be a float"):
        call(top_p=None)
    for top_p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            call(top_p=top_p)
    with pytest.raises(ValueError, match="logits must be float32, float16 or bfloat16"):
        call(torch.randint(0, 5, (3, 10)))
    with pytest.raises(ValueError, match="vocab > 0"):
        call(torch.randn(3, 0))
    with pytest.raises(RuntimeError, match="temperature is on meta but logits on cpu"):
        call(temperature=torch.ones(3, device="meta"))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        call(generator=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_numpy_scalar_arguments(backend):
    logits = torch.randn(3, 10)
    tokens = fastlstm.sample(logits, np.float32(0.0), top_k=np.int64(3), top_p=np.float64(0.9),
                             backend=backend)
    assert torch.equal(tokens, logits.argmax(-1))


def test_kernel_backends_reject_float64():
    for backend in CPU_BACKENDS:
        if backend != "torch":
            with pytest.raises(ValueError, match="got float64"):
                fastlstm.sample(torch.randn(2, 5, dtype=torch.float64), backend=backend)
    assert fastlstm.sample(torch.randn(2, 5, dtype=torch.float64)).shape == (2,)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastlstm.sample(torch.randn(2, 5), backend="tpu")


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="fastlstm._C is not built")
def test_cpu_op_checks_and_compiles():
    op = torch.ops.fastlstm.sample.default
    torch.library.opcheck(op, (torch.randn(4, 33), None, 0.7, 0, 1.0, None),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    torch.library.opcheck(op, (torch.randn(2, 3, 33).half(), torch.rand(2, 3), 1.0, 4, 0.9, None),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    torch.library.opcheck(op, (torch.randn(4, 33), None, 0.7, 0, 1.0, None),
                          {"min_p": 0.2}, test_utils=("test_schema", "test_autograd_registration",
                                                      "test_faketensor"))
    with pytest.raises(ValueError, match="min_p must be in"):
        op(torch.randn(4, 33), None, 0.7, 0, 1.0, None, min_p=1.5)

    def step(logits):
        return fastlstm.sample(logits, 0.0, backend="cpu")

    logits = torch.randn(5, 40)
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(logits), logits.argmax(-1))


def test_sampler_module():
    sampler = fastlstm.Sampler(temperature=0.0, top_k=3)
    logits = torch.randn(6, 20)
    assert torch.equal(sampler(logits), logits.argmax(-1))
    assert "top_k=3" in repr(sampler)
    assert torch.equal(fastlstm.Sampler(temperature=2.0, min_p=1.0)(logits), logits.argmax(-1))
    assert "min_p=1.0" in repr(fastlstm.Sampler(min_p=1.0))
    with pytest.raises(ValueError, match="top_p"):
        fastlstm.Sampler(top_p=2.0)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="fastlstm._C is not built")
def test_cpu_long_rows():
    """Rows longer than the kernel's block, half-masked, in float32 and bfloat16."""
    vocab = 262144
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(4, vocab, generator=generator)
    logits[:, ::2] = -math.inf
    for dtype in (torch.float32, torch.bfloat16):
        tokens = fastlstm.sample(logits.to(dtype), 1.0, backend="cpu", generator=generator)
        assert bool((tokens % 2 == 1).all()) and bool((tokens < vocab).all())



@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="fastlstm._C is not built")
def test_cpu_distribution_many_blocks():
    """V = 4100: five blocks of the CPU kernel (the last one of 4 tokens) and many chunks, every
    one carrying mass; the draws come from several calls so each call stays small."""
    vocab, calls = 4100, 20
    z = make_logits(vocab, seed=11, masked=40)
    logits = z.float().expand(DRAWS // calls, vocab).contiguous()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.cat([fastlstm.sample(logits, 0.7, backend="cpu", generator=generator)
                        for _ in range(calls)])
    p = chi_square_p_value(tokens, reference_probs(z.float().double(), 0.7))
    assert p > P_VALUE_FLOOR, f"V={vocab}: chi-square p = {p:.2e}"


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="fastlstm._C is not built")
@pytest.mark.parametrize("rows, vocab, dtype", [(1, 200000, torch.float32),
                                                (37, 3000, torch.float32),
                                                (6, 9000, torch.float32),
                                                (5, 70000, torch.bfloat16),
                                                (300, 65, torch.float16)])
def test_cpu_draws_do_not_depend_on_threads(rows, vocab, dtype):
    """Rows and blocks are split over threads differently for each thread count (6 rows go to
    threads whole on 1 thread, by blocks on 2 or 3); the tokens must not change (each draw is
    keyed by the row, each block's sums by its own tokens)."""
    logits = (2 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))).to(dtype)
    saved = torch.get_num_threads()
    drawn = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            drawn.append(torch.stack([
                fastlstm.sample(logits, 0.9, backend="cpu",
                                generator=torch.Generator().manual_seed(seed))
                for seed in range(4)]))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], drawn[2])
    assert not torch.equal(drawn[0][0], drawn[0][1])  # the seeds do matter


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="fastlstm._C is not built")
@pytest.mark.skipif(os.environ.get("FASTLSTM_SAMPLE_KERNELS") is not None,
                    reason="already running on chosen kernels")
@pytest.mark.parametrize("kernels", ["portable", "avx2"])
def test_cpu_lower_kernels(kernels):
    """The CPU kernel picks the widest vector code the CPU runs (AVX-512, AVX2, portable C++);
    FASTLSTM_SAMPLE_KERNELS forces a lower one. Rerun the CPU tests on it, in a fresh process
    (on a CPU without the chosen instructions this repeats the best available ones)."""
    env = dict(os.environ, FASTLSTM_SAMPLE_KERNELS=kernels)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "(distribution and cpu and not cuda) or long_rows or masked or greedy or threads"
         " or (min_p and cpu) or (ties and cpu)"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout

# --- CUDA ------------------------------------------------------------------------------------

CUDA_BACKENDS = ["cuda", "triton"]


def _cuda_backend_or_skip(backend):
    reason = why_unavailable(backend, "cuda") if torch.cuda.is_available() else "no GPU"
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, top_k, top_p", [(37, 0, 1.0), (50000, 0, 1.0), (37, 6, 1.0),
                                                 (37, 0, 0.6), (300, 20, 0.9)])
def test_cuda_distribution(backend, dtype, vocab, top_k, top_p):
    _cuda_backend_or_skip(backend)
    z = make_logits(vocab, seed=vocab).to(dtype)
    temperatures = [0.0, 0.6, 1.7]
    logits = z.cuda().expand(DRAWS * len(temperatures), vocab).contiguous()
    temperature = torch.tensor(temperatures, device="cuda").repeat_interleave(DRAWS)
    tokens = fastlstm.sample(logits, temperature, top_k=top_k, top_p=top_p, backend=backend,
                             generator=torch.Generator("cuda").manual_seed(8), check=True).cpu()
    assert bool((tokens[:DRAWS] == z.argmax()).all())
    for index, t in enumerate(temperatures[1:], start=1):
        drawn = tokens[index * DRAWS:(index + 1) * DRAWS]
        p = chi_square_p_value(drawn, reference_probs(z.double(), t, top_k, top_p))
        assert p > P_VALUE_FLOOR, f"{backend}, {dtype}, V={vocab}, T={t}: p = {p:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_generator_and_errors(backend):
    _cuda_backend_or_skip(backend)
    logits = torch.randn(8, 1000, device="cuda")
    generator = torch.Generator("cuda").manual_seed(1)
    state = generator.get_state()
    first = fastlstm.sample(logits, 1.0, generator=generator, backend=backend)
    second = fastlstm.sample(logits, 1.0, generator=generator, backend=backend)
    generator.set_state(state)
    assert torch.equal(fastlstm.sample(logits, 1.0, generator=generator, backend=backend), first)
    assert not torch.equal(first, second)
    bad = logits.clone()
    bad[3, 5] = math.nan
    tokens = fastlstm.sample(bad, 1.0, backend=backend)  # no synchronization here
    assert int(tokens[3]) == -1
    with pytest.raises(ValueError, match="row 3 contains NaN"):
        sampling.check_tokens(tokens, bad)
    with pytest.raises(ValueError, match="row 3 contains NaN"):
        fastlstm.sample(bad, 1.0, backend=backend, check=True)
    with pytest.raises(RuntimeError, match="generator is on cpu but logits on cuda"):
        fastlstm.sample(logits, 1.0, generator=torch.Generator(), backend=backend)
    with pytest.raises(RuntimeError, match="temperature is on cpu but logits on cuda"):
        fastlstm.sample(logits, torch.ones(8), backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_replay_draws_fresh_tokens(backend):
    _cuda_backend_or_skip(backend)
    logits = torch.zeros(16, 4096, device="cuda")  # uniform: repeats would be a coincidence
    fastlstm.sample(logits, 1.0, backend=backend)  # compile / warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fastlstm.sample(logits, 1.0, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = fastlstm.sample(logits, 1.0, backend=backend)
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(tokens.clone())
    torch.cuda.synchronize()
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_check_tokens_without_temperature_names_the_bad_row():
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    tokens = torch.tensor([0, -1, 4])
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        sampling.check_tokens(tokens, logits)
    sampling.check_tokens(torch.tensor([0, 1, 4]), logits)  # no bad token: no error


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.0), (50, 1.0, 0.0), (0, 0.9, 0.0),
                                                 (50, 0.9, 0.0), (0, 1.0, 0.05),
                                                 (100, 0.95, 0.02)])
def test_cuda_long_rows_distribution(backend, batch, top_k, top_p, min_p):
    """V = 50000 at batch 1 (a row split over many blocks / programs, thresholds merged across
    them) and batch 64: chi-square against softmax(z / T) after the filters, and greedy rows."""
    _cuda_backend_or_skip(backend)
    vocab, temperature = 50000, 0.9
    z = 3 * torch.randn(vocab, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    z[torch.randperm(vocab, generator=torch.Generator().manual_seed(32))[:100]] = -math.inf
    logits = z.float().cuda().expand(batch, vocab).contiguous()
    generator = torch.Generator("cuda").manual_seed(17)
    # batch 1: one call a draw (about 40 launches each on the filtered split path), so fewer
    calls = 5000 if batch == 1 else -(-DRAWS // batch)
    tokens = torch.cat([fastlstm.sample(logits, temperature, top_k=top_k, top_p=top_p,
                                        min_p=min_p, generator=generator, backend=backend)
                        for _ in range(calls)]).cpu()
    assert int(tokens.min()) >= 0
    p = chi_square_p_value(tokens, reference_probs(z.float().double(), temperature, top_k, top_p,
                                                   min_p))
    assert p > P_VALUE_FLOOR, f"{backend}, B={batch}, {top_k}, {top_p}, {min_p}: p = {p:.2e}"
    greedy = fastlstm.sample(logits, 0.0, top_k=top_k, top_p=top_p, min_p=min_p,
                             backend=backend, check=True)
    assert bool((greedy == int(z.argmax())).all())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("batch", [1, 64])
def test_cuda_long_rows_ties(backend, batch):
    """Ties at the max in different blocks of a long row: greedy takes the first; sampling with
    top-k 2 / top-p 1e-4 / min-p 0.99 keeps exactly the tied tokens and spreads evenly."""
    _cuda_backend_or_skip(backend)
    vocab, tied = 50000, (11, 20000, 49999)
    z = tied_logits(vocab, tied, seed=5).float()
    logits = z.cuda().expand(batch, vocab).contiguous()
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[list(tied)] = 1.0 / 3
    assert torch.equal(reference_probs(z.double(), 1.0, 0, 1e-4), expected)
    for top_k, top_p, min_p in ((2, 1.0, 0.0), (0, 1e-4, 0.0), (0, 1.0, 0.99), (2, 0.5, 0.5)):
        greedy = fastlstm.sample(logits, 0.0, top_k=top_k, top_p=top_p, min_p=min_p,
                                 backend=backend, check=True)
        assert bool((greedy == 11).all())
        generator = torch.Generator("cuda").manual_seed(top_k + 1)
        tokens = torch.cat([fastlstm.sample(logits, 1.0, top_k=top_k, top_p=top_p, min_p=min_p,
                                            generator=generator, backend=backend)
                            for _ in range(-(-3000 // batch))]).cpu()
        p = chi_square_p_value(tokens, expected)
        assert p > P_VALUE_FLOOR, f"{backend}, B={batch}, {top_k}, {top_p}, {min_p}: p = {p:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_filtered_errors_and_graph(backend):
    """Bad rows on the filtered split path give -1; the filtered path replays in a CUDA graph
    with fresh draws; the same generator state gives the same tokens."""
    _cuda_backend_or_skip(backend)
    logits = torch.randn(3, 50000, device="cuda")
    logits[1, 7] = math.nan
    logits[2] = -math.inf
    tokens = fastlstm.sample(logits, 1.0, top_k=50, top_p=0.9, min_p=0.01, backend=backend)
    assert int(tokens[0]) >= 0 and tokens[1:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        fastlstm.sample(logits, 1.0, top_k=50, backend=backend, check=True)
    good = torch.zeros(2, 50000, device="cuda")  # uniform: repeats would be a coincidence
    generator = torch.Generator("cuda").manual_seed(4)
    state = generator.get_state()
    first = fastlstm.sample(good, 1.0, top_k=40000, top_p=0.9, generator=generator,
                            backend=backend)
    generator.set_state(state)
    assert torch.equal(fastlstm.sample(good, 1.0, top_k=40000, top_p=0.9, generator=generator,
                                       backend=backend), first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fastlstm.sample(good, 1.0, top_k=40000, top_p=0.9, min_p=0.5, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        drawn = fastlstm.sample(good, 1.0, top_k=40000, top_p=0.9, min_p=0.5, backend=backend)
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(drawn.clone())
    torch.cuda.synchronize()
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
