// Fused sampling: temperature, optional top-k / top-p, and the draw, in one pass over each row.
// The CPU routine is callable from other C++ in fastlstm._C (the fused CPU decode step uses it);
// the counter-based Philox generator below is shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FASTLSTM_SAMPLE_HOSTDEV __host__ __device__ __forceinline__
#else
#define FASTLSTM_SAMPLE_HOSTDEV inline
#endif

namespace fastlstm {

// logits [rows, V] float/half/bfloat16, contiguous; temperature [rows] float32 (0 = greedy);
// top_k 0 = off; top_p 1.0 = off; (seed, offset) select the random stream. The rows are rows
// first_row, first_row + 1, ... of a larger batch: row r draws the numbers of row first_row + r,
// so a batch sampled in slices gives the tokens of one call over all of it. min_p 0.0 = off
// (keep p >= min_p * max p, applied after top-k and top-p).
// Returns int64 [rows]. Checks its arguments and throws c10::Error on bad input.
at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                      int64_t top_k, double top_p, int64_t seed, int64_t offset,
                      int64_t first_row = 0, double min_p = 0.0);

namespace sampling {

// Argument checks shared by the CPU and CUDA entry points (host side, no device reads):
// dtype, shape and contiguity of logits and temperature, the ranges of top_k, top_p and min_p.
void check_arguments(const at::Tensor& logits, const at::Tensor& temperature, int64_t top_k,
                     double top_p, double min_p = 0.0);

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
// a counter-based generator, so every (seed, offset, row, token) has its own numbers and the
// result does not depend on how rows or tokens are split over threads or blocks.
struct Philox4 {
  uint32_t x[4];
};

FASTLSTM_SAMPLE_HOSTDEV void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

FASTLSTM_SAMPLE_HOSTDEV Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                              uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Map a float to an unsigned integer with the same order (used by the threshold searches).
FASTLSTM_SAMPLE_HOSTDEV uint32_t float_to_ordered(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

FASTLSTM_SAMPLE_HOSTDEV uint32_t ordered_to_float_bits(uint32_t key) {
  return (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
}

// Error codes written per row by the kernels; the host turns them into messages.
enum RowError : int32_t { kRowOk = 0, kRowNaN = 1, kRowAllNegInf = 2, kRowPosInf = 3,
                          kRowBadTemperature = 4 };

const char* row_error_message(int32_t code);

// The op's inputs as the kernels take them: logits (rows, V) contiguous and a float32
// temperature per row (the scalar broadcast when no tensor is given), after the shape checks.
struct Rows {
  at::Tensor logits;
  at::Tensor temperature;
};
Rows prepare_rows(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                  double scalar_temperature);

}  // namespace sampling
}  // namespace fastlstm
