// Fused sampling on CUDA: Gumbel-max with counter-based Philox noise.
//
// Drawing token j with probability softmax(z / T)_j equals argmax_j(z_j + T * g_j) with
// independent Gumbel noise g_j (T > 0); at T = 0 the same expression is the exact argmax, so
// greedy rows need no branch. One Philox4x32-10 call gives the noise for four consecutive tokens,
// keyed by the call's seed with counter (token / 4, row, offset): the draw does not depend on the
// launch shape.
//
// Common case (no top-k / top-p): the row is split over `splits` blocks when rows are few (to
// fill the GPU); each block writes its best (key, index) and a one-warp-per-row kernel takes the
// argmax over the splits. With one split the first kernel writes the token itself.
// With top-k / top-p one block owns a row: a bisection over the logits' order-preserving integer
// keys finds the k-th largest logit (counting) and then the top-p cut (summing weights); each
// step is one pass over the row, which stays in L2. No sort.
//
// Random state: (seed, offset) come from the CUDA generator's philox_cuda_state, which under CUDA
// graph capture reads device tensors that each replay advances, so replays draw fresh tokens.
// Errors: a bad row (NaN, +inf, all -inf, negative temperature) gets token -1; the host does not
// wait for the kernel (fastlstm.check_tokens / sample(check=True) raise).
#include "sample_cpu.h"

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

// Grid (rows, splits). Block (row, split) covers tokens [split * span, min(+span, vocab)), span a
// multiple of 4 so that Philox groups never straddle two blocks.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sample_split_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ temperature,
                    at::PhiloxCudaState philox_args, int64_t vocab, int64_t span,
                    float* __restrict__ part_key, int32_t* __restrict__ part_index,
                    int32_t* __restrict__ part_error, int64_t* __restrict__ tokens) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const auto seeds = at::cuda::philox::unpack(philox_args);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const float t = temperature[row];
  const scalar_t* row_logits = logits + row * vocab;
  const int64_t begin = split * span;
  const int64_t end = min(begin + span, vocab);
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
        if (key > best.key) best = Best{key, static_cast<int32_t>(index)};
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

// Count (count = true) or weight sum exp((z - max) / T) of the tokens whose key >= threshold.
template <typename scalar_t>
__device__ float mass_at_least(const scalar_t* row_logits, int64_t vocab, int32_t threshold,
                               float row_max, float inv_t, bool count) {
  float total = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float z = to_float(row_logits[i]);
    if (ordered_key(z) >= threshold) total += count ? 1.f : __expf((z - row_max) * inv_t);
  }
  return block_sum(total);
}

// Largest key in [low, high] whose mass is still >= target (mass(low) >= target assumed).
template <typename scalar_t>
__device__ int64_t largest_key_with_mass(const scalar_t* row_logits, int64_t vocab, int64_t low,
                                         int64_t high, float target, float row_max, float inv_t,
                                         bool count) {
  while (low < high) {  // the same on every thread: the masses are block-wide
    const int64_t mid = low + (high - low + 1) / 2;
    if (mass_at_least(row_logits, vocab, static_cast<int32_t>(mid), row_max, inv_t, count) >=
        target) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return low;
}

// One block per row: top-k then top-p thresholds, then Gumbel-max over the kept tokens.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sample_filtered_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ temperature,
                       at::PhiloxCudaState philox_args, int64_t vocab, int64_t top_k,
                       float top_p, int64_t* __restrict__ tokens) {
  const int64_t row = blockIdx.x;
  const auto seeds = at::cuda::philox::unpack(philox_args);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const float t = temperature[row];
  const float inv_t = t > 0.f ? 1.f / t : 1.f;  // T = 0: any weights do, the argmax is kept
  const scalar_t* row_logits = logits + row * vocab;
  float local_max = -INFINITY;
  bool nan_seen = false;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float z = to_float(row_logits[i]);
    nan_seen |= isnan(z);
    if (z > local_max) local_max = z;
  }
  const float row_max = block_best(Best{local_max, 0}).key;
  nan_seen = block_any(nan_seen);
  if (nan_seen || row_max == INFINITY || row_max == -INFINITY || !(t >= 0.f) || isinf(t)) {
    if (threadIdx.x == 0) tokens[row] = -1;
    return;
  }
  int64_t low = std::numeric_limits<int32_t>::min();
  const int64_t high = ordered_key(row_max);
  if (top_k > 0 && top_k < vocab) {
    low = largest_key_with_mass(row_logits, vocab, low, high, static_cast<float>(top_k), row_max,
                                inv_t, true);
  }
  if (top_p < 1.f) {
    const float kept = mass_at_least(row_logits, vocab, static_cast<int32_t>(low), row_max, inv_t,
                                     false);
    low = largest_key_with_mass(row_logits, vocab, low, high, top_p * kept, row_max, inv_t, false);
  }
  const int32_t threshold = static_cast<int32_t>(low);
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
        if (ordered_key(z) >= threshold) {
          const float key = z + t * gumbel_noise(r.x[lane]);
          if (key > best.key) best = Best{key, static_cast<int32_t>(index)};
        }
      }
    }
  }
  best = block_best(best);
  if (threadIdx.x == 0) tokens[row] = best.key == -INFINITY ? -1 : best.index;
}

int sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

at::Tensor sample_op_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                          double scalar_temperature, int64_t top_k, double top_p,
                          std::optional<at::Generator> generator) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const sampling::Rows rows = sampling::prepare_rows(logits, temperature, scalar_temperature);
  sampling::check_arguments(rows.logits, rows.temperature, top_k, top_p);
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
  const bool filtered = (top_k > 0 && top_k < vocab) || top_p < 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.logits.scalar_type(),
                                  "sample_cuda", [&] {
    const scalar_t* logits_data = rows.logits.data_ptr<scalar_t>();
    const float* temperature_data = rows.temperature.data_ptr<float>();
    if (filtered) {
      sample_filtered_kernel<scalar_t><<<row_count, kThreads, 0, stream>>>(
          logits_data, temperature_data, philox_args, vocab, top_k, static_cast<float>(top_p),
          tokens.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Splits: about 4 blocks per SM in all, each covering at least 2048 tokens (below that the
    // second launch costs more than it saves).
    const int64_t groups = (vocab + 3) / 4;
    const int64_t max_splits = std::max<int64_t>(1, vocab / 2048);
    const int64_t wanted = (4 * sm_count() + row_count - 1) / row_count;
    int64_t splits = std::min(max_splits, std::max<int64_t>(1, wanted));
    const int64_t span = ((groups + splits - 1) / splits) * 4;
    splits = (vocab + span - 1) / span;
    // Rows on x (up to 2^31 - 1 blocks), splits on y (at most 65535: vocab / 2048 is far below).
    const dim3 grid(static_cast<unsigned>(row_count), static_cast<unsigned>(splits));
    if (splits == 1) {
      sample_split_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          logits_data, temperature_data, philox_args, vocab, span, nullptr, nullptr, nullptr,
          tokens.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor part_key = at::empty({row_count * splits}, rows.logits.options().dtype(at::kFloat));
    at::Tensor part_index = at::empty({row_count * splits}, rows.logits.options().dtype(at::kInt));
    at::Tensor part_error = at::empty({row_count * splits}, rows.logits.options().dtype(at::kInt));
    sample_split_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        logits_data, temperature_data, philox_args, vocab, span, part_key.data_ptr<float>(),
        part_index.data_ptr<int32_t>(), part_error.data_ptr<int32_t>(),
        tokens.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kRowsPerBlock = 8;
    sample_reduce_kernel<<<static_cast<unsigned>((row_count + kRowsPerBlock - 1) / kRowsPerBlock),
                           kRowsPerBlock * 32, 0, stream>>>(
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
