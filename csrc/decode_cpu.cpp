// The CPU decode step of an LSTM language model, whole, as one op: embedding gather, every
// layer's cell step, the output head and the draw, for `num_steps` tokens in a row.
//
// At batch 1 a decode step is a handful of matrix-vector products; run as separate ATen ops each
// costs a dispatch, an allocation and (with oneDNN) a weight reorder, which dwarf the arithmetic.
// Here every weight matrix is read once per step, straight from the parameters, in one pass per
// layer: the four gate rows of a hidden unit are dotted with the input and the hidden state
// together, and the unit's cell update (cell.h) follows at once while its gates are in registers.
//
// Schema (declared below):
//   decode_cpu(Tensor token, Tensor(a!) h, Tensor(b!) c, Tensor embedding, Tensor[] w_ih,
//              Tensor[] w_hh, Tensor[] bias, Tensor head_weight, Tensor? head_bias,
//              float temperature, int top_k, float top_p, Generator? generator,
//              int num_steps) -> Tensor
//   token [B] int64: the last token; h, c [L, B, H] float32, updated in place to the state after
//   the last step; embedding [V, E]; w_ih[l] [4H, E or H]; w_hh[l] [4H, H]; bias[l] [4H]
//   (b_ih + b_hh); head_weight [V, H]; head_bias [V] or None; temperature >= 0 (0 = greedy).
//   Every step draws with fastlstm::sample_cpu after taking one 64-bit seed from `generator`
//   (the default CPU generator when None), exactly as the fastlstm::sample op does per call, so
//   num_steps steps here give the tokens of num_steps Python steps with fastlstm.sample.
//   Returns the drawn tokens, int64 [B, num_steps].
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "cell.h"
#include "sample_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTLSTM_DECODE_X86 1
#endif

namespace fastlstm {
namespace {

// ---------------------------------------------------------------------------------------------
// Dot products of weight rows with one vector: the whole cost of a step at small batch.
// Four rows at a time so each load of the vector feeds four FMAs (the four gates of a unit, or
// four vocabulary rows of the head).
// ---------------------------------------------------------------------------------------------

using Dot4 = void (*)(const float* r0, const float* r1, const float* r2, const float* r3,
                      const float* x, int64_t n, float* out);
using Dot1 = float (*)(const float* r, const float* x, int64_t n);

void dot4_portable(const float* r0, const float* r1, const float* r2, const float* r3,
                   const float* x, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k];
    s0 += r0[k] * v;
    s1 += r1[k] * v;
    s2 += r2[k] * v;
    s3 += r3[k] * v;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

float dot1_portable(const float* r, const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t k = 0; k < n; ++k) s += r[k] * x[k];
  return s;
}

#ifdef FASTLSTM_DECODE_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  const __m128 low = _mm256_castps256_ps128(v);
  const __m128 high = _mm256_extractf128_ps(v, 1);
  __m128 sum = _mm_add_ps(low, high);
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 0x55));
  return _mm_cvtss_f32(sum);
}

__attribute__((target("avx2,fma"))) void dot4_avx2(const float* r0, const float* r1,
                                                   const float* r2, const float* r3,
                                                   const float* x, int64_t n, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + k), v, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + k), v, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + k), v, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + k), v, a3);
  }
  float s0 = hsum256(a0), s1 = hsum256(a1), s2 = hsum256(a2), s3 = hsum256(a3);
  for (; k < n; ++k) {
    const float v = x[k];
    s0 += r0[k] * v;
    s1 += r1[k] * v;
    s2 += r2[k] * v;
    s3 += r3[k] * v;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

__attribute__((target("avx2,fma"))) float dot1_avx2(const float* r, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 8), _mm256_loadu_ps(x + k + 8), a1);
  }
  for (; k + 8 <= n; k += 8) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a0);
  }
  float s = hsum256(_mm256_add_ps(a0, a1));
  for (; k < n; ++k) s += r[k] * x[k];
  return s;
}
#endif

struct DotKernels {
  Dot4 dot4 = dot4_portable;
  Dot1 dot1 = dot1_portable;
};

const DotKernels& dot_kernels() {
  static const DotKernels kernels = [] {
    DotKernels chosen;
#ifdef FASTLSTM_DECODE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      chosen.dot4 = dot4_avx2;
      chosen.dot1 = dot1_avx2;
    }
#endif
    return chosen;
  }();
  return kernels;
}

// A parallel task covers at least 64K weights (256 KB of float32), so that a layer of a small
// model still splits over the cores: at batch 1 the step is bound by how fast the weights stream
// in, which every core adds to, and the fork of a parallel region with its threads spinning costs
// a few microseconds. (65, 64, 256, 2): 174-195 us a token with 512K weights per task (one thread
// for every layer) against 88-97 us with 64K (2-core Xeon, `python -m fastlstm.bench --suites
// decode`). On a machine whose cores are all busy a split costs instead (34-70 ms against 10.3 ms
// at load 8 on 2 cores): torch.set_num_threads(1) keeps the op on one thread.
constexpr int64_t kMinWeightsPerTask = int64_t(1) << 16;

int64_t grain_for(int64_t weights_per_item) {
  return std::max<int64_t>(1, kMinWeightsPerTask / std::max<int64_t>(1, weights_per_item));
}

// One layer's cell step for every batch row. x [B, in] (row stride x_stride), h_prev [B, H],
// c [B, H] updated in place, h_next [B, H] written.
void layer_step(const DotKernels& dots, const float* w_ih, const float* w_hh, const float* bias,
                const float* const* x_rows, int64_t in_size, const float* h_prev, float* c,
                float* h_next, int64_t batch, int64_t hidden) {
  at::parallel_for(0, hidden, grain_for(4 * (in_size + hidden) * batch),
                   [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const float* ih[4];
      const float* hh[4];
      for (int gate = 0; gate < 4; ++gate) {
        ih[gate] = w_ih + (gate * hidden + unit) * in_size;
        hh[gate] = w_hh + (gate * hidden + unit) * hidden;
      }
      for (int64_t b = 0; b < batch; ++b) {
        float from_input[4], from_hidden[4];
        dots.dot4(ih[0], ih[1], ih[2], ih[3], x_rows[b], in_size, from_input);
        dots.dot4(hh[0], hh[1], hh[2], hh[3], h_prev + b * hidden, hidden, from_hidden);
        float pre[4];
        for (int gate = 0; gate < 4; ++gate) {
          pre[gate] = from_input[gate] + from_hidden[gate] + bias[gate * hidden + unit];
        }
        GateValues<float> gates;
        float c_new;
        const float r = cell_forward<float>(pre[0], pre[1], pre[2], pre[3], c[b * hidden + unit],
                                            gates, c_new);
        c[b * hidden + unit] = c_new;
        h_next[b * hidden + unit] = r;
      }
    }
  });
}

// logits [B, V] = h [B, H] @ head_weight^T + head_bias
void head_step(const DotKernels& dots, const float* weight, const float* bias, const float* h,
               float* logits, int64_t batch, int64_t hidden, int64_t vocab) {
  const int64_t quads = vocab / 4;
  at::parallel_for(0, quads + 1, grain_for(4 * hidden * batch), [&](int64_t begin, int64_t end) {
    for (int64_t quad = begin; quad < end; ++quad) {
      const int64_t row = quad * 4;
      if (quad < quads) {
        const float* r = weight + row * hidden;
        for (int64_t b = 0; b < batch; ++b) {
          float out[4];
          dots.dot4(r, r + hidden, r + 2 * hidden, r + 3 * hidden, h + b * hidden, hidden, out);
          for (int j = 0; j < 4; ++j) {
            logits[b * vocab + row + j] = out[j] + (bias ? bias[row + j] : 0.f);
          }
        }
      } else {  // the last vocab % 4 rows
        for (int64_t v = row; v < vocab; ++v) {
          for (int64_t b = 0; b < batch; ++b) {
            logits[b * vocab + v] =
                dots.dot1(weight + v * hidden, h + b * hidden, hidden) + (bias ? bias[v] : 0.f);
          }
        }
      }
    }
  });
}

void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "decode_cpu: ", name,
              " must be (", rows, ", ", cols, "); got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "decode_cpu: ", name, " must be float32; got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "decode_cpu: ", name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "decode_cpu: ", name, " must be a CPU tensor");
}

void check_vector(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "decode_cpu: ", name, " must be (", size,
              "); got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "decode_cpu: ", name, " must be float32; got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "decode_cpu: ", name,
              " must be a contiguous CPU tensor");
}

at::Tensor decode_cpu(const at::Tensor& token, at::Tensor& h, at::Tensor& c,
                      const at::Tensor& embedding, at::TensorList w_ih, at::TensorList w_hh,
                      at::TensorList bias, const at::Tensor& head_weight,
                      const std::optional<at::Tensor>& head_bias, double temperature,
                      int64_t top_k, double top_p, std::optional<at::Generator> generator,
                      int64_t num_steps) {
  const int64_t layers = static_cast<int64_t>(w_ih.size());
  TORCH_CHECK(layers >= 1, "decode_cpu: w_ih must hold one tensor per layer; got none");
  TORCH_CHECK(static_cast<int64_t>(w_hh.size()) == layers &&
                  static_cast<int64_t>(bias.size()) == layers,
              "decode_cpu: w_ih, w_hh and bias must have one tensor per layer; got ", layers, ", ",
              w_hh.size(), " and ", bias.size());
  TORCH_CHECK(num_steps >= 0, "decode_cpu: num_steps must be >= 0; got ", num_steps);
  TORCH_CHECK(token.dim() == 1 && token.scalar_type() == at::kLong && token.device().is_cpu(),
              "decode_cpu: token must be a (batch,) int64 CPU tensor; got ", token.sizes(), " ",
              token.scalar_type());
  const int64_t batch = token.size(0);
  TORCH_CHECK(h.dim() == 3 && h.size(0) == layers && h.size(1) == batch,
              "decode_cpu: h must be (num_layers=", layers, ", batch=", batch,
              ", hidden); got ", h.sizes());
  const int64_t hidden = h.size(2);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.device().is_cpu(),
              "decode_cpu: h must be a contiguous float32 CPU tensor");
  TORCH_CHECK(c.sizes() == h.sizes() && c.scalar_type() == at::kFloat && c.is_contiguous() &&
                  c.device().is_cpu(),
              "decode_cpu: c must be a contiguous float32 CPU tensor of h's shape ", h.sizes(),
              "; got ", c.sizes());
  TORCH_CHECK(embedding.dim() == 2, "decode_cpu: embedding must be (vocab, embed); got ",
              embedding.sizes());
  const int64_t embed = embedding.size(1);
  const int64_t vocab_in = embedding.size(0);
  check_matrix(embedding, "embedding", vocab_in, embed);
  for (int64_t l = 0; l < layers; ++l) {
    check_matrix(w_ih[l], "w_ih[l]", 4 * hidden, l == 0 ? embed : hidden);
    check_matrix(w_hh[l], "w_hh[l]", 4 * hidden, hidden);
    check_vector(bias[l], "bias[l]", 4 * hidden);
  }
  TORCH_CHECK(head_weight.dim() == 2, "decode_cpu: head_weight must be (vocab, hidden); got ",
              head_weight.sizes());
  const int64_t vocab = head_weight.size(0);
  check_matrix(head_weight, "head_weight", vocab, hidden);
  const float* head_bias_data = nullptr;
  if (head_bias.has_value() && head_bias->defined()) {
    check_vector(*head_bias, "head_bias", vocab);
    head_bias_data = head_bias->data_ptr<float>();
  }
  TORCH_CHECK_VALUE(temperature >= 0.0 && std::isfinite(temperature),
                    "decode_cpu: temperature must be finite and >= 0; got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "decode_cpu: top_k must be >= 0 (0 = off); got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "decode_cpu: top_p must be in (0, 1]; got ",
                    top_p);

  at::Tensor tokens = at::empty({batch, num_steps}, token.options());
  if (num_steps == 0 || batch == 0) return tokens;
  const int64_t* token_in = token.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(token_in[b] >= 0 && token_in[b] < vocab_in, "decode_cpu: token[", b, "] = ",
                token_in[b], " is outside the embedding's [0, ", vocab_in, ")");
  }

  const DotKernels& dots = dot_kernels();
  const at::Tensor temperatures = at::full({batch}, temperature, h.options());
  auto* cpu_generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  at::Tensor logits = at::empty({batch, vocab}, head_weight.options());
  at::Tensor h_next = at::empty({batch, hidden}, h.options());
  std::vector<const float*> x_rows(batch);
  std::vector<int64_t> current(token_in, token_in + batch);
  float* h_data = h.data_ptr<float>();
  float* c_data = c.data_ptr<float>();
  float* h_next_data = h_next.data_ptr<float>();
  const float* embedding_data = embedding.data_ptr<float>();
  int64_t* tokens_data = tokens.data_ptr<int64_t>();

  for (int64_t step = 0; step < num_steps; ++step) {
    for (int64_t b = 0; b < batch; ++b) x_rows[b] = embedding_data + current[b] * embed;
    int64_t in_size = embed;
    for (int64_t l = 0; l < layers; ++l) {
      float* h_layer = h_data + l * batch * hidden;
      layer_step(dots, w_ih[l].data_ptr<float>(), w_hh[l].data_ptr<float>(),
                 bias[l].data_ptr<float>(), x_rows.data(), in_size, h_layer,
                 c_data + l * batch * hidden, h_next_data, batch, hidden);
      std::copy(h_next_data, h_next_data + batch * hidden, h_layer);
      for (int64_t b = 0; b < batch; ++b) x_rows[b] = h_layer + b * hidden;
      in_size = hidden;
    }
    head_step(dots, head_weight.data_ptr<float>(), head_bias_data,
              h_data + (layers - 1) * batch * hidden, logits.data_ptr<float>(), batch, hidden,
              vocab);
    uint64_t seed;
    {
      std::lock_guard<std::mutex> lock(cpu_generator->mutex_);
      seed = cpu_generator->random64();
    }
    const at::Tensor drawn =
        sample_cpu(logits, temperatures, top_k, top_p, static_cast<int64_t>(seed), 0);
    const int64_t* drawn_data = drawn.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(drawn_data[b] >= 0 && drawn_data[b] < vocab_in, "decode_cpu: drew token ",
                  drawn_data[b], " but the embedding has only ", vocab_in, " rows");
      current[b] = drawn_data[b];
      tokens_data[b * num_steps + step] = drawn_data[b];
    }
  }
  return tokens;
}

}  // namespace
}  // namespace fastlstm

TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def(
      "decode_cpu(Tensor token, Tensor(a!) h, Tensor(b!) c, Tensor embedding, Tensor[] w_ih, "
      "Tensor[] w_hh, Tensor[] bias, Tensor head_weight, Tensor? head_bias, float temperature, "
      "int top_k, float top_p, Generator? generator, int num_steps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("decode_cpu", &fastlstm::decode_cpu);
}
