// What the AVX-512 step GEMM kernels (csrc/cpu/step_gemm_avx512.cpp, csrc/cpu/step_gemm_bf16.cpp) share:
// the table of register-blocked micro-kernels by row count, the column masks of a panel's two
// 16-lane halves, the split of the rows into blocks and the empty-product cases. Include it after
// the kernel file's target pragma and <immintrin.h>.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace fastlstm {
namespace cpu {
namespace step_gemm_blocks {

constexpr int kMaxRows = 12;  // rows of a register block: 24 zmm accumulators

// Micro-kernel<1> ... Micro-kernel<kMaxRows> as a table indexed by rows - 1.
template <typename Pointer, template <int> class Micro, int... kRows>
constexpr std::array<Pointer, sizeof...(kRows)> kernel_table(std::integer_sequence<int, kRows...>) {
  return {&Micro<kRows + 1>::run...};
}

template <typename Pointer, template <int> class Micro>
constexpr std::array<Pointer, kMaxRows> kernel_table() {
  return kernel_table<Pointer, Micro>(std::make_integer_sequence<int, kMaxRows>{});
}

// The lanes of a 16-column half that hold one of `count` remaining columns.
inline __mmask16 columns_mask(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// fn(first_row, rows) for consecutive blocks of at most kMaxRows rows covering [0, m), of nearly
// equal size (16 rows: 8 + 8, not 12 + 4, whose 4-row block would do 8 FMAs per two panel loads).
template <typename Fn>
inline void for_row_blocks(int64_t m, Fn&& fn) {
  for (int64_t i = 0, blocks = (m + kMaxRows - 1) / kMaxRows; i < m; --blocks) {
    const int64_t rows = (m - i + blocks - 1) / blocks;
    fn(i, rows);
    i += rows;
  }
}

// Handles the products with nothing to multiply (m, n or k zero); true when it did.
inline bool empty_product(int64_t m, int64_t n, int64_t k, float* c, int64_t ldc,
                          bool accumulate) {
  if (m <= 0 || n <= 0) return true;
  if (k > 0) return false;
  for (int64_t i = 0; !accumulate && i < m; ++i) std::fill_n(c + i * ldc, n, 0.0f);
  return true;
}

}  // namespace step_gemm_blocks
}  // namespace cpu
}  // namespace fastlstm
