// Fused sampling on the CPU: the same distribution as softmax(z / T) (after top-k / top-p) by the
// cheapest exact route, the inverse CDF. The common case (no top-k / top-p / min-p) runs in two
// stages.
// First, every block of kBlock tokens of every row gets its max and its sum of exp relative to
// that max (the block is read from memory once and stays in L1 for the second look). Second,
// per row, one uniform number picks a block from the block masses, then a chunk, then a token.
// Many rows are shared out among threads whole; few long rows by their blocks, so they still use
// every thread. The exp is an explicit AVX-512 or AVX2 + FMA polynomial, chosen at run time.
// Each row's uniform comes from a counter-based Philox keyed by (seed, offset, row), and each
// block's figures depend only on its tokens, so the result does not depend on the thread count.
#include "sampling/sample_kernels.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <version>
#if defined(__cpp_lib_bit_cast)
#include <bit>
#endif
#include <limits>
#include <mutex>
#include <string>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif
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
// rounding); x < -87 gives 0 (weights below 1e-38 of the max). The portable kernels and the
// top-k / top-p path use it; the AVX2 kernels have their own 8-lane exp.
inline float exp_nonpositive(float x) {
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

// Max of n floats; NaN anywhere makes the result NaN.
float block_max(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int32_t nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    best = x[i] > best ? x[i] : best;
    nan |= x[i] != x[i];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : best;
}

// Tokens per chunk of the final scan: the chosen block's weights are summed per chunk (in
// double), a chunk is picked from those sums, and only that chunk is scanned token by token.
constexpr int64_t kChunk = 64;

// The per-block work of the plain path. Three builds: portable C++, and AVX2 + FMA or AVX-512
// intrinsics picked at run time when the CPU has them (the extension is built without -mavx2,
// so neither the compiler's auto-vectorizer nor ATen's Vectorized<float> can use them here).
// All compute the same quantities; the build used is fixed per process, so draws do not depend
// on threads.
struct BlockKernels {
  // max_out = max of x[0, n) (NaN if any is NaN); sum_out = sum of exp((x - max) * scale),
  // 0 unless the max is finite.
  void (*stats)(const float* x, int64_t n, float scale, float* max_out, float* sum_out);
  // weights[i] = exp((x[i] - shift) * scale) for i < n; chunk_sums[c] = sum of weights in chunk c
  // (chunks of kChunk tokens), in double.
  void (*weights)(const float* x, int64_t n, float shift, float scale, float* weights,
                  double* chunk_sums);
  void (*half_to_float)(const at::Half* x, int64_t n, float* out);
  void (*bfloat16_to_float)(const at::BFloat16* x, int64_t n, float* out);
};

void stats_portable(const float* x, int64_t n, float scale, float* max_out, float* sum_out) {
  const float m = block_max(x, n);
  *max_out = m;
  float total = 0.f;
  if (std::isfinite(m)) {
    for (int64_t i = 0; i < n; ++i) total += exp_nonpositive((x[i] - m) * scale);
  }
  *sum_out = total;
}

void weights_portable(const float* x, int64_t n, float shift, float scale, float* weights,
                      double* chunk_sums) {
  for (int64_t begin = 0, c = 0; begin < n; begin += kChunk, ++c) {
    const int64_t end = std::min(n, begin + kChunk);
    double sum = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      weights[i] = exp_nonpositive((x[i] - shift) * scale);
      sum += weights[i];
    }
    chunk_sums[c] = sum;
  }
}

template <typename scalar_t>
void to_float_portable(const scalar_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTLSTM_HAVE_AVX2_KERNELS 1
#define FASTLSTM_AVX2 __attribute__((target("avx2,fma,f16c")))

// exp(y) for y <= 0, 8 lanes: Cephes' expf (n = rint(y log2 e), y - n ln 2 in two parts, a
// degree-5 minimax polynomial; about 1 ulp), then 2^n through the exponent bits. y < -87 gives
// 0, as exp_nonpositive does (and -inf gives exactly 0).
FASTLSTM_AVX2 inline __m256 exp8_nonpositive(__m256 y) {
  const __m256 floor = _mm256_set1_ps(-87.f);
  const __m256 valid = _mm256_cmp_ps(y, floor, _CMP_GE_OQ);
  y = _mm256_max_ps(y, floor);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), y);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.f)));
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(exponent)), valid);
}

FASTLSTM_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The last n % 8 values, padded with -inf (weight 0), so the tails use the vector exp too.
FASTLSTM_AVX2 inline __m256 load_tail(const float* x, int64_t count) {
  alignas(32) float padded[8];
  for (int i = 0; i < 8; ++i) padded[i] = i < count ? x[i] : -std::numeric_limits<float>::infinity();
  return _mm256_load_ps(padded);
}

FASTLSTM_AVX2 void stats_avx2(const float* x, int64_t n, float scale, float* max_out,
                              float* sum_out) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = neg_inf, m1 = neg_inf, nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    m0 = _mm256_max_ps(m0, a);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  if (i < n) {
    const __m256 a = load_tail(x + i, n - i);
    m0 = _mm256_max_ps(m0, a);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) {
    *max_out = std::numeric_limits<float>::quiet_NaN();
    *sum_out = 0.f;
    return;
  }
  m0 = _mm256_max_ps(m0, m1);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float m = _mm_cvtss_f32(h);
  *max_out = m;
  if (!std::isfinite(m)) {
    *sum_out = 0.f;
    return;
  }
  const __m256 shift = _mm256_set1_ps(m), s = _mm256_set1_ps(scale);
  // Four independent accumulators hide the latency of the exp chain.
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  i = 0;
  for (; i + 32 <= n; i += 32) {
    // Fetch the next block (the next tokens in memory) while this one computes, so its max
    // pass finds it in cache: the loads and the exp work then overlap.
    _mm_prefetch(reinterpret_cast<const char*>(x + n + i), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(x + n + i + 16), _MM_HINT_T0);
    a0 = _mm256_add_ps(a0, exp8_nonpositive(
        _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift), s)));
    a1 = _mm256_add_ps(a1, exp8_nonpositive(
        _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), shift), s)));
    a2 = _mm256_add_ps(a2, exp8_nonpositive(
        _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 16), shift), s)));
    a3 = _mm256_add_ps(a3, exp8_nonpositive(
        _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 24), shift), s)));
  }
  for (; i + 8 <= n; i += 8) {
    a0 = _mm256_add_ps(a0, exp8_nonpositive(
        _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift), s)));
  }
  if (i < n) {
    a1 = _mm256_add_ps(a1, exp8_nonpositive(
        _mm256_mul_ps(_mm256_sub_ps(load_tail(x + i, n - i), shift), s)));
  }
  *sum_out = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

FASTLSTM_AVX2 void weights_avx2(const float* x, int64_t n, float shift, float scale,
                                float* weights, double* chunk_sums) {
  static_assert(kChunk % 8 == 0, "a chunk holds whole vectors");
  const __m256 vshift = _mm256_set1_ps(shift), s = _mm256_set1_ps(scale);
  for (int64_t begin = 0, c = 0; begin < n; begin += kChunk, ++c) {
    const int64_t end = std::min(n, begin + kChunk);
    __m256d sum = _mm256_setzero_pd();
    for (int64_t i = begin; i < end; i += 8) {
      const __m256 v = i + 8 <= end ? _mm256_loadu_ps(x + i) : load_tail(x + i, end - i);
      const __m256 w = exp8_nonpositive(_mm256_mul_ps(_mm256_sub_ps(v, vshift), s));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, w);
      std::memcpy(weights + i, lanes, sizeof(float) * std::min<int64_t>(8, end - i));
      sum = _mm256_add_pd(sum, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(w)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1))));
    }
    alignas(32) double parts[4];
    _mm256_store_pd(parts, sum);
    chunk_sums[c] = (parts[0] + parts[1]) + (parts[2] + parts[3]);
  }
}

FASTLSTM_AVX2 void half_to_float_avx2(const at::Half* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

FASTLSTM_AVX2 void bfloat16_to_float_avx2(const at::BFloat16* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// GCC 12 flags the deliberately undefined lanes of its own avx512fintrin.h helpers as
// maybe-uninitialized; the warning is about the header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTLSTM_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

// exp16_nonpositive: exp8_nonpositive on 16 lanes (the same operations, so the same values;
// scalef does the exact multiply by 2^n in one instruction).
FASTLSTM_AVX512 inline __m512 exp16_nonpositive(__m512 y) {
  const __m512 floor = _mm512_set1_ps(-87.f);
  const __mmask16 valid = _mm512_cmp_ps_mask(y, floor, _CMP_GE_OQ);
  y = _mm512_max_ps(y, floor);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  return _mm512_maskz_scalef_ps(valid, p, n);  // p * 2^n, exact (n >= -126 after the clamp)
}

FASTLSTM_AVX512 inline __mmask16 tail_mask(int64_t count) {
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : (1u << count) - 1);
}

FASTLSTM_AVX512 void stats_avx512(const float* x, int64_t n, float scale, float* max_out,
                                  float* sum_out) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = neg_inf, m1 = neg_inf;
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
  }
  for (; i < n; i += 16) {  // masked lanes read as -inf
    const __m512 a = _mm512_mask_loadu_ps(neg_inf, tail_mask(n - i), x + i);
    m0 = _mm512_max_ps(m0, a);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  }
  if (nan) {
    *max_out = std::numeric_limits<float>::quiet_NaN();
    *sum_out = 0.f;
    return;
  }
  const float m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  *max_out = m;
  if (!std::isfinite(m)) {
    *sum_out = 0.f;
    return;
  }
  const __m512 shift = _mm512_set1_ps(m), s = _mm512_set1_ps(scale);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  i = 0;
  for (; i + 64 <= n; i += 64) {
    // Fetch the next block (the next tokens in memory) while this one computes, so its max
    // pass finds it in cache: the loads and the exp work then overlap.
    for (int line = 0; line < 4; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(x + n + i + 16 * line), _MM_HINT_T0);
    }
    a0 = _mm512_add_ps(a0, exp16_nonpositive(
        _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift), s)));
    a1 = _mm512_add_ps(a1, exp16_nonpositive(
        _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), shift), s)));
    a2 = _mm512_add_ps(a2, exp16_nonpositive(
        _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 32), shift), s)));
    a3 = _mm512_add_ps(a3, exp16_nonpositive(
        _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 48), shift), s)));
  }
  for (; i < n; i += 16) {
    const __m512 v = _mm512_mask_loadu_ps(neg_inf, tail_mask(n - i), x + i);
    a0 = _mm512_add_ps(a0, exp16_nonpositive(_mm512_mul_ps(_mm512_sub_ps(v, shift), s)));
  }
  *sum_out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

FASTLSTM_AVX512 void weights_avx512(const float* x, int64_t n, float shift, float scale,
                                    float* weights, double* chunk_sums) {
  static_assert(kChunk % 16 == 0, "a chunk holds whole vectors");
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vshift = _mm512_set1_ps(shift), s = _mm512_set1_ps(scale);
  for (int64_t begin = 0, c = 0; begin < n; begin += kChunk, ++c) {
    const int64_t end = std::min(n, begin + kChunk);
    __m512d sum = _mm512_setzero_pd();
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 mask = tail_mask(end - i);
      const __m512 v = _mm512_mask_loadu_ps(neg_inf, mask, x + i);
      const __m512 w = exp16_nonpositive(_mm512_mul_ps(_mm512_sub_ps(v, vshift), s));
      _mm512_mask_storeu_ps(weights + i, mask, w);
      const __m512d bits = _mm512_castps_pd(w);
      sum = _mm512_add_pd(sum, _mm512_add_pd(
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_castpd512_pd256(bits))),
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(bits, 1)))));
    }
    chunk_sums[c] = _mm512_reduce_add_pd(sum);
  }
}
#pragma GCC diagnostic pop
#endif

// The best kernels the CPU runs; FASTLSTM_SAMPLE_KERNELS=portable|avx2|avx512 picks a lower one
// (to test every build on one machine; a choice the CPU lacks falls back to the best it has).
const BlockKernels& block_kernels() {
  static const BlockKernels kernels = [] {
    const char* choice = std::getenv("FASTLSTM_SAMPLE_KERNELS");
    const std::string wanted = choice != nullptr ? choice : "avx512";
#if defined(FASTLSTM_HAVE_AVX2_KERNELS)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && wanted == "avx512") {
      return BlockKernels{stats_avx512, weights_avx512, half_to_float_avx2,
                          bfloat16_to_float_avx2};
    }
    if (avx2 && wanted != "portable") {
      return BlockKernels{stats_avx2, weights_avx2, half_to_float_avx2, bfloat16_to_float_avx2};
    }
#endif
    return BlockKernels{stats_portable, weights_portable, to_float_portable<at::Half>,
                        to_float_portable<at::BFloat16>};
  }();
  return kernels;
}

// x[0, n) as floats: the row itself for float logits, else converted into `buffer`.
inline const float* as_float(const BlockKernels&, const float* x, int64_t, float*) { return x; }
inline const float* as_float(const BlockKernels& k, const at::Half* x, int64_t n, float* buffer) {
  k.half_to_float(x, n, buffer);
  return buffer;
}
inline const float* as_float(const BlockKernels& k, const at::BFloat16* x, int64_t n,
                             float* buffer) {
  k.bfloat16_to_float(x, n, buffer);
  return buffer;
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

// top-k, top-p and/or min-p, in that order: the row is copied once, thresholds found by
// selection (no sort). min-p keeps p >= min_p * p_max, that is x / T >= max / T + log(min_p):
// a cut on the logit, known once the max is, applied with the top-k cut (or, after top-p, in
// top-p's own pass, so that top-p measures the mass of the top-k set alone).
template <typename scalar_t>
RowResult filtered_row(const scalar_t* row, int64_t vocab, float inv_temperature, int64_t top_k,
                       double top_p, double min_p, double uniform, std::vector<float>& values,
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
  const float min_p_cut =
      min_p > 0.0 ? row_max + std::log(static_cast<float>(min_p)) / inv_temperature
                  : -std::numeric_limits<float>::infinity();
  if (top_p >= 1.0) logit_threshold = std::max(logit_threshold, min_p_cut);
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
    const bool use_min_p = min_p > 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (values[i] < weight_threshold ||
          (use_min_p && static_cast<float>(row[i]) < min_p_cut)) {
        values[i] = 0.f;
      }
      total += values[i];
    }
  }
  return {scan_pick(values.data(), vocab, uniform * total), sampling::kRowOk};
}

// Tokens of work that make one task of a parallel loop worth its scheduling cost.
constexpr int64_t kParallelTokens = 16384;

// The plain path (no top-k / top-p), first stage: the max and sum of exp of the blocks
// [begin, end) of the (row, block) grid. A block's figures depend only on its own tokens, so
// the draw does not depend on which thread computes them. Greedy rows and rows with a bad
// temperature are skipped here and handled per row.
template <typename scalar_t>
void plain_block_stats(const scalar_t* data, int64_t vocab, const float* temperatures,
                       int64_t begin, int64_t end, float* maxima, float* sums) {
  const BlockKernels& kernels = block_kernels();
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  alignas(64) float buffer[kBlock];  // half / bfloat16 blocks, converted
  for (int64_t index = begin; index < end; ++index) {
    const int64_t r = index / blocks, start = (index - r * blocks) * kBlock;
    const float t = temperatures[r];
    if (!(t > 0.f) || std::isinf(t)) continue;
    const int64_t count = std::min(kBlock, vocab - start);
    const float* x = as_float(kernels, data + r * vocab + start, count, buffer);
    kernels.stats(x, count, 1.f / t, maxima + index, sums + index);
  }
}

// The plain path, second stage for one row: the row's errors, then one uniform number picks a
// block from the block masses, a chunk of that block from its chunk sums, and a token inside
// the chunk (the inverse CDF). `sums` (this row's) is overwritten with the block masses.
template <typename scalar_t>
RowResult plain_row_pick(const scalar_t* row, int64_t vocab, float inv_temperature,
                         double uniform, const float* maxima, float* sums) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < blocks; ++b) {
    const float m = maxima[b];
    if (std::isnan(m)) return {-1, sampling::kRowNaN};
    if (m == std::numeric_limits<float>::infinity()) return {-1, sampling::kRowPosInf};
    row_max = std::max(row_max, m);
  }
  if (row_max == -std::numeric_limits<float>::infinity()) return {-1, sampling::kRowAllNegInf};
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    // Block mass relative to the row max; all -inf blocks stay 0.
    if (sums[b] > 0.f) sums[b] *= std::exp((maxima[b] - row_max) * inv_temperature);
    total += sums[b];
  }
  const double target = uniform * total;
  double before = 0.0;
  int64_t chosen = -1;
  for (int64_t b = 0; b < blocks; ++b) {
    if (sums[b] <= 0.f) continue;
    chosen = b;
    if (before + sums[b] > target) break;
    before += sums[b];
  }
  // Inside the chosen block, recompute the weights (relative to the block max, by the same
  // kernel as the block sums) and walk its chunks, then the tokens of one chunk.
  const BlockKernels& kernels = block_kernels();
  const int64_t begin = chosen * kBlock, count = std::min(kBlock, vocab - begin);
  alignas(32) float buffer[kBlock];
  alignas(32) float weights[kBlock];
  double chunk_sums[kBlock / kChunk];
  const float* x = as_float(kernels, row + begin, count, buffer);
  const float m = maxima[chosen];
  kernels.weights(x, count, m, inv_temperature, weights, chunk_sums);
  const double scale = std::exp(static_cast<double>(m - row_max) * inv_temperature);
  double local_target = std::max(0.0, (target - before) / scale);
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  int64_t chunk = -1;
  for (int64_t c = 0; c < chunks; ++c) {
    if (chunk_sums[c] <= 0.0) continue;
    if (chunk >= 0) local_target -= chunk_sums[chunk];
    chunk = c;
    if (chunk_sums[c] > local_target) break;
  }
  if (chunk < 0) {  // unreachable: the chosen block has a positive sum, so a positive weight
    return {begin + scan_pick(weights, count, local_target), sampling::kRowOk};
  }
  const int64_t chunk_begin = chunk * kChunk;
  const int64_t token = scan_pick(weights + chunk_begin, std::min(kChunk, count - chunk_begin),
                                  std::max(0.0, local_target));
  return {begin + chunk_begin + token, sampling::kRowOk};
}

// Per-thread growable scratch for the block statistics: no allocation once it is big enough.
float* stats_workspace(int64_t floats) {
  static thread_local std::vector<float> workspace;
  if (static_cast<int64_t>(workspace.size()) < floats) workspace.resize(floats);
  return workspace.data();
}

// Fills tokens[r]; a bad row gets -(its error code) instead of a token.
//
// One fork-join per call: on a busy machine every join can wait a whole scheduler time slice
// for a descheduled thread, so the two stages of the plain path do not each get their own.
// With enough rows to share out, each task runs both stages for whole rows; with few rows, the
// blocks of all rows are shared out and the second stage (about one block of work per row)
// runs on the calling thread. Either way every figure is computed the same way, so the tokens
// do not depend on the thread count.
template <typename scalar_t>
void sample_rows(const at::Tensor& logits, const at::Tensor& temperature, int64_t top_k,
                 double top_p, double min_p, uint64_t seed, uint64_t offset, uint64_t first_row,
                 int64_t* tokens) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const scalar_t* data = logits.data_ptr<scalar_t>();
  const float* temperatures = temperature.data_ptr<float>();
  const bool filtered = (top_k > 0 && top_k < vocab) || top_p < 1.0 || min_p > 0.0;
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  float* maxima = nullptr;
  float* sums = nullptr;
  if (!filtered) {
    maxima = stats_workspace(2 * rows * blocks);
    sums = maxima + rows * blocks;
  }
  auto finish_rows = [&](int64_t row_begin, int64_t row_end) {
    std::vector<float> values, work;  // the filtered path's copies of a row
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = data + r * vocab;
      const float t = temperatures[r];
      RowResult result;
      if (!(t >= 0.f) || std::isinf(t)) {
        result = {-1, sampling::kRowBadTemperature};
      } else if (t == 0.f) {
        result = greedy_row(row, vocab);
      } else {
        const double u = row_uniform(seed, offset, first_row + static_cast<uint64_t>(r));
        result = filtered
                     ? filtered_row(row, vocab, 1.f / t, top_k, top_p, min_p, u, values, work)
                     : plain_row_pick(row, vocab, 1.f / t, u, maxima + r * blocks, sums + r * blocks);
      }
      tokens[r] = result.error == sampling::kRowOk ? result.token : -result.error;
    }
  };
  const bool by_rows = filtered || rows >= 4 * static_cast<int64_t>(at::get_num_threads());
  if (by_rows) {
    const int64_t grain = std::max<int64_t>(1, kParallelTokens / vocab);
    at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
      if (!filtered) {
        plain_block_stats(data, vocab, temperatures, row_begin * blocks, row_end * blocks, maxima,
                          sums);
      }
      finish_rows(row_begin, row_end);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kParallelTokens / std::min(kBlock, vocab));
    at::parallel_for(0, rows * blocks, grain, [&](int64_t begin, int64_t end) {
      plain_block_stats(data, vocab, temperatures, begin, end, maxima, sums);
    });
    finish_rows(0, rows);
  }
}

}  // namespace

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, int64_t top_k,
                      double top_p, int64_t seed, int64_t offset, int64_t first_row,
                      double min_p) {
  sampling::check_arguments(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "fastlstm.sample_cpu: logits must be on the CPU; got ",
                    logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  int64_t* out = tokens.data_ptr<int64_t>();
  // check_arguments admits exactly these three dtypes.
  const uint64_t useed = static_cast<uint64_t>(seed), uoffset = static_cast<uint64_t>(offset);
  const uint64_t ufirst = static_cast<uint64_t>(first_row);
  switch (logits.scalar_type()) {
    case at::kFloat:
      sample_rows<float>(logits, temperature, top_k, top_p, min_p, useed, uoffset, ufirst,
                                 out);
      break;
    case at::kHalf:
      sample_rows<at::Half>(logits, temperature, top_k, top_p, min_p, useed, uoffset, ufirst,
                                 out);
      break;
    default:
      sample_rows<at::BFloat16>(logits, temperature, top_k, top_p, min_p, useed, uoffset, ufirst,
                                 out);
      break;
  }
  for (int64_t bad = 0; bad < rows; ++bad) {
    if (out[bad] >= 0) continue;
    const int32_t code = static_cast<int32_t>(-out[bad]);
    if (code == sampling::kRowBadTemperature) {
      TORCH_CHECK_VALUE(false, "fastlstm.sample: temperature must be finite and >= 0; row ",
                        first_row + bad, " has ", temperature.data_ptr<float>()[bad]);
    }
    TORCH_CHECK_VALUE(false, "fastlstm.sample: logits row ", first_row + bad, " ",
                      sampling::row_error_message(code));
  }
  return tokens;
}

namespace {

// The op's CPU kernel: one 64-bit seed drawn from the generator per call, so equal generator
// states give equal tokens and every call advances the generator.
at::Tensor sample_op_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                         double scalar_temperature, int64_t top_k, double top_p,
                         std::optional<at::Generator> generator, double min_p) {
  const sampling::Rows rows = sampling::prepare_rows(logits, temperature, scalar_temperature);
  uint64_t seed;
  {
    auto* cpu_generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(cpu_generator->mutex_);
    seed = cpu_generator->random64();
  }
  at::Tensor tokens = sample_cpu(rows.logits, rows.temperature, top_k, top_p,
                                 static_cast<int64_t>(seed), 0, 0, min_p);
  return tokens.view(logits.sizes().slice(0, logits.dim() - 1));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) { m.impl("sample", &sample_op_cpu); }

}  // namespace fastlstm
