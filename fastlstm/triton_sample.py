"""Fused sampling in Triton: Gumbel-max with counter-based Philox noise.

Drawing token j with probability softmax(z / T)_j is the same as taking argmax_j(z_j / T + g_j)
with independent Gumbel noise g_j, or argmax_j(z_j + T * g_j) for T > 0; with T = 0 the same
expression is the exact argmax, so greedy rows need no branch. The noise for token j of row r
comes from Philox keyed by the call's seed with counter (r, j), so it does not depend on how the
row is split over programs.

Common case (no top-k / top-p): a row is split over `splits` programs (enough programs to fill
the GPU when there are few rows); each keeps its best (key, index) and a second small kernel
takes the argmax over the splits. With top-k / top-p one program owns a row: a bisection over
the logits' order-preserving integer keys finds the k-th largest logit (counting) and then the
top-p cut (summing weights), 32 passes at most each; no sort.

Bad rows give token -1 and an error code; the caller turns them into an error (at once on the
CPU, at the next `check_tokens` on CUDA: see fastlstm/sampling.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Error codes, as in csrc/sample_cpu.h.
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
    tokens_ptr,
    # sizes
    rows, vocab, splits, span, counters_per_row, scalar_temperature,
    # meta-parameters
    ROWS: tl.constexpr, QUARTER: tl.constexpr, PER_ROW: tl.constexpr, FINAL: tl.constexpr,
):
    """Program (row block, split): per row, the best Gumbel key and its index over the tokens
    [split * span, + span). A tile is ROWS x (4 * QUARTER): one Philox call per 4 tokens."""
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
            key = tl.where(z == z, z + t[:, None] * noise, -float("inf"))
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
def _sample_reduce_kernel(part_key_ptr, part_index_ptr, part_error_ptr, tokens_ptr, splits,
                          SPLITS_POW2: tl.constexpr):
    """Program row: the argmax over its splits (the first index on ties) and the row's error."""
    row = tl.program_id(0)
    lane = tl.arange(0, SPLITS_POW2)
    inside = lane < splits
    key = tl.load(part_key_ptr + row * splits + lane, mask=inside, other=-float("inf"))
    index = tl.load(part_index_ptr + row * splits + lane, mask=inside, other=2147483647)
    error = tl.max(tl.load(part_error_ptr + row * splits + lane, mask=inside, other=0), axis=0)
    best = tl.max(key, axis=0)
    best_index = tl.min(tl.where(key == best, index, 2147483647), axis=0)
    error = tl.where((error == 0) & (best == -float("inf")), 2, error)
    tl.store(tokens_ptr + row, tl.where(error == 0, best_index, -1).to(tl.int64))


@triton.jit
def _mass_at_least(row_ptr, row_inside, vocab, threshold_key, row_max, inv_t,
                   COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: the count (COUNT) or the weight sum exp((z - max) / T) of the tokens whose key is
    >= threshold_key[row]."""
    total = tl.zeros(row_max.shape, tl.float32)
    for start in range(0, vocab, BLOCK):
        index = start + tl.arange(0, BLOCK)[None, :]
        inside = row_inside[:, None] & (index < vocab)
        z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
        kept = (_ordered_key(z) >= threshold_key[:, None]) & inside
        if COUNT:
            total += tl.sum(kept.to(tl.float32), axis=1)
        else:
            # Rows past the end (and all -inf rows, an error anyway) have max -inf: shift by 0.
            shift = tl.where(row_max > -float("inf"), row_max, 0.0)
            weight = tl.exp((z - shift[:, None]) * inv_t[:, None])
            total += tl.sum(tl.where(kept, weight, 0.0), axis=1)
    return total


@triton.jit
def _largest_key_with_mass(row_ptr, row_inside, vocab, low, high, target, row_max, inv_t,
                           COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, the largest integer key in [low, high] whose mass (count or weight) is still
    >= target; the mass does not increase with the key, and mass(low) >= target is assumed.
    32 halvings cover the whole int32 range."""
    for _ in range(32):
        mid = low + (high - low + 1) // 2
        enough = _mass_at_least(row_ptr, row_inside, vocab, mid.to(tl.int32), row_max, inv_t,
                                COUNT, BLOCK) >= target
        low = tl.where(enough, mid, low)
        high = tl.where(enough, high, mid - 1)
    return low


@triton.jit
def _sample_filtered_kernel(
    # pointers
    logits_ptr, temperature_ptr, seed_ptr, tokens_ptr,
    # sizes and settings
    rows, vocab, counters_per_row, scalar_temperature, top_k, top_p,
    # meta-parameters
    ROWS: tl.constexpr, QUARTER: tl.constexpr, PER_ROW: tl.constexpr,
    USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
):
    """Program (row block): thresholds for top-k then top-p by bisection, then Gumbel-max over
    the tokens at or above them."""
    BLOCK: tl.constexpr = 4 * QUARTER
    rows_index = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_inside = rows_index < rows
    t = _row_temperature(temperature_ptr, scalar_temperature, rows_index, row_inside, PER_ROW)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)  # T = 0: any weights do; the argmax is always kept
    row_ptr = logits_ptr + rows_index.to(tl.int64)[:, None] * vocab
    row_max = tl.full((ROWS,), -float("inf"), tl.float32)
    nan_seen = tl.zeros((ROWS,), tl.int32)
    for start in range(0, vocab, BLOCK):
        index = start + tl.arange(0, BLOCK)[None, :]
        inside = row_inside[:, None] & (index < vocab)
        z = tl.load(row_ptr + index, mask=inside, other=-float("inf")).to(tl.float32)
        nan_seen = tl.maximum(nan_seen, tl.max((z != z).to(tl.int32), axis=1))
        row_max = tl.maximum(row_max, tl.max(tl.where(z == z, z, -float("inf")), axis=1))
    low = tl.full((ROWS,), -2147483648, tl.int64)
    high = _ordered_key(row_max).to(tl.int64)
    if USE_TOP_K:
        low = _largest_key_with_mass(row_ptr, row_inside, vocab, low, high, top_k * 1.0, row_max,
                                     inv_t, True, BLOCK)
    if USE_TOP_P:
        kept_mass = _mass_at_least(row_ptr, row_inside, vocab, low.to(tl.int32), row_max, inv_t,
                                   False, BLOCK)
        low = _largest_key_with_mass(row_ptr, row_inside, vocab, low, high, top_p * kept_mass,
                                     row_max, inv_t, False, BLOCK)
    threshold = low.to(tl.int32)
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
            kept = inside & (z == z) & (_ordered_key(z) >= threshold[:, None])
            key = tl.where(kept, z + t[:, None] * noise, -float("inf"))
            best_key, best_index = _tile_best(key, index, best_key, best_index)
    error = tl.where(nan_seen > 0, 1, tl.where(row_max == float("inf"), 3,
                                               tl.where(row_max == -float("inf"), 2, 0)))
    if PER_ROW:
        error = tl.where((t >= 0) & (t < float("inf")), error, 4)
    tl.store(tokens_ptr + rows_index, tl.where(error == 0, best_index, -1).to(tl.int64),
             mask=row_inside)


def _programs_per_row(row_blocks: int, tiles: int, device: torch.device) -> int:
    """Splits per row block: enough programs to fill the GPU (about 4 per SM) when rows are few."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2  # the interpreter: a few splits, so the two-stage path is exercised
    return max(1, min(tiles, -(-4 * sms // max(row_blocks, 1))))


def triton_sample(logits: torch.Tensor, temperature, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """logits [..., V] float32/float16/bfloat16; temperature float or tensor [...] -> int64 [...]
    (-1 marks a bad row; the caller raises). Arguments are checked by fastlstm.sample."""
    # Triton launches on the current CUDA device, whatever device the pointers belong to.
    if (logits.is_cuda and not torch.compiler.is_compiling()
            and logits.device.index != torch.cuda.current_device()):
        with torch.cuda.device(logits.device):
            return _sample(logits, temperature, top_k, top_p, generator)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(logits, temperature, top_k, top_p, generator):
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
    if use_top_k or use_top_p:
        _sample_filtered_kernel[(row_blocks,)](
            rows_logits, temperature_rows, seed, tokens, rows, vocab, counters_per_row,
            scalar_temperature, top_k, top_p,
            ROWS=rows_per_program, QUARTER=quarter, PER_ROW=per_row, USE_TOP_K=use_top_k, USE_TOP_P=use_top_p)
        return tokens.reshape(batch_shape)
    splits = _programs_per_row(row_blocks, tiles, logits.device)
    span = -(-tiles // splits) * tile
    splits = -(-vocab // span)
    if splits == 1:
        _sample_split_kernel[(row_blocks, 1)](
            rows_logits, temperature_rows, seed, tokens, tokens, tokens, tokens,
            rows, vocab, 1, span, counters_per_row, scalar_temperature,
            ROWS=rows_per_program, QUARTER=quarter, PER_ROW=per_row, FINAL=True)
        return tokens.reshape(batch_shape)
    part_key = torch.empty(rows * splits, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(rows * splits, dtype=torch.int32, device=logits.device)
    part_error = torch.empty(rows * splits, dtype=torch.int32, device=logits.device)
    _sample_split_kernel[(row_blocks, splits)](
        rows_logits, temperature_rows, seed, part_key, part_index, part_error, tokens,
        rows, vocab, splits, span, counters_per_row, scalar_temperature,
        ROWS=rows_per_program, QUARTER=quarter, PER_ROW=per_row, FINAL=False)
    _sample_reduce_kernel[(rows,)](part_key, part_index, part_error, tokens, splits,
                                   SPLITS_POW2=triton.next_power_of_2(splits))
    return tokens.reshape(batch_shape)
