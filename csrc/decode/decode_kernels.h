// The kernels of the CPU decode step (decode_cpu.cpp) in the widest instruction set the CPU has:
// dot products of weight rows with one vector, and the cell update of a block of units. They are
// lstm/cpu/step_kernels.h's dot4_impl / dot1_impl / forward_rows_impl, compiled once per instruction
// set with the LSTM step kernels; lstm_cpu.cpp picks them.
#pragma once

#include <cstdint>

#include "lstm/cpu/step_args.h"

namespace at {
class Tensor;
}  // namespace at

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

// One step's draw in a CPU decode op (decode_cpu.cpp, quant_cpu.cpp): rows [row_begin, row_end)
// of logits [B, V] through sample_cpu, their random numbers those of a whole-batch call with
// `seed`; each token becomes row b's next input (current[b]) and column `step` of
// tokens [B, num_steps]. A token outside the embedding's vocab_in rows is an error of `op`.
void draw_decode_rows(const char* op, const at::Tensor& logits, const at::Tensor& temperatures,
                      int64_t top_k, double top_p, double min_p, uint64_t seed,
                      int64_t row_begin, int64_t row_end, int64_t vocab_in, int64_t step,
                      int64_t num_steps, int64_t* current, int64_t* tokens);

}  // namespace cpu
}  // namespace fastlstm
