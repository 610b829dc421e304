// The pointwise part of one LSTM time step on the CPU, vectorized with ATen's Vectorized<T>.
//
// Included by lstm_cpu.cpp (baseline instruction set) and lstm_cpu_avx2.cpp (AVX2 + FMA, chosen
// at run time), so each translation unit gets its own copy of the templates: they live in an
// anonymous namespace and ATen's Vectorized<T> sits in a per-capability inline namespace, which
// keeps the two copies apart. The arithmetic itself is cell.h's, applied to SIMD lanes.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include <torch/version.h>

// Vectorized<T>::exp_u20 exists from torch 2.4 on.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define FASTLSTM_HAVE_EXP_U20 1
#else
#define FASTLSTM_HAVE_EXP_U20 0
#endif

#include "cell.h"

namespace fastlstm {
namespace cpu {

// Pointers of one forward step. Rows are the step's live batch rows b = 0..live-1.
template <typename T>
struct ForwardStep {
  int64_t hidden;
  const T* input_gates;  // [live, 4H]: x @ W_ih^T + b of this step
  T* gates;              // [live, 4H]: h @ W_hh^T in; activated i, f, g, o out
  T* c;                  // [B, H] cell state, updated in place
  T* cells;              // [live, H] copy of the new c, or nullptr
  T* r;                  // [live, r_stride]: o * tanh(c)
  int64_t r_stride;
  T* r_copy;             // a second destination of r ([live, hidden]), or nullptr
};

// Pointers of one backward step.
template <typename T>
struct BackwardStep {
  int64_t hidden;
  const T* gates;       // [live, 4H] activated gates saved by the forward
  const T* cells;       // [live, H] c after this step
  const T* prev_cells;  // [prev_live, H] c after the previously visited step
  int64_t prev_live;    // rows b >= prev_live start from c0
  const T* c0;          // [B, H]
  const T* dh;          // [live, H]: gradient reaching r (or h without projection)
  const T* grad_out;    // [live, H] added to dh, or nullptr
  T* dc;                // [B, H] gradient reaching c, updated in place
  T* grad_gates;        // [live, 4H] pre-activation gate gradients out
};

namespace {

using at::vec::Vectorized;

// SIMD lanes with the operators and exp/tanh that cell.h's templates use; exp and tanh are
// friends so that cell.h's unqualified calls find them by argument-dependent lookup.
template <typename T>
struct Lanes {
  Vectorized<T> v;
  Lanes(T scalar) : v(scalar) {}  // NOLINT: cell.h writes Acc(1)
  Lanes(Vectorized<T> value) : v(value) {}  // NOLINT
  friend Lanes operator+(Lanes a, Lanes b) { return a.v + b.v; }
  friend Lanes operator-(Lanes a, Lanes b) { return a.v - b.v; }
  friend Lanes operator*(Lanes a, Lanes b) { return a.v * b.v; }
  friend Lanes operator/(Lanes a, Lanes b) { return a.v / b.v; }
  friend Lanes operator-(Lanes a) { return a.v.neg(); }
  friend Lanes exp(Lanes a) { return fast_exp(a.v); }
  // tanh(x) = 2 / (1 + exp(-2x)) - 1: SLEEF's tanh took 1.5x the time of the step's GEMM
  // (B=8, H=128, perf), its exp a tenth of that. The absolute error stays within a few ulp of 1,
  // which is what the cell's sums of gate products can resolve anyway; the limits +-1 come out
  // exactly (exp overflows to inf or underflows to 0).
  friend Lanes tanh(Lanes a) {
    const Vectorized<T> one(T(1)), two(T(2));
    return two / (one + fast_exp(a.v * Vectorized<T>(T(-2)))) - one;
  }

  // exp for the activations. In float, ATen's exp_u20 (a degree-5 polynomial, within 20 ulp)
  // instead of SLEEF's 1-ulp exp: five exps per cell were most of the pointwise step, and 20 ulp
  // of exp stay below float's resolution of the sigmoid/tanh results built from it. exp_u20
  // clamps its input, which would turn NaN into a finite value; NaN is passed through as is.
  static Vectorized<T> fast_exp(Vectorized<T> x) {
#if FASTLSTM_HAVE_EXP_U20
    if constexpr (std::is_same<T, float>::value) {
      return Vectorized<T>::blendv(x.exp_u20(), x, x.isnan());
    }
#endif
    return x.exp();
  }
};

template <typename T>
inline Lanes<T> load(const T* ptr, int64_t count) {
  return count == Vectorized<T>::size() ? Vectorized<T>::loadu(ptr)
                                        : Vectorized<T>::loadu(ptr, count);
}

template <typename T>
inline void store(T* ptr, Lanes<T> value, int64_t count) {
  value.v.store(ptr, static_cast<int>(count));
}

// Rows per parallel task: enough hidden units that a task outweighs the cost of handing it out.
inline int64_t grain_rows(int64_t hidden) {
  constexpr int64_t kUnitsPerTask = 8192;
  return hidden >= kUnitsPerTask ? 1 : kUnitsPerTask / hidden;
}

// The row loops are marked flatten: under lstm_cpu_avx2.cpp's target pragma (rather than
// -mavx2 on the command line) GCC left Vectorized<T>'s operators, constructors and exp as
// out-of-line calls, each passing its vector through memory, and the cell arithmetic ran 3-4x
// slower than the step's GEMM (B=64, H=128). flatten inlines them all into the loop.
template <typename T>
void forward_step_impl(const ForwardStep<T>& step, int64_t live) {
  const int64_t hidden = step.hidden;
  constexpr int64_t width = Vectorized<T>::size();
  at::parallel_for(0, live, grain_rows(hidden), [&](int64_t begin, int64_t end) __attribute__((flatten)) {
    for (int64_t b = begin; b < end; ++b) {
      const T* xg = step.input_gates + b * 4 * hidden;
      T* gates = step.gates + b * 4 * hidden;
      T* c = step.c + b * hidden;
      T* r = step.r + b * step.r_stride;
      for (int64_t j = 0; j < hidden; j += width) {
        const int64_t n = hidden - j < width ? hidden - j : width;
        Lanes<T> pre_i = load(xg + j, n) + load(gates + j, n);
        Lanes<T> pre_f = load(xg + hidden + j, n) + load(gates + hidden + j, n);
        Lanes<T> pre_g = load(xg + 2 * hidden + j, n) + load(gates + 2 * hidden + j, n);
        Lanes<T> pre_o = load(xg + 3 * hidden + j, n) + load(gates + 3 * hidden + j, n);
        GateValues<Lanes<T>> act{T(0), T(0), T(0), T(0)};
        Lanes<T> c_new(T(0));
        Lanes<T> out = cell_forward(pre_i, pre_f, pre_g, pre_o, load(c + j, n), act, c_new);
        store(gates + j, act.i, n);
        store(gates + hidden + j, act.f, n);
        store(gates + 2 * hidden + j, act.g, n);
        store(gates + 3 * hidden + j, act.o, n);
        store(c + j, c_new, n);
        if (step.cells != nullptr) store(step.cells + b * hidden + j, c_new, n);
        store(r + j, out, n);
        if (step.r_copy != nullptr) store(step.r_copy + b * hidden + j, out, n);
      }
    }
  });
}

template <typename T>
void backward_step_impl(const BackwardStep<T>& step, int64_t live) {
  const int64_t hidden = step.hidden;
  constexpr int64_t width = Vectorized<T>::size();
  at::parallel_for(0, live, grain_rows(hidden), [&](int64_t begin, int64_t end) __attribute__((flatten)) {
    for (int64_t b = begin; b < end; ++b) {
      const T* gates = step.gates + b * 4 * hidden;
      const T* c = step.cells + b * hidden;
      const T* c_prev = b < step.prev_live ? step.prev_cells + b * hidden : step.c0 + b * hidden;
      const T* dh = step.dh + b * hidden;
      const T* grad_out = step.grad_out == nullptr ? nullptr : step.grad_out + b * hidden;
      T* dc = step.dc + b * hidden;
      T* grad_gates = step.grad_gates + b * 4 * hidden;
      for (int64_t j = 0; j < hidden; j += width) {
        const int64_t n = hidden - j < width ? hidden - j : width;
        GateValues<Lanes<T>> act{load(gates + j, n), load(gates + hidden + j, n),
                                 load(gates + 2 * hidden + j, n), load(gates + 3 * hidden + j, n)};
        Lanes<T> dr = load(dh + j, n);
        if (grad_out != nullptr) dr = dr + load(grad_out + j, n);
        GateGrads<Lanes<T>> grads{T(0), T(0), T(0), T(0)};
        Lanes<T> dc_prev(T(0));
        cell_backward(act, load(c + j, n), load(c_prev + j, n), dr, load(dc + j, n), grads,
                      dc_prev);
        store(grad_gates + j, grads.i, n);
        store(grad_gates + hidden + j, grads.f, n);
        store(grad_gates + 2 * hidden + j, grads.g, n);
        store(grad_gates + 3 * hidden + j, grads.o, n);
        store(dc + j, dc_prev, n);
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastlstm

// Defines the entry points of one instruction set, named <name>_<suffix>.
#define FASTLSTM_DEFINE_CPU_STEP_KERNELS(suffix)                                               \
  namespace fastlstm {                                                                         \
  namespace cpu {                                                                              \
  void forward_step_##suffix(const ForwardStep<float>& step, int64_t live) {                   \
    forward_step_impl(step, live);                                                             \
  }                                                                                            \
  void forward_step_##suffix(const ForwardStep<double>& step, int64_t live) {                  \
    forward_step_impl(step, live);                                                             \
  }                                                                                            \
  void backward_step_##suffix(const BackwardStep<float>& step, int64_t live) {                 \
    backward_step_impl(step, live);                                                            \
  }                                                                                            \
  void backward_step_##suffix(const BackwardStep<double>& step, int64_t live) {                \
    backward_step_impl(step, live);                                                            \
  }                                                                                            \
  }                                                                                            \
  }
