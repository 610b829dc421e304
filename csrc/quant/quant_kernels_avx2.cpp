// AVX2 kernels of quantized inference (csrc/quant/quant_kernels.h), for CPUs without AVX-512 VNNI /
// AVX512-BF16 (and, forced with FASTLSTM_QUANT_KERNELS=avx2, for testing this path anywhere).
//
// int8: no VNNI, so each 4-byte group is multiplied with _mm256_maddubs_epi16(|q|, sign(Wq, q))
// (unsigned |q| <= 127 times signed Wq: a pair sums to at most 2 * 127 * 128 < 32767, never
// saturating) and the int16 pairs are summed into int32 lanes with _mm256_madd_epi16(., 1): the
// exact dot product, as the other kernel sets compute it.
// bf16: the packed pairs are widened to float32 (a shift or a mask) and multiplied with FMA.
//
// Built with a target pragma, as lstm/cpu/step_kernels_avx2.cpp is, so every source shares one set of flags.
#include "quant/quant_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace fastlstm {
namespace quant {
namespace {

constexpr int kMaxRows = 2, kMaxPanels = 2;  // 2 x 2 panels x 2 halves = 8 accumulators

inline int32_t load_group(const void* p) {
  int32_t value;
  std::memcpy(&value, p, sizeof(value));
  return value;
}

// Lanes [0, count) of 8 set.
inline __m256i lanes_mask(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(
                                std::min<int64_t>(count, 8), 0))), index);
}

// out[r, n0 .. n0 + 8) = base + value, the lanes n < columns only.
inline void store_lanes(const Gemm& g, int64_t r, int64_t n0, __m256 value) {
  const int64_t count = g.columns - n0;
  if (count <= 0) return;
  if (g.base != nullptr) {
    const float* base = g.base + r * g.base_ld + n0 - g.base_column0;
    value = _mm256_add_ps(value, count >= 8 ? _mm256_loadu_ps(base)
                                            : _mm256_maskload_ps(base, lanes_mask(count)));
  }
  float* out = g.out + r * g.out_ld + n0 - g.out_column0;
  if (count >= 8) {
    _mm256_storeu_ps(out, value);
  } else {
    _mm256_maskstore_ps(out, lanes_mask(count), value);
  }
}

// --- int8 ----------------------------------------------------------------------------------------

void quantize_s8_avx2(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                      int8_t* q, float* scale) {
  const __m256 sign_bits = _mm256_set1_ps(-0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx;
    int8_t* out = q + r * k_pad;
    __m256 amax8 = _mm256_setzero_ps();
    __m256 unordered = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256 v = _mm256_loadu_ps(row + i);
      amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign_bits, v));
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, amax8);
    float amax = 0.0f;
    for (float lane : lanes) amax = std::max(amax, lane);
    bool nan = _mm256_movemask_ps(unordered) != 0;
    for (; i < k; ++i) {
      amax = std::max(amax, std::fabs(row[i]));
      nan = nan || std::isnan(row[i]);
    }
    if (nan || amax == 0.0f || !std::isfinite(amax)) {
      scale[r] = amax == 0.0f && !nan ? 0.0f : std::nanf("");
      std::memset(out, 0, k_pad);
      continue;
    }
    const float inverse = 127.0f / amax;
    const __m256 inv8 = _mm256_set1_ps(inverse);
    const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    for (i = 0; i + 8 <= k; i += 8) {
      const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(
          _mm256_mul_ps(_mm256_loadu_ps(row + i), inv8),
          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      const __m256i ints = _mm256_cvtps_epi32(v);
      int32_t values[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(values), ints);
      for (int j = 0; j < 8; ++j) out[i + j] = static_cast<int8_t>(values[j]);
    }
    for (; i < k; ++i) {
      const float value = std::nearbyint(row[i] * inverse);
      out[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, value)));
    }
    std::memset(out + k, 0, k_pad - k);
    scale[r] = amax / 127.0f;
  }
}

template <int R, int P>
void s8_block(const Gemm& g, int64_t r0, int64_t p0) {
  const int8_t* a = static_cast<const int8_t*>(g.a) + r0 * g.lda;
  const int8_t* w = static_cast<const int8_t*>(g.w) + p0 * g.groups * kPanel * kS8Group;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][P][2];
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_si256();
  }
  for (int64_t q = 0; q < g.groups; ++q) {
    __m256i wv[P][2];
    for (int p = 0; p < P; ++p) {
      const int8_t* lanes = w + (p * g.groups + q) * kPanel * kS8Group;
      wv[p][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes));
      wv[p][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 32));
    }
    for (int r = 0; r < R; ++r) {
      const __m256i av = _mm256_set1_epi32(load_group(a + r * g.lda + q * kS8Group));
      const __m256i magnitude = _mm256_abs_epi8(av);
      for (int p = 0; p < P; ++p) {
        for (int h = 0; h < 2; ++h) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wv[p][h], av));
          acc[r][p][h] = _mm256_add_epi32(acc[r][p][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int h = 0; h < 2; ++h) {
      const int64_t n0 = (p0 + p) * kPanel + h * 8;
      if (n0 >= g.columns) continue;
      const __m256 w_scale = _mm256_loadu_ps(g.w_scale + n0);
      for (int r = 0; r < R; ++r) {
        const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][p][h]),
                                            _mm256_set1_ps(g.a_scale[r0 + r]));
        store_lanes(g, r0 + r, n0, _mm256_mul_ps(scaled, w_scale));
      }
    }
  }
}

// --- bf16 ----------------------------------------------------------------------------------------

inline uint16_t to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

void to_bf16_avx2(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                  uint16_t* out) {
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
  const __m256i quiet_nan = _mm256_set1_epi32(0x7FC00000);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx;
    uint16_t* dst = out + r * k_pad;
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, abs_mask), inf);
      const __m256i rounded = _mm256_add_epi32(
          bits, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(bits, 16), one)));
      bits = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet_nan, nan), 16);
      // 8 int32 holding 16-bit values -> 8 uint16
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                              _mm256_extracti128_si256(bits, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
    }
    for (; i < k; ++i) dst[i] = to_bf16_bits(row[i]);
    for (; i < k_pad; ++i) dst[i] = 0;
  }
}

template <int R, int P>
void bf16_block(const Gemm& g, int64_t r0, int64_t p0) {
  const uint16_t* a = static_cast<const uint16_t*>(g.a) + r0 * g.lda;
  const uint16_t* w = static_cast<const uint16_t*>(g.w) + p0 * g.groups * kPanel * kBf16Group;
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[R][P][2];
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
  }
  for (int64_t q = 0; q < g.groups; ++q) {
    __m256 even[P][2], odd[P][2];
    for (int p = 0; p < P; ++p) {
      const uint16_t* lanes = w + (p * g.groups + q) * kPanel * kBf16Group;
      for (int h = 0; h < 2; ++h) {
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 16 * h));
        even[p][h] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        odd[p][h] = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_half));
      }
    }
    for (int r = 0; r < R; ++r) {
      const uint32_t pair = static_cast<uint32_t>(load_group(a + r * g.lda + q * kBf16Group));
      const __m256i pair8 = _mm256_set1_epi32(static_cast<int>(pair));
      const __m256 a_even = _mm256_castsi256_ps(_mm256_slli_epi32(pair8, 16));
      const __m256 a_odd = _mm256_castsi256_ps(_mm256_and_si256(pair8, high_half));
      for (int p = 0; p < P; ++p) {
        for (int h = 0; h < 2; ++h) {
          acc[r][p][h] = _mm256_fmadd_ps(a_even, even[p][h], acc[r][p][h]);
          acc[r][p][h] = _mm256_fmadd_ps(a_odd, odd[p][h], acc[r][p][h]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int h = 0; h < 2; ++h) {
      const int64_t n0 = (p0 + p) * kPanel + h * 8;
      for (int r = 0; r < R; ++r) store_lanes(g, r0 + r, n0, acc[r][p][h]);
    }
  }
}

// The blocks of rows x panels, largest first.
template <template <int, int> class Block>
void run_blocks(const Gemm& g) {
  for (int64_t p = g.panel_begin; p < g.panel_end; p += kMaxPanels) {
    const bool two_panels = g.panel_end - p >= 2;
    int64_t r = 0;
    for (; r + 2 <= g.rows; r += 2) {
      two_panels ? Block<2, 2>::run(g, r, p) : Block<2, 1>::run(g, r, p);
    }
    if (r < g.rows) two_panels ? Block<1, 2>::run(g, r, p) : Block<1, 1>::run(g, r, p);
  }
}

template <int R, int P>
struct S8Block {
  static void run(const Gemm& g, int64_t r0, int64_t p0) { s8_block<R, P>(g, r0, p0); }
};
template <int R, int P>
struct Bf16Block {
  static void run(const Gemm& g, int64_t r0, int64_t p0) { bf16_block<R, P>(g, r0, p0); }
};

void gemm_s8_avx2(const Gemm& g) { run_blocks<S8Block>(g); }
void gemm_bf16_avx2(const Gemm& g) { run_blocks<Bf16Block>(g); }

static_assert(kMaxRows == 2 && kMaxPanels == 2, "run_blocks unrolls 2 x 2");

}  // namespace

Kernels avx2_kernels() {
  return Kernels{"avx2", "avx2", quantize_s8_avx2, gemm_s8_avx2, to_bf16_avx2, gemm_bf16_avx2};
}

}  // namespace quant
}  // namespace fastlstm

#else

namespace fastlstm {
namespace quant {
Kernels avx2_kernels() { return Kernels{"avx2", "avx2", nullptr, nullptr, nullptr, nullptr}; }
}  // namespace quant
}  // namespace fastlstm

#endif
