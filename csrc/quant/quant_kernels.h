// The kernels of quantized CPU inference (csrc/quant/quant_cpu.cpp): products of activations with int8
// or bf16 weight matrices packed once, in the widest instruction set the CPU has.
//
// Weights. A matrix W [N, K] (N output rows) is packed in panels of kPanel = 16 output rows: panel
// p holds rows 16p..16p+15, K in groups of 4 (int8) or 2 (bf16) consecutive values, as
// [N_pad / 16][K_pad / depth][16][depth] (N and K zero-padded). One 64-byte load then holds one
// group of K for 16 output rows: the operand of one _mm512_dpbusd_epi32 (int8, 4 products per
// int32 lane) or _mm512_dpbf16_ps (bf16, 2 products per float32 lane). fastlstm/quant.py packs
// with torch ops (a reshape and a permute), so the layout is written down in one more place.
// int8 weights are symmetric with one float32 scale per output row: W[n, :] ~ scale[n] * Wq[n, :].
//
// Activations. int8: each row of x is quantized on the fly, symmetrically, with its own scale:
//   amax = max_k |x[k]|, scale = amax / 127, q[k] = round_half_even(x[k] * (127 / amax)) in
//   [-127, 127] (float32 arithmetic throughout; a zero row has scale 0 and q = 0; a row holding a
//   NaN gets scale NaN, so its products come out NaN).
// VNNI multiplies unsigned by signed bytes, so its kernels store q + 128 (q xor 0x80) and subtract
// 128 * sum_k Wq[n, k] (`w_sums`) from each dot product; the AVX2 kernel multiplies |q| by Wq
// with q's sign (no int16 pair of |q| * Wq <= 127 * 128 can saturate) and the portable one
// multiplies ints. All three compute the same integer dot product exactly, then
//   out[m, n] = base[m, n] + (float(dot) * a_scale[m]) * w_scale[n].
// bf16: activations are rounded to bf16 (to nearest even) and the products (exact in float32) are
// summed in float32: out[m, n] = base[m, n] + sum_k bf16(x[k]) * W[n, k].
#pragma once

#include <cstdint>

namespace fastlstm {
namespace quant {

constexpr int64_t kPanel = 16;      // output rows per packed panel
constexpr int64_t kS8Group = 4;     // int8: K values per 32-bit lane of a panel
constexpr int64_t kBf16Group = 2;   // bf16: K values per 32-bit lane of a panel

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// One product of `rows` activation rows with the panels [panel_begin, panel_end) of a packed W.
struct Gemm {
  int64_t rows;
  int64_t panel_begin, panel_end;
  int64_t groups;            // K_pad / kS8Group or K_pad / kBf16Group
  const void* a;             // activations: int8 (in the kernel set's own form) or bf16 bits,
  int64_t lda;               //   row r at a + r * lda elements; K_pad of them, the padding zero
  const float* a_scale;      // [rows] (int8)
  const void* w;             // the whole packed matrix (panel p at p * groups * 64 bytes)
  const int32_t* w_sums;     // [N_pad] sum_k Wq[n, k] (int8)
  const float* w_scale;      // [N_pad] (int8)
  const float* base;         // out = base + product: base[r * base_ld + n - base_column0];
  int64_t base_ld;           //   base_ld 0 broadcasts a bias row; nullptr: out = product
  int64_t base_column0;
  float* out;                // out[r * out_ld + n - out_column0], n the output row of W
  int64_t out_ld;
  int64_t out_column0;
  int64_t columns;           // only n < columns are stored
};

struct Kernels {
  const char* s8_name;
  const char* bf16_name;
  // x [rows, k] (row r at x + r * ldx) -> q [rows, k_pad] (zero-padded) and scale [rows].
  void (*quantize_s8)(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                      int8_t* q, float* scale);
  void (*gemm_s8)(const Gemm& g);
  // x [rows, k] -> bf16 bits [rows, k_pad] (zero-padded), rounded to nearest even.
  void (*to_bf16)(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                  uint16_t* out);
  void (*gemm_bf16)(const Gemm& g);
};

// The kernels of the widest instruction set the CPU has: AVX-512 VNNI (int8) and AVX512-BF16
// (bf16), AVX2, or portable C++. FASTLSTM_QUANT_KERNELS=portable|avx2|avx512 picks a lower one
// (read once per process; a choice the CPU lacks falls back to the best it has).
const Kernels& kernels();

// The kernel sets themselves (quant_kernels.cpp, quant_kernels_avx2.cpp,
// quant_kernels_avx512.cpp); an instruction set the build lacks gives nullptr functions.
Kernels portable_kernels();
Kernels avx2_kernels();
Kernels avx512_kernels();        // int8 with VNNI; bf16 only where avx512_bf16_available()
bool avx512_bf16_built();

}  // namespace quant
}  // namespace fastlstm
