// Fused sampling on the CPU: the same distribution as softmax(z / T) (after top-k / top-p) by the
// cheapest exact route, the inverse CDF. One pass over each row in blocks computes every block's
// max and sum of exp (online, so each logit is read and exponentiated once); one uniform number
// picks a block from the block masses and a short scan inside that block picks the token.
// Rows run in parallel (at::parallel_for); each row's uniform comes from a counter-based Philox
// keyed by (seed, offset, row), so the result does not depend on the number of threads.
#include "sample_cpu.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <version>
#if defined(__cpp_lib_bit_cast)
#include <bit>
#endif
#include <limits>
#include <mutex>
#include <vector>

namespace fastlstm {

namespace {


// Tokens per block of the inverse-CDF pass: big enough that the per-block bookkeeping is small,
// small enough that the final scan inside one block is short and the block stays in L1.
constexpr int64_t kBlock = 1024;

// A uniform double in [0, 1) with 53 random bits, for (seed, offset, row).
inline double row_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
  const sampling::Philox4 r = sampling::philox4x32_10(
      static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
      static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t bits = ((static_cast<uint64_t>(r.x[0]) << 32) | r.x[1]) >> 11;
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

template <typename scalar_t>
inline void load_block(const scalar_t* source, int64_t count, float* target) {
  for (int64_t i = 0; i < count; ++i) target[i] = static_cast<float>(source[i]);
}

// exp(x) for x <= 0 (arguments here are shifted by the max): 2^n * 2^f with n = rint(x log2 e),
// |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (relative error < 1e-8, below float's own
// rounding); x < -87 gives 0 (weights below 1e-38 of the max). Written as plain arithmetic so
// the compiler vectorizes the loops below (omp simd: -fopenmp is on); target_clones builds an
// AVX2 copy picked at run time, since ATen's Vectorized is scalar in an extension built without
// -mavx2. Always inlined: a call inside the loops stops their vectorization.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float t = (x > -87.0f ? x : -87.0f) * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23 trick, no call
  const float f = (t - n) * 0.693147180559945309f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
#if defined(__cpp_lib_bit_cast)
  const float scale = std::bit_cast<float>(exponent);  // memcpy here keeps GCC from vectorizing
#else
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
#endif
  // A multiply by the mask, not a branch, so the loops vectorize; -inf gives exactly 0.
  return p * scale * static_cast<float>(x >= -87.0f);
}

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTLSTM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTLSTM_CLONES
#endif

// Max of n floats; NaN anywhere makes the result NaN.
FASTLSTM_CLONES float block_max(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int32_t nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    best = x[i] > best ? x[i] : best;
    nan |= x[i] != x[i];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : best;
}

// Sum of exp((x - shift) * scale), shift finite and >= every x.
FASTLSTM_CLONES float block_sum_exp(const float* x, int64_t n, float shift, float scale) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += exp_nonpositive((x[i] - shift) * scale);
  return total;
}

// Index of the token whose cumulative weight first exceeds `target` among weights[0, n)
// (weights >= 0); a token of weight 0 is never returned. Rounding can leave `target` at or past
// the total: then the last token of positive weight.
inline int64_t scan_pick(const float* weights, int64_t n, double target) {
  double cumulative = 0.0;
  int64_t last_positive = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (weights[i] > 0.f) {
      cumulative += weights[i];
      last_positive = i;
      if (cumulative > target) return i;
    }
  }
  return last_positive;
}

struct RowResult {
  int64_t token;
  int32_t error;
};

template <typename scalar_t>
RowResult greedy_row(const scalar_t* row, int64_t vocab) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_index = -1;
  for (int64_t i = 0; i < vocab; ++i) {
    const float x = static_cast<float>(row[i]);
    if (std::isnan(x)) return {-1, sampling::kRowNaN};
    if (x > best) {  // strict: the first index wins ties, like torch.argmax
      best = x;
      best_index = i;
    }
  }
  if (best_index < 0) return {-1, sampling::kRowAllNegInf};
  return {best_index, sampling::kRowOk};
}

// The common case: no top-k / top-p. One pass in blocks, then the inverse CDF.
template <typename scalar_t>
RowResult plain_row(const scalar_t* row, int64_t vocab, float inv_temperature, double uniform,
                    std::vector<float>& scratch, std::vector<float>& block_maxima,
                    std::vector<float>& block_sums) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  block_maxima.resize(blocks);
  block_sums.resize(blocks);
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, count = std::min(kBlock, vocab - begin);
    const float* x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row + begin;
    } else {
      load_block(row + begin, count, scratch.data());
      x = scratch.data();
    }
    const float m = block_max(x, count);
    if (std::isnan(m)) return {-1, sampling::kRowNaN};
    if (m == std::numeric_limits<float>::infinity()) return {-1, sampling::kRowPosInf};
    block_maxima[b] = m;
    // exp((-inf - m) * s) = 0 for masked tokens; an all -inf block has weight 0.
    block_sums[b] = m == -std::numeric_limits<float>::infinity()
                        ? 0.f : block_sum_exp(x, count, m, inv_temperature);
    row_max = std::max(row_max, m);
  }
  if (row_max == -std::numeric_limits<float>::infinity()) return {-1, sampling::kRowAllNegInf};
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    // Block mass relative to the row max; all -inf blocks stay 0.
    if (block_sums[b] > 0.f) {
      block_sums[b] *= std::exp((block_maxima[b] - row_max) * inv_temperature);
    }
    total += block_sums[b];
  }
  const double target = uniform * total;
  double before = 0.0;
  int64_t chosen = -1;
  for (int64_t b = 0; b < blocks; ++b) {
    if (block_sums[b] <= 0.f) continue;
    chosen = b;
    if (before + block_sums[b] > target) break;
    before += block_sums[b];
  }
  // Inside the chosen block, recompute the weights (relative to the block max) and scan.
  const int64_t begin = chosen * kBlock, count = std::min(kBlock, vocab - begin);
  float* weights = scratch.data();
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(row + begin, row + begin + count, weights);
  } else {
    load_block(row + begin, count, weights);
  }
  const float m = block_maxima[chosen];
  for (int64_t i = 0; i < count; ++i) weights[i] = exp_nonpositive((weights[i] - m) * inv_temperature);
  const double scale = std::exp(static_cast<double>(m - row_max) * inv_temperature);
  const double local_target = std::max(0.0, (target - before) / scale);
  return {begin + scan_pick(weights, count, local_target), sampling::kRowOk};
}

// The smallest weight w* such that the weights >= w* hold at least `need` of the mass (weighted
// quickselect, expected O(n)); every weight >= w* is kept. `values` is reordered.
float top_p_threshold(float* values, int64_t n, double need) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const float pivot = values[lo + (hi - lo) / 2];
    // Three-way partition of [lo, hi): greater | equal | less.
    float* greater_end = std::partition(values + lo, values + hi, [&](float v) { return v > pivot; });
    float* equal_end = std::partition(greater_end, values + hi, [&](float v) { return v == pivot; });
    double greater_mass = 0.0, equal_mass = 0.0;
    for (float* p = values + lo; p < greater_end; ++p) greater_mass += *p;
    for (float* p = greater_end; p < equal_end; ++p) equal_mass += *p;
    if (greater_mass >= need) {
      hi = greater_end - values;
    } else if (greater_mass + equal_mass >= need) {
      return pivot;
    } else {
      need -= greater_mass + equal_mass;
      lo = equal_end - values;
    }
  }
  return 0.f;  // rounding left mass unclaimed: keep every token
}

// top-k and/or top-p: the row is copied once, thresholds found by selection (no sort).
template <typename scalar_t>
RowResult filtered_row(const scalar_t* row, int64_t vocab, float inv_temperature, int64_t top_k,
                       double top_p, double uniform, std::vector<float>& values,
                       std::vector<float>& work) {
  values.resize(vocab);
  work.resize(vocab);
  load_block(row, vocab, values.data());
  const float row_max = block_max(values.data(), vocab);
  if (std::isnan(row_max)) return {-1, sampling::kRowNaN};
  if (row_max == std::numeric_limits<float>::infinity()) return {-1, sampling::kRowPosInf};
  if (row_max == -std::numeric_limits<float>::infinity()) return {-1, sampling::kRowAllNegInf};
  float logit_threshold = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < vocab) {
    // The k-th largest logit; ties with it are kept too.
    std::copy(values.begin(), values.end(), work.begin());
    std::nth_element(work.begin(), work.begin() + (top_k - 1), work.end(), std::greater<float>());
    logit_threshold = work[top_k - 1];
  }
  double total = 0.0;
  int64_t kept = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float x = values[i];
    const float w = x >= logit_threshold ? exp_nonpositive((x - row_max) * inv_temperature) : 0.f;
    values[i] = w;
    total += w;
    if (w > 0.f) work[kept++] = w;
  }
  if (top_p < 1.0) {
    const float weight_threshold = top_p_threshold(work.data(), kept, top_p * total);
    total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (values[i] < weight_threshold) values[i] = 0.f;
      total += values[i];
    }
  }
  return {scan_pick(values.data(), vocab, uniform * total), sampling::kRowOk};
}

template <typename scalar_t>
void sample_rows(const at::Tensor& logits, const at::Tensor& temperature, int64_t top_k,
                 double top_p, uint64_t seed, uint64_t offset, int64_t* tokens,
                 std::atomic<int64_t>& first_bad_row, std::vector<int32_t>& errors) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const scalar_t* data = logits.data_ptr<scalar_t>();
  const float* temperatures = temperature.data_ptr<float>();
  const bool filtered = (top_k > 0 && top_k < vocab) || top_p < 1.0;
  // Small rows are cheap: give each thread many of them.
  const int64_t grain = std::max<int64_t>(1, 32768 / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<float> scratch(std::min(kBlock, vocab)), maxima, sums;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = data + r * vocab;
      const float t = temperatures[r];
      RowResult result;
      if (!(t >= 0.f) || std::isinf(t)) {
        result = {-1, sampling::kRowBadTemperature};
      } else if (t == 0.f) {
        result = greedy_row(row, vocab);
      } else {
        const double u = row_uniform(seed, offset, static_cast<uint64_t>(r));
        result = filtered ? filtered_row(row, vocab, 1.f / t, top_k, top_p, u, maxima, sums)
                          : plain_row(row, vocab, 1.f / t, u, scratch, maxima, sums);
      }
      tokens[r] = result.token;
      if (result.error != sampling::kRowOk) {
        errors[r] = result.error;
        int64_t expected = first_bad_row.load();
        while (r < expected && !first_bad_row.compare_exchange_weak(expected, r)) {
        }
      }
    }
  });
}

}  // namespace

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, int64_t top_k,
                      double top_p, int64_t seed, int64_t offset) {
  sampling::check_arguments(logits, temperature, top_k, top_p);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "fastlstm.sample_cpu: logits must be on the CPU; got ",
                    logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  std::atomic<int64_t> first_bad_row{rows};
  std::vector<int32_t> errors(rows, sampling::kRowOk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_cpu", [&] {
    sample_rows<scalar_t>(logits, temperature, top_k, top_p, static_cast<uint64_t>(seed),
                          static_cast<uint64_t>(offset), tokens.data_ptr<int64_t>(),
                          first_bad_row, errors);
  });
  const int64_t bad = first_bad_row.load();
  if (bad < rows) {
    const int32_t code = errors[bad];
    if (code == sampling::kRowBadTemperature) {
      TORCH_CHECK_VALUE(false, "fastlstm.sample: temperature must be finite and >= 0; row ", bad,
                        " has ", temperature.data_ptr<float>()[bad]);
    }
    TORCH_CHECK_VALUE(false, "fastlstm.sample: logits row ", bad, " ",
                      sampling::row_error_message(code));
  }
  return tokens;
}

namespace {

// The op's CPU kernel: one 64-bit seed drawn from the generator per call, so equal generator
// states give equal tokens and every call advances the generator.
at::Tensor sample_op_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                         double scalar_temperature, int64_t top_k, double top_p,
                         std::optional<at::Generator> generator) {
  const sampling::Rows rows = sampling::prepare_rows(logits, temperature, scalar_temperature);
  uint64_t seed;
  {
    auto* cpu_generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(cpu_generator->mutex_);
    seed = cpu_generator->random64();
  }
  at::Tensor tokens = sample_cpu(rows.logits, rows.temperature, top_k, top_p,
                                 static_cast<int64_t>(seed), 0);
  return tokens.view(logits.sizes().slice(0, logits.dim() - 1));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) { m.impl("sample", &sample_op_cpu); }

}  // namespace fastlstm
