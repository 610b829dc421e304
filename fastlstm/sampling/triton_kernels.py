"""Fused sampling in Triton: Gumbel-max with counter-based Philox noise.

Drawing token j with probability softmax(z / T)_j is the same as taking argmax_j(z_j / T + g_j)
with independent Gumbel noise g_j, or argmax_j(z_j + T * g_j) for T > 0; with T = 0 the same
expression is the exact argmax, so greedy rows need no branch. The noise for token j of row r
comes from Philox keyed by the call's seed with counter (r, j), so it does not depend on how the
row is split over programs.

Common case (no top-k / top-p / min-p): a row is split over `splits` programs (enough programs to
fill the GPU when there are few rows); each keeps its best (key, index) and a second small kernel
takes the argmax over the splits. With top-k / top-p / min-p the thresholds come first, by a
search over the logits' order-preserving integer keys (no sort; see below): when a row gets one
program, that program runs the whole search; when it is split, each pass is a kernel over the
splits writing partial masses to a [rows, splits, PIVOTS] buffer and a small kernel that sums
them in a fixed order and moves the row's interval, and the draw is the split kernel above told
to skip the tokens below the thresholds.

Bad rows give token -1 and an error code; the caller turns them into an error (at once on the
CPU, at the next `check_tokens` on CUDA: see fastlstm/sampling/sampler.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Error codes, as in csrc/sampling/sample_kernels.h.
_ROW_NAN, _ROW_ALL_NEG_INF, _ROW_POS_INF, _ROW_BAD_TEMPERATURE = 1, 2, 3, 4


@triton.jit
def _exponential_noise(random_bits):
    """-log(1 - u) ~ Exp(1) for u uniform in [0, 1), accurate for small u (where the Gumbel
    noise -log(E) is large and decides rare draws), never 0 (so -log(E) stays finite)."""
    u = tl.random.uint_to_uniform_float(random_bits)
    small = u + 0.5 * u * u  # -log(1 - u) to O(u^3), exact in float32 for u < 2^-12
    e = tl.where(u < 0.000244140625, small, -tl.log(1.0 - u))
    return tl.maximum(e, 1.1641532182693481e-10)  # 2^-33


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order (negative floats: flip the magnitude bits)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _row_temperature(temperature_ptr, scalar_temperature, rows_index, row_inside,
                     PER_ROW: tl.constexpr):
    if PER_ROW:
        return tl.load(temperature_ptr + rows_index, mask=row_inside, other=1.0).to(tl.float32)
    else:
        return tl.zeros(rows_index.shape, tl.float32) + scalar_temperature


@triton.jit
def _pick_bits(r0, r1, r2, r3, part: tl.constexpr):
    if part == 0:
        return r0
    elif part == 1:
        return r1
    elif part == 2:
        return r2
    else:
        return r3


@triton.jit
def _tile_best(key, index, best_key, best_index):
    """Fold a [ROWS, QUARTER] tile of keys into the running per-row best (earlier index wins)."""
    tile_best = tl.max(key, axis=1)
    tile_index = tl.min(tl.where(key == tile_best[:, None], index, 2147483647), axis=1)
    better = tile_best > best_key  # strict: tiles come in index order, so earlier tokens win ties
    return tl.where(better, tile_best, best_key), tl.where(better, tile_index, best_index)


@triton.jit
def _sample_split_kernel(
    # pointers
    logits_ptr, temperature_ptr, seed_ptr, part_key_ptr, part_index_ptr, part_error_ptr,
    tokens_ptr, state_float_ptr, state_key_ptr,
    # sizes
    rows, vocab, splits, span, counters_per_row, scalar_temperature,
    # meta-parameters
    ROWS: tl.constexpr, QUARTER: tl.constexpr, PER_ROW: tl.constexpr, FINAL: tl.constexpr,
    FILTERED: tl.constexpr,
):
    """Program (row block, split): per row, the best Gumbel key and its index over the tokens
    [split * span, + span). A tile is ROWS x (4 * QUARTER): one Philox call per 4 tokens.
    FILTERED: only the tokens at or above the row's threshold key and min-p cut (the state the
    filter kernels left) take part."""
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    split = tl.program_id(1)
    t = _row_temperature(temperature_ptr, scalar_temperature, rows_index, row_inside, PER_ROW)
    seed = tl.load(seed_ptr)
    lane = tl.arange(0, QUARTER)
    row_ptr = logits_ptr + rows_index.to(tl.int64)[:, None] * vocab
    best_key = tl.full((ROWS,), -float("inf"), tl.float32)
    best_index = tl.full((ROWS,), 2147483647, tl.int32)
    nan_seen = tl.zeros((ROWS,), tl.int32)
    pos_inf_seen = tl.zeros((ROWS,), tl.int32)
    begin = split * span
    end = tl.minimum(begin + span, vocab)
    if FILTERED:
        threshold = tl.load(state_key_ptr + rows_index * 3, mask=row_inside, other=0).to(tl.int32)
        cut = tl.load(state_float_ptr + rows_index * 4 + 3, mask=row_inside, other=0.0)
    else:
        threshold = tl.full((ROWS,), -2147483648, tl.int32)
        cut = tl.full((ROWS,), -float("inf"), tl.float32)
    for tile_start in range(begin, end, 4 * QUARTER):
        counter = (rows_index.to(tl.int64)[:, None] * counters_per_row + tile_start // 4
                   + lane[None, :])
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        for part in tl.static_range(4):
            index = tile_start + part * QUARTER + lane[None, :]
            inside = row_inside[:, None] & (index < end)
            z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
            nan_seen = tl.maximum(nan_seen, tl.max((z != z).to(tl.int32), axis=1))
            pos_inf_seen = tl.maximum(pos_inf_seen,
                                      tl.max((z == float("inf")).to(tl.int32), axis=1))
            noise = -tl.log(_exponential_noise(_pick_bits(r0, r1, r2, r3, part)))
            kept = (z == z) & (_ordered_key(z) >= threshold[:, None]) & (z >= cut[:, None])
            key = tl.where(kept, z + t[:, None] * noise, -float("inf"))
            best_key, best_index = _tile_best(key, index, best_key, best_index)
    error = tl.where(nan_seen > 0, 1, tl.where(pos_inf_seen > 0, 3, 0))
    if PER_ROW:
        error = tl.where((t >= 0) & (t < float("inf")), error, 4)
    if FINAL:
        error = tl.where((error == 0) & (best_key == -float("inf")), 2, error)
        tl.store(tokens_ptr + rows_index, tl.where(error == 0, best_index, -1).to(tl.int64),
                 mask=row_inside)
    else:
        slot = rows_index * splits + split
        tl.store(part_key_ptr + slot, best_key, mask=row_inside)
        tl.store(part_index_ptr + slot, best_index, mask=row_inside)
        tl.store(part_error_ptr + slot, error, mask=row_inside)


@triton.jit
def _sample_reduce_kernel(part_key_ptr, part_index_ptr, part_error_ptr, tokens_ptr, rows, splits,
                          ROWS: tl.constexpr, SPLITS_POW2: tl.constexpr):
    """Program (row block): per row, the argmax over its splits (the first index on ties) and
    the row's error."""
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    lane = tl.arange(0, SPLITS_POW2)[None, :]
    inside = row_inside[:, None] & (lane < splits)
    slot = rows_index[:, None] * splits + lane
    key = tl.load(part_key_ptr + slot, mask=inside, other=-float("inf"))
    index = tl.load(part_index_ptr + slot, mask=inside, other=2147483647)
    error = tl.max(tl.load(part_error_ptr + slot, mask=inside, other=0), axis=1)
    best = tl.max(key, axis=1)
    best_index = tl.min(tl.where(key == best[:, None], index, 2147483647), axis=1)
    error = tl.where((error == 0) & (best == -float("inf")), 2, error)
    tl.store(tokens_ptr + rows_index, tl.where(error == 0, best_index, -1).to(tl.int64),
             mask=row_inside)


# ---- top-k / top-p / min-p ----------------------------------------------------------------------
#
# The thresholds are found on the logits' order-preserving int32 keys, as in csrc/sampling/sample_cuda.cu:
# a search keeps an interval [low, high] of keys with mass(low) >= target > mass(high + 1), where
# mass(key) is the count (top-k) or the weight sum exp((z - max) / T) (top-p) of the tokens whose
# key is >= key. It starts from the row's smallest and largest keys; each pass measures the mass
# at PIVOTS keys spread evenly inside the interval, which shrinks it 17-fold (at most 8 passes for
# 2^32 keys); a row stops once its interval is one key. min-p is a cut on the logit,
# z >= max + T log(min_p), applied with the thresholds in the draw.

PIVOTS = 16


@triton.jit
def _pivot_keys(low, high, PIVOTS_: tl.constexpr):
    """[ROWS, PIVOTS] keys inside (low, high]: low + ceil((high - low) * (j + 1) / (PIVOTS + 1))."""
    j = tl.arange(0, PIVOTS_).to(tl.int64)
    span = (high - low)[:, None]
    return low[:, None] + (span * (j[None, :] + 1) + PIVOTS_) // (PIVOTS_ + 1)


@triton.jit
def _tile_pivot_masses(z, inside, pivots, row_max, inv_t):
    """Count and weight sum of one [ROWS, BLOCK] tile's tokens at or above each pivot:
    ([ROWS, PIVOTS], [ROWS, PIVOTS])."""
    key = _ordered_key(z).to(tl.int64)
    shift = tl.where(row_max > -float("inf"), row_max, 0.0)
    weight = tl.where(inside, tl.exp((z - shift[:, None]) * inv_t[:, None]), 0.0)
    kept = (key[:, None, :] >= pivots[:, :, None]) & inside[:, None, :]
    count = tl.sum(kept.to(tl.float32), axis=2)
    mass = tl.sum(tl.where(kept, weight[:, None, :], 0.0), axis=2)
    return count, mass


@triton.jit
def _search_step(low, high, mass_at_low, target, count, mass, COUNTING: tl.constexpr,
                 PIVOTS_: tl.constexpr):
    """Move each row's [low, high] to the part between the last pivot whose mass (count when
    COUNTING) reaches the target and the next one; rows with low == high stay."""
    pivots = _pivot_keys(low, high, PIVOTS_)
    measured = count if COUNTING else mass
    enough = measured >= target[:, None]
    reached = tl.sum(enough.to(tl.int32), axis=1)  # the masses fall with the pivot: a prefix
    j = tl.arange(0, PIVOTS_)[None, :]
    last = j == (reached - 1)[:, None]
    first_short = j == reached[:, None]
    active = low < high
    new_low = tl.where(reached > 0, tl.sum(tl.where(last, pivots, 0), axis=1), low)
    new_mass = tl.where(reached > 0, tl.sum(tl.where(last, mass, 0.0), axis=1), mass_at_low)
    new_high = tl.where(reached < PIVOTS_, tl.sum(tl.where(first_short, pivots, 0), axis=1) - 1,
                        high)
    return (tl.where(active, new_low, low), tl.where(active, new_high, high),
            tl.where(active, new_mass, mass_at_low))


@triton.jit
def _min_p_cut(row_max, t, min_p):
    """min-p keeps p >= min_p * p_max, i.e. z >= max + T log(min_p); -inf when off or greedy."""
    use = (t > 0) & (min_p > 0)
    return tl.where(use, row_max + t * tl.log(tl.where(use, min_p, 1.0)), -float("inf"))


@triton.jit
def _sample_filtered_kernel(
    # pointers
    logits_ptr, temperature_ptr, seed_ptr, tokens_ptr,
    # sizes and settings
    rows, vocab, counters_per_row, scalar_temperature, top_k, top_p, min_p,
    # meta-parameters
    ROWS: tl.constexpr, QUARTER: tl.constexpr, PER_ROW: tl.constexpr,
    USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, PIVOTS_: tl.constexpr,
    PASS_BLOCK: tl.constexpr,
):
    """Program (row block): the top-k then top-p thresholds by the search above (its passes in
    tiles of ROWS x PASS_BLOCK tokens, each compared with PIVOTS keys), then Gumbel-max over the
    tokens at or above them and the min-p cut."""
    BLOCK: tl.constexpr = 4 * QUARTER
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    t = _row_temperature(temperature_ptr, scalar_temperature, rows_index, row_inside, PER_ROW)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)  # T = 0: any weights do; the argmax is always kept
    row_ptr = logits_ptr + rows_index.to(tl.int64)[:, None] * vocab
    row_max = tl.full((ROWS,), -float("inf"), tl.float32)
    min_key = tl.full((ROWS,), 2147483647, tl.int32)
    nan_seen = tl.zeros((ROWS,), tl.int32)
    for start in range(0, vocab, BLOCK):
        index = start + tl.arange(0, BLOCK)[None, :]
        inside = row_inside[:, None] & (index < vocab)
        z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
        nan_seen = tl.maximum(nan_seen, tl.max((z != z).to(tl.int32), axis=1))
        row_max = tl.maximum(row_max, tl.max(tl.where(z == z, z, -float("inf")), axis=1))
        min_key = tl.minimum(min_key, tl.min(tl.where(inside & (z == z), _ordered_key(z),
                                                      2147483647), axis=1))
    low = min_key.to(tl.int64)
    high = tl.where(row_max == row_max, _ordered_key(row_max), min_key).to(tl.int64)
    high = tl.maximum(high, low)
    max_key = high
    mass_at_low = tl.zeros((ROWS,), tl.float32)
    if USE_TOP_K:
        target = tl.zeros((ROWS,), tl.float32) + top_k
        while tl.max(high - low, axis=0) > 0:
            pivots = _pivot_keys(low, high, PIVOTS_)
            count = tl.zeros((ROWS, PIVOTS_), tl.float32)
            mass = tl.zeros((ROWS, PIVOTS_), tl.float32)
            for start in range(0, vocab, PASS_BLOCK):
                index = start + tl.arange(0, PASS_BLOCK)[None, :]
                inside = row_inside[:, None] & (index < vocab)
                z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
                tile_count, tile_mass = _tile_pivot_masses(z, inside & (z == z), pivots, row_max,
                                                           inv_t)
                count += tile_count
                mass += tile_mass
            low, high, mass_at_low = _search_step(low, high, mass_at_low, target, count, mass,
                                                  True, PIVOTS_)
    if USE_TOP_P:
        # the kept mass: the top-k set's (the search measured it), or the whole row's
        if not USE_TOP_K:
            mass_at_low = tl.zeros((ROWS,), tl.float32)
            for start in range(0, vocab, BLOCK):
                index = start + tl.arange(0, BLOCK)[None, :]
                inside = row_inside[:, None] & (index < vocab)
                z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
                shift = tl.where(row_max > -float("inf"), row_max, 0.0)
                weight = tl.exp((z - shift[:, None]) * inv_t[:, None])
                mass_at_low += tl.sum(tl.where(inside & (z == z), weight, 0.0), axis=1)
        target = top_p * mass_at_low
        high = max_key
        while tl.max(high - low, axis=0) > 0:
            pivots = _pivot_keys(low, high, PIVOTS_)
            mass = tl.zeros((ROWS, PIVOTS_), tl.float32)
            for start in range(0, vocab, PASS_BLOCK):
                index = start + tl.arange(0, PASS_BLOCK)[None, :]
                inside = row_inside[:, None] & (index < vocab)
                z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
                _unused, tile_mass = _tile_pivot_masses(z, inside & (z == z), pivots, row_max,
                                                        inv_t)
                mass += tile_mass
            low, high, mass_at_low = _search_step(low, high, mass_at_low, target, mass, mass,
                                                  False, PIVOTS_)
    threshold = low.to(tl.int32)
    cut = _min_p_cut(row_max, t, min_p)
    seed = tl.load(seed_ptr)
    lane = tl.arange(0, QUARTER)
    best_key = tl.full((ROWS,), -float("inf"), tl.float32)
    best_index = tl.full((ROWS,), 2147483647, tl.int32)
    for tile_start in range(0, vocab, BLOCK):
        counter = (rows_index.to(tl.int64)[:, None] * counters_per_row + tile_start // 4
                   + lane[None, :])
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        for part in tl.static_range(4):
            index = tile_start + part * QUARTER + lane[None, :]
            inside = row_inside[:, None] & (index < vocab)
            z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
            noise = -tl.log(_exponential_noise(_pick_bits(r0, r1, r2, r3, part)))
            kept = (inside & (z == z) & (_ordered_key(z) >= threshold[:, None])
                    & (z >= cut[:, None]))
            key = tl.where(kept, z + t[:, None] * noise, -float("inf"))
            best_key, best_index = _tile_best(key, index, best_key, best_index)
    error = tl.where(nan_seen > 0, 1, tl.where(row_max == float("inf"), 3,
                                               tl.where(row_max == -float("inf"), 2, 0)))
    if PER_ROW:
        error = tl.where((t >= 0) & (t < float("inf")), error, 4)
    tl.store(tokens_ptr + rows_index, tl.where(error == 0, best_index, -1).to(tl.int64),
             mask=row_inside)


@triton.jit
def _filter_stats_kernel(
    # pointers
    logits_ptr, temperature_ptr, part_max_ptr, part_sum_ptr, part_min_key_ptr,
    # sizes
    rows, vocab, splits, span, scalar_temperature,
    # meta-parameters
    ROWS: tl.constexpr, BLOCK: tl.constexpr, PER_ROW: tl.constexpr,
):
    """Few rows, first pass; program (row block, split): per row, the max of tokens
    [split * span, + span), their weight sum relative to it and their smallest key (NaN and
    +inf are left to the draw, which reports them)."""
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    split = tl.program_id(1)
    t = _row_temperature(temperature_ptr, scalar_temperature, rows_index, row_inside, PER_ROW)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    row_ptr = logits_ptr + rows_index.to(tl.int64)[:, None] * vocab
    begin = split * span
    end = tl.minimum(begin + span, vocab)
    split_max = tl.full((ROWS,), -float("inf"), tl.float32)
    min_key = tl.full((ROWS,), 2147483647, tl.int32)
    for start in range(begin, end, BLOCK):
        index = start + tl.arange(0, BLOCK)[None, :]
        inside = row_inside[:, None] & (index < end)
        z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
        split_max = tl.maximum(split_max, tl.max(tl.where(z == z, z, -float("inf")), axis=1))
        min_key = tl.minimum(min_key, tl.min(tl.where(inside & (z == z), _ordered_key(z),
                                                      2147483647), axis=1))
    shift = tl.where(split_max > -float("inf"), split_max, 0.0)
    total = tl.zeros((ROWS,), tl.float32)
    for start in range(begin, end, BLOCK):
        index = start + tl.arange(0, BLOCK)[None, :]
        inside = row_inside[:, None] & (index < end)
        z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
        weight = tl.exp((z - shift[:, None]) * inv_t[:, None])
        total += tl.sum(tl.where(inside & (z == z), weight, 0.0), axis=1)
    slot = rows_index * splits + split
    tl.store(part_max_ptr + slot, split_max, mask=row_inside)
    tl.store(part_sum_ptr + slot, total, mask=row_inside)
    tl.store(part_min_key_ptr + slot, min_key, mask=row_inside)


@triton.jit
def _filter_begin_kernel(
    # pointers
    part_max_ptr, part_sum_ptr, part_min_key_ptr, temperature_ptr,
    state_float_ptr, state_key_ptr,
    # sizes and settings
    rows, splits, scalar_temperature, top_k, top_p, min_p,
    # meta-parameters
    ROWS: tl.constexpr, SPLITS_POW2: tl.constexpr, PER_ROW: tl.constexpr,
    USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
):
    """Program (row block): per row, the max, total weight and smallest key from its splits (in
    split order), and the start of the first search. State per row: floats (max, mass at low,
    target, min-p cut) and keys (low, high, max key)."""
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    lane = tl.arange(0, SPLITS_POW2)[None, :]
    inside = row_inside[:, None] & (lane < splits)
    slot = rows_index[:, None] * splits + lane
    part_max = tl.load(part_max_ptr + slot, mask=inside, other=-float("inf"))
    part_sum = tl.load(part_sum_ptr + slot, mask=inside, other=0.0)
    min_key = tl.min(tl.load(part_min_key_ptr + slot, mask=inside, other=2147483647), axis=1)
    t = _row_temperature(temperature_ptr, scalar_temperature, rows_index, row_inside, PER_ROW)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    row_max = tl.max(part_max, axis=1)
    good = (row_max > -float("inf")) & (row_max < float("inf"))
    scale = tl.exp((part_max - tl.where(good, row_max, 0.0)[:, None]) * inv_t[:, None])
    total = tl.sum(tl.where(part_sum > 0, part_sum * scale, 0.0), axis=1)
    low = min_key.to(tl.int64)
    max_key = tl.maximum(tl.where(good, _ordered_key(row_max), min_key).to(tl.int64), low)
    high = max_key
    target = total * 0.0
    if USE_TOP_K:
        target = target + top_k
    elif USE_TOP_P:
        target = top_p * total
    else:
        high = low  # min-p alone: no search
    high = tl.where(good, high, low)
    cut = _min_p_cut(row_max, t, min_p)
    tl.store(state_float_ptr + rows_index * 4 + 0, row_max, mask=row_inside)
    tl.store(state_float_ptr + rows_index * 4 + 1, total, mask=row_inside)
    tl.store(state_float_ptr + rows_index * 4 + 2, target, mask=row_inside)
    tl.store(state_float_ptr + rows_index * 4 + 3, cut, mask=row_inside)
    tl.store(state_key_ptr + rows_index * 3 + 0, low, mask=row_inside)
    tl.store(state_key_ptr + rows_index * 3 + 1, high, mask=row_inside)
    tl.store(state_key_ptr + rows_index * 3 + 2, max_key, mask=row_inside)


@triton.jit
def _filter_pass_kernel(
    # pointers
    logits_ptr, temperature_ptr, state_float_ptr, state_key_ptr, part_count_ptr, part_mass_ptr,
    # sizes
    rows, vocab, splits, span, scalar_temperature,
    # meta-parameters
    ROWS: tl.constexpr, BLOCK: tl.constexpr, PER_ROW: tl.constexpr, PIVOTS_: tl.constexpr,
):
    """One search pass; program (row block, split): per row, the count and weight sum of tokens
    [split * span, + span) at or above each pivot of the row's interval, into
    part_*[row, split, 0:PIVOTS]."""
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    split = tl.program_id(1)
    t = _row_temperature(temperature_ptr, scalar_temperature, rows_index, row_inside, PER_ROW)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    row_max = tl.load(state_float_ptr + rows_index * 4, mask=row_inside, other=0.0)
    low = tl.load(state_key_ptr + rows_index * 3, mask=row_inside, other=0)
    high = tl.load(state_key_ptr + rows_index * 3 + 1, mask=row_inside, other=0)
    pivots = _pivot_keys(low, high, PIVOTS_)
    row_ptr = logits_ptr + rows_index.to(tl.int64)[:, None] * vocab
    begin = split * span
    end = tl.minimum(begin + span, vocab)
    count = tl.zeros((ROWS, PIVOTS_), tl.float32)
    mass = tl.zeros((ROWS, PIVOTS_), tl.float32)
    if tl.max(high - low, axis=0) > 0:  # every row done: nothing to measure
        for start in range(begin, end, BLOCK):
            index = start + tl.arange(0, BLOCK)[None, :]
            inside = row_inside[:, None] & (index < end)
            z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
            tile_count, tile_mass = _tile_pivot_masses(z, inside & (z == z), pivots, row_max,
                                                       inv_t)
            count += tile_count
            mass += tile_mass
    slot = ((rows_index * splits + split) * PIVOTS_)[:, None] + tl.arange(0, PIVOTS_)[None, :]
    tl.store(part_count_ptr + slot, count, mask=row_inside[:, None])
    tl.store(part_mass_ptr + slot, mass, mask=row_inside[:, None])


@triton.jit
def _filter_update_kernel(
    # pointers
    part_count_ptr, part_mass_ptr, state_float_ptr, state_key_ptr,
    # sizes and settings
    rows, splits, top_p,
    # meta-parameters
    ROWS: tl.constexpr, SPLITS_POW2: tl.constexpr, PIVOTS_: tl.constexpr,
    COUNTING: tl.constexpr, START_TOP_P: tl.constexpr,
):
    """Program (row block): per row, a pass's partial masses summed over the splits (a fixed
    reduction order) move the row's interval; with START_TOP_P, then the top-p search begins."""
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    split = tl.arange(0, SPLITS_POW2)[None, :, None]
    j = tl.arange(0, PIVOTS_)[None, None, :]
    inside = row_inside[:, None, None] & (split < splits)
    slot = (rows_index[:, None, None] * splits + split) * PIVOTS_ + j
    count = tl.sum(tl.load(part_count_ptr + slot, mask=inside, other=0.0), axis=1)
    mass = tl.sum(tl.load(part_mass_ptr + slot, mask=inside, other=0.0), axis=1)
    low = tl.load(state_key_ptr + rows_index * 3, mask=row_inside, other=0)
    high = tl.load(state_key_ptr + rows_index * 3 + 1, mask=row_inside, other=0)
    mass_at_low = tl.load(state_float_ptr + rows_index * 4 + 1, mask=row_inside, other=0.0)
    target = tl.load(state_float_ptr + rows_index * 4 + 2, mask=row_inside, other=0.0)
    low, high, mass_at_low = _search_step(low, high, mass_at_low, target, count, mass, COUNTING,
                                          PIVOTS_)
    if START_TOP_P:
        row_max = tl.load(state_float_ptr + rows_index * 4, mask=row_inside, other=0.0)
        good = (row_max > -float("inf")) & (row_max < float("inf"))
        target = top_p * mass_at_low
        max_key = tl.load(state_key_ptr + rows_index * 3 + 2, mask=row_inside, other=0)
        high = tl.where(good, max_key, low)
        tl.store(state_float_ptr + rows_index * 4 + 2, target, mask=row_inside)
    tl.store(state_key_ptr + rows_index * 3, low, mask=row_inside)
    tl.store(state_key_ptr + rows_index * 3 + 1, high, mask=row_inside)
    tl.store(state_float_ptr + rows_index * 4 + 1, mass_at_low, mask=row_inside)


def _programs_per_row(row_blocks: int, tiles: int, device: torch.device) -> int:
    """Splits per row block: enough programs to fill the GPU (about 4 per SM) when rows are few."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2  # the interpreter: a few splits, so the two-stage path is exercised
    return max(1, min(tiles, -(-4 * sms // max(row_blocks, 1))))


def triton_sample(logits: torch.Tensor, temperature, top_k: int, top_p: float,
                  generator: torch.Generator | None, *, min_p: float = 0.0,
                  splits: int | None = None) -> torch.Tensor:
    """logits [..., V] float32/float16/bfloat16; temperature float or tensor [...] -> int64 [...]
    (-1 marks a bad row; the caller raises). Arguments are checked by fastlstm.sample.
    `splits` forces the number of programs a row is split over (tests); None chooses."""
    # Triton launches on the current CUDA device, whatever device the pointers belong to.
    if (logits.is_cuda and not torch.compiler.is_compiling()
            and logits.device.index != torch.cuda.current_device()):
        with torch.cuda.device(logits.device):
            return _sample(logits, temperature, top_k, top_p, min_p, generator, splits)
    return _sample(logits, temperature, top_k, top_p, min_p, generator, splits)


def _sample(logits, temperature, top_k, top_p, min_p, generator, forced_splits):
    batch_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    rows_logits = logits.reshape(-1, vocab).contiguous()
    rows = rows_logits.shape[0]
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    # A fresh 63-bit seed on the device from the generator: advances it, and under CUDA graph
    # capture it is drawn anew at every replay.
    seed = torch.randint(0, 2**62, (1,), device=logits.device, generator=generator)
    if rows == 0:
        return tokens.reshape(batch_shape)
    per_row = isinstance(temperature, torch.Tensor)
    if per_row:
        temperature_rows = temperature.reshape(-1).to(device=logits.device, dtype=torch.float32)
        scalar_temperature = 1.0
    else:
        temperature_rows = tokens  # unused when PER_ROW is False
        scalar_temperature = float(temperature)
    # Four Philox outputs per lane cover four sub-tiles of QUARTER tokens.
    quarter = max(16, min(1024, triton.next_power_of_2(-(-vocab // 16))))
    tile = 4 * quarter
    tiles = -(-vocab // tile)
    counters_per_row = tiles * quarter
    # Rows per program: one for long rows; for short rows enough to give a program ~4K tokens.
    # The interpreter runs programs one by one at a fixed cost each: there, few large programs.
    tokens_per_program = 4096 if logits.device.type == "cuda" else 1 << 20
    rows_per_program = max(1, min(triton.next_power_of_2(rows), tokens_per_program // tile))
    row_blocks = -(-rows // rows_per_program)
    use_top_k = 0 < top_k < vocab
    use_top_p = top_p < 1.0
    filtered = use_top_k or use_top_p or min_p > 0.0
    # The search compares [rows, PIVOTS, tokens] tiles: fewer rows and tokens per tile than the
    # draw takes (registers on a GPU; the interpreter's 2^20 elements a tensor).
    budget = 4096 if logits.device.type == "cuda" else 1 << 20
    filter_rows = min(rows_per_program, max(1, budget // (PIVOTS * 16)))
    filter_blocks = -(-rows // filter_rows)
    pass_block = max(16, min(tile, budget // (PIVOTS * filter_rows)))
    if forced_splits is None:
        splits = _programs_per_row(row_blocks, tiles, logits.device)
    else:
        splits = max(1, min(tiles, int(forced_splits)))
    span = -(-tiles // splits) * tile
    splits = -(-vocab // span)
    if filtered and splits == 1:
        # Many rows (or short ones): each program runs the whole search for its rows.
        _sample_filtered_kernel[(filter_blocks,)](
            rows_logits, temperature_rows, seed, tokens, rows, vocab, counters_per_row,
            scalar_temperature, top_k, top_p, min_p,
            ROWS=filter_rows, QUARTER=quarter, PER_ROW=per_row, USE_TOP_K=use_top_k,
            USE_TOP_P=use_top_p, PIVOTS_=PIVOTS, PASS_BLOCK=pass_block)
        return tokens.reshape(batch_shape)
    if splits == 1:
        _sample_split_kernel[(row_blocks, 1)](
            rows_logits, temperature_rows, seed, tokens, tokens, tokens, tokens, tokens, tokens,
            rows, vocab, 1, span, counters_per_row, scalar_temperature,
            ROWS=rows_per_program, QUARTER=quarter, PER_ROW=per_row, FINAL=True, FILTERED=False)
        return tokens.reshape(batch_shape)
    state_float = state_key = tokens  # unused unless filtered
    if filtered:
        state_float, state_key = _filter_split_rows(
            rows_logits, temperature_rows, scalar_temperature, per_row, rows, vocab, splits, span,
            filter_rows, filter_blocks, tile, pass_block, top_k if use_top_k else 0, top_p, min_p)
    part_key = torch.empty(rows * splits, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(rows * splits, dtype=torch.int32, device=logits.device)
    part_error = torch.empty(rows * splits, dtype=torch.int32, device=logits.device)
    _sample_split_kernel[(row_blocks, splits)](
        rows_logits, temperature_rows, seed, part_key, part_index, part_error, tokens,
        state_float, state_key, rows, vocab, splits, span, counters_per_row, scalar_temperature,
        ROWS=rows_per_program, QUARTER=quarter, PER_ROW=per_row, FINAL=False, FILTERED=filtered)
    splits_pow2 = triton.next_power_of_2(splits)
    reduce_rows = max(1, min(triton.next_power_of_2(rows), 4096 // splits_pow2))
    _sample_reduce_kernel[(-(-rows // reduce_rows),)](
        part_key, part_index, part_error, tokens, rows, splits, ROWS=reduce_rows,
        SPLITS_POW2=splits_pow2)
    return tokens.reshape(batch_shape)


# A search pass shrinks the interval at least 17-fold: 8 passes cover 2^32 keys.
_SEARCH_PASSES = 8


def _filter_split_rows(rows_logits, temperature_rows, scalar_temperature, per_row, rows, vocab,
                       splits, span, rows_per_program, row_blocks, tile, pass_block, top_k, top_p,
                       min_p):
    """The thresholds of the filtered path with rows split over `splits` programs: the first pass,
    then the top-k and top-p searches, a fixed number of passes each (the host does not wait to
    see which rows are done; a pass over rows that are all done measures nothing). Returns the
    rows' state (floats [rows, 4], keys [rows, 3]) for the draw."""
    device = rows_logits.device
    slots = rows * splits
    part_max = torch.empty(slots, dtype=torch.float32, device=device)
    part_sum = torch.empty(slots, dtype=torch.float32, device=device)
    part_min_key = torch.empty(slots, dtype=torch.int32, device=device)
    state_float = torch.empty(rows, 4, dtype=torch.float32, device=device)
    state_key = torch.empty(rows, 3, dtype=torch.int64, device=device)
    block = min(tile, 1024)
    splits_pow2 = triton.next_power_of_2(splits)
    _filter_stats_kernel[(row_blocks, splits)](
        rows_logits, temperature_rows, part_max, part_sum, part_min_key,
        rows, vocab, splits, span, scalar_temperature,
        ROWS=rows_per_program, BLOCK=block, PER_ROW=per_row)
    use_top_k, use_top_p = top_k > 0, top_p < 1.0
    _filter_begin_kernel[(row_blocks,)](
        part_max, part_sum, part_min_key, temperature_rows, state_float, state_key,
        rows, splits, scalar_temperature, top_k, top_p, min_p,
        ROWS=rows_per_program, SPLITS_POW2=splits_pow2, PER_ROW=per_row, USE_TOP_K=use_top_k,
        USE_TOP_P=use_top_p)
    if not (use_top_k or use_top_p):
        return state_float, state_key
    part_count = torch.empty(slots * PIVOTS, dtype=torch.float32, device=device)
    part_mass = torch.empty(slots * PIVOTS, dtype=torch.float32, device=device)
    # The update holds [rows, splits, PIVOTS] sums; rows as many as fit 2^16 of them.
    update_rows = max(1, min(rows_per_program, (1 << 16) // (splits_pow2 * PIVOTS)))
    update_blocks = -(-rows // update_rows)
    for counting in (True, False):
        if not (use_top_k if counting else use_top_p):
            continue
        for step in range(_SEARCH_PASSES):
            _filter_pass_kernel[(row_blocks, splits)](
                rows_logits, temperature_rows, state_float, state_key, part_count, part_mass,
                rows, vocab, splits, span, scalar_temperature,
                ROWS=rows_per_program, BLOCK=pass_block, PER_ROW=per_row, PIVOTS_=PIVOTS)
            _filter_update_kernel[(update_blocks,)](
                part_count, part_mass, state_float, state_key, rows, splits, top_p,
                ROWS=update_rows, SPLITS_POW2=splits_pow2, PIVOTS_=PIVOTS, COUNTING=counting,
                START_TOP_P=counting and step == _SEARCH_PASSES - 1 and use_top_p)
    return state_float, state_key
