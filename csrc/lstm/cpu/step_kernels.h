// The pointwise part of one LSTM time step on the CPU, vectorized with ATen's Vectorized<T>.
//
// Included by lstm_cpu.cpp (baseline instruction set) and lstm/cpu/step_kernels_avx2.cpp (AVX2 + FMA, chosen
// at run time), so each translation unit gets its own copy of the templates: they live in an
// anonymous namespace and ATen's Vectorized<T> sits in a per-capability inline namespace, which
// keeps the two copies apart. The arithmetic itself is cell.h's, applied to SIMD lanes.
#pragma once

#include <ATen/cpu/vec/functional.h>
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

#include "common/cell.h"
#include "lstm/cpu/step_args.h"

namespace fastlstm {
namespace cpu {

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
  // Every division in the cell math (sigmoid's and tanh's) has a denominator 1 + exp(..) >= 1.
  friend Lanes operator/(Lanes a, Lanes b) { return a.v * reciprocal(b.v); }
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
  // 1 / d for d >= 1. In float under AVX-512 / AVX2: the hardware estimate (14 / 12 bits) and one
  // Newton step (28 / 24 bits), instead of a division that took a quarter of the pointwise pass.
  // d = inf (exp overflowing) is clamped to FLT_MAX, whose estimate is 0, so the result is 0
  // rather than the 0 * inf = NaN of the Newton step.
  static Vectorized<T> reciprocal(Vectorized<T> d) {
    if constexpr (std::is_same<T, float>::value) {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 x = _mm512_min_ps(_mm512_set1_ps(3.402823466e38f), d);  // NaN stays NaN
      const __m512 r = _mm512_rcp14_ps(x);
      return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
#elif defined(CPU_CAPABILITY_AVX2)
      const __m256 x = _mm256_min_ps(_mm256_set1_ps(3.402823466e38f), d);
      const __m256 r = _mm256_rcp_ps(x);
      return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0f)));
#endif
    }
    return Vectorized<T>(T(1)) / d;
  }

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

#if defined(CPU_CAPABILITY_AVX2)
// cell.h's zoneout_hash32 on 8 lanes. Written out: GCC left the scalar loop below unvectorized
// under this file's AVX2 target (one hash at a time, 8 per vector of floats), while AVX-512
// vectorizes it as is.
inline __m256i zoneout_hash32_avx2(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x1b873593));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
#endif

// Zoneout keep weights of units [unit, unit + width) of one row: the hash of cell.h per lane
// (a fixed-length loop of 32-bit integer operations, which the compiler vectorizes; written
// with AVX2 intrinsics for float under AVX2), or the probability itself in evaluation.
template <typename T>
inline Lanes<T> zoneout_keep_lanes(const ZoneoutMasks& masks, bool for_h, int64_t element) {
  const double prob = for_h ? masks.prob_h : masks.prob_c;
  if (masks.expected) return Lanes<T>(static_cast<T>(prob));
  const uint32_t key = for_h ? masks.key_h : masks.key_c;
  const uint32_t threshold = for_h ? masks.threshold_h : masks.threshold_c;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<T, float>::value && Vectorized<T>::size() == 8) {
    const __m256i keys = _mm256_set1_epi32(static_cast<int>(key));
    const __m256i lanes = _mm256_add_epi32(
        _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(element))),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i u = zoneout_hash32_avx2(
        _mm256_add_epi32(zoneout_hash32_avx2(_mm256_xor_si256(lanes, keys)), keys));
    // Unsigned u < threshold as a signed comparison of both with the top bit flipped.
    const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256i keep = _mm256_cmpgt_epi32(
        _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(threshold)), flip),
        _mm256_xor_si256(u, flip));
    return Vectorized<T>(_mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_set1_ps(1.0f)));
  }
#endif
  constexpr int64_t width = Vectorized<T>::size();
  alignas(64) T keep[width];
  const uint32_t first = static_cast<uint32_t>(element);
  for (int64_t l = 0; l < width; ++l) {
    keep[l] = zoneout_keeps(key, threshold, first + static_cast<uint32_t>(l)) ? T(1) : T(0);
  }
  return Vectorized<T>::loadu(keep);
}

// The row loops are marked flatten: under lstm/cpu/step_kernels_avx2.cpp's target pragma (rather than
// -mavx2 on the command line) GCC left Vectorized<T>'s operators, constructors and exp as
// out-of-line calls, each passing its vector through memory, and the cell arithmetic ran 3-4x
// slower than the step's GEMM (B=64, H=128). flatten inlines them all into the loop.
template <typename T>
__attribute__((flatten)) void forward_rows_impl(const ForwardStep<T>& step, int64_t row_begin,
                                                int64_t row_end) {
  const int64_t hidden = step.hidden, u0 = step.unit_begin, u1 = step.unit_end;
  const int64_t gate = step.gemm_gate;
  constexpr int64_t width = Vectorized<T>::size();
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* xg = step.input_gates == nullptr ? nullptr : step.input_gates + b * 4 * hidden;
    const T* pre = step.gemm + b * step.gemm_ld - u0;
    T* gates = step.gates == nullptr ? nullptr : step.gates + b * 4 * hidden;
    T* c = step.c + b * hidden;
    T* r = step.r + b * step.r_stride;
    const T* bias = step.bias;
    for (int64_t j = u0; j < u1; j += width) {
      const int64_t n = u1 - j < width ? u1 - j : width;
      Lanes<T> pre_i = load(pre + j, n);
      Lanes<T> pre_f = load(pre + gate + j, n);
      Lanes<T> pre_g = load(pre + 2 * gate + j, n);
      Lanes<T> pre_o = load(pre + 3 * gate + j, n);
      if (xg != nullptr) {
        pre_i = load(xg + j, n) + pre_i;
        pre_f = load(xg + hidden + j, n) + pre_f;
        pre_g = load(xg + 2 * hidden + j, n) + pre_g;
        pre_o = load(xg + 3 * hidden + j, n) + pre_o;
      }
      if (bias != nullptr) {
        pre_i = pre_i + load(bias + j, n);
        pre_f = pre_f + load(bias + hidden + j, n);
        pre_g = pre_g + load(bias + 2 * hidden + j, n);
        pre_o = pre_o + load(bias + 3 * hidden + j, n);
      }
      GateValues<Lanes<T>> act{T(0), T(0), T(0), T(0)};
      Lanes<T> c_new(T(0));
      const Lanes<T> c_prev = load(c + j, n);
      Lanes<T> out = cell_forward(pre_i, pre_f, pre_g, pre_o, c_prev, act, c_new);
      if (step.zoneout != nullptr) {
        const ZoneoutMasks& masks = *step.zoneout;
        const int64_t row = step.row_base + b;
        if (masks.c) {
          const Lanes<T> keep = zoneout_keep_lanes<T>(masks, false, row * hidden + j);
          c_new = keep * c_prev + (Lanes<T>(T(1)) - keep) * c_new;
        }
        if (masks.h && step.mix_h) {
          const T* h_prev = b < step.h_prev_live ? step.h_prev + b * step.r_stride
                                                 : step.h0 + b * step.r_stride;
          const Lanes<T> keep = zoneout_keep_lanes<T>(masks, true, row * step.r_stride + j);
          out = keep * load(h_prev + j, n) + (Lanes<T>(T(1)) - keep) * out;
        }
      }
      if (gates != nullptr) {
        store(gates + j, act.i, n);
        store(gates + hidden + j, act.f, n);
        store(gates + 2 * hidden + j, act.g, n);
        store(gates + 3 * hidden + j, act.o, n);
      }
      store(c + j, c_new, n);
      if (step.cells != nullptr) store(step.cells + b * hidden + j, c_new, n);
      store(r + j, out, n);
    }
  }
}

template <typename T>
__attribute__((flatten)) void backward_rows_impl(const BackwardStep<T>& step, int64_t row_begin,
                                                 int64_t row_end) {
  const int64_t hidden = step.hidden, u0 = step.unit_begin, u1 = step.unit_end;
  constexpr int64_t width = Vectorized<T>::size();
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* gates = step.gates + b * 4 * hidden;
    const T* c = step.cells + b * hidden;
    const T* c_prev = b < step.prev_live ? step.prev_cells + b * hidden : step.c0 + b * hidden;
    const T* dh = step.dh + b * step.dh_stride;
    const T* grad_out = step.grad_out == nullptr ? nullptr : step.grad_out + b * step.dh_stride;
    T* dc = step.dc + b * hidden;
    T* grad_gates = step.grad_gates + b * 4 * hidden;
    for (int64_t j = u0; j < u1; j += width) {
      const int64_t n = u1 - j < width ? u1 - j : width;
      GateValues<Lanes<T>> act{load(gates + j, n), load(gates + hidden + j, n),
                               load(gates + 2 * hidden + j, n), load(gates + 3 * hidden + j, n)};
      Lanes<T> dr = load(dh + j, n);
      if (grad_out != nullptr) dr = dr + load(grad_out + j, n);
      GateGrads<Lanes<T>> grads{T(0), T(0), T(0), T(0)};
      Lanes<T> dc_prev(T(0));
      const Lanes<T> c_before = load(c_prev + j, n);
      if (step.zoneout != nullptr) {
        const ZoneoutMasks& masks = *step.zoneout;
        const int64_t row = step.row_base + b;
        const Lanes<T> one(T(1));
        if (masks.h && step.dh_carry != nullptr) {
          const Lanes<T> keep = zoneout_keep_lanes<T>(masks, true, row * step.dh_stride + j);
          store(step.dh_carry + b * step.dh_stride + j, keep * dr, n);
          dr = (one - keep) * dr;
        }
        Lanes<T> dc_next = load(dc + j, n);
        Lanes<T> keep_c(T(0));
        Lanes<T> c_value = load(c + j, n);
        if (masks.c) {
          keep_c = zoneout_keep_lanes<T>(masks, false, row * hidden + j);
          c_value = act.f * c_before + act.i * act.g;  // c_new; `cells` holds the mixed c
          const Lanes<T> dc_state = dc_next;
          dc_next = (one - keep_c) * dc_state;
          cell_backward(act, c_value, c_before, dr, dc_next, grads, dc_prev);
          dc_prev = dc_prev + keep_c * dc_state;
        } else {
          cell_backward(act, c_value, c_before, dr, dc_next, grads, dc_prev);
        }
      } else {
        cell_backward(act, load(c + j, n), c_before, dr, load(dc + j, n), grads, dc_prev);
      }
      store(grad_gates + j, grads.i, n);
      store(grad_gates + hidden + j, grads.f, n);
      store(grad_gates + 2 * hidden + j, grads.g, n);
      store(grad_gates + 3 * hidden + j, grads.o, n);
      store(dc + j, dc_prev, n);
    }
  }
}

// Dot products of four weight rows with one vector: the whole cost of a decode step at batch 1
// (decode_cpu.cpp), where each load of x feeds four FMAs. The callers pick four rows far apart in
// memory (the four gates of a unit, one row from each quarter of a range): four independent
// streams keep more reads in flight than four adjacent rows, which the hardware prefetcher
// follows as one stream. Each row's bytes are also asked for kDotPrefetch floats ahead; past a
// row's end that is the start of the row the same stream reads next. With both, the decode step
// at V=10000, H=512 (35 MB of weights) went from 1.3x to 0.8-0.9x the time of torch.mv over as
// many bytes (`python -m fastlstm.bench --suites decode`, 2-core Xeon).
constexpr int64_t kDotPrefetch = 512;

inline float sum_lanes(Vectorized<float> v) {
  return at::vec::vec_reduce_all<float>(
      [](Vectorized<float>& a, Vectorized<float>& b) { return a + b; }, v);
}

__attribute__((flatten)) inline void dot4_impl(const float* r0, const float* r1, const float* r2,
                                               const float* r3, const float* x, int64_t n,
                                               float* out) {
  using Vec = Vectorized<float>;
  constexpr int64_t width = Vec::size();
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t k = 0;
  for (; k + width <= n; k += width) {
    __builtin_prefetch(r0 + k + kDotPrefetch, 0, 3);
    __builtin_prefetch(r1 + k + kDotPrefetch, 0, 3);
    __builtin_prefetch(r2 + k + kDotPrefetch, 0, 3);
    __builtin_prefetch(r3 + k + kDotPrefetch, 0, 3);
    const Vec v = Vec::loadu(x + k);
    a0 = at::vec::fmadd(Vec::loadu(r0 + k), v, a0);
    a1 = at::vec::fmadd(Vec::loadu(r1 + k), v, a1);
    a2 = at::vec::fmadd(Vec::loadu(r2 + k), v, a2);
    a3 = at::vec::fmadd(Vec::loadu(r3 + k), v, a3);
  }
  if (k < n) {  // loadu with a count fills the lanes past it with zeros
    const Vec v = Vec::loadu(x + k, n - k);
    a0 = at::vec::fmadd(Vec::loadu(r0 + k, n - k), v, a0);
    a1 = at::vec::fmadd(Vec::loadu(r1 + k, n - k), v, a1);
    a2 = at::vec::fmadd(Vec::loadu(r2 + k, n - k), v, a2);
    a3 = at::vec::fmadd(Vec::loadu(r3 + k, n - k), v, a3);
  }
  out[0] = sum_lanes(a0);
  out[1] = sum_lanes(a1);
  out[2] = sum_lanes(a2);
  out[3] = sum_lanes(a3);
}

__attribute__((flatten)) inline float dot1_impl(const float* r, const float* x, int64_t n) {
  using Vec = Vectorized<float>;
  constexpr int64_t width = Vec::size();
  Vec a0(0.f), a1(0.f);
  int64_t k = 0;
  for (; k + 2 * width <= n; k += 2 * width) {
    a0 = at::vec::fmadd(Vec::loadu(r + k), Vec::loadu(x + k), a0);
    a1 = at::vec::fmadd(Vec::loadu(r + k + width), Vec::loadu(x + k + width), a1);
  }
  for (; k < n; k += width) {
    const int64_t count = n - k < width ? n - k : width;
    a0 = at::vec::fmadd(Vec::loadu(r + k, count), Vec::loadu(x + k, count), a0);
  }
  return sum_lanes(a0 + a1);
}

}  // namespace
}  // namespace cpu
}  // namespace fastlstm

// Defines the entry points of one instruction set, named <name>_<suffix>.
#define FASTLSTM_DEFINE_CPU_STEP_KERNELS(suffix)                                               \
  namespace fastlstm {                                                                         \
  namespace cpu {                                                                              \
  void forward_rows_##suffix(const ForwardStep<float>& step, int64_t begin, int64_t end) {     \
    forward_rows_impl(step, begin, end);                                                       \
  }                                                                                            \
  void forward_rows_##suffix(const ForwardStep<double>& step, int64_t begin, int64_t end) {    \
    forward_rows_impl(step, begin, end);                                                       \
  }                                                                                            \
  void backward_rows_##suffix(const BackwardStep<float>& step, int64_t begin, int64_t end) {   \
    backward_rows_impl(step, begin, end);                                                      \
  }                                                                                            \
  void backward_rows_##suffix(const BackwardStep<double>& step, int64_t begin, int64_t end) {  \
    backward_rows_impl(step, begin, end);                                                      \
  }                                                                                            \
  void dot4_##suffix(const float* r0, const float* r1, const float* r2, const float* r3,       \
                     const float* x, int64_t n, float* out) {                                  \
    dot4_impl(r0, r1, r2, r3, x, n, out);                                                      \
  }                                                                                            \
  float dot1_##suffix(const float* r, const float* x, int64_t n) {                             \
    return dot1_impl(r, x, n);                                                                 \
  }                                                                                            \
  }                                                                                            \
  }
