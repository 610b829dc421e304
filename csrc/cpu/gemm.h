// The CPU backend's choice of GEMM library, and its layer-wide products (csrc/cpu/gemm.cpp).
#pragma once

#include <ATen/ATen.h>

namespace fastlstm {
namespace cpu {

// Whether the CPU backend's products should avoid torch's BLAS (FASTLSTM_CPU_GEMM, or by default
// on processors other than Intel's): then layer-wide float32 products run on oneDNN and the
// per-step ones on step_gemm_avx512 (csrc/cpu/step_gemm.h). Throws on a bad FASTLSTM_CPU_GEMM: call
// outside parallel regions.
bool avoid_blas();

// input [N, K] @ weight[M, K]^T on the library avoid_blas() picks for the product (the caller has
// checked the shapes; mismatches still raise, as from fastlstm::mm).
at::Tensor linear_product(const at::Tensor& input, const at::Tensor& weight);

}  // namespace cpu
}  // namespace fastlstm
