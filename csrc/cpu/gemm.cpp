// The CPU backend's layer-wide GEMMs: the input projection x @ W_ih^T when the recurrence op does
// not fuse it into its steps (linear_product(), called by csrc/lstm/cpu/lstm_cpu.cpp) and, in backward,
// dx, dW_ih and dW_hh (ops fastlstm::mm and fastlstm::addmm, called from
// fastlstm/lstm/recurrence.py).
//
// Why not torch.mm: torch's x86 wheels run float32 matmul on MKL, and MKL takes its AVX-512 code
// only on Intel processors. On an AMD EPYC with AVX-512 (2 threads) torch.mm of a
// [4096, 128] x [128, 512] product ran at 200 GFLOP/s, oneDNN (at::native::mkldnn_matmul, the
// library nn.LSTM's CPU kernel is built on) at 465: these GEMMs were two thirds of a training step
// there. So where avoid_blas() says so (by default: processors other than Intel's), float32
// products of at least kMinOneDnnMacs multiply-adds go to oneDNN, and the recurrence's per-step
// products to fastlstm's own AVX-512 kernel (csrc/cpu/step_gemm.h; oneDNN's per-call setup, about
// 15 us, is too slow for them). Everything else (Intel, float64, reduced precision, small
// products) stays on at::mm / at::addmm and MKL, as before.
//
// FASTLSTM_CPU_GEMM=auto|blas|own (read at every call) forces the choice: `blas` is torch's BLAS
// for every product, `own` is oneDNN and the AVX-512 step kernel wherever they can run. oneDNN is
// also skipped when torch.backends.mkldnn is disabled.
//
// at::native::mkldnn_matmul is a symbol of libtorch_cpu, not of torch's public API, so it is
// declared here, weak: a torch without it (or with another signature) loads this library all the
// same and uses at::mm. If oneDNN refuses a product (a torch whose mkldnn_matmul rejects float32),
// the first refusal is reported once and BLAS is used from then on.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "cpu/gemm.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace at {
namespace native {
// result = beta * result + alpha * mat1 @ mat2 (2-D, any strides), on oneDNN.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                             float beta, float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at

namespace fastlstm {
namespace cpu {
namespace {

using at::Tensor;

// Below this, oneDNN's per-call setup (about 15 us) outweighs its faster kernel.
constexpr int64_t kMinOneDnnMacs = int64_t(1) << 21;

std::atomic<bool> onednn_failed{false};

bool intel_cpu() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

}  // namespace

bool avoid_blas() {
  const char* value = std::getenv("FASTLSTM_CPU_GEMM");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return !intel_cpu();
  if (std::strcmp(value, "own") == 0) return true;
  if (std::strcmp(value, "blas") == 0) return false;
  TORCH_CHECK(false, "FASTLSTM_CPU_GEMM must be auto, blas or own; got '", value, "'");
  return false;
}

namespace {

// Whether a @ b (and its result, of the same dtype) runs on oneDNN.
bool use_onednn(const Tensor& a, const Tensor& b) {
  if (!avoid_blas()) return false;
  if (&at::native::mkldnn_matmul == nullptr || onednn_failed.load(std::memory_order_relaxed) ||
      !at::globalContext().userEnabledMkldnn()) {
    return false;
  }
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat) return false;
  return a.size(0) * a.size(1) * b.size(1) >= kMinOneDnnMacs;
}

// result = beta * result + a @ b, with result already of the right shape and a's dtype.
void gemm_into(const Tensor& a, const Tensor& b, const Tensor& result, float beta) {
  if (use_onednn(a, b)) {
    try {
      if (beta == 0.0f) {
        at::native::mkldnn_matmul(a, b, result, 0.0f, 1.0f);
      } else {
        // Never beta != 0 on oneDNN: torch turns it into oneDNN's sum post-op, which corrupted
        // the heap for a one-row result with a transposed mat2 (torch 2.14.1). The product goes
        // to a new buffer and is added.
        const Tensor product = at::empty_like(result, at::MemoryFormat::Contiguous);
        at::native::mkldnn_matmul(a, b, product, 0.0f, 1.0f);
        if (beta != 1.0f) const_cast<Tensor&>(result).mul_(beta);
        const_cast<Tensor&>(result).add_(product);
      }
      return;
    } catch (const c10::Error& error) {
      if (!onednn_failed.exchange(true)) {
        TORCH_WARN("fastlstm: oneDNN matmul failed (", error.what_without_backtrace(),
                   "); the CPU backend's GEMMs use torch's BLAS from now on");
      }
    }
  }
  if (beta == 0.0f) {
    at::mm_out(const_cast<Tensor&>(result), a, b);
  } else {
    const_cast<Tensor&>(result).addmm_(a, b, beta, 1.0);
  }
}

void check_matrices(const char* op, const Tensor& a, const char* a_name, const Tensor& b,
                    const char* b_name) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": ", a_name, " and ", b_name,
              " must be 2-D, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": ", a_name, " and ", b_name,
              " must be CPU tensors");
}

// self @ mat2.
Tensor mm_cpu(const Tensor& self, const Tensor& mat2) {
  check_matrices("fastlstm::mm", self, "self", mat2, "mat2");
  TORCH_CHECK(self.size(1) == mat2.size(0), "fastlstm::mm: self ", self.sizes(),
              " and mat2 ", mat2.sizes(), " cannot be multiplied");
  Tensor result = at::empty({self.size(0), mat2.size(1)}, self.options());
  if (self.size(1) == 0) return result.zero_();
  gemm_into(self, mat2, result, 0.0f);
  return result;
}

// self + mat1 @ mat2 (a new tensor).
Tensor addmm_cpu(const Tensor& self, const Tensor& mat1, const Tensor& mat2) {
  check_matrices("fastlstm::addmm", mat1, "mat1", mat2, "mat2");
  TORCH_CHECK(mat1.size(1) == mat2.size(0), "fastlstm::addmm: mat1 ", mat1.sizes(),
              " and mat2 ", mat2.sizes(), " cannot be multiplied");
  TORCH_CHECK(self.sizes() == at::IntArrayRef({mat1.size(0), mat2.size(1)}),
              "fastlstm::addmm: self must have shape [", mat1.size(0), ", ", mat2.size(1),
              "], got ", self.sizes());
  TORCH_CHECK(self.scalar_type() == mat1.scalar_type() && self.device().is_cpu(),
              "fastlstm::addmm: self must be a CPU tensor of mat1's dtype ", mat1.scalar_type(),
              ", got ", self.scalar_type(), " on ", self.device());
  Tensor result = self.clone(at::MemoryFormat::Contiguous);
  if (mat1.size(1) == 0) return result;
  gemm_into(mat1, mat2, result, 1.0f);
  return result;
}

// Which library self @ mat2 would run on now: "onednn" or "blas".
std::string gemm_library_cpu(const Tensor& self, const Tensor& mat2) {
  check_matrices("fastlstm::gemm_library", self, "self", mat2, "mat2");
  return use_onednn(self, mat2) ? "onednn" : "blas";
}

}  // namespace

Tensor linear_product(const Tensor& input, const Tensor& weight) {
  return mm_cpu(input, weight.t());  // mm_cpu checks the operands
}

TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def("gemm_library(Tensor self, Tensor mat2) -> str");
  m.def("mm(Tensor self, Tensor mat2) -> Tensor");
  m.def("addmm(Tensor self, Tensor mat1, Tensor mat2) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("gemm_library", &gemm_library_cpu);
  m.impl("mm", &mm_cpu);
  m.impl("addmm", &addmm_cpu);
}

}  // namespace cpu
}  // namespace fastlstm
