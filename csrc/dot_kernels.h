// Dot products of weight rows with one vector, in the widest instruction set the CPU has (the
// kernels are lstm_cpu_kernels.h's dot4_impl / dot1_impl, compiled once per instruction set with
// the LSTM step kernels; lstm_cpu.cpp picks them).
#pragma once

#include <cstdint>

namespace fastlstm {
namespace cpu {

struct DotKernels {
  // out[j] = sum_k rj[k] * x[k], j = 0..3
  void (*dot4)(const float* r0, const float* r1, const float* r2, const float* r3,
               const float* x, int64_t n, float* out);
  // sum_k r[k] * x[k]
  float (*dot1)(const float* r, const float* x, int64_t n);
};

const DotKernels& dot_kernels();

}  // namespace cpu
}  // namespace fastlstm
