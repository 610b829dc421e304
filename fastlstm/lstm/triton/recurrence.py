"""Backend "triton": the LSTM recurrence fused in Triton, forward and backward.

The two ops follow the contract of fastlstm/lstm/recurrence.py exactly (row layout, packed batch
sizes, reverse, save, projection, accumulation dtype):

  fastlstm_triton::recurrence_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, save,
                                      zoneout_h=0, zoneout_c=0, zoneout_seed=None,
                                      zoneout_expected=False)
      -> (out, h_n, c_n, gates, cells)
  fastlstm_triton::recurrence_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr,
                                       gates, cells, reverse, zoneout_h=0, zoneout_c=0,
                                       zoneout_seed=None, zoneout_expected=False)
      -> (grad_xg, grad_h0, grad_c0, grad_h_total)

The input projection before the recurrence and the weight gradients after it are single large
GEMMs done by torch (see stack.py and recurrence.make_backward); only the sequential part runs
here. Two kernel designs (DESIGN.md, "GPU kernel designs"):

* step-fused: one launch per time step. Each program owns a (batch tile, hidden tile), computes
  h_prev @ W_hh^T for all four gates of its hidden units with tl.dot (fp32 accumulation) and
  fuses the pointwise cell update. Any hidden size.
* sequence-fused: one launch for all steps. Each program owns a batch tile and the whole hidden
  state (H and P up to SEQUENCE_MAX_SIZE = 64 after padding to powers of two), loops over time
  inside the kernel and reads W_hh every step (from shared memory or L2). Programs never wait on
  each other, so it also runs under TRITON_INTERPRET=1.

Zoneout (the zoneout_* arguments of both ops, see _recurrence) runs inside every kernel: the
masks come from the counter-based hash of csrc/common/cell.h, evaluated where each element is used, in
the forward and again in the backward, so no mask goes through memory.

`select_design` picks between them by shape; `DESIGN` forces one (tests use it to cover both).
Supported dtypes: float32, float16, bfloat16 on CUDA (fp32 accumulation, fp32 cell state) and
float64 (fp64 accumulation); float32 and float64 on the CPU under the interpreter.
"""

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import recurrence as _recurrence

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # older Triton 3.x releases keep it in the autotuner module
    from triton.runtime.autotuner import OutOfResources

# "auto" lets select_design choose; "step" or "sequence" forces a design (used by tests).
DESIGN = "auto"

# The sequence-fused kernel keeps [batch tile, H] and [batch tile, P] state in registers and
# holds the four [P, H] gate tiles of W_hh on chip across steps. Compiled for sm_90 (ptxas
# report, BLOCK_B=16, 8 warps): H = P = 32 needs 112-178 registers and no spills; H = P = 64
# spills (up to 6.7 KB of stack per thread in the fp32 forward) but fits in shared memory
# (135 KB); H = P = 128 needs 540 KB of shared memory and cannot launch. Hence 64.
SEQUENCE_MAX_SIZE = 64
# Warps per sequence-fused program: 8 halves the registers per thread against 4 (the 32-wide
# kernels spill with 4 warps and not with 8, in the same ptxas report).
SEQUENCE_NUM_WARPS = 8

# tl.dot needs every tile dimension >= 16 on the GPU, so tiles are padded (and masked) up to it.
MIN_TILE = 16


# ----------------------------------------------------------------------------------------------
# Cell arithmetic, written once for all kernels. exp-based forms work in fp32 and fp64 alike
# (tl has no tanh in every Triton 3.x release) and saturate cleanly: exp overflow gives 0 or 1.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


# Zoneout: the counter-based hash of csrc/common/cell.h and recurrence.zoneout_keep, in uint32.
@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x1B873593, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _zoneout_weight(rows, cols, units, key, threshold, prob_ptr, EXPECTED: tl.constexpr):
    """Keep weights k [rows, cols] of one zoneout mask: 1 where
    hash32(hash32(e ^ key) + key) < threshold with e = row * units + col (mod 2^32), else 0; with
    EXPECTED the probability itself (a scalar read from prob_ptr, in the accumulation dtype).
    `key` and `threshold` arrive as int32 holding the uint32 bits."""
    if EXPECTED:
        k = tl.load(prob_ptr)
    else:
        element = (rows.to(tl.int64)[:, None] * units + cols[None, :]).to(tl.uint32)
        key_bits = key.to(tl.uint32, bitcast=True)
        u = _hash32(_hash32(element ^ key_bits) + key_bits)
        k = tl.where(u < threshold.to(tl.uint32, bitcast=True), 1.0, 0.0)
    return k


# ----------------------------------------------------------------------------------------------
# Step-fused design: forward.
# ----------------------------------------------------------------------------------------------

# Per-step integer arguments (first row, live rows, ...) take a new value at almost every step,
# and the sequence kernels' T and B at almost every call. Triton specializes integer arguments
# equal to 1 or divisible by 16 (one more compiled kernel for each such case), so these are
# listed in do_not_specialize: one compiled kernel serves every step. Sizes that are fixed for
# a layer (H, P) stay specialized.
# The zoneout keys (a new seed every forward) and thresholds are not specialized either.
_ZONEOUT_ARGS = ["zkey_h", "zthr_h", "zkey_c", "zthr_c"]


@triton.jit(do_not_specialize=["offset", "live", "prev_offset", "prev_live"] + _ZONEOUT_ARGS)
def _lstm_fwd_step_kernel(
    # pointers
    xg_ptr, w_hh_ptr, h0_ptr, out_ptr, h_n_ptr, c_state_ptr, r_ptr, gates_ptr, cells_ptr,
    zprob_ptr,
    # this step: first row and live rows; the previous visited step's rows (h_prev source)
    offset, live, prev_offset, prev_live,
    # sizes
    H, P,
    # zoneout keys and thresholds (see _zoneout_weight)
    zkey_h, zthr_h, zkey_c, zthr_c,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_PROJ: tl.constexpr, SAVE: tl.constexpr,
    ZONEOUT_H: tl.constexpr, ZONEOUT_C: tl.constexpr, ZONEOUT_EXPECTED: tl.constexpr,
):
    """One time step for a (batch tile, hidden tile): gates, c update, r = o * tanh(c).

    h_prev of row b is out[prev_offset + b] when b < prev_live (that row was updated at the
    previous visited step), else h0[b] (its sequence has not started yet). Reading the previous
    step's output rows and writing this step's rows is the double buffer that keeps programs from
    racing: no program reads memory another program of the same launch writes. The cell state
    c_state[b, j] is read and written only by the program that owns (b, j).
    Without projection h = r is written to out and h_n here; with it, r goes to r_ptr and
    _lstm_fwd_proj_kernel finishes the step. Zoneout mixes c with c_prev here, and h with its
    previous value h_n[b] (the row's h at its previous live step, or h0) where h is finished.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    acc_dtype = c_state_ptr.dtype.element_ty
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    b_live = b < live
    j_ok = j < H
    from_prev = b_live & (b < prev_live)
    from_h0 = b_live & (b >= prev_live)
    prev_rows = (prev_offset + b).to(tl.int64)
    state_rows = b.to(tl.int64)

    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_dtype)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_dtype)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_dtype)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_dtype)
    # Rows gate * H + j of W_hh, [1, BLOCK_H] each; row * P in int64 (4 * H * P can pass 2^31).
    w_rows = j.to(tl.int64)
    w_i = w_hh_ptr + w_rows[None, :] * P
    w_f = w_hh_ptr + (w_rows + H)[None, :] * P
    w_g = w_hh_ptr + (w_rows + 2 * H)[None, :] * P
    w_o = w_hh_ptr + (w_rows + 3 * H)[None, :] * P
    for k0 in range(0, P, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < P
        # The two masks are disjoint, so the sum is whichever load was live (exact).
        h_prev = tl.load(out_ptr + prev_rows[:, None] * P + k[None, :],
                         mask=from_prev[:, None] & k_ok[None, :], other=0.0)
        h_prev += tl.load(h0_ptr + state_rows[:, None] * P + k[None, :],
                          mask=from_h0[:, None] & k_ok[None, :], other=0.0)
        # W_hh[gate * H + j, k] viewed as [BLOCK_K, BLOCK_H] for each gate.
        w_mask = k_ok[:, None] & j_ok[None, :]
        acc_i += tl.dot(h_prev, tl.load(w_i + k[:, None], mask=w_mask, other=0.0),
                        input_precision="ieee")
        acc_f += tl.dot(h_prev, tl.load(w_f + k[:, None], mask=w_mask, other=0.0),
                        input_precision="ieee")
        acc_g += tl.dot(h_prev, tl.load(w_g + k[:, None], mask=w_mask, other=0.0),
                        input_precision="ieee")
        acc_o += tl.dot(h_prev, tl.load(w_o + k[:, None], mask=w_mask, other=0.0),
                        input_precision="ieee")

    rows = (offset + b).to(tl.int64)
    mask = b_live[:, None] & j_ok[None, :]
    xg_tile = xg_ptr + rows[:, None] * (4 * H) + j[None, :]
    in_gate = _sigmoid(acc_i + tl.load(xg_tile, mask=mask, other=0.0).to(acc_dtype))
    forget_gate = _sigmoid(acc_f + tl.load(xg_tile + H, mask=mask, other=0.0).to(acc_dtype))
    cell_gate = _tanh(acc_g + tl.load(xg_tile + 2 * H, mask=mask, other=0.0).to(acc_dtype))
    out_gate = _sigmoid(acc_o + tl.load(xg_tile + 3 * H, mask=mask, other=0.0).to(acc_dtype))

    state_tile = state_rows[:, None] * H + j[None, :]
    c_prev = tl.load(c_state_ptr + state_tile, mask=mask, other=0.0)
    c_new = forget_gate * c_prev + in_gate * cell_gate
    r = out_gate * _tanh(c_new)
    if ZONEOUT_C:
        k_c = _zoneout_weight(rows, j, H, zkey_c, zthr_c, zprob_ptr + 1, ZONEOUT_EXPECTED)
        c_new = k_c * c_prev + (1.0 - k_c) * c_new
    tl.store(c_state_ptr + state_tile, c_new, mask=mask)
    if SAVE:
        gates_tile = gates_ptr + rows[:, None] * (4 * H) + j[None, :]
        tl.store(gates_tile, in_gate, mask=mask)
        tl.store(gates_tile + H, forget_gate, mask=mask)
        tl.store(gates_tile + 2 * H, cell_gate, mask=mask)
        tl.store(gates_tile + 3 * H, out_gate, mask=mask)
        tl.store(cells_ptr + rows[:, None] * H + j[None, :], c_new, mask=mask)
    if HAS_PROJ:
        tl.store(r_ptr + state_tile, r, mask=mask)
    else:
        if ZONEOUT_H:
            k_h = _zoneout_weight(rows, j, H, zkey_h, zthr_h, zprob_ptr, ZONEOUT_EXPECTED)
            h_prev_own = tl.load(h_n_ptr + state_tile, mask=mask, other=0.0).to(acc_dtype)
            r = k_h * h_prev_own + (1.0 - k_h) * r
        h_new = r.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * H + j[None, :], h_new, mask=mask)
        tl.store(h_n_ptr + state_tile, h_new, mask=mask)


@triton.jit(do_not_specialize=["offset", "live", "zkey_h", "zthr_h"])
def _lstm_fwd_proj_kernel(
    # pointers
    r_ptr, w_hr_ptr, out_ptr, h_n_ptr, zprob_ptr,
    # this step
    offset, live,
    # sizes
    H, P,
    # zoneout of h
    zkey_h, zthr_h,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    ZONEOUT_H: tl.constexpr, ZONEOUT_EXPECTED: tl.constexpr,
):
    """Second launch of a projected step: h = r @ W_hr^T for a (batch tile, projection tile).

    It needs all H columns of r, which other programs of the first launch produce, hence a
    separate launch rather than a sync inside one.
    """
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    acc_dtype = r_ptr.dtype.element_ty
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    b_live = b < live
    p_ok = p < P
    state_rows = b.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=acc_dtype)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        r = tl.load(r_ptr + state_rows[:, None] * H + k[None, :],
                    mask=b_live[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_hr_ptr + p.to(tl.int64)[None, :] * H + k[:, None],
                    mask=k_ok[:, None] & p_ok[None, :], other=0.0).to(acc_dtype)
        acc += tl.dot(r, w, input_precision="ieee")
    mask = b_live[:, None] & p_ok[None, :]
    rows = (offset + b).to(tl.int64)
    if ZONEOUT_H:  # h_n[b] holds the row's previous h; only this program reads or writes it
        k_h = _zoneout_weight(rows, p, P, zkey_h, zthr_h, zprob_ptr, ZONEOUT_EXPECTED)
        h_prev = tl.load(h_n_ptr + state_rows[:, None] * P + p[None, :], mask=mask,
                         other=0.0).to(acc_dtype)
        acc = k_h * h_prev + (1.0 - k_h) * acc
    h_new = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * P + p[None, :], h_new, mask=mask)
    tl.store(h_n_ptr + state_rows[:, None] * P + p[None, :], h_new, mask=mask)


# ----------------------------------------------------------------------------------------------
# Step-fused design: backward (the reverse recurrence).
# ----------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["offset", "live", "prev_live", "zkey_h", "zthr_h"])
def _lstm_bwd_dh_kernel(
    # pointers
    dpre_prev_ptr, w_hh_ptr, dh_state_ptr, grad_out_ptr, dh_row_ptr, grad_h_total_ptr,
    zprob_ptr,
    # this step (live rows; live = 0 for the final launch) and the previous visited step
    offset, live, prev_live,
    # sizes
    H, P,
    # zoneout of h
    zkey_h, zthr_h,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    ZONEOUT_H: tl.constexpr, ZONEOUT_EXPECTED: tl.constexpr,
):
    """First launch of a projected backward step, for a (batch tile, projection tile).

    Rows live at the previous visited step get dh = dpre_prev @ W_hh, stored in dh_state (it
    becomes grad_h0 for rows whose sequence is done). Live rows then take
    dh_row = dh + grad_out, the whole gradient reaching h, written to grad_h_total and to
    dh_row_ptr for the pointwise launch, which needs all P columns of it for dr = dh_row @ W_hr.
    Zoneout of h splits dh_row: (1 - k) dh_row reaches h_new (written out), k dh_row reaches
    h_prev; that carry waits in dh_state, to be added to dh when the next launch finishes it.
    """
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    acc_dtype = dh_state_ptr.dtype.element_ty
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    b_prev = b < prev_live
    b_live = b < live
    p_ok = p < P
    state_rows = b.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=acc_dtype)
    for k0 in range(0, 4 * H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < 4 * H
        dpre = tl.load(dpre_prev_ptr + state_rows[:, None] * (4 * H) + k[None, :],
                       mask=b_prev[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_hh_ptr + k.to(tl.int64)[:, None] * P + p[None, :],
                    mask=k_ok[:, None] & p_ok[None, :], other=0.0).to(acc_dtype)
        acc += tl.dot(dpre, w, input_precision="ieee")
    state_tile = dh_state_ptr + state_rows[:, None] * P + p[None, :]
    if ZONEOUT_H:  # the previous launch's carry k dh_row of these rows
        acc += tl.load(state_tile, mask=b_prev[:, None] & p_ok[None, :], other=0.0)
    tl.store(state_tile, acc, mask=b_prev[:, None] & p_ok[None, :])
    dh = tl.where(b_prev[:, None], acc,
                  tl.load(state_tile, mask=(b_live & ~b_prev)[:, None] & p_ok[None, :], other=0.0))
    mask = b_live[:, None] & p_ok[None, :]
    rows = (offset + b).to(tl.int64)
    grad_out = tl.load(grad_out_ptr + rows[:, None] * P + p[None, :], mask=mask, other=0.0)
    dh_row = dh + grad_out.to(acc_dtype)
    if ZONEOUT_H:
        k_h = _zoneout_weight(rows, p, P, zkey_h, zthr_h, zprob_ptr, ZONEOUT_EXPECTED)
        tl.store(state_tile, k_h * dh_row, mask=mask)
        dh_row = (1.0 - k_h) * dh_row
    tl.store(dh_row_ptr + state_rows[:, None] * P + p[None, :], dh_row, mask=mask)
    tl.store(grad_h_total_ptr + rows[:, None] * P + p[None, :],
             dh_row.to(grad_h_total_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["offset", "live", "prev_live", "c_prev_offset", "c_prev_live"]
            + _ZONEOUT_ARGS)
def _lstm_bwd_step_kernel(
    # pointers
    grad_out_ptr, dh_row_ptr, w_hr_ptr, dpre_prev_ptr, w_hh_ptr, dh_state_ptr, dc_state_ptr,
    gates_ptr, cells_ptr, c0_ptr, grad_xg_ptr, dpre_ptr, zprob_ptr,
    # this step, the previous visited step (for dh), the previous forward step (for c_prev)
    offset, live, prev_live, c_prev_offset, c_prev_live,
    # sizes
    H, P,
    # zoneout keys and thresholds (see _zoneout_weight)
    zkey_h, zthr_h, zkey_c, zthr_c,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    ZONEOUT_H: tl.constexpr, ZONEOUT_C: tl.constexpr, ZONEOUT_EXPECTED: tl.constexpr,
):
    """One reverse step for a (batch tile, hidden tile): dpre of the four gates, dc update.

    Without projection (P == H) this program also finishes the previous visited step's
    dh = dpre_prev @ W_hh for its columns, reading dpre_prev from one buffer while the launch
    writes this step's dpre to the other (double buffer: no program reads what another writes).
    With projection, dh_row comes from _lstm_bwd_dh_kernel and dr = dh_row @ W_hr is done here.
    Zoneout: without projection the carry k_h dh_row waits in dh_state as in
    _lstm_bwd_dh_kernel; c = f c_prev + i g is recomputed (cells hold the mixed state) and dc
    splits into (1 - k_c) dc through the cell and k_c dc straight to c_prev.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    acc_dtype = dc_state_ptr.dtype.element_ty
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    b_live = b < live
    j_ok = j < H
    state_rows = b.to(tl.int64)
    rows = (offset + b).to(tl.int64)
    mask = b_live[:, None] & j_ok[None, :]

    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_dtype)
    if HAS_PROJ:
        for k0 in range(0, P, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < P
            dh_row = tl.load(dh_row_ptr + state_rows[:, None] * P + k[None, :],
                             mask=b_live[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_hr_ptr + k.to(tl.int64)[:, None] * H + j[None, :],
                        mask=k_ok[:, None] & j_ok[None, :], other=0.0).to(acc_dtype)
            acc += tl.dot(dh_row, w, input_precision="ieee")
        dr = acc
    else:
        b_prev = b < prev_live
        for k0 in range(0, 4 * H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < 4 * H
            dpre_prev = tl.load(dpre_prev_ptr + state_rows[:, None] * (4 * H) + k[None, :],
                                mask=b_prev[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_hh_ptr + k.to(tl.int64)[:, None] * H + j[None, :],
                        mask=k_ok[:, None] & j_ok[None, :], other=0.0).to(acc_dtype)
            acc += tl.dot(dpre_prev, w, input_precision="ieee")
        state_tile = dh_state_ptr + state_rows[:, None] * H + j[None, :]
        if ZONEOUT_H:  # the previous launch's carry k dh_row of these rows
            acc += tl.load(state_tile, mask=b_prev[:, None] & j_ok[None, :], other=0.0)
        tl.store(state_tile, acc, mask=b_prev[:, None] & j_ok[None, :])
        dh = tl.where(b_prev[:, None], acc,
                      tl.load(state_tile, mask=(b_live & ~b_prev)[:, None] & j_ok[None, :],
                              other=0.0))
        grad_out = tl.load(grad_out_ptr + rows[:, None] * H + j[None, :], mask=mask, other=0.0)
        dr = dh + grad_out.to(acc_dtype)
        if ZONEOUT_H:
            k_h = _zoneout_weight(rows, j, H, zkey_h, zthr_h, zprob_ptr, ZONEOUT_EXPECTED)
            tl.store(state_tile, k_h * dr, mask=mask)
            dr = (1.0 - k_h) * dr

    gates_tile = gates_ptr + rows[:, None] * (4 * H) + j[None, :]
    in_gate = tl.load(gates_tile, mask=mask, other=0.0)
    forget_gate = tl.load(gates_tile + H, mask=mask, other=0.0)
    cell_gate = tl.load(gates_tile + 2 * H, mask=mask, other=0.0)
    out_gate = tl.load(gates_tile + 3 * H, mask=mask, other=0.0)
    c = tl.load(cells_ptr + rows[:, None] * H + j[None, :], mask=mask, other=0.0)
    prev_mask = b_live & (b < c_prev_live)
    c_prev = tl.load(cells_ptr + (c_prev_offset + b).to(tl.int64)[:, None] * H + j[None, :],
                     mask=prev_mask[:, None] & j_ok[None, :], other=0.0)
    c_prev += tl.load(c0_ptr + state_rows[:, None] * H + j[None, :],
                      mask=(b_live & ~prev_mask)[:, None] & j_ok[None, :], other=0.0).to(acc_dtype)
    dc_tile = dc_state_ptr + state_rows[:, None] * H + j[None, :]
    dc = tl.load(dc_tile, mask=mask, other=0.0)
    dc_next = dc
    if ZONEOUT_C:
        c = forget_gate * c_prev + in_gate * cell_gate  # c_new, before the mix
        k_c = _zoneout_weight(rows, j, H, zkey_c, zthr_c, zprob_ptr + 1, ZONEOUT_EXPECTED)
        dc_next = (1.0 - k_c) * dc

    tanh_c = _tanh(c)
    dc_total = dc_next + dr * out_gate * (1.0 - tanh_c * tanh_c)
    d_in = dc_total * cell_gate * in_gate * (1.0 - in_gate)
    d_forget = dc_total * c_prev * forget_gate * (1.0 - forget_gate)
    d_cell = dc_total * in_gate * (1.0 - cell_gate * cell_gate)
    d_out = dr * tanh_c * out_gate * (1.0 - out_gate)
    dc_prev = dc_total * forget_gate
    if ZONEOUT_C:
        dc_prev += k_c * dc
    tl.store(dc_tile, dc_prev, mask=mask)

    out_dtype = grad_xg_ptr.dtype.element_ty
    grad_tile = grad_xg_ptr + rows[:, None] * (4 * H) + j[None, :]
    tl.store(grad_tile, d_in.to(out_dtype), mask=mask)
    tl.store(grad_tile + H, d_forget.to(out_dtype), mask=mask)
    tl.store(grad_tile + 2 * H, d_cell.to(out_dtype), mask=mask)
    tl.store(grad_tile + 3 * H, d_out.to(out_dtype), mask=mask)
    dpre_tile = dpre_ptr + state_rows[:, None] * (4 * H) + j[None, :]
    tl.store(dpre_tile, d_in, mask=mask)
    tl.store(dpre_tile + H, d_forget, mask=mask)
    tl.store(dpre_tile + 2 * H, d_cell, mask=mask)
    tl.store(dpre_tile + 3 * H, d_out, mask=mask)


# ----------------------------------------------------------------------------------------------
# Sequence-fused design: one launch for all steps.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _step_rows(t, T, B, offsets_ptr, lives_ptr, PACKED: tl.constexpr):
    """(first row, live rows) of time step t; (0, 0) when t is outside [0, T)."""
    if PACKED:
        # The tables carry one zero entry on each side, so t = -1 and t = T read (0, 0).
        offset = tl.load(offsets_ptr + t + 1)
        live = tl.load(lives_ptr + t + 1)
    else:
        inside = (t >= 0) & (t < T)
        offset = tl.where(inside, t.to(tl.int64) * B, 0)
        live = tl.where(inside, B, 0)
    return offset, live


@triton.jit(do_not_specialize=["T", "B"] + _ZONEOUT_ARGS)
def _lstm_fwd_sequence_kernel(
    # pointers
    xg_ptr, w_hh_ptr, w_hr_ptr, h0_ptr, c0_ptr, out_ptr, h_n_ptr, c_n_ptr, gates_ptr, cells_ptr,
    offsets_ptr, lives_ptr, zprob_ptr,
    # sizes
    T, B, H, P,
    # zoneout keys and thresholds (see _zoneout_weight)
    zkey_h, zthr_h, zkey_c, zthr_c,
    # meta-parameters: HP, PP are H, P padded to powers of two (>= 16)
    BLOCK_B: tl.constexpr, HP: tl.constexpr, PP: tl.constexpr,
    PACKED: tl.constexpr, REVERSE: tl.constexpr, HAS_PROJ: tl.constexpr, SAVE: tl.constexpr,
    ZONEOUT_H: tl.constexpr, ZONEOUT_C: tl.constexpr, ZONEOUT_EXPECTED: tl.constexpr,
):
    """All T steps for one batch tile; h and c stay in registers across steps.

    Padded columns stay exactly zero: their weights and inputs load as 0, so their gates are
    (0.5, 0.5, 0, 0.5) and c, r remain 0.
    """
    pid_b = tl.program_id(0)
    acc_dtype = gates_ptr.dtype.element_ty
    dtype = out_ptr.dtype.element_ty
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.arange(0, HP)
    p = tl.arange(0, PP)
    b_ok = b < B
    j_ok = j < H
    p_ok = p < P
    state_rows = b.to(tl.int64)
    h = tl.load(h0_ptr + state_rows[:, None] * P + p[None, :],
                mask=b_ok[:, None] & p_ok[None, :], other=0.0)
    c = tl.load(c0_ptr + state_rows[:, None] * H + j[None, :],
                mask=b_ok[:, None] & j_ok[None, :], other=0.0).to(acc_dtype)
    # W_hh[gate * H + j, p] viewed as [PP, HP]; W_hr[p, j] viewed as [HP, PP].
    w_tile = w_hh_ptr + j[None, :] * P + p[:, None]
    w_mask = p_ok[:, None] & j_ok[None, :]
    w_hr_tile = w_hr_ptr + p[None, :] * H + j[:, None]
    w_hr_mask = j_ok[:, None] & p_ok[None, :]
    for s in range(0, T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        offset, live = _step_rows(t, T, B, offsets_ptr, lives_ptr, PACKED)
        b_live = b < live
        rows = (offset + b).to(tl.int64)
        mask = b_live[:, None] & j_ok[None, :]
        xg_tile = xg_ptr + rows[:, None] * (4 * H) + j[None, :]
        pre_i = tl.dot(h, tl.load(w_tile, mask=w_mask, other=0.0), input_precision="ieee")
        pre_f = tl.dot(h, tl.load(w_tile + H * P, mask=w_mask, other=0.0), input_precision="ieee")
        pre_g = tl.dot(h, tl.load(w_tile + 2 * H * P, mask=w_mask, other=0.0),
                       input_precision="ieee")
        pre_o = tl.dot(h, tl.load(w_tile + 3 * H * P, mask=w_mask, other=0.0),
                       input_precision="ieee")
        in_gate = _sigmoid(pre_i + tl.load(xg_tile, mask=mask, other=0.0).to(acc_dtype))
        forget_gate = _sigmoid(pre_f + tl.load(xg_tile + H, mask=mask, other=0.0).to(acc_dtype))
        cell_gate = _tanh(pre_g + tl.load(xg_tile + 2 * H, mask=mask, other=0.0).to(acc_dtype))
        out_gate = _sigmoid(pre_o + tl.load(xg_tile + 3 * H, mask=mask, other=0.0).to(acc_dtype))
        c_new = forget_gate * c + in_gate * cell_gate
        r = out_gate * _tanh(c_new)
        if HAS_PROJ:
            w_hr = tl.load(w_hr_tile, mask=w_hr_mask, other=0.0).to(acc_dtype)
            h_new = tl.dot(r, w_hr, input_precision="ieee")
        else:
            h_new = r
        if ZONEOUT_C:
            k_c = _zoneout_weight(rows, j, H, zkey_c, zthr_c, zprob_ptr + 1, ZONEOUT_EXPECTED)
            c_new = k_c * c + (1.0 - k_c) * c_new
        if ZONEOUT_H:
            k_h = _zoneout_weight(rows, p, P, zkey_h, zthr_h, zprob_ptr, ZONEOUT_EXPECTED)
            h_new = k_h * h.to(acc_dtype) + (1.0 - k_h) * h_new
        h_new = h_new.to(dtype)
        tl.store(out_ptr + rows[:, None] * P + p[None, :], h_new,
                 mask=b_live[:, None] & p_ok[None, :])
        if SAVE:
            gates_tile = gates_ptr + rows[:, None] * (4 * H) + j[None, :]
            tl.store(gates_tile, in_gate, mask=mask)
            tl.store(gates_tile + H, forget_gate, mask=mask)
            tl.store(gates_tile + 2 * H, cell_gate, mask=mask)
            tl.store(gates_tile + 3 * H, out_gate, mask=mask)
            tl.store(cells_ptr + rows[:, None] * H + j[None, :], c_new, mask=mask)
        c = tl.where(b_live[:, None], c_new, c)
        h = tl.where(b_live[:, None], h_new, h)
    tl.store(h_n_ptr + state_rows[:, None] * P + p[None, :], h,
             mask=b_ok[:, None] & p_ok[None, :])
    tl.store(c_n_ptr + state_rows[:, None] * H + j[None, :], c.to(dtype),
             mask=b_ok[:, None] & j_ok[None, :])


@triton.jit(do_not_specialize=["T", "B"] + _ZONEOUT_ARGS)
def _lstm_bwd_sequence_kernel(
    # pointers
    grad_out_ptr, grad_hn_ptr, grad_cn_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, gates_ptr, cells_ptr,
    grad_xg_ptr, grad_h0_ptr, grad_c0_ptr, grad_h_total_ptr, offsets_ptr, lives_ptr, zprob_ptr,
    # sizes
    T, B, H, P,
    # zoneout keys and thresholds (see _zoneout_weight)
    zkey_h, zthr_h, zkey_c, zthr_c,
    # meta-parameters: HP, PP are H, P padded to powers of two (>= 16)
    BLOCK_B: tl.constexpr, HP: tl.constexpr, PP: tl.constexpr,
    PACKED: tl.constexpr, REVERSE: tl.constexpr, HAS_PROJ: tl.constexpr,
    ZONEOUT_H: tl.constexpr, ZONEOUT_C: tl.constexpr, ZONEOUT_EXPECTED: tl.constexpr,
):
    """The reverse recurrence over all T steps for one batch tile; dh and dc stay in registers."""
    pid_b = tl.program_id(0)
    acc_dtype = gates_ptr.dtype.element_ty
    dtype = grad_xg_ptr.dtype.element_ty
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.arange(0, HP)
    p = tl.arange(0, PP)
    b_ok = b < B
    j_ok = j < H
    p_ok = p < P
    state_rows = b.to(tl.int64)
    dh = tl.load(grad_hn_ptr + state_rows[:, None] * P + p[None, :],
                 mask=b_ok[:, None] & p_ok[None, :], other=0.0).to(acc_dtype)
    dc = tl.load(grad_cn_ptr + state_rows[:, None] * H + j[None, :],
                 mask=b_ok[:, None] & j_ok[None, :], other=0.0).to(acc_dtype)
    # W_hh[gate * H + j, p] viewed as [HP, PP]; W_hr[p, j] viewed as [PP, HP].
    w_tile = w_hh_ptr + j[:, None] * P + p[None, :]
    w_mask = j_ok[:, None] & p_ok[None, :]
    w_hr_tile = w_hr_ptr + p[:, None] * H + j[None, :]
    w_hr_mask = p_ok[:, None] & j_ok[None, :]
    for s in range(0, T):
        # Visit the steps in the opposite order of the forward pass; the forward pass came to
        # step t from step t_prev, whose cells are this step's c_prev.
        if REVERSE:
            t = s
            t_prev = s + 1
        else:
            t = T - 1 - s
            t_prev = t - 1
        offset, live = _step_rows(t, T, B, offsets_ptr, lives_ptr, PACKED)
        prev_offset, prev_live = _step_rows(t_prev, T, B, offsets_ptr, lives_ptr, PACKED)
        b_live = b < live
        rows = (offset + b).to(tl.int64)
        mask = b_live[:, None] & j_ok[None, :]
        p_mask = b_live[:, None] & p_ok[None, :]
        grad_out = tl.load(grad_out_ptr + rows[:, None] * P + p[None, :], mask=p_mask, other=0.0)
        dh_row = dh + grad_out.to(acc_dtype)
        if ZONEOUT_H:  # k dh_row reaches h_prev directly, (1 - k) dh_row reaches h_new
            k_h = _zoneout_weight(rows, p, P, zkey_h, zthr_h, zprob_ptr, ZONEOUT_EXPECTED)
            carry_h = k_h * dh_row
            dh_row = (1.0 - k_h) * dh_row
        if HAS_PROJ:
            tl.store(grad_h_total_ptr + rows[:, None] * P + p[None, :], dh_row.to(dtype),
                     mask=p_mask)
            w_hr = tl.load(w_hr_tile, mask=w_hr_mask, other=0.0).to(acc_dtype)
            dr = tl.dot(dh_row, w_hr, input_precision="ieee")
        else:
            dr = dh_row
        gates_tile = gates_ptr + rows[:, None] * (4 * H) + j[None, :]
        in_gate = tl.load(gates_tile, mask=mask, other=0.0)
        forget_gate = tl.load(gates_tile + H, mask=mask, other=0.0)
        cell_gate = tl.load(gates_tile + 2 * H, mask=mask, other=0.0)
        out_gate = tl.load(gates_tile + 3 * H, mask=mask, other=0.0)
        c = tl.load(cells_ptr + rows[:, None] * H + j[None, :], mask=mask, other=0.0)
        prev_mask = b_live & (b < prev_live)
        c_prev = tl.load(cells_ptr + (prev_offset + b).to(tl.int64)[:, None] * H + j[None, :],
                         mask=prev_mask[:, None] & j_ok[None, :], other=0.0)
        c_prev += tl.load(c0_ptr + state_rows[:, None] * H + j[None, :],
                          mask=(b_live & ~prev_mask)[:, None] & j_ok[None, :],
                          other=0.0).to(acc_dtype)

        dc_next = dc
        if ZONEOUT_C:
            c = forget_gate * c_prev + in_gate * cell_gate  # c_new, before the mix
            k_c = _zoneout_weight(rows, j, H, zkey_c, zthr_c, zprob_ptr + 1, ZONEOUT_EXPECTED)
            dc_next = (1.0 - k_c) * dc

        tanh_c = _tanh(c)
        dc_total = dc_next + dr * out_gate * (1.0 - tanh_c * tanh_c)
        d_in = dc_total * cell_gate * in_gate * (1.0 - in_gate)
        d_forget = dc_total * c_prev * forget_gate * (1.0 - forget_gate)
        d_cell = dc_total * in_gate * (1.0 - cell_gate * cell_gate)
        d_out = dr * tanh_c * out_gate * (1.0 - out_gate)
        dc_prev = dc_total * forget_gate
        if ZONEOUT_C:
            dc_prev += k_c * dc
        grad_tile = grad_xg_ptr + rows[:, None] * (4 * H) + j[None, :]
        tl.store(grad_tile, d_in.to(dtype), mask=mask)
        tl.store(grad_tile + H, d_forget.to(dtype), mask=mask)
        tl.store(grad_tile + 2 * H, d_cell.to(dtype), mask=mask)
        tl.store(grad_tile + 3 * H, d_out.to(dtype), mask=mask)

        dh_new = tl.dot(d_in, tl.load(w_tile, mask=w_mask, other=0.0).to(acc_dtype),
                        input_precision="ieee")
        dh_new += tl.dot(d_forget, tl.load(w_tile + H * P, mask=w_mask, other=0.0).to(acc_dtype),
                         input_precision="ieee")
        dh_new += tl.dot(d_cell,
                         tl.load(w_tile + 2 * H * P, mask=w_mask, other=0.0).to(acc_dtype),
                         input_precision="ieee")
        dh_new += tl.dot(d_out,
                         tl.load(w_tile + 3 * H * P, mask=w_mask, other=0.0).to(acc_dtype),
                         input_precision="ieee")
        if ZONEOUT_H:
            dh_new += carry_h
        dh = tl.where(b_live[:, None], dh_new, dh)
        dc = tl.where(b_live[:, None], dc_prev, dc)
    tl.store(grad_h0_ptr + state_rows[:, None] * P + p[None, :], dh.to(dtype),
             mask=b_ok[:, None] & p_ok[None, :])
    tl.store(grad_c0_ptr + state_rows[:, None] * H + j[None, :], dc.to(dtype),
             mask=b_ok[:, None] & j_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Host side: checks, layout, design choice, launches.
# ----------------------------------------------------------------------------------------------

def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device (and its current stream), whatever device the
    pointers belong to: make the tensor's device current for the launches."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _padded(size: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(max(size, 1)))


def select_design(hidden_size: int, proj_size: int, batch: int) -> str:
    """"sequence" or "step" for a layer of this shape (DESIGN forces one).

    Sequence-fused runs the whole sequence in one launch, so it saves the per-step launch
    latency (3-5 us a launch on the GPU, two launches per step with projection) that dominates
    the step-fused design at small H; but each program holds the whole hidden state and reads all
    of W_hh every step, which only fits on chip for small H and P. Hence: sequence-fused up
    to SEQUENCE_MAX_SIZE (padded), step-fused beyond. The threshold comes from the compiled
    kernels' resource use (see SEQUENCE_MAX_SIZE), not yet from timings on a GPU. Should a
    sequence-fused kernel still not fit a GPU (float64 doubles its shared memory), the launch
    fails before it runs and the step-fused kernels take over (see _run_sequence).
    """
    del batch  # both designs tile the batch; it does not change the choice yet
    if DESIGN not in ("auto", "step", "sequence"):
        raise ValueError(f"fastlstm.lstm.triton.recurrence.DESIGN must be 'auto', 'step' or 'sequence'; "
                         f"got {DESIGN!r}")
    fits = max(_padded(hidden_size), _padded(proj_size)) <= SEQUENCE_MAX_SIZE
    if DESIGN == "sequence":
        if not fits:
            raise ValueError(
                f"the sequence-fused Triton kernel handles hidden_size and proj_size up to "
                f"{SEQUENCE_MAX_SIZE}; got hidden_size={hidden_size}, proj_size={proj_size}")
        return "sequence"
    if DESIGN == "step":
        return "step"
    return "sequence" if fits else "step"


def _step_tiles(batch: int, n: int, k: int):
    """(BLOCK_B, BLOCK_N, BLOCK_K) for a step-fused launch; every tile >= 16 for tl.dot."""
    block_b = min(64, _padded(batch))
    if _interpreted():
        # The interpreter runs programs one after another: fewer, larger tiles are faster.
        return block_b, min(64, _padded(n)), min(64, _padded(k))
    # 64-row batch tiles spill on sm_90 (255 registers and a stack); 32 x 32 x 32 does not.
    return min(32, block_b), min(32, _padded(n)), min(32, _padded(k))


def _sequence_block_b(batch: int) -> int:
    """Batch rows per program of a sequence-fused launch (>= 16 for tl.dot)."""
    # Small tiles give more programs, which the GPU runs in parallel, and fewer registers per
    # program (32-row tiles spill at H = 16 on sm_90); the interpreter runs programs one after
    # another, so there one tile covers more rows.
    return min(_padded(batch), 64 if _interpreted() else MIN_TILE)


# Shapes whose sequence-fused kernel did not fit the GPU: (device, dtype, HP, PP, has_proj).
_SEQUENCE_DOES_NOT_FIT = set()


def _run_sequence(kernel, grid, key, *args, **meta):
    """Launch a sequence-fused kernel; False if it does not fit the GPU (nothing ran then)."""
    if key in _SEQUENCE_DOES_NOT_FIT:
        return False
    num_warps = 4 if _interpreted() else SEQUENCE_NUM_WARPS
    try:
        kernel[grid](*args, **meta, num_warps=num_warps)
    except OutOfResources:  # raised at load time, before the kernel runs
        _SEQUENCE_DOES_NOT_FIT.add(key)
        return False
    return True


_SUPPORTED_CUDA = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUPPORTED_CPU = (torch.float32, torch.float64)


def _check_device_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda":
        supported = _SUPPORTED_CUDA
    elif tensor.device.type == "cpu":
        if not _interpreted():
            raise RuntimeError(
                f"fastlstm_triton: {name} is a CPU tensor, but Triton runs CPU tensors only "
                f"under its interpreter (set TRITON_INTERPRET=1 before triton is imported); use a "
                f"CUDA tensor or another backend")
        supported = _SUPPORTED_CPU
    else:
        raise RuntimeError(f"fastlstm_triton: {name} is on {tensor.device}; the Triton backend "
                           f"runs on CUDA (or the CPU under TRITON_INTERPRET=1)")
    if tensor.dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        raise ValueError(f"fastlstm_triton: {name} has dtype {tensor.dtype}; on "
                         f"{tensor.device.type} the Triton backend supports {names}")


def _check_tensor(name, tensor, shape, dtype, device):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"fastlstm_triton: {name} must be a Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"fastlstm_triton: {name} must have shape {tuple(shape)}, got "
                         f"{tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise ValueError(f"fastlstm_triton: {name} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.device != device:
        raise RuntimeError(f"fastlstm_triton: {name} must be on {device} like the other inputs, "
                           f"got {tensor.device}")
    return tensor.contiguous()


def _layout(batch_sizes: torch.Tensor, num_rows: int, batch: int):
    """Check batch_sizes against the rows; return [(offset, live)] per step in time order."""
    if not isinstance(batch_sizes, torch.Tensor):
        raise TypeError("fastlstm_triton: batch_sizes must be a Tensor (empty for dense input)")
    if batch_sizes.numel() == 0:
        if batch == 0 and num_rows != 0:
            raise ValueError(f"fastlstm_triton: dense input with batch 0 must have 0 rows, got "
                             f"{num_rows}")
        if batch and num_rows % batch:
            raise ValueError(f"fastlstm_triton: dense input (empty batch_sizes) needs a row count "
                             f"divisible by the batch {batch}; got {num_rows} rows")
        return _recurrence.step_layout(None, num_rows, batch)
    if (batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64
            or batch_sizes.device.type != "cpu"):
        raise ValueError(f"fastlstm_triton: batch_sizes must be a 1-D int64 CPU tensor, got "
                         f"{batch_sizes.dim()}-D {batch_sizes.dtype} on {batch_sizes.device}")
    sizes = batch_sizes.tolist()
    if sizes[0] > batch or min(sizes) < 1 or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"fastlstm_triton: batch_sizes must be positive, non-increasing and at "
                         f"most the batch {batch}; got {sizes}")
    if sum(sizes) != num_rows:
        raise ValueError(f"fastlstm_triton: batch_sizes sum to {sum(sizes)} but there are "
                         f"{num_rows} rows")
    return _recurrence.step_layout(batch_sizes, num_rows, batch)


def _step_tables(layout, device):
    """Per-step row offsets and live counts as int32 device tensors, padded with a zero entry on
    each side (see _step_rows).

    While the current CUDA stream is being captured into a graph, the tables are built on the
    device with no copy from host memory: a captured host-to-device copy would replay from a host
    buffer that later calls reuse. One fill per run of equal live counts (live counts never
    increase, so there are at most min(T, B) runs), and the offsets are their cumulative sum.
    """
    offsets = [0] + [offset for offset, _ in layout] + [0]
    lives = [0] + [live for _, live in layout] + [0]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        lives_table = torch.zeros(len(lives), dtype=torch.int32, device=device)
        start = 1
        for end in range(2, len(lives)):
            if lives[end] != lives[start]:
                lives_table[start:end].fill_(lives[start])
                start = end
        offsets_table = torch.zeros_like(lives_table)
        offsets_table[1:-1] = torch.cumsum(lives_table[:-2], 0, dtype=torch.int32)
        return offsets_table, lives_table
    return (torch.tensor(offsets, dtype=torch.int32).to(device),
            torch.tensor(lives, dtype=torch.int32).to(device))


def _check_state_and_weights(dtype, device, batch, hidden, proj, h0, c0, w_hh, w_hr,
                             h0_name="h0"):
    h0 = _check_tensor(h0_name, h0, (batch, proj), dtype, device)
    c0 = _check_tensor("c0", c0, (batch, hidden), dtype, device)
    w_hh = _check_tensor("w_hh", w_hh, (4 * hidden, proj), dtype, device)
    if w_hr is not None:
        w_hr = _check_tensor("w_hr", w_hr, (proj, hidden), dtype, device)
    return h0, c0, w_hh, w_hr


def _zoneout_args(zoneout_h, zoneout_c, zoneout_seed, zoneout_expected, acc, device, dummy):
    """(zprob_ptr, keyword arguments) of the kernels for these zoneout settings.

    Keys and thresholds go as int32 holding their uint32 bits (one argument type whatever the
    seed, so one compiled kernel); the probabilities of evaluation (k = p) go in a tensor of the
    accumulation dtype, so float64 runs keep them exact."""
    for name, value in (("zoneout_h", zoneout_h), ("zoneout_c", zoneout_c)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"fastlstm_triton: {name} must be in [0, 1), got {value}")

    def bits(value):
        return value - (1 << 32) if value >= (1 << 31) else value

    seed = _recurrence.seed_value(zoneout_seed)
    args = dict(
        zkey_h=bits(_recurrence.zoneout_key(seed, _recurrence.ZONEOUT_H_STREAM)),
        zthr_h=bits(_recurrence.zoneout_threshold(zoneout_h)),
        zkey_c=bits(_recurrence.zoneout_key(seed, _recurrence.ZONEOUT_C_STREAM)),
        zthr_c=bits(_recurrence.zoneout_threshold(zoneout_c)),
        ZONEOUT_H=zoneout_h > 0, ZONEOUT_C=zoneout_c > 0,
        ZONEOUT_EXPECTED=bool(zoneout_expected) and (zoneout_h > 0 or zoneout_c > 0))
    zprob = dummy
    if args["ZONEOUT_EXPECTED"]:
        # Two fills rather than a host-to-device copy: capturable in a CUDA graph.
        zprob = torch.empty(2, dtype=acc, device=device)
        zprob[0].fill_(zoneout_h)
        zprob[1].fill_(zoneout_c)
    return zprob, args


def _only(args, *names):
    return {name: args[name] for name in names}


_H_ONLY = ("zkey_h", "zthr_h", "ZONEOUT_H", "ZONEOUT_EXPECTED")


def _forward_impl(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, save, zoneout_h=0.0,
                  zoneout_c=0.0, zoneout_seed=None, zoneout_expected=False):
    for name, tensor in (("xg", xg), ("h0", h0), ("c0", c0), ("w_hh", w_hh)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"fastlstm_triton: {name} must be a Tensor, got "
                            f"{type(tensor).__name__}")
    if xg.dim() != 2 or h0.dim() != 2 or c0.dim() != 2:
        raise ValueError(f"fastlstm_triton: xg [N, 4*hidden], h0 [batch, proj or hidden] and c0 "
                         f"[batch, hidden] must be 2-D; got {xg.dim()}-D, {h0.dim()}-D, "
                         f"{c0.dim()}-D")
    _check_device_dtype("xg", xg)
    dtype, device = xg.dtype, xg.device
    acc = _recurrence.acc_dtype(dtype)
    num_rows = xg.shape[0]
    batch, hidden = c0.shape
    proj = h0.shape[1]
    if w_hr is None and proj != hidden:
        raise ValueError(f"fastlstm_triton: without w_hr, h0 must have hidden_size={hidden} "
                         f"columns; got {proj}")
    xg = _check_tensor("xg", xg, (num_rows, 4 * hidden), dtype, device)
    h0, c0, w_hh, w_hr = _check_state_and_weights(dtype, device, batch, hidden, proj, h0, c0,
                                                  w_hh, w_hr)
    layout = _layout(batch_sizes, num_rows, batch)
    packed = batch_sizes.numel() > 0

    out = xg.new_empty(num_rows, proj)
    h_n = h0.clone()
    c_n = c0.clone()
    gates = torch.empty(num_rows if save else 0, 4 * hidden, dtype=acc, device=device)
    cells = torch.empty(num_rows if save else 0, hidden, dtype=acc, device=device)
    if num_rows == 0 or batch == 0:
        return out, h_n, c_n, gates, cells
    # Without save, gates/cells are empty; kernels receive a valid pointer they never store to.
    gates_arg = gates if save else torch.empty(1, dtype=acc, device=device)
    cells_arg = cells if save else gates_arg
    zprob, zoneout = _zoneout_args(zoneout_h, zoneout_c, zoneout_seed, zoneout_expected, acc,
                                   device, gates_arg)

    if select_design(hidden, proj if w_hr is not None else 0, batch) == "sequence":
        offsets, lives = _step_tables(layout, device) if packed else (gates_arg, gates_arg)
        block_b = _sequence_block_b(batch)
        key = ("forward", device, dtype, _padded(hidden), _padded(proj), w_hr is not None)
        if _run_sequence(
                _lstm_fwd_sequence_kernel, (triton.cdiv(batch, block_b),), key,
                xg, w_hh, w_hr if w_hr is not None else w_hh, h0, c0, out, h_n, c_n, gates_arg,
                cells_arg, offsets, lives, zprob,
                len(layout), batch, hidden, proj,
                BLOCK_B=block_b, HP=_padded(hidden), PP=_padded(proj),
                PACKED=packed, REVERSE=bool(reverse), HAS_PROJ=w_hr is not None,
                SAVE=bool(save), **zoneout):
            return out, h_n, c_n, gates, cells

    c_state = c0.to(acc, copy=True)
    r_state = torch.empty(batch, hidden, dtype=acc, device=device) if w_hr is not None else c_state
    order = range(len(layout) - 1, -1, -1) if reverse else range(len(layout))
    previous = None  # the step visited before, whose out rows hold h_prev
    for t in order:
        offset, live = layout[t]
        prev_offset, prev_live = layout[previous] if previous is not None else (0, 0)
        block_b, block_h, block_k = _step_tiles(live, hidden, proj)
        grid = (triton.cdiv(live, block_b), triton.cdiv(hidden, block_h))
        _lstm_fwd_step_kernel[grid](
            xg, w_hh, h0, out, h_n, c_state, r_state, gates_arg, cells_arg, zprob,
            offset, live, prev_offset, prev_live, hidden, proj,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
            HAS_PROJ=w_hr is not None, SAVE=bool(save), **zoneout)
        if w_hr is not None:
            # h = r @ W_hr^T needs every column of r: a second launch per step.
            block_b, block_p, block_k = _step_tiles(live, proj, hidden)
            grid = (triton.cdiv(live, block_b), triton.cdiv(proj, block_p))
            _lstm_fwd_proj_kernel[grid](
                r_state, w_hr, out, h_n, zprob, offset, live, hidden, proj,
                BLOCK_B=block_b, BLOCK_P=block_p, BLOCK_K=block_k, **_only(zoneout, *_H_ONLY))
        previous = t
    c_n.copy_(c_state)
    return out, h_n, c_n, gates, cells


def _backward_impl(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr, gates, cells,
                   reverse, zoneout_h=0.0, zoneout_c=0.0, zoneout_seed=None,
                   zoneout_expected=False):
    for name, tensor in (("grad_out", grad_out), ("grad_hn", grad_hn), ("grad_cn", grad_cn),
                         ("c0", c0), ("w_hh", w_hh), ("gates", gates), ("cells", cells)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"fastlstm_triton: {name} must be a Tensor, got "
                            f"{type(tensor).__name__}")
    if grad_out.dim() != 2 or c0.dim() != 2:
        raise ValueError(f"fastlstm_triton: grad_out [N, proj or hidden] and c0 [batch, hidden] "
                         f"must be 2-D; got {grad_out.dim()}-D, {c0.dim()}-D")
    _check_device_dtype("grad_out", grad_out)
    dtype, device = grad_out.dtype, grad_out.device
    acc = _recurrence.acc_dtype(dtype)
    num_rows, proj = grad_out.shape
    batch, hidden = c0.shape
    if w_hr is None and proj != hidden:
        raise ValueError(f"fastlstm_triton: without w_hr, grad_out must have hidden_size="
                         f"{hidden} columns; got {proj}")
    grad_out = _check_tensor("grad_out", grad_out, (num_rows, proj), dtype, device)
    grad_hn, c0, w_hh, w_hr = _check_state_and_weights(dtype, device, batch, hidden, proj,
                                                       grad_hn, c0, w_hh, w_hr, "grad_hn")
    grad_cn = _check_tensor("grad_cn", grad_cn, (batch, hidden), dtype, device)
    if gates.shape[0] != num_rows:
        raise RuntimeError("fastlstm_triton: gates has no rows: the forward ran with save=False, "
                           "so nothing was kept for backward; run it with save=True")
    gates = _check_tensor("gates", gates, (num_rows, 4 * hidden), acc, device)
    cells = _check_tensor("cells", cells, (num_rows, hidden), acc, device)
    layout = _layout(batch_sizes, num_rows, batch)
    packed = batch_sizes.numel() > 0
    has_proj = w_hr is not None

    grad_xg = grad_out.new_empty(num_rows, 4 * hidden)
    grad_h_total = grad_out.new_empty(num_rows if has_proj else 0, proj)
    if num_rows == 0 or batch == 0:
        return grad_xg, grad_hn.clone(), grad_cn.clone(), grad_h_total
    grad_h_total_arg = grad_h_total if has_proj else grad_xg
    zprob, zoneout = _zoneout_args(zoneout_h, zoneout_c, zoneout_seed, zoneout_expected, acc,
                                   device, gates)

    if select_design(hidden, proj if has_proj else 0, batch) == "sequence":
        grad_h0 = torch.empty_like(grad_hn)
        grad_c0 = torch.empty_like(grad_cn)
        offsets, lives = _step_tables(layout, device) if packed else (gates, gates)
        block_b = _sequence_block_b(batch)
        key = ("backward", device, dtype, _padded(hidden), _padded(proj), has_proj)
        if _run_sequence(
                _lstm_bwd_sequence_kernel, (triton.cdiv(batch, block_b),), key,
                grad_out, grad_hn, grad_cn, c0, w_hh, w_hr if has_proj else w_hh, gates, cells,
                grad_xg, grad_h0, grad_c0, grad_h_total_arg, offsets, lives, zprob,
                len(layout), batch, hidden, proj,
                BLOCK_B=block_b, HP=_padded(hidden), PP=_padded(proj),
                PACKED=packed, REVERSE=bool(reverse), HAS_PROJ=has_proj, **zoneout):
            return grad_xg, grad_h0, grad_c0, grad_h_total

    dh_state = grad_hn.to(acc, copy=True)
    dc_state = grad_cn.to(acc, copy=True)
    # dpre of the step just visited and of the one before: read one, write the other.
    dpre_buffers = torch.empty(2, batch, 4 * hidden, dtype=acc, device=device)
    dh_row = torch.empty(batch, proj, dtype=acc, device=device) if has_proj else dh_state
    steps = len(layout)
    # Backward visits the steps in the opposite order of the forward pass.
    order = range(steps) if reverse else range(steps - 1, -1, -1)

    def forward_previous(t):  # the step the forward pass came from: its cells are c_prev
        prev = t + 1 if reverse else t - 1
        return layout[prev] if 0 <= prev < steps else (0, 0)

    def finish_dh(prev_dpre, prev_live, offset, live):
        """dh = dpre_prev @ W_hh for rows live at the previous visited step (projected case)."""
        rows = max(live, prev_live)
        block_b, block_p, block_k = _step_tiles(rows, proj, 4 * hidden)
        grid = (triton.cdiv(rows, block_b), triton.cdiv(proj, block_p))
        _lstm_bwd_dh_kernel[grid](
            prev_dpre, w_hh, dh_state, grad_out, dh_row, grad_h_total_arg, zprob,
            offset, live, prev_live, hidden, proj,
            BLOCK_B=block_b, BLOCK_P=block_p, BLOCK_K=block_k, **_only(zoneout, *_H_ONLY))

    prev_live = 0
    for visit, t in enumerate(order):
        offset, live = layout[t]
        dpre = dpre_buffers[visit % 2]
        dpre_prev = dpre_buffers[(visit + 1) % 2]
        c_prev_offset, c_prev_live = forward_previous(t)
        if has_proj:
            finish_dh(dpre_prev, prev_live, offset, live)
            rows = live
        else:  # rows live only at the previous step still need their dh finished here
            rows = max(live, prev_live)
        block_b, block_h, block_k = _step_tiles(rows, hidden, proj if has_proj else 4 * hidden)
        grid = (triton.cdiv(rows, block_b), triton.cdiv(hidden, block_h))
        _lstm_bwd_step_kernel[grid](
            grad_out, dh_row, w_hr if has_proj else w_hh, dpre_prev, w_hh, dh_state, dc_state,
            gates, cells, c0, grad_xg, dpre, zprob,
            offset, live, prev_live, c_prev_offset, c_prev_live, hidden, proj,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, HAS_PROJ=has_proj,
            **dict(zoneout, ZONEOUT_H=zoneout["ZONEOUT_H"] and not has_proj))
        prev_live = live
    # The last visited step's dh = dpre @ W_hh is grad_h0 for its rows: one more launch, no live
    # rows.
    last_dpre = dpre_buffers[(steps - 1) % 2]
    if has_proj:
        finish_dh(last_dpre, prev_live, 0, 0)
    else:
        block_b, block_h, block_k = _step_tiles(prev_live, hidden, 4 * hidden)
        grid = (triton.cdiv(prev_live, block_b), triton.cdiv(hidden, block_h))
        _lstm_bwd_step_kernel[grid](
            grad_out, dh_row, w_hh, last_dpre, w_hh, dh_state, dc_state,
            gates, cells, c0, grad_xg, dpre_buffers[steps % 2], zprob,
            0, 0, prev_live, 0, 0, hidden, proj,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, HAS_PROJ=False, **zoneout)
    return grad_xg, dh_state.to(dtype), dc_state.to(dtype), grad_h_total


# ----------------------------------------------------------------------------------------------
# The ops.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlstm_triton::recurrence_forward", mutates_args=())
def recurrence_forward(xg: torch.Tensor, batch_sizes: torch.Tensor, h0: torch.Tensor,
                       c0: torch.Tensor, w_hh: torch.Tensor, w_hr: Optional[torch.Tensor],
                       reverse: bool, save: bool, zoneout_h: float = 0.0,
                       zoneout_c: float = 0.0, zoneout_seed: Optional[torch.Tensor] = None,
                       zoneout_expected: bool = False
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """The LSTM recurrence of one layer and direction (contract: fastlstm/lstm/recurrence.py).

    xg [N, 4H] input gates (x @ W_ih^T + b) in the packed row layout; batch_sizes: int64 CPU [T]
    live rows per step, or empty for dense rows ([B] * T); h0 [B, P], c0 [B, H]; w_hh [4H, P];
    w_hr [P, H] or None (then P = H). All float tensors share xg's dtype and device.
    Returns out [N, P], h_n [B, P], c_n [B, H] in xg's dtype, and when save is set the activated
    gates [N, 4H] and cells [N, H] in the accumulation dtype (fp32, or fp64 for fp64 input);
    otherwise both are empty [0, 4H] / [0, H]. zoneout_*: as in the contract (cells then hold
    the mixed state).
    """
    with _on_device(xg):
        return _forward_impl(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, save, zoneout_h,
                             zoneout_c, zoneout_seed, zoneout_expected)


@torch.library.custom_op("fastlstm_triton::recurrence_backward", mutates_args=())
def recurrence_backward(grad_out: torch.Tensor, grad_hn: torch.Tensor, grad_cn: torch.Tensor,
                        batch_sizes: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                        w_hr: Optional[torch.Tensor], gates: torch.Tensor, cells: torch.Tensor,
                        reverse: bool, zoneout_h: float = 0.0, zoneout_c: float = 0.0,
                        zoneout_seed: Optional[torch.Tensor] = None,
                        zoneout_expected: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reverse recurrence (contract: fastlstm/lstm/recurrence.py).

    grad_out [N, P], grad_hn [B, P], grad_cn [B, H] in the input dtype; gates [N, 4H] and cells
    [N, H] as saved by recurrence_forward. Returns grad_xg [N, 4H] (pre-activation gate
    gradients), grad_h0 [B, P], grad_c0 [B, H] and, with w_hr, grad_h_total [N, P] (the whole
    gradient reaching each row's h; [0, P] without projection). zoneout_*: the forward's, whose
    masks the kernels rebuild.
    """
    with _on_device(grad_out):
        return _backward_impl(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr, gates,
                              cells, reverse, zoneout_h, zoneout_c, zoneout_seed,
                              zoneout_expected)


_recurrence.register("fastlstm_triton::recurrence_forward", recurrence_backward,
                     backward_qualname="fastlstm_triton::recurrence_backward",
                     extra_inputs=("zoneout_h", "zoneout_c", "zoneout_seed", "zoneout_expected"))

__all__ = ["recurrence_forward", "recurrence_backward", "select_design", "DESIGN",
           "SEQUENCE_MAX_SIZE"]
