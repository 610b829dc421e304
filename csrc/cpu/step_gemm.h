// fastlstm's own GEMM for the recurrence's per-step products C = A @ B, where B (W_hh, or a
// thread's slice of it) stays fixed for a whole layer: B is packed once into panels of
// kStepGemmPanel columns ([k][kStepGemmPanel] each, zero-padded) and every step multiplies by the
// panels with an AVX-512 register-blocked kernel (csrc/cpu/step_gemm_avx512.cpp). Used where torch's
// BLAS is slow (avoid_blas() in csrc/cpu/gemm.h); elsewhere the steps call the BLAS.
#pragma once

#include <cstdint>

namespace fastlstm {
namespace cpu {

constexpr int64_t kStepGemmPanel = 32;

// Which column of the source (or, for a transposed source, which row) is B's column j:
// (j / block) * stride + offset + j % block, or offset + j with block 0. It lets a thread pack its
// slice of W straight from W: its hidden units' four gates are four runs of rows of W.
struct PackColumns {
  int64_t block = 0;
  int64_t stride = 0;
  int64_t offset = 0;
  int64_t source(int64_t j) const {
    return block == 0 ? offset + j : (j / block) * stride + offset + j % block;
  }
};

// Floats the packed copy of a [k, n] B takes.
inline int64_t step_gemm_packed_floats(int64_t k, int64_t n) {
  return (n + kStepGemmPanel - 1) / kStepGemmPanel * kStepGemmPanel * k;
}

// Packs B, given as [k, n] (b[kk * ldb + j]) or, with `transposed`, as [n, k] (b[j * ldb + kk]),
// j mapped through `columns`. With `mask` (laid out as b), B's elements are b * mask: a weight
// mask (fastlstm.LSTM's weight_drop) applied in the packing pass itself.
void step_gemm_pack(const float* b, int64_t ldb, bool transposed, int64_t k, int64_t n,
                    float* packed, PackColumns columns = {}, const float* mask = nullptr);

// c[m, n] = a[m, k] @ B, or with `accumulate` c += a @ B (row-major, leading dimensions lda,
// ldc), B packed by step_gemm_pack. Needs AVX-512F (step_gemm_available()).
void step_gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                      const float* packed, float* c, int64_t ldc, bool accumulate = false);

// Whether this build and CPU can run step_gemm_avx512.
bool step_gemm_available();

// The bf16 variant (csrc/cpu/step_gemm_bf16.cpp), for layers whose A and B values are bf16: B packed
// as bf16 pairs by step_gemm_pack_bf16 (step_gemm_packed_bf16_elements(k, n) of them), A read as
// float32 holding bf16 values. Needs AVX512-BF16
// (step_gemm_bf16_available()).
void step_gemm_pack_bf16(const float* b, int64_t ldb, bool transposed, int64_t k, int64_t n,
                         uint16_t* packed, PackColumns columns = {});
void step_gemm_bf16(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const uint16_t* packed, float* c, int64_t ldc, bool accumulate = false);
bool step_gemm_bf16_available();

// 16-bit elements of step_gemm_pack_bf16's packing of a [k, n] B.
inline int64_t step_gemm_packed_bf16_elements(int64_t k, int64_t n) {
  return (n + kStepGemmPanel - 1) / kStepGemmPanel * kStepGemmPanel * ((k + 1) / 2) * 2;
}

}  // namespace cpu
}  // namespace fastlstm
