// The bf16 variant of the step GEMM (csrc/cpu/step_gemm.h) for bf16 layers: W (exactly representable
// in bf16: the layer's bf16 weights) packed once as bf16 pairs, A (h and x of a bf16 layer, whose
// float32 copies hold bf16 values) converted to pairs a row block at a time, and
// _mm512_dpbf16_ps (AVX512-BF16), which multiplies two bf16 pairs per float32 lane at twice the
// float32 FMA rate. The products of bf16 values are exact in float32, so this computes what the
// float32 kernel computes on the same values, up to the order of the additions (a pair is summed
// before it is added) and denormals (flushed).
//
// Packing: panel p of kStepGemmPanel columns holds, for each pair of rows (2q, 2q + 1) of B, the
// 32 columns as 32-bit lanes (low half row 2q, high half row 2q + 1; a missing last row is 0):
// [panel][pair][32 columns][2].
#include "cpu/step_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace fastlstm {
namespace cpu {
namespace {

// float -> bf16, rounding to nearest even (exact for values bf16 can hold); NaN stays NaN.
inline uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

void step_gemm_pack_bf16(const float* b, int64_t ldb, bool transposed, int64_t k, int64_t n,
                         uint16_t* packed, PackColumns columns) {
  const int64_t panels = (n + kStepGemmPanel - 1) / kStepGemmPanel, pairs = (k + 1) / 2;
  constexpr int64_t kPairStride = kStepGemmPanel * 2;  // 16-bit elements per pair of B's rows
  for (int64_t p = 0; p < panels; ++p) {
    uint16_t* panel = packed + p * pairs * kPairStride;
    const int64_t j0 = p * kStepGemmPanel, width = std::min(kStepGemmPanel, n - j0);
    for (int64_t j = 0; j < kStepGemmPanel; ++j) {
      uint16_t* out = panel + 2 * j;
      if (j >= width) {  // padding columns
        for (int64_t q = 0; q < pairs; ++q) out[q * kPairStride] = out[q * kPairStride + 1] = 0;
        continue;
      }
      const int64_t source = columns.source(j0 + j);
      for (int64_t kk = 0; kk < 2 * pairs; ++kk) {
        const float value =
            kk >= k ? 0.0f : transposed ? b[source * ldb + kk] : b[kk * ldb + source];
        out[(kk / 2) * kPairStride + (kk % 2)] = to_bf16(value);
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastlstm

// Everything below is compiled for AVX-512 with BF16 (the packing above runs anywhere).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>
#define FASTLSTM_STEP_GEMM_BF16 1
#include "cpu/step_gemm_blocks.h"
#endif

namespace fastlstm {
namespace cpu {

#ifdef FASTLSTM_STEP_GEMM_BF16

bool step_gemm_bf16_available() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

namespace {

using namespace step_gemm_blocks;

constexpr int64_t kDepthPairs = 128;  // 256 rows of B per K block, as the float32 kernel

// c[kRows, 32] (+)= a[kRows, pairs] @ panel[pairs, 32] with A and the panel as bf16 pairs; A's
// rows are kDepthPairs apart.
template <int kRows>
struct MicroKernel {
  static void run(int64_t pairs, const uint32_t* a, const uint16_t* panel, float* c, int64_t ldc,
                  bool accumulate, __mmask16 mask0, __mmask16 mask1) {
    __m512 acc[kRows][2];
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      if (accumulate) {
        acc[r][0] = _mm512_maskz_loadu_ps(mask0, c + r * ldc);
        acc[r][1] = _mm512_maskz_loadu_ps(mask1, c + r * ldc + 16);
      } else {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
      }
    }
    for (int64_t q = 0; q < pairs; ++q) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + q * kStepGemmPanel * 2);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + q * kStepGemmPanel * 2 + 32);
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * kDepthPairs + q]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      _mm512_mask_storeu_ps(c + r * ldc, mask0, acc[r][0]);
      _mm512_mask_storeu_ps(c + r * ldc + 16, mask1, acc[r][1]);
    }
  }
};

using MicroKernelPointer = void (*)(int64_t, const uint32_t*, const uint16_t*, float*, int64_t,
                                    bool, __mmask16, __mmask16);

inline uint32_t bf16_pair(float low, float high) {
  uint32_t lo, hi;
  std::memcpy(&lo, &low, sizeof(lo));
  std::memcpy(&hi, &high, sizeof(hi));
  // Values of a bf16 layer: exact in bf16, so dropping the low half rounds nothing.
  return (lo >> 16) | (hi & 0xFFFF0000u);
}

}  // namespace

void step_gemm_bf16(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const uint16_t* packed, float* c, int64_t ldc, bool accumulate) {
  static constexpr auto kernels = kernel_table<MicroKernelPointer, MicroKernel>();
  if (empty_product(m, n, k, c, ldc, accumulate)) return;
  const int64_t panels = (n + kStepGemmPanel - 1) / kStepGemmPanel, pairs_total = (k + 1) / 2;
  uint32_t a_pairs[kMaxRows * kDepthPairs];  // one row block's A for one K block, as pairs
  for (int64_t k0 = 0; k0 < k; k0 += 2 * kDepthPairs) {
    const int64_t depth = std::min(2 * kDepthPairs, k - k0), pairs = (depth + 1) / 2;
    const bool add_to_c = accumulate || k0 > 0;
    for_row_blocks(m, [&](int64_t i, int64_t rows) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = a + (i + r) * lda + k0;
        for (int64_t q = 0; q < pairs; ++q) {
          const int64_t kk = 2 * q;
          a_pairs[r * kDepthPairs + q] = bf16_pair(row[kk], kk + 1 < depth ? row[kk + 1] : 0.0f);
        }
      }
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t j0 = p * kStepGemmPanel;
        const uint16_t* panel = packed + (p * pairs_total + k0 / 2) * kStepGemmPanel * 2;
        kernels[rows - 1](pairs, a_pairs, panel, c + i * ldc + j0, ldc, add_to_c,
                          columns_mask(n - j0), columns_mask(n - j0 - 16));
      }
    });
  }
}

#else

bool step_gemm_bf16_available() { return false; }

void step_gemm_bf16(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, float*,
                    int64_t, bool) {
  std::abort();  // callers check step_gemm_bf16_available() first
}

#endif

}  // namespace cpu
}  // namespace fastlstm
