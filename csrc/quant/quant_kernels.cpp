// Portable C++ kernels of quantized inference (csrc/quant/quant_kernels.h), and the choice of kernel set.
#include "quant/quant_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

namespace fastlstm {
namespace quant {
namespace {

void quantize_s8_portable(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                          int8_t* q, float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx;
    int8_t* out = q + r * k_pad;
    float amax = 0.0f;
    bool nan = false;
    for (int64_t i = 0; i < k; ++i) {
      amax = std::max(amax, std::fabs(row[i]));
      nan = nan || std::isnan(row[i]);
    }
    if (nan || amax == 0.0f || !std::isfinite(amax)) {
      // NaN (or inf) in the row: its products must not come out finite
      scale[r] = amax == 0.0f && !nan ? 0.0f : std::nanf("");
      std::memset(out, 0, k_pad);
      continue;
    }
    const float inverse = 127.0f / amax;
    for (int64_t i = 0; i < k; ++i) {
      const float value = std::nearbyint(row[i] * inverse);
      out[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, value)));
    }
    std::memset(out + k, 0, k_pad - k);
    scale[r] = amax / 127.0f;
  }
}

void gemm_s8_portable(const Gemm& g) {
  const int8_t* a = static_cast<const int8_t*>(g.a);
  const int8_t* w = static_cast<const int8_t*>(g.w);
  for (int64_t p = g.panel_begin; p < g.panel_end; ++p) {
    const int8_t* panel = w + p * g.groups * kPanel * kS8Group;
    for (int64_t r = 0; r < g.rows; ++r) {
      const int8_t* row = a + r * g.lda;
      int32_t dot[kPanel] = {};
      for (int64_t q = 0; q < g.groups; ++q) {
        const int8_t* lanes = panel + q * kPanel * kS8Group;
        for (int64_t j = 0; j < kPanel; ++j) {
          for (int64_t d = 0; d < kS8Group; ++d) {
            dot[j] += int32_t(row[q * kS8Group + d]) * int32_t(lanes[j * kS8Group + d]);
          }
        }
      }
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        if (n >= g.columns) break;
        const float product = (float(dot[j]) * g.a_scale[r]) * g.w_scale[n];
        const float base = g.base == nullptr ? 0.0f : g.base[r * g.base_ld + n - g.base_column0];
        g.out[r * g.out_ld + n - g.out_column0] = base + product;
      }
    }
  }
}

inline uint16_t to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN stays NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

void to_bf16_portable(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                      uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < k; ++i) out[r * k_pad + i] = to_bf16_bits(x[r * ldx + i]);
    for (int64_t i = k; i < k_pad; ++i) out[r * k_pad + i] = 0;
  }
}

void gemm_bf16_portable(const Gemm& g) {
  const uint16_t* a = static_cast<const uint16_t*>(g.a);
  const uint16_t* w = static_cast<const uint16_t*>(g.w);
  for (int64_t p = g.panel_begin; p < g.panel_end; ++p) {
    const uint16_t* panel = w + p * g.groups * kPanel * kBf16Group;
    for (int64_t r = 0; r < g.rows; ++r) {
      const uint16_t* row = a + r * g.lda;
      float dot[kPanel] = {};
      for (int64_t q = 0; q < g.groups; ++q) {
        const uint16_t* lanes = panel + q * kPanel * kBf16Group;
        const float a0 = bf16_to_float(row[2 * q]), a1 = bf16_to_float(row[2 * q + 1]);
        for (int64_t j = 0; j < kPanel; ++j) {
          dot[j] += a0 * bf16_to_float(lanes[2 * j]) + a1 * bf16_to_float(lanes[2 * j + 1]);
        }
      }
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        if (n >= g.columns) break;
        const float base = g.base == nullptr ? 0.0f : g.base[r * g.base_ld + n - g.base_column0];
        g.out[r * g.out_ld + n - g.out_column0] = base + dot[j];
      }
    }
  }
}

}  // namespace

Kernels portable_kernels() {
  return Kernels{"portable", "portable", quantize_s8_portable, gemm_s8_portable, to_bf16_portable,
                 gemm_bf16_portable};
}

const Kernels& kernels() {
  static const Kernels chosen = [] {
    const char* choice = std::getenv("FASTLSTM_QUANT_KERNELS");
    const std::string wanted = choice != nullptr ? choice : "avx512";
    Kernels result = portable_kernels();
    if (wanted == "portable") return result;
#if defined(__x86_64__) || defined(_M_X64)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) {
      const Kernels wide = avx2_kernels();
      if (wide.gemm_s8 != nullptr) result = wide;
    }
    const bool vnni = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512vnni");
    if (vnni && wanted == "avx512") {
      const Kernels wide = avx512_kernels();
      if (wide.gemm_s8 != nullptr) {
        result.s8_name = wide.s8_name;
        result.quantize_s8 = wide.quantize_s8;
        result.gemm_s8 = wide.gemm_s8;
      }
      if (__builtin_cpu_supports("avx512bf16") && avx512_bf16_built()) {
        result.bf16_name = wide.bf16_name;
        result.to_bf16 = wide.to_bf16;
        result.gemm_bf16 = wide.gemm_bf16;
      }
    }
#endif
    return result;
  }();
  return chosen;
}

}  // namespace quant
}  // namespace fastlstm
