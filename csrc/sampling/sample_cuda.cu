// Fused sampling on CUDA: Gumbel-max with counter-based Philox noise.
//
// Drawing token j with probability softmax(z / T)_j equals argmax_j(z_j + T * g_j) with
// independent Gumbel noise g_j (T > 0); at T = 0 the same expression is the exact argmax, so
// greedy rows need no branch. One Philox4x32-10 call gives the noise for four consecutive tokens,
// keyed by the call's seed with counter (token / 4, row, offset): the draw does not depend on the
// launch shape.
//
// Common case (no top-k / top-p / min-p): the row is split over `splits` blocks when rows are
// few (to fill the GPU); each block writes its best (key, index) and a one-warp-per-row kernel
// takes the argmax over the splits. With one split the first kernel writes the token itself.
// With top-k / top-p / min-p the thresholds are found first (no sort; see the section below),
// by one block per row when rows are many, over the same splits when they are few.
//
// Random state: (seed, offset) come from the CUDA generator's philox_cuda_state, which under CUDA
// graph capture reads device tensors that each replay advances, so replays draw fresh tokens.
// Errors: a bad row (NaN, +inf, all -inf, negative temperature) gets token -1; the host does not
// wait for the kernel (fastlstm.check_tokens / sample(check=True) raise).
#include "sampling/sample_kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <utility>

namespace fastlstm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMissing = 0x7FFFFFFF;  // index larger than any token: loses every tie

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// Gumbel noise -log(E), E = -log(1 - u) ~ Exp(1), from 32 random bits. Small u (large noise,
// which decides rare draws) uses all 32 bits and a series; E never reaches 0, so keys stay finite.
__device__ __forceinline__ float gumbel_noise(uint32_t bits) {
  const float u = static_cast<float>(bits) * 2.3283064365386963e-10f;  // 2^-32
  float e;
  if (u < 2.44140625e-4f) {  // 2^-12: -log(1 - u) = u + u^2/2 + O(u^3)
    e = fmaxf(u + 0.5f * u * u, 1.16415321826934814e-10f);  // >= 2^-33
  } else {
    e = -__logf(1.0f - static_cast<float>(bits >> 8) * 5.9604644775390625e-8f);  // 2^-24 grid
  }
  return -__logf(e);
}

struct Best {
  float key;
  int32_t index;
};

// The better of two candidates: larger key, then the smaller index (torch.argmax's tie rule).
__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.key > a.key || (b.key == a.key && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ Best warp_best(Best value) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    Best other{__shfl_xor_sync(0xFFFFFFFFu, value.key, delta),
               __shfl_xor_sync(0xFFFFFFFFu, value.index, delta)};
    value = better(value, other);
  }
  return value;
}

// Block-wide best; every thread gets the result.
__device__ Best block_best(Best value) {
  __shared__ float keys[kWarps];
  __shared__ int32_t indices[kWarps];
  value = warp_best(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    keys[warp] = value.key;
    indices[warp] = value.index;
  }
  __syncthreads();
  Best result{-INFINITY, kMissing};
  for (int w = 0; w < kWarps; ++w) result = better(result, Best{keys[w], indices[w]});
  __syncthreads();
  return result;
}

__device__ float block_sum(float value) {
  __shared__ float partial[kWarps];
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) value += __shfl_xor_sync(0xFFFFFFFFu, value, delta);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += partial[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ int block_any(int flag) { return __syncthreads_or(flag); }

__device__ __forceinline__ int32_t ordered_key(float x) {
  const int32_t bits = __float_as_int(x);
  return bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
}

__device__ __forceinline__ int32_t row_error(bool nan_seen, bool pos_inf_seen, float best_key,
                                             float temperature) {
  if (!(temperature >= 0.f) || isinf(temperature)) return sampling::kRowBadTemperature;
  if (nan_seen) return sampling::kRowNaN;
  if (pos_inf_seen) return sampling::kRowPosInf;
  if (best_key == -INFINITY) return sampling::kRowAllNegInf;
  return sampling::kRowOk;
}

// A row's filtering state between the passes of the split path.
struct FilterState {
  float row_max;      // the row's largest logit
  float mass_at_low;  // weight sum of the tokens whose key is >= low
  float target;       // what the current search looks for: a count (top-k) or a mass (top-p)
  float min_p_cut;    // min-p drops the tokens with z < min_p_cut (-inf: off)
  int32_t low, high;  // the search interval of keys; low is the threshold once low == high
  int32_t max_key;    // ordered_key(row_max)
  int32_t error;      // sampling::RowError of the row
};

// Grid (rows, splits). Block (row, split) covers tokens [split * span, min(+span, vocab)), span a
// multiple of 4 so that Philox groups never straddle two blocks.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sample_split_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ temperature,
                    at::PhiloxCudaState philox_args, int64_t vocab, int64_t span,
                    const FilterState* __restrict__ states, float* __restrict__ part_key,
                    int32_t* __restrict__ part_index, int32_t* __restrict__ part_error,
                    int64_t* __restrict__ tokens) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const auto seeds = at::cuda::philox::unpack(philox_args);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const float t = temperature[row];
  const scalar_t* row_logits = logits + row * vocab;
  const int64_t begin = split * span;
  const int64_t end = min(begin + span, vocab);
  // The filtered path's thresholds: keys below `threshold` and logits below `cut` are skipped.
  int32_t threshold = std::numeric_limits<int32_t>::min();
  float cut = -INFINITY;
  if (states != nullptr) {
    threshold = states[row].low;
    cut = states[row].min_p_cut;
  }
  Best best{-INFINITY, kMissing};
  bool nan_seen = false, pos_inf_seen = false;
  for (int64_t group = begin / 4 + threadIdx.x; group * 4 < end; group += kThreads) {
    const sampling::Philox4 r = sampling::philox4x32_10(
        static_cast<uint32_t>(group), static_cast<uint32_t>(row), static_cast<uint32_t>(offset),
        static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
        static_cast<uint32_t>(seed >> 32));
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t index = group * 4 + lane;
      if (index < end) {
        const float z = to_float(row_logits[index]);
        nan_seen |= isnan(z);
        pos_inf_seen |= (z == INFINITY);
        const float key = z + t * gumbel_noise(r.x[lane]);
        // index grows along the loop: a strict > keeps the first of equal keys.
        if (key > best.key && ordered_key(z) >= threshold && z >= cut) {
          best = Best{key, static_cast<int32_t>(index)};
        }
      }
    }
  }
  best = block_best(best);
  nan_seen = block_any(nan_seen);
  pos_inf_seen = block_any(pos_inf_seen);
  if (threadIdx.x == 0) {
    if (gridDim.y == 1) {
      const int32_t error = row_error(nan_seen, pos_inf_seen, best.key, t);
      tokens[row] = error == sampling::kRowOk ? best.index : -1;
    } else {
      const int64_t slot = row * gridDim.y + split;
      part_key[slot] = best.key;
      part_index[slot] = best.index;
      part_error[slot] = (nan_seen ? 1 : 0) | (pos_inf_seen ? 2 : 0);
    }
  }
}

// One warp per row: argmax over the splits.
__global__ void sample_reduce_kernel(const float* __restrict__ part_key,
                                     const int32_t* __restrict__ part_index,
                                     const int32_t* __restrict__ part_error,
                                     const float* __restrict__ temperature, int64_t rows,
                                     int splits, int64_t* __restrict__ tokens) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  Best best{-INFINITY, kMissing};
  int flags = 0;
  for (int s = lane; s < splits; s += 32) {
    best = better(best, Best{part_key[row * splits + s], part_index[row * splits + s]});
    flags |= part_error[row * splits + s];
  }
  best = warp_best(best);
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) flags |= __shfl_xor_sync(0xFFFFFFFFu, flags, delta);
  if (lane == 0) {
    const int32_t error = row_error(flags & 1, flags & 2, best.key, temperature[row]);
    tokens[row] = error == sampling::kRowOk ? best.index : -1;
  }
}

// ---- top-k / top-p / min-p ---------------------------------------------------------------------
//
// The thresholds are found on the logits' order-preserving int32 keys. A search keeps an interval
// [low, high] of keys with mass(low) >= target > mass(high + 1), where mass(key) is the count
// (top-k) or the weight sum exp((z - max) / T) (top-p) of the tokens whose key is >= key. It starts
// from the row's smallest and largest keys, and each pass over the row measures the mass at
// kPivots keys spread evenly inside the interval, which shrinks it 16-fold: at most 8 passes for
// any row (2^32 keys), and the search stops once the interval is one key. All sums run in a fixed
// order (per thread, then warp shuffles, then warps, then splits), so the same logits give the
// same thresholds, and the same seed the same tokens.
//
// Many rows: one block per row runs the whole search (sample_filtered_kernel). Few rows: each
// row's tokens are split over several blocks; every pass is a kernel over (row, split) that
// writes its partial masses to a [rows, splits, kPivots] buffer and a one-warp-per-row kernel that
// sums them in split order and moves the interval (FilterState). The draw is then the plain
// path's split kernel, told to skip the tokens below the thresholds.
constexpr int kPivots = 15;
constexpr int kSearchPasses = 8;  // 16^8 = 2^32: enough for any interval of int32 keys

// The j-th of the kPivots keys inside (low, high]: ceil((high - low) * (j + 1) / (kPivots + 1)).
__device__ __forceinline__ int32_t pivot_key(int32_t low, int32_t high, int j) {
  const int64_t span = static_cast<int64_t>(high) - low;
  return static_cast<int32_t>(low + (span * (j + 1) + kPivots) / (kPivots + 1));
}

// min-p keeps p >= min_p * p_max, i.e. z / T >= max / T + log(min_p): a cut on the logit.
__device__ __forceinline__ float min_p_cut(float row_max, float t, float min_p) {
  return (t > 0.f && min_p > 0.f) ? row_max + t * __logf(min_p) : -INFINITY;
}

// Every thread gets the sums over the block of values[0, N), in a fixed order.
template <int N>
__device__ void block_sum_array(float (&values)[N]) {
  __shared__ float partial[kWarps][N];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int delta = 16; delta > 0; delta >>= 1) {
      values[j] += __shfl_xor_sync(0xFFFFFFFFu, values[j], delta);
    }
    if (lane == 0) partial[warp][j] = values[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += partial[w][j];
    values[j] = total;
  }
  __syncthreads();
}

// This thread's share of the masses at the pivots of [low, high] over tokens [begin, end):
// count[j] (when counting) and mass[j] of the tokens whose key is >= pivot j.
template <typename scalar_t>
__device__ void pivot_masses(const scalar_t* row_logits, int64_t begin, int64_t end,
                             int32_t low, int32_t high, float row_max, float inv_t, bool counting,
                             float (&count)[kPivots], float (&mass)[kPivots]) {
  int32_t pivot[kPivots];
#pragma unroll
  for (int j = 0; j < kPivots; ++j) {
    pivot[j] = pivot_key(low, high, j);
    count[j] = 0.f;
    mass[j] = 0.f;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float z = to_float(row_logits[i]);
    const int32_t key = ordered_key(z);
    const float weight = __expf((z - row_max) * inv_t);  // -inf gives 0
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      const bool kept = key >= pivot[j];
      if (counting) count[j] += kept ? 1.f : 0.f;
      mass[j] += kept ? weight : 0.f;
    }
  }
}

// One step of a search: move [low, high] to the part between the last pivot whose mass (count
// when counting) reaches the target and the next one. Every caller sees the same sums.
__device__ __forceinline__ void search_step(FilterState& state, const float* count,
                                            const float* mass, bool counting) {
  int32_t low = state.low, high = state.high;
  float mass_at_low = state.mass_at_low;
  for (int j = 0; j < kPivots; ++j) {
    const int32_t pivot = pivot_key(state.low, state.high, j);
    if ((counting ? count[j] : mass[j]) >= state.target) {
      low = pivot;
      mass_at_low = mass[j];
    } else {
      high = pivot - 1;
      break;
    }
  }
  state.low = low;
  state.high = high;
  state.mass_at_low = mass_at_low;
}

// After top-k (or at once without it): search for the top-p threshold among the kept tokens.
__device__ __forceinline__ void begin_top_p(FilterState& state, float top_p) {
  state.target = top_p * state.mass_at_low;
  state.high = state.max_key;
}

// Many rows: one block per row finds the thresholds (top-k, then top-p, then min-p) and draws
// by Gumbel-max among the tokens at or above them.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sample_filtered_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ temperature,
                       at::PhiloxCudaState philox_args, int64_t vocab, int64_t top_k,
                       float top_p, float min_p, int64_t* __restrict__ tokens) {
  const int64_t row = blockIdx.x;
  const auto seeds = at::cuda::philox::unpack(philox_args);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const float t = temperature[row];
  const float inv_t = t > 0.f ? 1.f / t : 1.f;  // T = 0: any weights do, the argmax is kept
  const scalar_t* row_logits = logits + row * vocab;
  // First pass: max, smallest key, errors, and the total weight (each thread's sum relative to
  // its own max, rescaled to the row max below).
  float local_max = -INFINITY, local_sum = 0.f;
  int32_t local_min_key = ordered_key(INFINITY);
  bool nan_seen = false;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float z = to_float(row_logits[i]);
    if (isnan(z)) {
      nan_seen = true;
      continue;
    }
    local_min_key = min(local_min_key, ordered_key(z));
    if (z > local_max) {
      local_sum = local_max == -INFINITY ? 0.f : local_sum * __expf((local_max - z) * inv_t);
      local_max = z;
    }
    if (z != -INFINITY) local_sum += __expf((z - local_max) * inv_t);
  }
  const float row_max = block_best(Best{local_max, 0}).key;
  nan_seen = block_any(nan_seen);
  if (nan_seen || row_max == INFINITY || row_max == -INFINITY || !(t >= 0.f) || isinf(t)) {
    if (threadIdx.x == 0) tokens[row] = -1;
    return;
  }
  __shared__ int32_t min_keys[kWarps];
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    local_min_key = min(local_min_key, __shfl_xor_sync(0xFFFFFFFFu, local_min_key, delta));
  }
  if (threadIdx.x % 32 == 0) min_keys[threadIdx.x / 32] = local_min_key;
  __syncthreads();
  int32_t min_key = min_keys[0];
  for (int w = 1; w < kWarps; ++w) min_key = min(min_key, min_keys[w]);
  float total[1] = {local_max == -INFINITY ? 0.f : local_sum * __expf((local_max - row_max) * inv_t)};
  block_sum_array<1>(total);

  FilterState state;
  state.row_max = row_max;
  state.max_key = ordered_key(row_max);
  state.low = min_key;
  state.high = state.max_key;
  state.mass_at_low = total[0];
  float count[kPivots], mass[kPivots];
  if (top_k > 0 && top_k < vocab) {
    state.target = static_cast<float>(top_k);
    while (state.low < state.high) {  // the same on every thread: the sums are block-wide
      pivot_masses(row_logits, 0, vocab, state.low, state.high, row_max, inv_t, true, count, mass);
      block_sum_array<kPivots>(count);
      block_sum_array<kPivots>(mass);
      search_step(state, count, mass, true);
    }
  }
  if (top_p < 1.f) {
    begin_top_p(state, top_p);
    while (state.low < state.high) {
      pivot_masses(row_logits, 0, vocab, state.low, state.high, row_max, inv_t, false, count,
                   mass);
      block_sum_array<kPivots>(mass);
      search_step(state, count, mass, false);
    }
  }
  const int32_t threshold = state.low;
  const float cut = min_p_cut(row_max, t, min_p);
  Best best{-INFINITY, kMissing};
  for (int64_t group = threadIdx.x; group * 4 < vocab; group += kThreads) {
    const sampling::Philox4 r = sampling::philox4x32_10(
        static_cast<uint32_t>(group), static_cast<uint32_t>(row), static_cast<uint32_t>(offset),
        static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
        static_cast<uint32_t>(seed >> 32));
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t index = group * 4 + lane;
      if (index < vocab) {
        const float z = to_float(row_logits[index]);
        if (ordered_key(z) >= threshold && z >= cut) {
          const float key = z + t * gumbel_noise(r.x[lane]);
          if (key > best.key) best = Best{key, static_cast<int32_t>(index)};
        }
      }
    }
  }
  best = block_best(best);
  if (threadIdx.x == 0) tokens[row] = best.key == -INFINITY ? -1 : best.index;
}

// Few rows, first pass: per (row, split) the max, the weight sum relative to it, the smallest
// key and the error flags of tokens [split * span, + span).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
filter_stats_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ temperature,
                    int64_t vocab, int64_t span, float* __restrict__ part_max,
                    float* __restrict__ part_sum, int32_t* __restrict__ part_min_key,
                    int32_t* __restrict__ part_flags) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const float t = temperature[row];
  const float inv_t = t > 0.f ? 1.f / t : 1.f;
  const scalar_t* row_logits = logits + row * vocab;
  const int64_t begin = split * span, end = min(begin + span, vocab);
  float local_max = -INFINITY;
  int32_t local_min_key = ordered_key(INFINITY);
  bool nan_seen = false, pos_inf_seen = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float z = to_float(row_logits[i]);
    nan_seen |= isnan(z);
    pos_inf_seen |= (z == INFINITY);
    if (!isnan(z)) {
      local_max = fmaxf(local_max, z);
      local_min_key = min(local_min_key, ordered_key(z));
    }
  }
  const float split_max = block_best(Best{local_max, 0}).key;
  nan_seen = block_any(nan_seen);
  pos_inf_seen = block_any(pos_inf_seen);
  __shared__ int32_t min_keys[kWarps];
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    local_min_key = min(local_min_key, __shfl_xor_sync(0xFFFFFFFFu, local_min_key, delta));
  }
  if (threadIdx.x % 32 == 0) min_keys[threadIdx.x / 32] = local_min_key;
  // Second look at the span (in L1/L2 now): the weights relative to the split's max.
  float sum[1] = {0.f};
  if (isfinite(split_max)) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float z = to_float(row_logits[i]);
      if (!isnan(z)) sum[0] += __expf((z - split_max) * inv_t);
    }
  }
  block_sum_array<1>(sum);  // its first __syncthreads also publishes min_keys
  if (threadIdx.x == 0) {
    int32_t min_key = min_keys[0];
    for (int w = 1; w < kWarps; ++w) min_key = min(min_key, min_keys[w]);
    const int64_t slot = row * gridDim.y + split;
    part_max[slot] = split_max;
    part_sum[slot] = sum[0];
    part_min_key[slot] = min_key;
    part_flags[slot] = (nan_seen ? 1 : 0) | (pos_inf_seen ? 2 : 0);
  }
}

// One warp per row: the row's max, total weight and error from its splits, and the start of the
// first search (top-k, else top-p).
__global__ void filter_begin_kernel(const float* __restrict__ part_max,
                                    const float* __restrict__ part_sum,
                                    const int32_t* __restrict__ part_min_key,
                                    const int32_t* __restrict__ part_flags,
                                    const float* __restrict__ temperature, int64_t rows,
                                    int splits, int64_t top_k, float top_p, float min_p,
                                    FilterState* __restrict__ states) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const float t = temperature[row];
  const float inv_t = t > 0.f ? 1.f / t : 1.f;
  float row_max = -INFINITY;
  int32_t min_key = ordered_key(INFINITY);
  int flags = 0;
  for (int s = lane; s < splits; s += 32) {
    row_max = fmaxf(row_max, part_max[row * splits + s]);
    min_key = min(min_key, part_min_key[row * splits + s]);
    flags |= part_flags[row * splits + s];
  }
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    row_max = fmaxf(row_max, __shfl_xor_sync(0xFFFFFFFFu, row_max, delta));
    min_key = min(min_key, __shfl_xor_sync(0xFFFFFFFFu, min_key, delta));
    flags |= __shfl_xor_sync(0xFFFFFFFFu, flags, delta);
  }
  if (lane != 0) return;
  FilterState state;
  state.error = row_error(flags & 1, flags & 2, row_max, t);
  float total = 0.f;
  if (state.error == sampling::kRowOk) {
    for (int s = 0; s < splits; ++s) {  // in split order: the same total every time
      const float sum = part_sum[row * splits + s];
      if (sum > 0.f) total += sum * __expf((part_max[row * splits + s] - row_max) * inv_t);
    }
  }
  state.row_max = row_max;
  state.max_key = state.error == sampling::kRowOk ? ordered_key(row_max) : min_key;
  state.low = min_key;
  state.high = state.max_key;
  state.mass_at_low = total;
  state.min_p_cut = state.error == sampling::kRowOk ? min_p_cut(row_max, t, min_p) : -INFINITY;
  if (top_k > 0) {
    state.target = static_cast<float>(top_k);
  } else if (top_p < 1.f) {
    begin_top_p(state, top_p);
  } else {
    state.high = state.low;  // min-p alone: no search
  }
  if (state.error != sampling::kRowOk) state.high = state.low;
  states[row] = state;
}

// One search pass of (row, split): the masses at the pivots of the row's interval over the
// split's tokens, into part_mass[row][split][0, kPivots) (and part_count when counting).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
filter_pass_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ temperature,
                   const FilterState* __restrict__ states, int64_t vocab, int64_t span,
                   bool counting, float* __restrict__ part_count, float* __restrict__ part_mass) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const FilterState state = states[row];
  if (state.low >= state.high) return;  // done (or a bad row): the same for the whole block
  const float t = temperature[row];
  const float inv_t = t > 0.f ? 1.f / t : 1.f;
  const int64_t begin = split * span, end = min(begin + span, vocab);
  float count[kPivots], mass[kPivots];
  pivot_masses(logits + row * vocab, begin, end, state.low, state.high, state.row_max, inv_t,
               counting, count, mass);
  if (counting) block_sum_array<kPivots>(count);
  block_sum_array<kPivots>(mass);
  // Thread j writes pivot j (a constant index for each j keeps the arrays in registers).
#pragma unroll
  for (int j = 0; j < kPivots; ++j) {
    if (threadIdx.x == j) {
      const int64_t slot = (row * gridDim.y + split) * kPivots + j;
      if (counting) part_count[slot] = count[j];
      part_mass[slot] = mass[j];
    }
  }
}

// One warp per row: sum a pass's partial masses over the splits (lane j: pivot j, splits in
// order) and move the row's interval; with start_top_p, then begin the top-p search.
__global__ void filter_update_kernel(const float* __restrict__ part_count,
                                     const float* __restrict__ part_mass, int64_t rows,
                                     int splits, bool counting, bool start_top_p, float top_p,
                                     FilterState* __restrict__ states) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  FilterState state = states[row];
  if (state.low < state.high) {
    float count = 0.f, mass = 0.f;
    if (lane < kPivots) {
      for (int s = 0; s < splits; ++s) {
        const int64_t slot = (row * splits + s) * kPivots + lane;
        if (counting) count += part_count[slot];
        mass += part_mass[slot];
      }
    }
    float counts[kPivots], masses[kPivots];
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      counts[j] = __shfl_sync(0xFFFFFFFFu, count, j);
      masses[j] = __shfl_sync(0xFFFFFFFFu, mass, j);
    }
    search_step(state, counts, masses, counting);
  }
  if (start_top_p && state.error == sampling::kRowOk) begin_top_p(state, top_p);
  if (lane == 0) states[row] = state;
}

int sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Splits of a row: about 4 blocks per SM in all, each covering at least 2048 tokens (below that
// the extra launches cost more than they save), and a multiple of 4 tokens per split so that
// Philox groups never straddle two blocks. Returns (splits, span).
std::pair<int64_t, int64_t> row_splits(int64_t row_count, int64_t vocab) {
  const int64_t groups = (vocab + 3) / 4;
  const int64_t max_splits = std::max<int64_t>(1, vocab / 2048);
  const int64_t wanted = (4 * sm_count() + row_count - 1) / row_count;
  int64_t splits = std::min(max_splits, std::max<int64_t>(1, wanted));
  const int64_t span = ((groups + splits - 1) / splits) * 4;
  splits = (vocab + span - 1) / span;
  return {splits, span};
}

constexpr int kRowsPerBlock = 8;  // the one-warp-per-row kernels

unsigned warp_row_blocks(int64_t row_count) {
  return static_cast<unsigned>((row_count + kRowsPerBlock - 1) / kRowsPerBlock);
}

// The filtered path's thresholds over (row, split) blocks: the first pass, then the top-k and
// top-p searches. Returns the rows' FilterStates (as int32 words) for the draw. `top_k` is 0
// when off.
template <typename scalar_t>
at::Tensor filter_split_rows(const scalar_t* logits, const float* temperature, int64_t row_count,
                             int64_t vocab, int64_t splits, int64_t span, int64_t top_k,
                             float top_p, float min_p, const at::TensorOptions& options,
                             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(row_count), static_cast<unsigned>(splits));
  const int64_t slots = row_count * splits;
  at::Tensor part_float = at::empty({2 * slots + 2 * slots * kPivots}, options.dtype(at::kFloat));
  at::Tensor part_int = at::empty({2 * slots}, options.dtype(at::kInt));
  static_assert(sizeof(FilterState) % sizeof(int32_t) == 0, "FilterState is a run of 32-bit words");
  at::Tensor states = at::empty({row_count * static_cast<int64_t>(sizeof(FilterState) / 4)},
                                options.dtype(at::kInt));
  float* part_max = part_float.data_ptr<float>();
  float* part_sum = part_max + slots;
  float* part_count = part_sum + slots;
  float* part_mass = part_count + slots * kPivots;
  int32_t* part_min_key = part_int.data_ptr<int32_t>();
  int32_t* part_flags = part_min_key + slots;
  auto* state_data = reinterpret_cast<FilterState*>(states.data_ptr<int32_t>());
  filter_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      logits, temperature, vocab, span, part_max, part_sum, part_min_key, part_flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  filter_begin_kernel<<<warp_row_blocks(row_count), kRowsPerBlock * 32, 0, stream>>>(
      part_max, part_sum, part_min_key, part_flags, temperature, row_count,
      static_cast<int>(splits), top_k, top_p, min_p, state_data);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A fixed number of passes (the host does not wait to see which rows are done); a pass over a
  // row whose interval is one key returns at once.
  for (int search = 0; search < 2; ++search) {
    const bool counting = search == 0;
    if (counting ? top_k == 0 : top_p >= 1.f) continue;
    for (int pass = 0; pass < kSearchPasses; ++pass) {
      filter_pass_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          logits, temperature, state_data, vocab, span, counting, part_count, part_mass);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const bool start_top_p = counting && pass == kSearchPasses - 1 && top_p < 1.f;
      filter_update_kernel<<<warp_row_blocks(row_count), kRowsPerBlock * 32, 0, stream>>>(
          part_count, part_mass, row_count, static_cast<int>(splits), counting, start_top_p,
          top_p, state_data);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return states;
}

at::Tensor sample_op_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                          double scalar_temperature, int64_t top_k, double top_p,
                          std::optional<at::Generator> generator, double min_p) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const sampling::Rows rows = sampling::prepare_rows(logits, temperature, scalar_temperature);
  sampling::check_arguments(rows.logits, rows.temperature, top_k, top_p, min_p);
  const int64_t row_count = rows.logits.size(0), vocab = rows.logits.size(1);
  at::Tensor tokens = at::empty({row_count}, rows.logits.options().dtype(at::kLong));
  at::PhiloxCudaState philox_args;
  {
    auto* cuda_generator = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(cuda_generator->mutex_);
    philox_args = cuda_generator->philox_cuda_state(4);  // one counter block per call
  }
  if (row_count == 0) return tokens.view(logits.sizes().slice(0, logits.dim() - 1));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t used_top_k = (top_k > 0 && top_k < vocab) ? top_k : 0;
  const bool filtered = used_top_k > 0 || top_p < 1.0 || min_p > 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.logits.scalar_type(),
                                  "sample_cuda", [&] {
    const scalar_t* logits_data = rows.logits.data_ptr<scalar_t>();
    const float* temperature_data = rows.temperature.data_ptr<float>();
    const auto [splits, span] = row_splits(row_count, vocab);
    if (filtered && splits == 1) {
      sample_filtered_kernel<scalar_t><<<row_count, kThreads, 0, stream>>>(
          logits_data, temperature_data, philox_args, vocab, used_top_k,
          static_cast<float>(top_p), static_cast<float>(min_p), tokens.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Rows on x (up to 2^31 - 1 blocks), splits on y (at most 65535: vocab / 2048 is far below).
    const dim3 grid(static_cast<unsigned>(row_count), static_cast<unsigned>(splits));
    if (splits == 1) {
      sample_split_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          logits_data, temperature_data, philox_args, vocab, span, nullptr, nullptr, nullptr,
          nullptr, tokens.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor states;  // kept alive until the draw below is queued
    if (filtered) {
      states = filter_split_rows<scalar_t>(logits_data, temperature_data, row_count, vocab,
                                           splits, span, used_top_k, static_cast<float>(top_p),
                                           static_cast<float>(min_p), rows.logits.options(),
                                           stream);
    }
    const auto* state_data =
        filtered ? reinterpret_cast<const FilterState*>(states.data_ptr<int32_t>()) : nullptr;
    at::Tensor part_key = at::empty({row_count * splits}, rows.logits.options().dtype(at::kFloat));
    at::Tensor part_index = at::empty({row_count * splits}, rows.logits.options().dtype(at::kInt));
    at::Tensor part_error = at::empty({row_count * splits}, rows.logits.options().dtype(at::kInt));
    sample_split_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        logits_data, temperature_data, philox_args, vocab, span, state_data,
        part_key.data_ptr<float>(), part_index.data_ptr<int32_t>(),
        part_error.data_ptr<int32_t>(), tokens.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sample_reduce_kernel<<<warp_row_blocks(row_count), kRowsPerBlock * 32, 0, stream>>>(
        part_key.data_ptr<float>(), part_index.data_ptr<int32_t>(),
        part_error.data_ptr<int32_t>(), temperature_data, row_count, static_cast<int>(splits),
        tokens.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return tokens.view(logits.sizes().slice(0, logits.dim() - 1));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, CUDA, m) { m.impl("sample", &sample_op_cuda); }

}  // namespace fastlstm
