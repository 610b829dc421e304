// CPU kernels of fastlstm::recurrence_forward / recurrence_backward: the whole recurrence of one
// layer and direction in one op call (the contract is in fastlstm/_recurrence.py).
//
// Per time step: the h @ W_hh^T GEMM through ATen (MKL or oneDNN underneath) into a preallocated
// buffer, then the fused cell arithmetic of cell.h over SIMD lanes, parallel over batch rows.
// Everything is computed in the accumulation type (double for float64, float otherwise); fp16 and
// bf16 inputs are converted once on entry, and h is rounded through the input dtype each step, as
// the contract asks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "lstm_cpu_kernels.h"

#if defined(__linux__)
// The Fortran BLAS that libtorch_cpu exports when torch is built with MKL or OpenBLAS. Declared
// weak: a torch without them still loads this library, and the steps fall back to at::mm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}
#define FASTLSTM_DIRECT_BLAS 1
#endif

FASTLSTM_DEFINE_CPU_STEP_KERNELS(baseline)

namespace fastlstm {
namespace cpu {

#if defined(__x86_64__) || defined(_M_X64)
// Defined in lstm_cpu_avx2.cpp, compiled for AVX2 + FMA.
void forward_step_avx2(const ForwardStep<float>& step, int64_t live);
void forward_step_avx2(const ForwardStep<double>& step, int64_t live);
void backward_step_avx2(const BackwardStep<float>& step, int64_t live);
void backward_step_avx2(const BackwardStep<double>& step, int64_t live);

// Defined in lstm_cpu_avx512.cpp.
void forward_step_avx512(const ForwardStep<float>& step, int64_t live);
void forward_step_avx512(const ForwardStep<double>& step, int64_t live);
void backward_step_avx512(const BackwardStep<float>& step, int64_t live);
void backward_step_avx512(const BackwardStep<double>& step, int64_t live);

static bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

static bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}
#endif

template <typename T>
static void forward_step(const ForwardStep<T>& step, int64_t live) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_has_avx512()) return forward_step_avx512(step, live);
  if (cpu_has_avx2()) return forward_step_avx2(step, live);
#endif
  forward_step_baseline(step, live);
}

template <typename T>
static void backward_step(const BackwardStep<T>& step, int64_t live) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_has_avx512()) return backward_step_avx512(step, live);
  if (cpu_has_avx2()) return backward_step_avx2(step, live);
#endif
  backward_step_baseline(step, live);
}

namespace {

using at::Tensor;

// ---- the per-step GEMM ----------------------------------------------------------------------

// c[m, n] = a[m, k] @ b[k, n], row-major with leading dimensions; a_t / b_t say that a / b are
// stored transposed ([k, m] / [n, k]). A small step's GEMM takes a few microseconds, and
// at::mm_out's dispatch and the narrow()ed views around it took as long (B=8, H=128), so the
// BLAS is called directly when torch exports one.
template <typename T>
void step_gemm(bool a_t, bool b_t, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
               const T* b, int64_t ldb, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#ifdef FASTLSTM_DIRECT_BLAS
  constexpr bool is_float = std::is_same<T, float>::value;
  const bool have = is_float ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (have && k > 0 && m < INT_MAX && n < INT_MAX && k < INT_MAX && lda < INT_MAX &&
      ldb < INT_MAX && ldc < INT_MAX) {
    // Column-major BLAS: c^T = b^T @ a^T.
    const char ta = b_t ? 'T' : 'N', tb = a_t ? 'T' : 'N';
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda),
              ildc = static_cast<int>(ldc);
    const T one = 1, zero = 0;
    if constexpr (is_float) {
      sgemm_(&ta, &tb, &im, &in, &ik, &one, b, &ilda, a, &ildb, &zero, c, &ildc);
    } else {
      dgemm_(&ta, &tb, &im, &in, &ik, &one, b, &ilda, a, &ildb, &zero, c, &ildc);
    }
    return;
  }
#endif
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  T* a_mut = const_cast<T*>(a);
  T* b_mut = const_cast<T*>(b);
  Tensor a_view = a_t ? at::from_blob(a_mut, {m, k}, {1, lda}, options)
                      : at::from_blob(a_mut, {m, k}, {lda, 1}, options);
  Tensor b_view = b_t ? at::from_blob(b_mut, {k, n}, {1, ldb}, options)
                      : at::from_blob(b_mut, {k, n}, {ldb, 1}, options);
  Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::mm_out(c_view, a_view, b_view);
}

// ---- argument checks: every tensor is checked before any memory is touched ------------------

void check_tensor(const char* op, const Tensor& tensor, const char* name, const char* shape_text,
                  std::vector<int64_t> shape, at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
              tensor.device());
  TORCH_CHECK(tensor.dim() == static_cast<int64_t>(shape.size()) &&
                  tensor.sizes() == at::IntArrayRef(shape),
              op, ": ", name, " must have shape ", shape_text, " = ", at::IntArrayRef(shape),
              ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous(), op, ": ", name, " must be contiguous");
}

bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Live rows per time step, in time order. An empty batch_sizes means dense: `batch` rows a step.
std::vector<int64_t> step_sizes(const char* op, const Tensor& batch_sizes, int64_t num_rows,
                                int64_t batch) {
  TORCH_CHECK(batch_sizes.device().is_cpu(), op,
              ": batch_sizes must be a CPU tensor (as in PackedSequence), got one on ",
              batch_sizes.device());
  TORCH_CHECK(batch_sizes.dim() == 1, op, ": batch_sizes must be 1-D [T], got shape ",
              batch_sizes.sizes());
  std::vector<int64_t> sizes;
  if (batch_sizes.numel() == 0) {
    if (batch == 0) {
      TORCH_CHECK(num_rows == 0, op, ": with a batch of 0 rows the input must have 0 rows, got ",
                  num_rows);
      return sizes;
    }
    TORCH_CHECK(num_rows % batch == 0, op, ": dense input (empty batch_sizes) must have T * B rows "
                "with B = h0.size(0) = ", batch, ", got ", num_rows, " rows");
    sizes.assign(num_rows / batch, batch);
    return sizes;
  }
  TORCH_CHECK(batch_sizes.scalar_type() == at::kLong, op, ": batch_sizes must have dtype int64, "
              "got ", batch_sizes.scalar_type());
  const Tensor contiguous = batch_sizes.contiguous();
  const int64_t* data = contiguous.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t t = 0; t < contiguous.numel(); ++t) {
    const int64_t live = data[t];
    TORCH_CHECK(live >= 1 && live <= batch, op, ": batch_sizes[", t, "] = ", live,
                " must be in [1, B] with B = h0.size(0) = ", batch);
    TORCH_CHECK(t == 0 || live <= data[t - 1], op, ": batch_sizes must not increase, got ",
                data[t - 1], " then ", live, " at step ", t);
    total += live;
    sizes.push_back(live);
  }
  TORCH_CHECK(total == num_rows, op, ": batch_sizes sum to ", total, " but the input has ",
              num_rows, " rows");
  return sizes;
}

std::vector<int64_t> step_offsets(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> offsets(sizes.size() + 1, 0);
  for (size_t t = 0; t < sizes.size(); ++t) offsets[t + 1] = offsets[t] + sizes[t];
  return offsets;
}

Tensor to_acc(const Tensor& tensor, at::ScalarType acc) {
  return tensor.scalar_type() == acc ? tensor : tensor.to(acc);
}

// ---- forward --------------------------------------------------------------------------------

template <typename T>
void forward_loop(const std::vector<int64_t>& sizes, bool reverse, int64_t hidden,
                  const Tensor& input_gates, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                  Tensor& h, Tensor& c, Tensor& out, Tensor& gates, Tensor& cells, bool save) {
  const int64_t steps = static_cast<int64_t>(sizes.size());
  const std::vector<int64_t> offsets = step_offsets(sizes);
  const int64_t batch = h.size(0);
  const int64_t proj = h.size(1);
  const bool direct_out = out.scalar_type() == h.scalar_type() && !w_hr.has_value();
  // h @ W_hh^T reads W_hh^T as a contiguous [P, 4H] matrix: MKL's sgemm ran 10-15% faster on it
  // than on the transposed view (B=32, H=256, one thread), and the copy is made once per layer.
  const Tensor w_hh_t = w_hh.t().contiguous();
  // Gates of one step when they are not saved; r = o * tanh(c) before the projection.
  Tensor scratch_gates = save ? Tensor() : at::empty({batch, 4 * hidden}, h.options());
  Tensor r = w_hr.has_value() ? at::empty({batch, hidden}, h.options()) : Tensor();
  // Raw pointers, taken once: the loop touches no Tensor on the direct path.
  const T* input_data = input_gates.data_ptr<T>();
  const T* w_hh_t_data = w_hh_t.data_ptr<T>();
  const T* w_hr_data = w_hr.has_value() ? w_hr->data_ptr<T>() : nullptr;
  T* h_data = h.data_ptr<T>();
  T* c_data = c.data_ptr<T>();
  T* r_data = w_hr.has_value() ? r.data_ptr<T>() : nullptr;
  T* gates_data = save ? gates.data_ptr<T>() : nullptr;
  T* cells_data = save ? cells.data_ptr<T>() : nullptr;
  T* scratch_data = save ? nullptr : scratch_gates.data_ptr<T>();
  T* out_data = direct_out ? out.data_ptr<T>() : nullptr;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t offset = offsets[t], live = sizes[t];
    T* step_gates = save ? gates_data + offset * 4 * hidden : scratch_data;
    step_gemm<T>(false, false, live, 4 * hidden, proj, h_data, proj, w_hh_t_data, 4 * hidden,
                 step_gates, 4 * hidden);
    ForwardStep<T> step;
    step.hidden = hidden;
    step.input_gates = input_data + offset * 4 * hidden;
    step.gates = step_gates;
    step.c = c_data;
    step.cells = save ? cells_data + offset * hidden : nullptr;
    step.r = w_hr.has_value() ? r_data : h_data;
    step.r_stride = w_hr.has_value() ? hidden : proj;
    step.r_copy = direct_out ? out_data + offset * proj : nullptr;
    forward_step(step, live);
    if (w_hr.has_value()) {
      // h = r @ W_hr^T, W_hr being [P, H].
      step_gemm<T>(false, true, live, proj, hidden, r_data, hidden, w_hr_data, hidden, h_data,
                   proj);
    }
    if (!direct_out) {
      Tensor h_live = h.narrow(0, 0, live);
      Tensor out_rows = out.narrow(0, offset, live);
      out_rows.copy_(h_live);
      // The next step reads h as the caller's dtype holds it.
      if (out.scalar_type() != h.scalar_type()) h_live.copy_(out_rows);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward_cpu(
    const Tensor& xg, const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, const std::optional<Tensor>& w_hr, bool reverse, bool save) {
  const char* op = "fastlstm::recurrence_forward";
  TORCH_CHECK(xg.dim() == 2, op, ": xg must be 2-D [N, 4*hidden], got shape ", xg.sizes());
  TORCH_CHECK(c0.dim() == 2, op, ": c0 must be 2-D [B, hidden], got shape ", c0.sizes());
  TORCH_CHECK(h0.dim() == 2, op, ": h0 must be 2-D [B, P], got shape ", h0.sizes());
  const auto dtype = xg.scalar_type();
  TORCH_CHECK(supported_dtype(dtype), op, ": xg must be float32, float64, float16 or bfloat16, "
              "got ", dtype);
  const int64_t num_rows = xg.size(0), batch = c0.size(0), hidden = c0.size(1);
  TORCH_CHECK(hidden > 0, op, ": hidden size (c0.size(1)) must be positive");
  const int64_t proj = w_hr.has_value() ? w_hr->size(0) : hidden;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": w_hr must be 2-D [P, hidden], got shape ", w_hr->sizes());
    check_tensor(op, *w_hr, "w_hr", "[P, hidden]", {proj, hidden}, dtype);
  }
  check_tensor(op, xg, "xg", "[N, 4*hidden]", {num_rows, 4 * hidden}, dtype);
  check_tensor(op, c0, "c0", "[B, hidden]", {batch, hidden}, dtype);
  check_tensor(op, h0, "h0", "[B, P]", {batch, proj}, dtype);
  check_tensor(op, w_hh, "w_hh", "[4*hidden, P]", {4 * hidden, proj}, dtype);
  const std::vector<int64_t> sizes = step_sizes(op, batch_sizes, num_rows, batch);

  const auto acc = acc_dtype(dtype);
  const auto acc_options = xg.options().dtype(acc);
  Tensor out = at::empty({num_rows, proj}, xg.options());
  Tensor gates = at::empty({save ? num_rows : 0, 4 * hidden}, acc_options);
  Tensor cells = at::empty({save ? num_rows : 0, hidden}, acc_options);
  Tensor h = h0.to(acc, /*non_blocking=*/false, /*copy=*/true);
  Tensor c = c0.to(acc, /*non_blocking=*/false, /*copy=*/true);
  const Tensor input_gates = to_acc(xg, acc);
  const Tensor w_hh_acc = to_acc(w_hh, acc);
  const std::optional<Tensor> w_hr_acc =
      w_hr.has_value() ? std::optional<Tensor>(to_acc(*w_hr, acc)) : std::nullopt;
  if (acc == at::kDouble) {
    forward_loop<double>(sizes, reverse, hidden, input_gates, w_hh_acc, w_hr_acc, h, c, out, gates,
                         cells, save);
  } else {
    forward_loop<float>(sizes, reverse, hidden, input_gates, w_hh_acc, w_hr_acc, h, c, out, gates,
                        cells, save);
  }
  return {out, h.to(dtype), c.to(dtype), gates, cells};
}

// ---- backward -------------------------------------------------------------------------------

template <typename T>
void backward_loop(const std::vector<int64_t>& sizes, bool reverse, int64_t hidden,
                   const Tensor& grad_out, const Tensor& c0, const Tensor& w_hh,
                   const std::optional<Tensor>& w_hr, const Tensor& gates, const Tensor& cells,
                   Tensor& dh, Tensor& dc, Tensor& grad_xg, Tensor& grad_h_total) {
  const int64_t steps = static_cast<int64_t>(sizes.size());
  const std::vector<int64_t> offsets = step_offsets(sizes);
  const int64_t batch = dh.size(0);
  const int64_t proj = dh.size(1);
  const bool direct_grad = grad_xg.scalar_type() == dh.scalar_type();
  const T* w_hh_data = w_hh.data_ptr<T>();
  T* dh_data = dh.data_ptr<T>();
  Tensor scratch_grad = direct_grad ? Tensor() : at::empty({batch, 4 * hidden}, dh.options());
  // With a projection: the whole gradient reaching h, then the gradient reaching r.
  Tensor dh_total = w_hr.has_value() ? at::empty_like(dh) : Tensor();
  Tensor dr = w_hr.has_value() ? at::empty({batch, hidden}, dh.options()) : Tensor();
  // Raw pointers, taken once: without a projection the loop touches no Tensor.
  const T* gates_data = gates.data_ptr<T>();
  const T* cells_data = cells.data_ptr<T>();
  const T* c0_data = c0.data_ptr<T>();
  const T* grad_out_data = grad_out.data_ptr<T>();
  T* dc_data = dc.data_ptr<T>();
  T* grad_xg_data = direct_grad ? grad_xg.data_ptr<T>() : nullptr;
  T* scratch_data = direct_grad ? nullptr : scratch_grad.data_ptr<T>();
  // Backward visits the steps in the opposite order of the forward.
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t offset = offsets[t], live = sizes[t];
    const int64_t prev_t = reverse ? t + 1 : t - 1;  // the step the forward visited before t
    const bool has_prev = prev_t >= 0 && prev_t < steps;
    BackwardStep<T> step;
    step.hidden = hidden;
    step.gates = gates_data + offset * 4 * hidden;
    step.cells = cells_data + offset * hidden;
    step.prev_cells = has_prev ? cells_data + offsets[prev_t] * hidden : nullptr;
    step.prev_live = has_prev ? sizes[prev_t] : 0;
    step.c0 = c0_data;
    step.dc = dc_data;
    step.grad_gates = direct_grad ? grad_xg_data + offset * 4 * hidden : scratch_data;
    if (w_hr.has_value()) {
      Tensor total = dh_total.narrow(0, 0, live);
      at::add_out(total, dh.narrow(0, 0, live), grad_out.narrow(0, offset, live));
      grad_h_total.narrow(0, offset, live).copy_(total);
      // dr = total @ W_hr, W_hr being [P, H].
      step_gemm<T>(false, false, live, hidden, proj, total.data_ptr<T>(), proj,
                   w_hr->data_ptr<T>(), hidden, dr.data_ptr<T>(), hidden);
      step.dh = dr.data_ptr<T>();
      step.grad_out = nullptr;
    } else {
      step.dh = dh_data;
      step.grad_out = grad_out_data + offset * proj;
    }
    backward_step(step, live);
    if (!direct_grad) {
      grad_xg.narrow(0, offset, live).copy_(scratch_grad.narrow(0, 0, live));
    }
    // dh = grad_gates @ W_hh, W_hh being [4H, P].
    step_gemm<T>(false, false, live, proj, 4 * hidden, step.grad_gates, 4 * hidden, w_hh_data,
                 proj, dh_data, proj);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> recurrence_backward_cpu(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn,
    const Tensor& batch_sizes, const Tensor& c0, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const Tensor& gates, const Tensor& cells, bool reverse) {
  const char* op = "fastlstm::recurrence_backward";
  TORCH_CHECK(grad_out.dim() == 2, op, ": grad_out must be 2-D [N, P], got shape ",
              grad_out.sizes());
  TORCH_CHECK(c0.dim() == 2, op, ": c0 must be 2-D [B, hidden], got shape ", c0.sizes());
  const auto dtype = grad_out.scalar_type();
  TORCH_CHECK(supported_dtype(dtype), op, ": grad_out must be float32, float64, float16 or "
              "bfloat16, got ", dtype);
  const auto acc = acc_dtype(dtype);
  TORCH_CHECK(gates.dim() == 2, op, ": gates must be 2-D [N, 4*hidden], got shape ",
              gates.sizes());
  TORCH_CHECK(gates.size(0) != 0 || grad_out.size(0) == 0, op, ": gates is empty; the forward "
              "was run with save=False and kept nothing for backward");
  // The rows are those the forward saved.
  const int64_t num_rows = gates.size(0), batch = c0.size(0), hidden = c0.size(1);
  TORCH_CHECK(hidden > 0, op, ": hidden size (c0.size(1)) must be positive");
  const int64_t proj = w_hr.has_value() ? w_hr->size(0) : hidden;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": w_hr must be 2-D [P, hidden], got shape ", w_hr->sizes());
    check_tensor(op, *w_hr, "w_hr", "[P, hidden]", {proj, hidden}, dtype);
  }
  check_tensor(op, grad_out, "grad_out", "[N, P]", {num_rows, proj}, dtype);
  check_tensor(op, grad_hn, "grad_hn", "[B, P]", {batch, proj}, dtype);
  check_tensor(op, grad_cn, "grad_cn", "[B, hidden]", {batch, hidden}, dtype);
  check_tensor(op, c0, "c0", "[B, hidden]", {batch, hidden}, dtype);
  check_tensor(op, w_hh, "w_hh", "[4*hidden, P]", {4 * hidden, proj}, dtype);
  check_tensor(op, gates, "gates", "[N, 4*hidden] (accumulation dtype)", {num_rows, 4 * hidden},
               acc);
  check_tensor(op, cells, "cells", "[N, hidden] (accumulation dtype)", {num_rows, hidden}, acc);
  const std::vector<int64_t> sizes = step_sizes(op, batch_sizes, num_rows, batch);

  Tensor grad_xg = at::empty({num_rows, 4 * hidden}, grad_out.options());
  Tensor grad_h_total = at::empty({w_hr.has_value() ? num_rows : 0, proj}, grad_out.options());
  Tensor dh = grad_hn.to(acc, /*non_blocking=*/false, /*copy=*/true);
  Tensor dc = grad_cn.to(acc, /*non_blocking=*/false, /*copy=*/true);
  const Tensor grad_out_acc = to_acc(grad_out, acc);
  const Tensor c0_acc = to_acc(c0, acc);
  const Tensor w_hh_acc = to_acc(w_hh, acc);
  const std::optional<Tensor> w_hr_acc =
      w_hr.has_value() ? std::optional<Tensor>(to_acc(*w_hr, acc)) : std::nullopt;
  if (acc == at::kDouble) {
    backward_loop<double>(sizes, reverse, hidden, grad_out_acc, c0_acc, w_hh_acc, w_hr_acc, gates,
                          cells, dh, dc, grad_xg, grad_h_total);
  } else {
    backward_loop<float>(sizes, reverse, hidden, grad_out_acc, c0_acc, w_hh_acc, w_hr_acc, gates,
                         cells, dh, dc, grad_xg, grad_h_total);
  }
  return {grad_xg, dh.to(dtype), dc.to(dtype), grad_h_total};
}

}  // namespace
}  // namespace cpu
}  // namespace fastlstm

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("recurrence_forward", &fastlstm::cpu::recurrence_forward_cpu);
  m.impl("recurrence_backward", &fastlstm::cpu::recurrence_backward_cpu);
}
