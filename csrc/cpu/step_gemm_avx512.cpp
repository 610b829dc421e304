// The AVX-512 kernel of csrc/cpu/step_gemm.h. Built like lstm/cpu/step_kernels_avx512.cpp: a target pragma, and
// only called when the CPU has AVX-512F.
//
// Register blocking: kRows rows x 32 columns of C (24 zmm accumulators at kRows = 12); per k, two
// loads of the packed panel and one broadcast of A per row feed 2 * kRows FMAs. K runs in blocks
// of kDepth so that a panel's block (kDepth x 32 floats, 32 KiB) stays in L1 while the row blocks
// sweep over it; later K blocks add to C. On an AMD EPYC (2 threads) the per-step products of a
// B=64, H=128 layer ran at about twice the rate of torch's MKL there (the benchmark's train and
// forward suites measure the whole step).
#include "cpu/step_gemm.h"

#include <algorithm>
#include <cstdlib>

namespace fastlstm {
namespace cpu {

void step_gemm_pack(const float* b, int64_t ldb, bool transposed, int64_t k, int64_t n,
                    float* packed, PackColumns columns, const float* mask) {
  const int64_t panels = (n + kStepGemmPanel - 1) / kStepGemmPanel;
  for (int64_t p = 0; p < panels; ++p) {
    float* panel = packed + p * k * kStepGemmPanel;
    const int64_t j0 = p * kStepGemmPanel, width = std::min(kStepGemmPanel, n - j0);
    for (int64_t j = 0; j < kStepGemmPanel; ++j) {
      if (j >= width) {  // padding columns
        for (int64_t kk = 0; kk < k; ++kk) panel[kk * kStepGemmPanel + j] = 0.0f;
        continue;
      }
      const int64_t source = columns.source(j0 + j);
      if (mask != nullptr) {
        for (int64_t kk = 0; kk < k; ++kk) {
          const int64_t at = transposed ? source * ldb + kk : kk * ldb + source;
          panel[kk * kStepGemmPanel + j] = b[at] * mask[at];
        }
      } else if (transposed) {  // a contiguous source row
        const float* row = b + source * ldb;
        for (int64_t kk = 0; kk < k; ++kk) panel[kk * kStepGemmPanel + j] = row[kk];
      } else {
        for (int64_t kk = 0; kk < k; ++kk) panel[kk * kStepGemmPanel + j] = b[kk * ldb + source];
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastlstm

// Everything below is compiled for AVX-512 (step_gemm_pack above is not: it runs anywhere).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,avx512f")
#include <immintrin.h>
#define FASTLSTM_STEP_GEMM_AVX512 1
#include "cpu/step_gemm_blocks.h"
#endif

namespace fastlstm {
namespace cpu {

#ifdef FASTLSTM_STEP_GEMM_AVX512

bool step_gemm_available() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}

namespace {

using namespace step_gemm_blocks;

constexpr int64_t kDepth = 256;

// c[kRows, 32] (+)= a[kRows, depth] @ panel[depth, 32]; `mask0` / `mask1` select the valid
// columns of each 16-column half.
template <int kRows>
struct MicroKernel {
  static void run(int64_t depth, const float* a, int64_t lda, const float* panel, float* c,
                  int64_t ldc, bool accumulate, __mmask16 mask0, __mmask16 mask1) {
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
    for (int64_t kk = 0; kk < depth; ++kk) {
      const __m512 b0 = _mm512_loadu_ps(panel + kk * kStepGemmPanel);
      const __m512 b1 = _mm512_loadu_ps(panel + kk * kStepGemmPanel + 16);
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      _mm512_mask_storeu_ps(c + r * ldc, mask0, acc[r][0]);
      _mm512_mask_storeu_ps(c + r * ldc + 16, mask1, acc[r][1]);
    }
  }
};

using MicroKernelPointer = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t,
                                    bool, __mmask16, __mmask16);

}  // namespace

void step_gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                      const float* packed, float* c, int64_t ldc, bool accumulate) {
  static constexpr auto kernels = kernel_table<MicroKernelPointer, MicroKernel>();
  if (empty_product(m, n, k, c, ldc, accumulate)) return;
  const int64_t panels = (n + kStepGemmPanel - 1) / kStepGemmPanel;
  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, k - k0);
    const bool add_to_c = accumulate || k0 > 0;
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t j0 = p * kStepGemmPanel;
      const __mmask16 mask0 = columns_mask(n - j0), mask1 = columns_mask(n - j0 - 16);
      const float* panel = packed + p * k * kStepGemmPanel + k0 * kStepGemmPanel;
      for_row_blocks(m, [&](int64_t i, int64_t rows) {
        kernels[rows - 1](depth, a + i * lda + k0, lda, panel, c + i * ldc + j0, ldc, add_to_c,
                          mask0, mask1);
      });
    }
  }
}

#else

bool step_gemm_available() { return false; }

void step_gemm_avx512(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*,
                      int64_t, bool) {
  std::abort();  // callers check step_gemm_available() first
}

#endif

}  // namespace cpu
}  // namespace fastlstm
