// C++ tests of the CPU kernels (run by ctest): the cell.h arithmetic against its formulas and
// finite differences, and fastlstm::recurrence_forward / recurrence_backward, called through the
// dispatcher, against a simple per-step reference written with ATen ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/cell.h"
#include "decode/decode_kernels.h"
#include "cpu/step_gemm.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

void expect_close(double actual, double expected, double atol, const std::string& what) {
  expect(std::fabs(actual - expected) <= atol,
         what + ": got " + std::to_string(actual) + ", expected " + std::to_string(expected));
}

void expect_close(const at::Tensor& actual, const at::Tensor& expected, double atol,
                  const std::string& what) {
  if (actual.sizes() != expected.sizes()) {
    expect(false, what + ": shape mismatch");
    return;
  }
  if (actual.numel() == 0) return;
  const double error = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
  expect(error <= atol, what + ": max abs error " + std::to_string(error));
}

// ---- cell.h -------------------------------------------------------------------------------

double cell_output(double pi, double pf, double pg, double po, double c_prev, double* c_out) {
  fastlstm::GateValues<double> gates{};
  double c_new = 0;
  const double r = fastlstm::cell_forward(pi, pf, pg, po, c_prev, gates, c_new);
  if (c_out != nullptr) *c_out = c_new;
  return r;
}

void test_cell_arithmetic() {
  const double pre[4] = {0.3, -1.2, 0.7, 2.1};
  const double c_prev = -0.4;
  fastlstm::GateValues<double> gates{};
  double c_new = 0;
  const double r = fastlstm::cell_forward(pre[0], pre[1], pre[2], pre[3], c_prev, gates, c_new);
  auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  expect_close(gates.i, sig(pre[0]), 1e-15, "cell i");
  expect_close(gates.f, sig(pre[1]), 1e-15, "cell f");
  expect_close(gates.g, std::tanh(pre[2]), 1e-15, "cell g");
  expect_close(gates.o, sig(pre[3]), 1e-15, "cell o");
  expect_close(c_new, sig(pre[1]) * c_prev + sig(pre[0]) * std::tanh(pre[2]), 1e-15, "cell c");
  expect_close(r, sig(pre[3]) * std::tanh(c_new), 1e-15, "cell r");

  // Backward against central differences of L = a * r + b * c_new.
  const double a = 0.8, b = -1.3;
  fastlstm::GateGrads<double> grads{};
  double dc_prev = 0;
  fastlstm::cell_backward(gates, c_new, c_prev, a, b, grads, dc_prev);
  const double eps = 1e-6;
  auto loss = [&](int which, double delta) {
    double p[4] = {pre[0], pre[1], pre[2], pre[3]};
    double cp = c_prev;
    if (which < 4) p[which] += delta; else cp += delta;
    double c = 0;
    const double out = cell_output(p[0], p[1], p[2], p[3], cp, &c);
    return a * out + b * c;
  };
  const double analytic[5] = {grads.i, grads.f, grads.g, grads.o, dc_prev};
  const char* names[5] = {"d pre_i", "d pre_f", "d pre_g", "d pre_o", "d c_prev"};
  for (int k = 0; k < 5; ++k) {
    const double numeric = (loss(k, eps) - loss(k, -eps)) / (2 * eps);
    expect_close(analytic[k], numeric, 1e-8, std::string("cell backward ") + names[k]);
  }

  // float: saturated inputs stay finite.
  fastlstm::GateValues<float> gf{};
  float cf = 0;
  const float rf = fastlstm::cell_forward(100.f, -100.f, 100.f, -100.f, 1.f, gf, cf);
  expect(std::isfinite(rf) && std::isfinite(cf) && gf.i == 1.f && gf.f == 0.f,
         "cell saturates cleanly in float");
}

// ---- the ops against a per-step reference --------------------------------------------------

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Forward call_forward(const at::Tensor& xg, const at::Tensor& batch_sizes, const at::Tensor& h0,
                     const at::Tensor& c0, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& w_hr, bool reverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlstm::recurrence_forward", "")
                       .typed<Forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, bool, bool,
                                      const std::optional<at::Tensor>&,
                                      const std::optional<at::Tensor>&, double, double,
                                      const std::optional<at::Tensor>&, bool,
                                      const std::optional<at::Tensor>&)>();
  // No bias, no fused projection, no regularizers (zoneout 0, no seed, no W_hh mask).
  return op.call(xg, batch_sizes, h0, c0, w_hh, w_hr, reverse, true, std::nullopt, std::nullopt,
                 0.0, 0.0, std::nullopt, false, std::nullopt);
}

Backward call_backward(const at::Tensor& grad_out, const at::Tensor& grad_hn,
                       const at::Tensor& grad_cn, const at::Tensor& batch_sizes,
                       const at::Tensor& c0, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& w_hr, const at::Tensor& gates,
                       const at::Tensor& cells, bool reverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlstm::recurrence_backward", "")
                       .typed<Backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&, const at::Tensor&,
                                       const at::Tensor&, bool, double, double,
                                       const std::optional<at::Tensor>&, bool,
                                       const std::optional<at::Tensor>&)>();
  return op.call(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr, gates, cells, reverse,
                 0.0, 0.0, std::nullopt, false, std::nullopt);
}

struct Case {
  int64_t batch, steps, hidden, proj;
  bool packed, reverse;
};

// Per time step with ATen ops, keeping every step's state, then backward through the same steps
// by hand; the state lists make packed sequences plain indexing.
void check_case(const Case& cs, at::ScalarType dtype, double atol) {
  const std::string name = "B=" + std::to_string(cs.batch) + " T=" + std::to_string(cs.steps) +
                           " H=" + std::to_string(cs.hidden) + " P=" + std::to_string(cs.proj) +
                           (cs.packed ? " packed" : " dense") + (cs.reverse ? " reverse" : "") +
                           (dtype == at::kDouble ? " f64" : " f32");
  const auto options = at::TensorOptions().dtype(dtype);
  const int64_t width = cs.proj > 0 ? cs.proj : cs.hidden;
  std::vector<int64_t> sizes(cs.steps, cs.batch);
  if (cs.packed) {
    for (int64_t t = 0; t < cs.steps; ++t) {
      sizes[t] = std::max<int64_t>(1, cs.batch - t * cs.batch / cs.steps);
    }
  }
  std::vector<int64_t> offsets(cs.steps + 1, 0);
  for (int64_t t = 0; t < cs.steps; ++t) offsets[t + 1] = offsets[t] + sizes[t];
  const int64_t rows = offsets[cs.steps];
  const at::Tensor batch_sizes =
      cs.packed ? at::tensor(sizes, at::kLong) : at::empty({0}, at::kLong);

  at::manual_seed(0);
  const at::Tensor xg = at::randn({rows, 4 * cs.hidden}, options);
  const at::Tensor h0 = at::randn({cs.batch, width}, options) * 0.5;
  const at::Tensor c0 = at::randn({cs.batch, cs.hidden}, options) * 0.5;
  const at::Tensor w_hh = at::randn({4 * cs.hidden, width}, options) / std::sqrt(double(width));
  std::optional<at::Tensor> w_hr;
  if (cs.proj > 0) w_hr = at::randn({cs.proj, cs.hidden}, options) / std::sqrt(double(cs.hidden));

  // Reference forward.
  at::Tensor h = h0.clone(), c = c0.clone();
  at::Tensor out = at::empty({rows, width}, options);
  at::Tensor gates_ref = at::empty({rows, 4 * cs.hidden}, options);
  at::Tensor cells_ref = at::empty({rows, cs.hidden}, options);
  std::vector<at::Tensor> h_prev_of(cs.steps), c_prev_of(cs.steps);
  for (int64_t s = 0; s < cs.steps; ++s) {
    const int64_t t = cs.reverse ? cs.steps - 1 - s : s;
    const int64_t live = sizes[t], offset = offsets[t];
    h_prev_of[t] = h.narrow(0, 0, live).clone();
    c_prev_of[t] = c.narrow(0, 0, live).clone();
    const at::Tensor pre = xg.narrow(0, offset, live) + at::mm(h_prev_of[t], w_hh.t());
    const auto chunks = pre.chunk(4, 1);
    const at::Tensor i = chunks[0].sigmoid(), f = chunks[1].sigmoid(), g = chunks[2].tanh(),
                     o = chunks[3].sigmoid();
    const at::Tensor c_new = f * c_prev_of[t] + i * g;
    at::Tensor h_new = o * c_new.tanh();
    if (w_hr) h_new = at::mm(h_new, w_hr->t());
    h.narrow(0, 0, live).copy_(h_new);
    c.narrow(0, 0, live).copy_(c_new);
    out.narrow(0, offset, live).copy_(h_new);
    gates_ref.narrow(0, offset, live).copy_(at::cat({i, f, g, o}, 1));
    cells_ref.narrow(0, offset, live).copy_(c_new);
  }
  const Forward got = call_forward(xg, batch_sizes, h0, c0, w_hh, w_hr, cs.reverse);
  expect_close(std::get<0>(got), out, atol, name + " out");
  expect_close(std::get<1>(got), h, atol, name + " h_n");
  expect_close(std::get<2>(got), c, atol, name + " c_n");
  expect_close(std::get<3>(got), gates_ref, atol, name + " gates");
  expect_close(std::get<4>(got), cells_ref, atol, name + " cells");

  // Reference backward, visiting the steps in the opposite order.
  const at::Tensor grad_out = at::randn({rows, width}, options);
  const at::Tensor grad_hn = at::randn({cs.batch, width}, options);
  const at::Tensor grad_cn = at::randn({cs.batch, cs.hidden}, options);
  at::Tensor dh = grad_hn.clone(), dc = grad_cn.clone();
  at::Tensor grad_xg = at::empty({rows, 4 * cs.hidden}, options);
  for (int64_t s = cs.steps - 1; s >= 0; --s) {
    const int64_t t = cs.reverse ? cs.steps - 1 - s : s;
    const int64_t live = sizes[t], offset = offsets[t];
    const auto chunks = gates_ref.narrow(0, offset, live).chunk(4, 1);
    const at::Tensor &i = chunks[0], &f = chunks[1], &g = chunks[2], &o = chunks[3];
    const at::Tensor c_now = cells_ref.narrow(0, offset, live);
    at::Tensor dr = dh.narrow(0, 0, live) + grad_out.narrow(0, offset, live);
    if (w_hr) dr = at::mm(dr, *w_hr);
    const at::Tensor tc = c_now.tanh();
    const at::Tensor dc_total = dc.narrow(0, 0, live) + dr * o * (1 - tc * tc);
    const at::Tensor dpre = at::cat({dc_total * g * i * (1 - i), dc_total * c_prev_of[t] * f * (1 - f),
                                     dc_total * i * (1 - g * g), dr * tc * o * (1 - o)}, 1);
    grad_xg.narrow(0, offset, live).copy_(dpre);
    dh.narrow(0, 0, live).copy_(at::mm(dpre, w_hh));
    dc.narrow(0, 0, live).copy_(dc_total * f);
  }
  const Backward grads = call_backward(grad_out, grad_hn, grad_cn, batch_sizes, c0, w_hh, w_hr,
                                       std::get<3>(got), std::get<4>(got), cs.reverse);
  expect_close(std::get<0>(grads), grad_xg, atol, name + " grad_xg");
  expect_close(std::get<1>(grads), dh, atol, name + " grad_h0");
  expect_close(std::get<2>(grads), dc, atol, name + " grad_c0");
}

void test_bad_argument_is_reported() {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  bool raised = false;
  try {
    call_forward(at::zeros({6, 31}, options), at::empty({0}, at::kLong), at::zeros({2, 8}, options),
                 at::zeros({2, 8}, options), at::zeros({32, 8}, options), std::nullopt, false);
  } catch (const c10::Error& error) {
    raised = std::string(error.what()).find("xg must have shape [N, 4*hidden]") !=
             std::string::npos;
  }
  expect(raised, "a wrong xg shape raises an error naming xg and its expected shape");
}

// Each instruction set's dot4 / dot1 against a double-precision sum, for lengths around every
// vector width (the tails are masked loads) and rows that start off the vector alignment.
void check_dot_kernels(const char* name, const fastlstm::cpu::DecodeKernels& dots) {
  const int64_t lengths[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 512};
  for (const int64_t n : lengths) {
    const at::Tensor rows = at::randn({4, n + 1}, at::kFloat);
    const at::Tensor x = at::randn({n + 1}, at::kFloat);
    const float* r = rows.data_ptr<float>() + 1;  // one float past the start: unaligned
    const float* xv = x.data_ptr<float>() + 1;
    const int64_t ld = n + 1;
    float out[4];
    dots.dot4(r, r + ld, r + 2 * ld, r + 3 * ld, xv, n, out);
    for (int j = 0; j < 4; ++j) {
      double expected = 0.0;
      for (int64_t k = 0; k < n; ++k) expected += double(r[j * ld + k]) * double(xv[k]);
      const std::string what = std::string(name) + " dot4 n=" + std::to_string(n) + " row " +
                               std::to_string(j);
      expect_close(out[j], expected, 1e-5 * (1.0 + std::sqrt(double(n))), what);
      if (j == 2) {
        expect_close(dots.dot1(r + 2 * ld, xv, n), expected, 1e-5 * (1.0 + std::sqrt(double(n))),
                     std::string(name) + " dot1 n=" + std::to_string(n));
      }
    }
  }
}

void test_dot_kernels() {
  using fastlstm::cpu::DecodeKernels;
  check_dot_kernels("baseline", DecodeKernels{fastlstm::cpu::dot4_baseline,
                                              fastlstm::cpu::dot1_baseline, nullptr});
#if defined(__x86_64__) || defined(_M_X64)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    check_dot_kernels("avx2",
                      DecodeKernels{fastlstm::cpu::dot4_avx2, fastlstm::cpu::dot1_avx2, nullptr});
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    check_dot_kernels("avx512",
                      DecodeKernels{fastlstm::cpu::dot4_avx512, fastlstm::cpu::dot1_avx512,
                                    nullptr});
  }
#endif
  check_dot_kernels("dispatched", fastlstm::cpu::decode_kernels());
}

// One step GEMM kernel against a double-precision product: every row count up to past two
// register blocks (each remainder kernel), column counts around the 16- and 32-wide masks, depths
// around its K blocks, B packed from both layouts, accumulating into c on alternate cases, and
// leading dimensions wider than the matrices. `Packed` is the packing's element type; `bf16_values`
// draws values bf16 holds exactly (as in a bf16 layer, what the bf16 kernel is for).
template <typename Packed, typename PackedSize, typename Pack, typename Gemm>
void check_step_gemm(const char* name, bool bf16_values, PackedSize packed_size, Pack pack,
                     Gemm gemm) {
  const int64_t rows_list[] = {1, 2, 5, 11, 12, 13, 24, 25, 37};
  const int64_t cols_list[] = {1, 15, 16, 17, 32, 33, 64, 100};
  const int64_t depth_list[] = {1, 2, 7, 255, 256, 257, 600};
  std::vector<float> a, b, c;
  std::vector<Packed> packed;
  uint32_t state = 12345;
  auto next = [&state, bf16_values] {
    state = state * 1664525u + 1013904223u;
    float value = static_cast<float>(static_cast<int32_t>(state >> 8) - (1 << 23)) /
                  float(1 << 23);
    if (bf16_values) {
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof(bits));
      bits &= 0xFFFF0000u;
      std::memcpy(&value, &bits, sizeof(bits));
    }
    return value;
  };
  for (const int64_t m : rows_list) {
    for (const int64_t n : cols_list) {
      for (const int64_t k : depth_list) {
        for (const bool transposed : {false, true}) {
          const bool accumulate = ((m + n + k) % 2 == 1) == transposed;
          const int64_t lda = k + 3, ldc = n + 5, ldb = (transposed ? k : n) + 2;
          a.resize(m * lda);
          b.resize((transposed ? n : k) * ldb);
          for (float& v : a) v = next();
          for (float& v : b) v = next();
          c.assign(m * ldc, 7.0f);  // columns past n must keep this
          const float start = accumulate ? 0.5f : 0.0f;
          for (int64_t i = 0; accumulate && i < m; ++i) std::fill_n(&c[i * ldc], n, start);
          packed.assign(packed_size(k, n), Packed(0xFF));
          pack(b.data(), ldb, transposed, k, n, packed.data());
          gemm(m, n, k, a.data(), lda, packed.data(), c.data(), ldc, accumulate);
          double worst = 0.0;
          bool padding_kept = true;
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < n; ++j) {
              double expected = start;
              for (int64_t kk = 0; kk < k; ++kk) {
                const double bv = transposed ? b[j * ldb + kk] : b[kk * ldb + j];
                expected += static_cast<double>(a[i * lda + kk]) * bv;
              }
              worst = std::max(worst, std::fabs(expected - c[i * ldc + j]));
            }
            for (int64_t j = n; j < ldc; ++j) padding_kept &= c[i * ldc + j] == 7.0f;
          }
          const std::string what = std::string(name) + " m=" + std::to_string(m) + " n=" +
                                   std::to_string(n) + " k=" + std::to_string(k) +
                                   (transposed ? " (B transposed)" : "") +
                                   (accumulate ? " (accumulating)" : "");
          expect(worst <= 1e-5 * std::sqrt(static_cast<double>(k)) + 1e-6,
                 what + ": max abs error " + std::to_string(worst));
          expect(padding_kept, what + ": wrote past column n");
        }
      }
    }
  }
}

void test_step_gemm() {
  if (fastlstm::cpu::step_gemm_available()) {
    check_step_gemm<float>(
        "step_gemm", false, fastlstm::cpu::step_gemm_packed_floats,
        [](const float* b, int64_t ldb, bool t, int64_t k, int64_t n, float* packed) {
          fastlstm::cpu::step_gemm_pack(b, ldb, t, k, n, packed);
        },
        [](int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* packed,
           float* c, int64_t ldc, bool accumulate) {
          fastlstm::cpu::step_gemm_avx512(m, n, k, a, lda, packed, c, ldc, accumulate);
        });
  } else {
    std::printf("step_gemm: no AVX-512 on this CPU, not tested\n");
  }
  if (fastlstm::cpu::step_gemm_bf16_available()) {
    check_step_gemm<uint16_t>(
        "step_gemm_bf16", true, fastlstm::cpu::step_gemm_packed_bf16_elements,
        [](const float* b, int64_t ldb, bool t, int64_t k, int64_t n, uint16_t* packed) {
          fastlstm::cpu::step_gemm_pack_bf16(b, ldb, t, k, n, packed);
        },
        [](int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint16_t* packed,
           float* c, int64_t ldc, bool accumulate) {
          fastlstm::cpu::step_gemm_bf16(m, n, k, a, lda, packed, c, ldc, accumulate);
        });
  } else {
    std::printf("step_gemm_bf16: no AVX512-BF16 on this CPU, not tested\n");
  }
}

}  // namespace

int main() {
  test_cell_arithmetic();
  const Case cases[] = {
      {3, 5, 8, 0, false, false}, {3, 5, 8, 0, false, true},  {5, 7, 13, 0, true, false},
      {5, 7, 13, 0, true, true},  {4, 6, 11, 5, false, false}, {4, 6, 11, 5, true, true},
      {1, 9, 7, 0, false, false}, {6, 1, 9, 0, false, true},   {2, 4, 40, 3, false, true},
  };
  for (const Case& cs : cases) {
    check_case(cs, at::kDouble, 1e-12);
    check_case(cs, at::kFloat, 2e-5);
  }
  test_bad_argument_is_reported();
  test_dot_kernels();
  test_step_gemm();
  if (failures == 0) std::printf("all CPU kernel tests passed\n");
  return failures == 0 ? 0 : 1;
}
