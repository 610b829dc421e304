// The CPU decode step of an LSTM language model, whole, as one op: embedding gather, every
// layer's cell step, the output head and the draw, for `num_steps` tokens in a row.
//
// At batch 1 a decode step is a handful of matrix-vector products; run as separate ATen ops each
// costs a dispatch, an allocation and (with oneDNN) a weight reorder, which dwarf the arithmetic.
// Here every weight matrix is read once per step, straight from the parameters, in one pass per
// layer: the four gate rows of a hidden unit are dotted with the input and the hidden state
// together, and the cell update of each block of units (cell.h's math over SIMD lanes) follows
// while the block's pre-activations are in L1.
//
// Schema (declared below):
//   decode_cpu(Tensor token, Tensor(a!) h, Tensor(b!) c, Tensor embedding, Tensor[] w_ih,
//              Tensor[] w_hh, Tensor[] bias, Tensor head_weight, Tensor? head_bias,
//              float temperature, int top_k, float top_p, Generator? generator,
//              int num_steps, float min_p=0.0) -> Tensor
//   token [B] int64: the last token; h, c [L, B, H] float32, updated in place to the state after
//   the last step (after an error in a draw, the state after that draw's step); embedding
//   [V, E]; w_ih[l] [4H, E or H]; w_hh[l] [4H, H]; bias[l] [4H] (b_ih + b_hh); head_weight
//   [V, H]; head_bias [V] or None; temperature >= 0 (0 = greedy); min_p in [0, 1] (0 = off;
//   last and defaulted, so that callers written before it still match).
//   Every step draws with fastlstm::sample_cpu after taking one 64-bit seed from `generator`
//   (the default CPU generator when None), exactly as the fastlstm::sample op does per call, so
//   num_steps steps here give the tokens of num_steps Python steps with fastlstm.sample.
//   Returns the drawn tokens, int64 [B, num_steps].
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <vector>

#include "decode/decode_kernels.h"
#include "common/part_barrier.h"
#include "sampling/sample_kernels.h"

namespace fastlstm {
namespace {

// The step runs in one parallel region for all of its tokens: each of `parts` threads owns a
// slice of every layer's hidden units, of the head's rows and of the batch rows to draw, and a
// spin barrier after each layer, after the head and after the draw replaces a fork and join per
// layer (a few microseconds each, a tenth of a small model's step). A part covers at least 64K
// weights (256 KB of float32) of the step, so a small model still splits over the cores: at
// batch 1 the step is bound by how fast the weights stream in, which every core adds to.
// (65, 64, 256, 2): 142 us a token on one thread against 87 us on two (2-core Xeon, `python -m
// fastlstm.bench --suites decode [--threads 1]`). On a machine whose cores are all busy a split
// costs instead (the barrier waits for a descheduled thread): torch.set_num_threads(1) keeps the
// op on one thread.
constexpr int64_t kMinWeightsPerPart = int64_t(1) << 16;

// [begin, end) of part k of n items split into `parts` nearly equal slices.
inline int64_t slice_begin(int64_t k, int64_t n, int64_t parts) { return n * k / parts; }

// Units per block of the cell update: the pre-activations of a block's units are gathered, then
// the cell math (cell.h's, over SIMD lanes) runs on the whole block at once. Done unit by unit in
// scalar code, its exp/tanh calls took a fifth of a small model's step.
constexpr int64_t kCellBlock = 32;

// Part k's hidden units [u0, u1) of one layer's cell step for every batch row. x_rows[b] is row
// b's input (in_size floats), h_prev [B, H], c [B, H] updated in place, h_next [B, H] written.
// scratch holds 8 * kCellBlock * batch floats.
void layer_units(const cpu::DecodeKernels& kernels, const float* w_ih, const float* w_hh,
                 const float* bias, const float* const* x_rows, int64_t in_size,
                 const float* h_prev, float* c, float* h_next, int64_t batch, int64_t hidden,
                 int64_t u0, int64_t u1, float* scratch) {
  // Row b's pre-activations of the block: from the input (with the bias) at
  // scratch[b * 8 * n + gate * n + i], from h_prev 4 * n floats after.
  for (int64_t block = u0; block < u1; block += kCellBlock) {
    const int64_t n = std::min(kCellBlock, u1 - block);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t unit = block + i;
      const float* ih[4];
      const float* hh[4];
      for (int gate = 0; gate < 4; ++gate) {
        ih[gate] = w_ih + (gate * hidden + unit) * in_size;
        hh[gate] = w_hh + (gate * hidden + unit) * hidden;
      }
      for (int64_t b = 0; b < batch; ++b) {
        float from_input[4], from_hidden[4];
        kernels.dot4(ih[0], ih[1], ih[2], ih[3], x_rows[b], in_size, from_input);
        kernels.dot4(hh[0], hh[1], hh[2], hh[3], h_prev + b * hidden, hidden, from_hidden);
        float* row = scratch + b * 8 * n;
        for (int gate = 0; gate < 4; ++gate) {
          row[gate * n + i] = from_input[gate] + bias[gate * hidden + unit];
          row[4 * n + gate * n + i] = from_hidden[gate];
        }
      }
    }
    for (int64_t b = 0; b < batch; ++b) {
      const float* row = scratch + b * 8 * n;
      cpu::ForwardStep<float> step{};
      step.hidden = n;  // the block's gate stride in `row`
      step.unit_begin = 0;
      step.unit_end = n;
      step.input_gates = row;
      step.bias = nullptr;
      step.gemm = row + 4 * n;
      step.gemm_ld = 0;
      step.gemm_gate = n;
      step.gates = nullptr;
      step.c = c + b * hidden + block;
      step.cells = nullptr;
      step.r = h_next + b * hidden + block;
      step.r_stride = 0;
      kernels.cell_rows(step, 0, 1);
    }
  }
}

// Rows [v0, v1) of logits [B, V] = h [B, H] @ head_weight^T + head_bias, four rows at a time,
// one from each quarter of the range.
void head_rows(const cpu::DecodeKernels& kernels, const float* weight, const float* bias,
               const float* h, float* logits, int64_t batch, int64_t hidden, int64_t vocab,
               int64_t v0, int64_t v1) {
  const int64_t quarter = (v1 - v0) / 4;
  for (int64_t i = 0; i < quarter; ++i) {
    const int64_t rows[4] = {v0 + i, v0 + quarter + i, v0 + 2 * quarter + i,
                             v0 + 3 * quarter + i};
    for (int64_t b = 0; b < batch; ++b) {
      float out[4];
      kernels.dot4(weight + rows[0] * hidden, weight + rows[1] * hidden,
                   weight + rows[2] * hidden, weight + rows[3] * hidden, h + b * hidden, hidden,
                   out);
      for (int j = 0; j < 4; ++j) {
        logits[b * vocab + rows[j]] = out[j] + (bias ? bias[rows[j]] : 0.f);
      }
    }
  }
  for (int64_t v = v0 + 4 * quarter; v < v1; ++v) {  // the last (v1 - v0) % 4 rows
    for (int64_t b = 0; b < batch; ++b) {
      logits[b * vocab + v] =
          kernels.dot1(weight + v * hidden, h + b * hidden, hidden) + (bias ? bias[v] : 0.f);
    }
  }
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
                      int64_t num_steps, double min_p) {
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
  TORCH_CHECK_VALUE(min_p >= 0.0 && min_p <= 1.0, "decode_cpu: min_p must be in [0, 1]; got ",
                    min_p);

  at::Tensor tokens = at::empty({batch, num_steps}, token.options());
  if (num_steps == 0 || batch == 0) return tokens;
  const int64_t* token_in = token.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(token_in[b] >= 0 && token_in[b] < vocab_in, "decode_cpu: token[", b, "] = ",
                token_in[b], " is outside the embedding's [0, ", vocab_in, ")");
  }

  const cpu::DecodeKernels& kernels = cpu::decode_kernels();
  const at::Tensor temperatures = at::full({batch}, temperature, h.options());
  auto* cpu_generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  at::Tensor logits = at::empty({batch, vocab}, head_weight.options());
  // h of every layer twice: step s reads half s % 2 and writes the other, so no part overwrites
  // a unit of h another part has still to read.
  at::Tensor h_halves = at::empty({2, layers, batch, hidden}, h.options());
  h_halves[0].copy_(h);
  std::vector<int64_t> current(token_in, token_in + batch);
  float* const h_buffers = h_halves.data_ptr<float>();
  const int64_t h_half = layers * batch * hidden;
  float* const c_data = c.data_ptr<float>();
  float* const logits_data = logits.data_ptr<float>();
  const float* const embedding_data = embedding.data_ptr<float>();
  const float* const head_data = head_weight.data_ptr<float>();
  int64_t* const tokens_data = tokens.data_ptr<int64_t>();
  std::vector<const float*> w_ih_data(layers), w_hh_data(layers), bias_data(layers);
  int64_t step_weights = vocab * hidden;
  for (int64_t l = 0; l < layers; ++l) {
    w_ih_data[l] = w_ih[l].data_ptr<float>();
    w_hh_data[l] = w_hh[l].data_ptr<float>();
    bias_data[l] = bias[l].data_ptr<float>();
    step_weights += w_ih[l].numel() + w_hh[l].numel();
  }
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), step_weights * batch / kMinWeightsPerPart));

  cpu::PartBarrier barrier(parts);
  // The draw of each step: part k samples the batch rows of slice k, keyed by their row in the
  // batch (sample_cpu's first_row), so the tokens do not depend on the split. An error (NaN
  // logits) is kept by its part and raised after the region, the lowest part's first.
  std::vector<std::exception_ptr> failures(parts);
  std::atomic<int64_t> failed_step{-1};  // the step whose draw failed
  uint64_t seed = 0;  // the step's seed: drawn by part 0 before the barrier that ends the head
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    const int64_t weight = part_end - part_begin;
    const int64_t row_begin = slice_begin(part_begin, batch, parts);
    const int64_t row_end = slice_begin(part_end, batch, parts);
    std::vector<const float*> x_rows(batch);
    std::vector<float> scratch(8 * kCellBlock * batch);
    for (int64_t step = 0; step < num_steps; ++step) {
      const float* h_prev = h_buffers + (step % 2) * h_half;
      float* h_next = h_buffers + ((step + 1) % 2) * h_half;
      for (int64_t b = 0; b < batch; ++b) x_rows[b] = embedding_data + current[b] * embed;
      int64_t in_size = embed;
      for (int64_t l = 0; l < layers; ++l) {
        float* h_out = h_next + l * batch * hidden;
        for (int64_t k = part_begin; k < part_end; ++k) {
          layer_units(kernels, w_ih_data[l], w_hh_data[l], bias_data[l], x_rows.data(),
                      in_size, h_prev + l * batch * hidden, c_data + l * batch * hidden, h_out,
                      batch, hidden, slice_begin(k, hidden, parts),
                      slice_begin(k + 1, hidden, parts), scratch.data());
        }
        barrier.arrive_and_wait(weight);
        for (int64_t b = 0; b < batch; ++b) x_rows[b] = h_out + b * hidden;
        in_size = hidden;
      }
      for (int64_t k = part_begin; k < part_end; ++k) {
        head_rows(kernels, head_data, head_bias_data, h_next + (layers - 1) * batch * hidden,
                  logits_data, batch, hidden, vocab, slice_begin(k, vocab, parts),
                  slice_begin(k + 1, vocab, parts));
      }
      if (part_begin == 0) {
        std::lock_guard<std::mutex> lock(cpu_generator->mutex_);
        seed = cpu_generator->random64();
      }
      barrier.arrive_and_wait(weight);
      if (row_end > row_begin) {
        try {
          cpu::draw_decode_rows("decode_cpu", logits, temperatures, top_k, top_p, min_p, seed,
                                row_begin, row_end, vocab_in, step, num_steps, current.data(),
                                tokens_data);
        } catch (...) {
          failures[part_begin] = std::current_exception();
          failed_step.store(step, std::memory_order_relaxed);
        }
      }
      barrier.arrive_and_wait(weight);
      if (failed_step.load(std::memory_order_relaxed) >= 0) return;
    }
  });
  // h and c leave as the state after the last step whose cell update ran (all of them, or up to
  // the one whose draw failed).
  const int64_t stopped = failed_step.load();
  h.copy_(h_halves[(stopped >= 0 ? stopped + 1 : num_steps) % 2]);
  for (const std::exception_ptr& failure : failures) {
    if (failure) std::rethrow_exception(failure);
  }
  return tokens;
}

}  // namespace

void cpu::draw_decode_rows(const char* op, const at::Tensor& logits,
                           const at::Tensor& temperatures, int64_t top_k, double top_p,
                           double min_p, uint64_t seed, int64_t row_begin, int64_t row_end,
                           int64_t vocab_in, int64_t step, int64_t num_steps, int64_t* current,
                           int64_t* tokens) {
  const int64_t rows = row_end - row_begin;
  const at::Tensor drawn =
      sample_cpu(logits.narrow(0, row_begin, rows), temperatures.narrow(0, row_begin, rows),
                 top_k, top_p, static_cast<int64_t>(seed), 0, row_begin, min_p);
  const int64_t* drawn_data = drawn.data_ptr<int64_t>();
  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t token_b = drawn_data[b - row_begin];
    TORCH_CHECK(token_b >= 0 && token_b < vocab_in, op, ": drew token ", token_b,
                " but the embedding has only ", vocab_in, " rows");
    current[b] = token_b;
    tokens[b * num_steps + step] = token_b;
  }
}

}  // namespace fastlstm

TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def(
      "decode_cpu(Tensor token, Tensor(a!) h, Tensor(b!) c, Tensor embedding, Tensor[] w_ih, "
      "Tensor[] w_hh, Tensor[] bias, Tensor head_weight, Tensor? head_bias, float temperature, "
      "int top_k, float top_p, Generator? generator, int num_steps, float min_p=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("decode_cpu", &fastlstm::decode_cpu);
}
