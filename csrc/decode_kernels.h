// The kernels of the CPU decode step (decode_cpu.cpp) in the widest instruction set the CPU has:
// dot products of weight rows with one vector, and the cell update of a block of units. They are
// lstm_cpu_kernels.h's dot4_impl / dot1_impl / forward_rows_impl, compiled once per instruction
// set with the LSTM step kernels; lstm_cpu.cpp picks them.
#pragma once

#include <cstdint>

#include "cpu_steps.h"

namespace fastlstm {
namespace cpu {

struct DecodeKernels {
  // out[j] = sum_k rj[k] * x[k], j = 0..3
  void (*dot4)(const float* r0, const float* r1, const float* r2, const float* r3,
               const float* x, int64_t n, float* out);
  // sum_k r[k] * x[k]
  float (*dot1)(const float* r, const float* x, int64_t n);
  // The cell update of rows [begin, end) of a step (the pointwise part of the LSTM forward).
  void (*cell_rows)(const ForwardStep<float>& step, int64_t begin, int64_t end);
};

const DecodeKernels& decode_kernels();

}  // namespace cpu
}  // namespace fastlstm
