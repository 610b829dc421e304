// The arguments of the CPU step kernels (lstm/cpu/step_kernels.h), the pointers of one forward or
// backward time step of a layer, and the declarations of each instruction set's entry points.
// Kept apart from the kernels so that their callers (lstm_cpu.cpp, decode_cpu.cpp, the C++
// tests) need not include ATen's vector headers.
#pragma once

#include <cstdint>

#include "common/cell.h"

namespace fastlstm {
namespace cpu {

// Pointers of one forward step. Rows are the step's live batch rows b = 0..live-1; a call updates
// the hidden units [unit_begin, unit_end) of the rows it is given.
template <typename T>
struct ForwardStep {
  int64_t hidden;
  int64_t unit_begin, unit_end;
  const T* input_gates;  // [live, 4H]: x @ W_ih^T (+ b) of this step, or nullptr when `gemm`
                         // holds x @ W_ih^T + h @ W_hh^T
  const T* bias;         // [4H] added to every row's input gates, or nullptr
  // h @ W_hh^T of this step: gate k (i, f, g, o) of unit u in row b is at
  // gemm[b * gemm_ld + k * gemm_gate + (u - unit_begin)].
  const T* gemm;
  int64_t gemm_ld, gemm_gate;
  T* gates;              // [live, 4H] activated i, f, g, o out, or nullptr (may alias gemm)
  T* c;                  // [B, H] cell state, updated in place
  T* cells;              // [live, H] copy of the new c, or nullptr
  T* r;                  // [live, r_stride]: o * tanh(c)
  int64_t r_stride;
  // Zoneout (cell.h), or nullptr. c is mixed in the kernel (`cells` then saves the mixed c);
  // with mix_h, r is h and is mixed with h_prev (rows b < h_prev_live) or h0.
  const ZoneoutMasks* zoneout = nullptr;
  int64_t row_base = 0;  // packed row index of live row 0: masks are per (row, unit)
  bool mix_h = false;
  const T* h_prev = nullptr;
  int64_t h_prev_live = 0;
  const T* h0 = nullptr;  // [B, r_stride]
};

// Pointers of one backward step; a call handles the units [unit_begin, unit_end).
template <typename T>
struct BackwardStep {
  int64_t hidden;
  int64_t unit_begin, unit_end;
  const T* gates;       // [live, 4H] activated gates saved by the forward
  const T* cells;       // [live, H] c after this step
  const T* prev_cells;  // [prev_live, H] c after the previously visited step
  int64_t prev_live;    // rows b >= prev_live start from c0
  const T* c0;          // [B, H]
  const T* dh;          // [live, dh_stride]: gradient reaching r (or h without projection)
  int64_t dh_stride;
  const T* grad_out;    // [live, dh_stride] added to dh, or nullptr
  T* dc;                // [B, H] gradient reaching c, updated in place
  T* grad_gates;        // [live, 4H] pre-activation gate gradients out
  // Zoneout (cell.h), or nullptr. With the c mask, `cells` holds the mixed c and the kernel
  // recomputes c_new = f c_prev + i g. With dh_carry (no projection), the h mask splits the
  // gradient reaching h: (1 - k) of it goes into the cell, k of it is written to dh_carry
  // [live, dh_stride] for the step before (the caller then adds grad_gates @ W_hh to it).
  const ZoneoutMasks* zoneout = nullptr;
  int64_t row_base = 0;
  T* dh_carry = nullptr;
};

// The entry points of one instruction set, named <name>_<suffix>: defined by
// FASTLSTM_DEFINE_CPU_STEP_KERNELS(suffix) (lstm/cpu/step_kernels.h) in lstm_cpu.cpp (baseline),
// lstm/cpu/step_kernels_avx2.cpp (AVX2 + FMA) and lstm/cpu/step_kernels_avx512.cpp (AVX-512).
#define FASTLSTM_DECLARE_CPU_STEP_KERNELS(suffix)                                              \
  void forward_rows_##suffix(const ForwardStep<float>& step, int64_t begin, int64_t end);      \
  void forward_rows_##suffix(const ForwardStep<double>& step, int64_t begin, int64_t end);     \
  void backward_rows_##suffix(const BackwardStep<float>& step, int64_t begin, int64_t end);    \
  void backward_rows_##suffix(const BackwardStep<double>& step, int64_t begin, int64_t end);   \
  void dot4_##suffix(const float* r0, const float* r1, const float* r2, const float* r3,       \
                     const float* x, int64_t n, float* out);                                   \
  float dot1_##suffix(const float* r, const float* x, int64_t n);

FASTLSTM_DECLARE_CPU_STEP_KERNELS(baseline)
#if defined(__x86_64__) || defined(_M_X64)
FASTLSTM_DECLARE_CPU_STEP_KERNELS(avx2)
FASTLSTM_DECLARE_CPU_STEP_KERNELS(avx512)
#endif

}  // namespace cpu
}  // namespace fastlstm
