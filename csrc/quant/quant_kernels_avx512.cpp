// AVX-512 kernels of quantized inference (csrc/quant/quant_kernels.h): int8 with VNNI
// (_mm512_dpbusd_epi32: 64 multiply-adds of unsigned by signed bytes per instruction, summed in
// groups of 4 into int32 lanes, which no int8 input can overflow) and bf16 with AVX512-BF16
// (_mm512_dpbf16_ps: 32 bf16 products summed in pairs into float32 lanes), as
// csrc/cpu/step_gemm_bf16.cpp uses it.
//
// A block of up to 6 activation rows x 4 panels (64 output rows) keeps 24 accumulators in
// registers; every 64-byte load of a panel feeds one instruction per row and every broadcast of an
// activation group one per panel. At batch 1 (decode) the block is 1 row x 4 panels: four panel
// streams read at once, bound by how fast the weights arrive.
//
// Built with target pragmas (as lstm/cpu/step_kernels_avx512.cpp is), so every source shares one set of flags.
#include "quant/quant_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 intrinsics start their unmasked forms from `__m512 __Y = __Y;`, which
// -Wmaybe-uninitialized reports at every inlined call (the value is never read).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace fastlstm {
namespace quant {
namespace {

constexpr int kMaxRows = 6, kMaxPanels = 4;

// A block of one row (decode) streams its panels once from L3 or memory, one 64-byte line per
// panel per instruction: each panel's bytes are also asked for this far ahead.
constexpr int64_t kPrefetchBytes = 2048;

inline int32_t load_group(const void* p) {
  int32_t value;
  std::memcpy(&value, p, sizeof(value));
  return value;
}

inline __mmask16 columns_mask(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0)
                                                      : __mmask16((1u << count) - 1u);
}

// out[r, n0 .. n0 + 16) = base + value, the lanes n < columns only.
inline void store_panel(const Gemm& g, int64_t r, int64_t n0, __m512 value, __mmask16 mask) {
  if (g.base != nullptr) {
    value = _mm512_add_ps(
        value, _mm512_maskz_loadu_ps(mask, g.base + r * g.base_ld + n0 - g.base_column0));
  }
  _mm512_mask_storeu_ps(g.out + r * g.out_ld + n0 - g.out_column0, mask, value);
}

// --- int8 ----------------------------------------------------------------------------------------

// As quant_kernels.h writes it, storing q xor 0x80 (= q + 128 as an unsigned byte).
void quantize_u8_vnni(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                      int8_t* q, float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx;
    int8_t* out = q + r * k_pad;
    __m512 amax16 = _mm512_setzero_ps();
    __mmask16 unordered = 0;
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 mask = columns_mask(k - i);
      const __m512 v = _mm512_maskz_loadu_ps(mask, row + i);
      amax16 = _mm512_max_ps(amax16, _mm512_abs_ps(v));
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float amax = _mm512_reduce_max_ps(amax16);
    if (unordered != 0 || amax == 0.0f || !std::isfinite(amax)) {
      scale[r] = amax == 0.0f && unordered == 0 ? 0.0f : std::nanf("");
      std::memset(out, 0x80, k_pad);
      continue;
    }
    const __m512 inverse = _mm512_set1_ps(127.0f / amax);
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 mask = columns_mask(k - i);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + i), inverse);
      // round half to even (the default rounding mode) in the conversion itself
      const __m512i ints = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
      const __m128i bytes = _mm_xor_si128(_mm512_cvtsepi32_epi8(ints), _mm_set1_epi8(-128));
      _mm_mask_storeu_epi8(out + i, mask, bytes);
    }
    std::memset(out + k, 0x80, k_pad - k);
    scale[r] = amax / 127.0f;
  }
}

template <int R, int P>
void s8_block(const Gemm& g, int64_t r0, int64_t p0) {
  const uint8_t* a = static_cast<const uint8_t*>(g.a) + r0 * g.lda;
  const int8_t* w = static_cast<const int8_t*>(g.w) + p0 * g.groups * kPanel * kS8Group;
  const int64_t panel_stride = g.groups * kPanel * kS8Group;
  __m512i acc[R][P];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_si512();
  }
  for (int64_t q = 0; q < g.groups; ++q) {
    __m512i wv[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      wv[p] = _mm512_loadu_si512(w + p * panel_stride + q * 64);
      if (R == 1) _mm_prefetch(reinterpret_cast<const char*>(w + p * panel_stride + q * 64) +
                                   kPrefetchBytes, _MM_HINT_T0);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(load_group(a + r * g.lda + q * kS8Group));
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], av, wv[p]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    const int64_t n0 = (p0 + p) * kPanel;
    const __mmask16 mask = columns_mask(g.columns - n0);
    if (mask == 0) continue;
    // the activations were q + 128: take 128 * sum_k Wq[n, k] back out
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(g.w_sums + n0), 7);
    const __m512 w_scale = _mm512_loadu_ps(g.w_scale + n0);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][p], offset));
      const __m512 scaled = _mm512_mul_ps(dot, _mm512_set1_ps(g.a_scale[r0 + r]));
      store_panel(g, r0 + r, n0, _mm512_mul_ps(scaled, w_scale), mask);
    }
  }
}

template <int R, int P>
struct S8Block {
  static void run(const Gemm& g, int64_t r0, int64_t p0) { s8_block<R, P>(g, r0, p0); }
};

// Rows in blocks of up to 4 for every group of up to 4 panels (the panels of a group stay in L1
// while all rows pass over them).
template <template <int, int> class Block>
void run_blocks(const Gemm& g) {
  using Run = void (*)(const Gemm&, int64_t, int64_t);
  static constexpr Run table[kMaxRows][kMaxPanels] = {
      {Block<1, 1>::run, Block<1, 2>::run, Block<1, 3>::run, Block<1, 4>::run},
      {Block<2, 1>::run, Block<2, 2>::run, Block<2, 3>::run, Block<2, 4>::run},
      {Block<3, 1>::run, Block<3, 2>::run, Block<3, 3>::run, Block<3, 4>::run},
      {Block<4, 1>::run, Block<4, 2>::run, Block<4, 3>::run, Block<4, 4>::run},
      {Block<5, 1>::run, Block<5, 2>::run, Block<5, 3>::run, Block<5, 4>::run},
      {Block<6, 1>::run, Block<6, 2>::run, Block<6, 3>::run, Block<6, 4>::run}};
  for (int64_t p = g.panel_begin; p < g.panel_end; p += kMaxPanels) {
    const int64_t panels = std::min<int64_t>(kMaxPanels, g.panel_end - p);
    for (int64_t r = 0; r < g.rows; r += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, g.rows - r);
      table[rows - 1][panels - 1](g, r, p);
    }
  }
}

void gemm_s8_vnni(const Gemm& g) { run_blocks<S8Block>(g); }

}  // namespace
}  // namespace quant
}  // namespace fastlstm

// --- bf16 ----------------------------------------------------------------------------------------

#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16")

namespace fastlstm {
namespace quant {
namespace {

void to_bf16_avx512(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                    uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx;
    uint16_t* dst = out + r * k_pad;
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 mask = columns_mask(k - i);
      // vcvtneps2bf16 rounds to nearest even, as the other kernel sets do; NaN stays NaN
      const __m256bh converted = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row + i));
      _mm256_mask_storeu_epi16(dst + i, mask, (__m256i)converted);
    }
    for (int64_t i = k; i < k_pad; ++i) dst[i] = 0;
  }
}

template <int R, int P>
void bf16_block(const Gemm& g, int64_t r0, int64_t p0) {
  const uint16_t* a = static_cast<const uint16_t*>(g.a) + r0 * g.lda;
  const uint16_t* w = static_cast<const uint16_t*>(g.w) + p0 * g.groups * kPanel * kBf16Group;
  const int64_t panel_stride = g.groups * kPanel * kBf16Group;
  __m512 acc[R][P];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < g.groups; ++q) {
    __m512bh wv[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      wv[p] = (__m512bh)_mm512_loadu_si512(w + p * panel_stride + q * 32);
      if (R == 1) _mm_prefetch(reinterpret_cast<const char*>(w + p * panel_stride + q * 32) +
                                   kPrefetchBytes, _MM_HINT_T0);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh av =
          (__m512bh)_mm512_set1_epi32(load_group(a + r * g.lda + q * kBf16Group));
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], av, wv[p]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    const int64_t n0 = (p0 + p) * kPanel;
    const __mmask16 mask = columns_mask(g.columns - n0);
    if (mask == 0) continue;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) store_panel(g, r0 + r, n0, acc[r][p], mask);
  }
}

template <int R, int P>
struct Bf16Block {
  static void run(const Gemm& g, int64_t r0, int64_t p0) { bf16_block<R, P>(g, r0, p0); }
};

void gemm_bf16_avx512(const Gemm& g) { run_blocks<Bf16Block>(g); }

}  // namespace

bool avx512_bf16_built() { return true; }

Kernels avx512_kernels() {
  return Kernels{"avx512-vnni", "avx512-bf16", quantize_u8_vnni, gemm_s8_vnni, to_bf16_avx512,
                 gemm_bf16_avx512};
}

}  // namespace quant
}  // namespace fastlstm

#else

namespace fastlstm {
namespace quant {
bool avx512_bf16_built() { return false; }
Kernels avx512_kernels() {
  return Kernels{"avx512-vnni", "avx512-bf16", nullptr, nullptr, nullptr, nullptr};
}
}  // namespace quant
}  // namespace fastlstm

#endif
