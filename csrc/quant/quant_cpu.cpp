// Quantized CPU inference ops: linear layers, whole LSTM layers and the decode step of an LSTM
// language model, over int8 (per-output-row scales, activations quantized per row on the fly) or
// bf16 weights packed by fastlstm/quant.py. The products are csrc/quant/quant_kernels.h's; the cell
// update is the float32 LSTM kernels' (decode_kernels.h), so only the matrix products differ from
// the float32 ops.
//
// A packed weight travels as three tensors: `packed` (int8 [N_pad/16, K_pad/4, 16, 4] or bfloat16
// [N_pad/16, K_pad/2, 16, 2], see quant_kernels.h), `scale` (float32 [N_pad], int8 only: empty for
// bf16) and `sums` (int32 [N_pad], sum_k Wq[n, k], int8 only). LSTM weights are packed with their
// rows reordered so that each block of 16 hidden units holds its four gates in four consecutive
// panels: gate k (i, f, g, o) of unit u is row (u / 16) * 64 + k * 16 + u % 16 of the packed W,
// with H_pad = H rounded up to 16 and the rows of units >= H zero; `bias` [4 * H_pad] (b_ih +
// b_hh) is in the same order. A thread that owns a range of unit blocks then owns a contiguous
// range of panels, and the pre-activations of a block come out as the cell update reads them.
//
// Schemas (declared below):
//   quant_linear_cpu(Tensor x, Tensor packed, Tensor scale, Tensor sums, Tensor? bias,
//                    int out_features) -> Tensor
//     x [M, K] float32 -> [M, out_features] = x @ W^T + bias (bias [>= out_features] or None)
//   quant_lstm_layer_cpu(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_ih_scale,
//                        Tensor w_ih_sums, Tensor w_hh, Tensor w_hh_scale, Tensor w_hh_sums,
//                        Tensor bias, bool reverse) -> (Tensor, Tensor, Tensor)
//     x [T, B, I], h0, c0 [B, H] float32 -> (out [T, B, H], h_n [B, H], c_n [B, H]); one layer
//     and direction (reverse: t = T-1 .. 0)
//   quant_decode_cpu(...): decode_cpu's step (csrc/decode/decode_cpu.cpp) over packed weights; see
//     quant_decode_cpu below.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "decode/decode_kernels.h"
#include "common/part_barrier.h"
#include "quant/quant_kernels.h"
#include "sampling/sample_kernels.h"

namespace fastlstm {
namespace quant {
namespace {

// A packed weight's tensors, checked, as the kernels take them.
struct Packed {
  bool int8 = true;
  int64_t panels = 0, groups = 0, rows_pad = 0, depth_pad = 0;
  const void* data = nullptr;
  const float* scale = nullptr;
  const int32_t* sums = nullptr;
};

Packed check_packed(const char* op, const std::string& name, const at::Tensor& packed,
                    const at::Tensor& scale, const at::Tensor& sums) {
  Packed p;
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && packed.dim() == 4,
              op, ": ", name, " must be a contiguous CPU tensor (panels, groups, 16, depth) as "
              "fastlstm.quantize packs it; got ", packed.sizes());
  TORCH_CHECK(packed.scalar_type() == at::kChar || packed.scalar_type() == at::kBFloat16, op,
              ": ", name, " must be int8 or bfloat16; got ", packed.scalar_type());
  p.int8 = packed.scalar_type() == at::kChar;
  const int64_t group = p.int8 ? kS8Group : kBf16Group;
  TORCH_CHECK(packed.size(2) == kPanel && packed.size(3) == group, op, ": ", name,
              " must be (panels, groups, ", kPanel, ", ", group, "); got ", packed.sizes());
  p.panels = packed.size(0);
  p.groups = packed.size(1);
  p.rows_pad = p.panels * kPanel;
  p.depth_pad = p.groups * group;
  p.data = packed.data_ptr();
  if (p.int8) {
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                    scale.size(0) == p.rows_pad && scale.is_contiguous() && scale.device().is_cpu(),
                op, ": ", name, "'s scale must be a contiguous float32 CPU tensor (", p.rows_pad,
                ",); got ", scale.scalar_type(), " ", scale.sizes());
    TORCH_CHECK(sums.scalar_type() == at::kInt && sums.dim() == 1 && sums.size(0) == p.rows_pad &&
                    sums.is_contiguous() && sums.device().is_cpu(),
                op, ": ", name, "'s sums must be a contiguous int32 CPU tensor (", p.rows_pad,
                ",); got ", sums.scalar_type(), " ", sums.sizes());
    p.scale = scale.data_ptr<float>();
    p.sums = sums.data_ptr<int32_t>();
  }
  return p;
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), op, ": ", name,
              " must be a float32 CPU tensor; got ", t.scalar_type(), " on ", t.device());
}

// Activation rows in the form a packed weight's kernels read: int8 (with a scale per row) or bf16.
class Activations {
 public:
  Activations(const Packed& w, int64_t rows) : int8_(w.int8), depth_pad_(w.depth_pad) {
    if (int8_) {
      q_.resize(rows * depth_pad_);
      scale_.resize(rows);
    } else {
      bf16_.resize(rows * depth_pad_);
    }
  }

  // rows [first, first + count) from x [count, k] (row r at x + r * ldx)
  void fill(const Kernels& k, const float* x, int64_t ldx, int64_t first, int64_t count,
            int64_t depth) {
    if (int8_) {
      k.quantize_s8(x, ldx, count, depth, depth_pad_, q_.data() + first * depth_pad_,
                    scale_.data() + first);
    } else {
      k.to_bf16(x, ldx, count, depth, depth_pad_, bf16_.data() + first * depth_pad_);
    }
  }

  // The product of rows [first, first + rows) with panels [p0, p1) of w: out (+)= ..., both
  // holding the columns from column0 on (see Gemm).
  Gemm gemm(const Packed& w, int64_t first, int64_t rows, int64_t p0, int64_t p1,
            const float* base, int64_t base_ld, float* out, int64_t out_ld, int64_t columns,
            int64_t base_column0 = 0, int64_t out_column0 = 0) const {
    Gemm g;
    g.rows = rows;
    g.panel_begin = p0;
    g.panel_end = p1;
    g.groups = w.groups;
    g.a = int8_ ? static_cast<const void*>(q_.data() + first * depth_pad_)
                : static_cast<const void*>(bf16_.data() + first * depth_pad_);
    g.lda = depth_pad_;
    g.a_scale = int8_ ? scale_.data() + first : nullptr;
    g.w = w.data;
    g.w_sums = w.sums;
    g.w_scale = w.scale;
    g.base = base;
    g.base_ld = base_ld;
    g.base_column0 = base_column0;
    g.out = out;
    g.out_ld = out_ld;
    g.out_column0 = out_column0;
    g.columns = columns;
    return g;
  }

 private:
  bool int8_;
  int64_t depth_pad_;
  std::vector<int8_t> q_;
  std::vector<float> scale_;
  std::vector<uint16_t> bf16_;
};

inline void run(const Kernels& k, const Packed& w, const Gemm& g) {
  (w.int8 ? k.gemm_s8 : k.gemm_bf16)(g);
}

// Rows of activations per parallel task of a large product, and panels per task.
constexpr int64_t kTaskRows = 64;
constexpr int64_t kTaskPanels = 8;

// out [M, columns] = base + x [M, K] @ W^T, over all threads: rows quantized once, then tasks of
// kTaskRows x kTaskPanels.
void product(const Kernels& k, const Packed& w, const float* x, int64_t m, int64_t depth,
             const float* base, int64_t base_ld, float* out, int64_t out_ld, int64_t columns) {
  Activations act(w, m);
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    act.fill(k, x + r0 * depth, depth, r0, r1 - r0, depth);
  });
  const int64_t used_panels = std::min(w.panels, (columns + kPanel - 1) / kPanel);
  const int64_t row_tasks = (m + kTaskRows - 1) / kTaskRows;
  const int64_t panel_tasks = (used_panels + kTaskPanels - 1) / kTaskPanels;
  at::parallel_for(0, row_tasks * panel_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      // consecutive tasks share their panels, which then stay in the cache
      const int64_t panel_task = task / row_tasks, row_task = task % row_tasks;
      const int64_t r0 = row_task * kTaskRows, rows = std::min(kTaskRows, m - r0);
      const int64_t p0 = panel_task * kTaskPanels;
      const int64_t p1 = std::min(used_panels, p0 + kTaskPanels);
      run(k, w, act.gemm(w, r0, rows, p0, p1, base == nullptr ? nullptr : base + r0 * base_ld,
                         base_ld, out + r0 * out_ld, out_ld, columns));
    }
  });
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const at::Tensor& sums, const std::optional<at::Tensor>& bias,
                            int64_t out_features) {
  constexpr const char* op = "quant_linear_cpu";
  const Packed w = check_packed(op, "weight", packed, scale, sums);
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be (rows, in_features); got ", x.sizes());
  TORCH_CHECK(out_features >= 0 && out_features <= w.rows_pad, op, ": out_features ",
              out_features, " does not fit the packed weight's ", w.rows_pad, " rows");
  const int64_t depth = x.size(1);
  TORCH_CHECK(depth <= w.depth_pad && depth > w.depth_pad - (w.int8 ? kS8Group : kBf16Group), op,
              ": x has ", depth, " features but the weight was packed for ", w.depth_pad,
              " (padded)");
  const float* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_float(op, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) >= out_features && bias->is_contiguous(), op,
                ": bias must be contiguous (>= ", out_features, ",); got ", bias->sizes());
    bias_data = bias->data_ptr<float>();
  }
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return out;
  product(kernels(), w, input.data_ptr<float>(), x.size(0), depth, bias_data, 0,
          out.data_ptr<float>(), out_features, out_features);
  return out;
}

// Floats of projected inputs a part of the LSTM layer's region holds at a time (256 KB).
constexpr int64_t kChunkFloats = int64_t(1) << 16;

// Each part of a parallel region covers at least this many multiply-adds per step (decode and the
// recurrence), so a small problem does not pay a barrier per step for a few microseconds of work.
constexpr int64_t kMinWorkPerPart = int64_t(1) << 16;

inline int64_t slice_begin(int64_t k, int64_t n, int64_t parts) { return n * k / parts; }

// The cell update of the unit block `block` for rows [0, batch): the block's pre-activations at
// block_gates (row b at block_gates + b * gates_ld: i, f, g, o of its 16 units), c [B, H] in
// place, h written to h_out (row b at h_out + b * h_ld).
void cell_block(const cpu::DecodeKernels& cell, const float* block_gates, int64_t gates_ld,
                float* c, float* h_out, int64_t h_ld, int64_t batch, int64_t hidden,
                int64_t block) {
  const int64_t u0 = block * kPanel;
  cpu::ForwardStep<float> step{};
  step.hidden = hidden;  // c's row stride
  step.unit_begin = 0;
  step.unit_end = std::min(kPanel, hidden - u0);
  step.input_gates = nullptr;
  step.bias = nullptr;
  step.gemm = block_gates;
  step.gemm_ld = gates_ld;
  step.gemm_gate = kPanel;
  step.gates = nullptr;
  step.c = c + u0;
  step.cells = nullptr;
  step.r = h_out + u0;
  step.r_stride = h_ld;
  cell.cell_rows(step, 0, batch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_lstm_layer_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_ih_scale, const at::Tensor& w_ih_sums, const at::Tensor& w_hh,
    const at::Tensor& w_hh_scale, const at::Tensor& w_hh_sums, const at::Tensor& bias,
    bool reverse) {
  constexpr const char* op = "quant_lstm_layer_cpu";
  const Packed wi = check_packed(op, "w_ih", w_ih, w_ih_scale, w_ih_sums);
  const Packed wh = check_packed(op, "w_hh", w_hh, w_hh_scale, w_hh_sums);
  TORCH_CHECK(wi.int8 == wh.int8, op, ": w_ih and w_hh must be packed in the same format");
  check_float(op, "x", x);
  check_float(op, "h0", h0);
  check_float(op, "c0", c0);
  check_float(op, "bias", bias);
  TORCH_CHECK(x.dim() == 3, op, ": x must be (T, B, input_size); got ", x.sizes());
  const int64_t steps = x.size(0), batch = x.size(1), in_size = x.size(2);
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == batch, op, ": h0 must be (B=", batch,
              ", H); got ", h0.sizes());
  const int64_t hidden = h0.size(1);
  TORCH_CHECK(c0.sizes() == h0.sizes(), op, ": c0 must be h0's shape ", h0.sizes(), "; got ",
              c0.sizes());
  const int64_t hidden_pad = round_up(hidden, kPanel);
  TORCH_CHECK(wh.rows_pad == 4 * hidden_pad && wi.rows_pad == 4 * hidden_pad, op,
              ": w_ih and w_hh must have 4 * H_pad = ", 4 * hidden_pad, " packed rows; got ",
              wi.rows_pad, " and ", wh.rows_pad);
  const int64_t group = wi.int8 ? kS8Group : kBf16Group;
  TORCH_CHECK(wi.depth_pad == round_up(in_size, group), op, ": w_ih was packed for ",
              wi.depth_pad, " inputs (padded) but x has ", in_size);
  TORCH_CHECK(wh.depth_pad == round_up(hidden, group), op, ": w_hh was packed for ",
              wh.depth_pad, " inputs (padded) but H is ", hidden);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == 4 * hidden_pad && bias.is_contiguous(), op,
              ": bias must be (4 * H_pad = ", 4 * hidden_pad, ",); got ", bias.sizes());

  at::Tensor out = at::empty({steps, batch, hidden}, x.options());
  at::Tensor c_n = c0.contiguous().clone();
  if (steps == 0 || batch == 0) return {out, h0.contiguous().clone(), c_n};
  const Kernels& k = kernels();
  const cpu::DecodeKernels& cell = cpu::decode_kernels();
  const at::Tensor input = x.contiguous();
  const at::Tensor h_first = h0.contiguous();

  // 1. Every step's input rows quantized once, by all threads.
  const float* const x_data = input.data_ptr<float>();
  Activations x_act(wi, steps * batch);
  at::parallel_for(0, steps * batch, 16, [&](int64_t r0, int64_t r1) {
    x_act.fill(k, x_data + r0 * in_size, in_size, r0, r1 - r0, in_size);
  });

  // 2. One parallel region: part k owns a slice of the unit blocks, so a slice of the columns of
  // both products (the gates of its units). It projects a chunk of steps' inputs on its panels of
  // W_ih (x @ W_ih^T + bias, kChunkFloats of them: they stay in L2 until the recurrence reads
  // them), then runs those steps: quantizes h_{t-1} for itself (B x H values, a few
  // microseconds: cheaper than a second barrier per step), adds h_{t-1} @ W_hh^T and updates its
  // units; a barrier per step. h_t goes straight into out[t], which the next step reads.
  // (Projecting every step at once into a [T * B, 4H] buffer first took a third more time at
  // B=32, T=128, H=256: the buffer (16 MB) page-faulted in on every call and went through
  // memory twice.)
  const int64_t blocks = hidden_pad / kPanel;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(
      {at::get_num_threads(), blocks, batch * 4 * hidden * hidden / kMinWorkPerPart}));
  float* const out_data = out.data_ptr<float>();
  float* const c_data = c_n.data_ptr<float>();
  const float* const h0_data = h_first.data_ptr<float>();
  const float* const bias_data = bias.data_ptr<float>();
  const int64_t gates_all = 4 * hidden_pad;
  cpu::PartBarrier barrier(parts);
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    const int64_t weight = part_end - part_begin;
    const int64_t b0 = slice_begin(part_begin, blocks, parts);
    const int64_t b1 = slice_begin(part_end, blocks, parts);
    const int64_t width = (b1 - b0) * 4 * kPanel;  // this part's columns: [column0, +width)
    const int64_t column0 = b0 * 4 * kPanel;
    const int64_t chunk = std::max<int64_t>(
        1, std::min<int64_t>(steps, kChunkFloats / std::max<int64_t>(1, batch * width)));
    std::vector<float> projected(chunk * batch * width), gates(batch * width);
    Activations h_act(wh, batch);
    for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
      const int64_t count = std::min(chunk, steps - s0);
      // the chunk's steps are the times [t_first, t_first + count)
      const int64_t t_first = reverse ? steps - s0 - count : s0;
      if (width > 0) {
        run(k, wi, x_act.gemm(wi, t_first * batch, count * batch, 4 * b0, 4 * b1, bias_data, 0,
                              projected.data(), width, gates_all, 0, column0));
      }
      for (int64_t s = s0; s < s0 + count; ++s) {
        const int64_t t = reverse ? steps - 1 - s : s;
        if (width > 0) {
          const float* h_prev =
              s == 0 ? h0_data : out_data + (reverse ? t + 1 : t - 1) * batch * hidden;
          h_act.fill(k, h_prev, hidden, 0, batch, hidden);
          run(k, wh, h_act.gemm(wh, 0, batch, 4 * b0, 4 * b1,
                                projected.data() + (t - t_first) * batch * width, width,
                                gates.data(), width, gates_all, column0, column0));
          for (int64_t block = b0; block < b1; ++block) {
            cell_block(cell, gates.data() + (block - b0) * 4 * kPanel, width, c_data,
                       out_data + t * batch * hidden, hidden, batch, hidden, block);
          }
        }
        barrier.arrive_and_wait(weight);
      }
    }
  });
  const int64_t last = reverse ? 0 : steps - 1;
  return {out, out[last].clone(), c_n};
}

// The quantized decode step: csrc/decode/decode_cpu.cpp's op, whose comments describe the parallel
// region, with the products over packed weights.
//
//   quant_decode_cpu(Tensor token, Tensor(a!) h, Tensor(b!) c, Tensor embedding,
//                    Tensor[] w_ih, Tensor[] w_ih_scale, Tensor[] w_ih_sums,
//                    Tensor[] w_hh, Tensor[] w_hh_scale, Tensor[] w_hh_sums, Tensor[] bias,
//                    Tensor head_weight, Tensor head_scale, Tensor head_sums, Tensor? head_bias,
//                    float temperature, int top_k, float top_p, float min_p,
//                    Generator? generator, int num_steps) -> Tensor
//   token [B] int64; h, c [L, B, H] float32, updated in place to the state after the last step;
//   embedding [V, E] float32; w_ih[l], w_hh[l] packed LSTM weights (gate-blocked rows) with their
//   scales and sums; bias[l] [4 * H_pad]; head_weight packed [V_pad, H] with head_scale,
//   head_sums; head_bias [>= V] or None. Sampling as decode_cpu: temperature >= 0 (0 = greedy),
//   top_k (0 = off), top_p in (0, 1]; one 64-bit seed per step from `generator`, drawn as
//   fastlstm.sample draws it, min_p in [0, 1] (0 = off) included: fastlstm.sample's order,
//   top-k, then top-p, then min-p. Returns the tokens, int64 [B, num_steps].
at::Tensor quant_decode_cpu(const at::Tensor& token, at::Tensor& h, at::Tensor& c,
                            const at::Tensor& embedding, at::TensorList w_ih,
                            at::TensorList w_ih_scale, at::TensorList w_ih_sums,
                            at::TensorList w_hh, at::TensorList w_hh_scale,
                            at::TensorList w_hh_sums, at::TensorList bias,
                            const at::Tensor& head_weight, const at::Tensor& head_scale,
                            const at::Tensor& head_sums,
                            const std::optional<at::Tensor>& head_bias, double temperature,
                            int64_t top_k, double top_p, double min_p,
                            std::optional<at::Generator> generator, int64_t num_steps) {
  constexpr const char* op = "quant_decode_cpu";
  const int64_t layers = static_cast<int64_t>(w_ih.size());
  TORCH_CHECK(layers >= 1, op, ": w_ih must hold one tensor per layer; got none");
  for (const auto& [list, name] : {std::pair<at::TensorList, const char*>{w_ih_scale, "w_ih_scale"},
                                   {w_ih_sums, "w_ih_sums"}, {w_hh, "w_hh"},
                                   {w_hh_scale, "w_hh_scale"}, {w_hh_sums, "w_hh_sums"},
                                   {bias, "bias"}}) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == layers, op, ": ", name,
                " must have one tensor per layer (", layers, "); got ", list.size());
  }
  TORCH_CHECK(num_steps >= 0, op, ": num_steps must be >= 0; got ", num_steps);
  TORCH_CHECK(token.dim() == 1 && token.scalar_type() == at::kLong && token.device().is_cpu(), op,
              ": token must be a (batch,) int64 CPU tensor; got ", token.sizes(), " ",
              token.scalar_type());
  const int64_t batch = token.size(0);
  TORCH_CHECK(h.dim() == 3 && h.size(0) == layers && h.size(1) == batch, op,
              ": h must be (num_layers=", layers, ", batch=", batch, ", hidden); got ", h.sizes());
  const int64_t hidden = h.size(2);
  const int64_t hidden_pad = round_up(hidden, kPanel);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.device().is_cpu(), op,
              ": h must be a contiguous float32 CPU tensor");
  TORCH_CHECK(c.sizes() == h.sizes() && c.scalar_type() == at::kFloat && c.is_contiguous() &&
                  c.device().is_cpu(),
              op, ": c must be a contiguous float32 CPU tensor of h's shape ", h.sizes(),
              "; got ", c.sizes());
  check_float(op, "embedding", embedding);
  TORCH_CHECK(embedding.dim() == 2 && embedding.is_contiguous(), op,
              ": embedding must be a contiguous (vocab, embed) tensor; got ", embedding.sizes());
  const int64_t embed = embedding.size(1), vocab_in = embedding.size(0);
  std::vector<Packed> wi(layers), wh(layers);
  bool int8 = true;
  for (int64_t l = 0; l < layers; ++l) {
    const std::string suffix = "[" + std::to_string(l) + "]";
    wi[l] = check_packed(op, "w_ih" + suffix, w_ih[l], w_ih_scale[l], w_ih_sums[l]);
    wh[l] = check_packed(op, "w_hh" + suffix, w_hh[l], w_hh_scale[l], w_hh_sums[l]);
    if (l == 0) int8 = wi[l].int8;
    TORCH_CHECK(wi[l].int8 == int8 && wh[l].int8 == int8, op,
                ": every weight must be packed in the same format (int8 or bf16)");
    const int64_t group = int8 ? kS8Group : kBf16Group;
    const int64_t in_size = l == 0 ? embed : hidden;
    TORCH_CHECK(wi[l].rows_pad == 4 * hidden_pad && wh[l].rows_pad == 4 * hidden_pad, op,
                ": w_ih", suffix, " and w_hh", suffix, " must have 4 * H_pad = ", 4 * hidden_pad,
                " packed rows; got ", wi[l].rows_pad, " and ", wh[l].rows_pad);
    TORCH_CHECK(wi[l].depth_pad == round_up(in_size, group) &&
                    wh[l].depth_pad == round_up(hidden, group),
                op, ": w_ih", suffix, " / w_hh", suffix, " were packed for ", wi[l].depth_pad,
                " / ", wh[l].depth_pad, " inputs (padded); expected ", round_up(in_size, group),
                " / ", round_up(hidden, group));
    check_float(op, "bias[l]", bias[l]);
    TORCH_CHECK(bias[l].dim() == 1 && bias[l].size(0) == 4 * hidden_pad &&
                    bias[l].is_contiguous(),
                op, ": bias", suffix, " must be (4 * H_pad = ", 4 * hidden_pad, ",); got ",
                bias[l].sizes());
  }
  const Packed head = check_packed(op, "head_weight", head_weight, head_scale, head_sums);
  TORCH_CHECK(head.int8 == int8, op, ": head_weight must be packed as the LSTM weights are");
  TORCH_CHECK(head.depth_pad == round_up(hidden, int8 ? kS8Group : kBf16Group), op,
              ": head_weight was packed for ", head.depth_pad, " inputs (padded); H is ", hidden);
  const int64_t vocab = vocab_in;
  TORCH_CHECK(head.rows_pad >= vocab && head.rows_pad < vocab + kPanel, op,
              ": head_weight must have the embedding's ", vocab, " rows (padded to ",
              round_up(vocab, kPanel), "); got ", head.rows_pad);
  const float* head_bias_data = nullptr;
  if (head_bias.has_value() && head_bias->defined()) {
    check_float(op, "head_bias", *head_bias);
    TORCH_CHECK(head_bias->dim() == 1 && head_bias->size(0) >= vocab && head_bias->is_contiguous(),
                op, ": head_bias must be contiguous (>= ", vocab, ",); got ", head_bias->sizes());
    head_bias_data = head_bias->data_ptr<float>();
  }
  TORCH_CHECK_VALUE(temperature >= 0.0 && std::isfinite(temperature), op,
                    ": temperature must be finite and >= 0; got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, op, ": top_k must be >= 0 (0 = off); got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, op, ": top_p must be in (0, 1]; got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0.0 && min_p <= 1.0, op, ": min_p must be in [0, 1] (0 = off); got ",
                    min_p);

  at::Tensor tokens = at::empty({batch, num_steps}, token.options());
  if (num_steps == 0 || batch == 0) return tokens;
  const int64_t* token_in = token.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(token_in[b] >= 0 && token_in[b] < vocab_in, op, ": token[", b, "] = ",
                token_in[b], " is outside the embedding's [0, ", vocab_in, ")");
  }

  const Kernels& k = kernels();
  const cpu::DecodeKernels& cell = cpu::decode_kernels();
  const at::Tensor temperatures = at::full({batch}, temperature, h.options());
  auto* cpu_generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  at::Tensor logits = at::empty({batch, vocab}, h.options());
  at::Tensor h_halves = at::empty({2, layers, batch, hidden}, h.options());
  h_halves[0].copy_(h);
  const int64_t gates_ld = 4 * hidden_pad;
  at::Tensor gates = at::empty({batch, gates_ld}, h.options());
  std::vector<int64_t> current(token_in, token_in + batch);
  float* const h_buffers = h_halves.data_ptr<float>();
  const int64_t h_half = layers * batch * hidden;
  float* const c_data = c.data_ptr<float>();
  float* const logits_data = logits.data_ptr<float>();
  float* const gates_data = gates.data_ptr<float>();
  const float* const embedding_data = embedding.data_ptr<float>();
  int64_t* const tokens_data = tokens.data_ptr<int64_t>();
  std::vector<const float*> bias_data(layers);
  int64_t step_work = vocab * hidden;
  for (int64_t l = 0; l < layers; ++l) {
    bias_data[l] = bias[l].data_ptr<float>();
    step_work += 4 * hidden * ((l == 0 ? embed : hidden) + hidden);
  }
  const int64_t blocks = hidden_pad / kPanel;
  const int64_t head_panels = (vocab + kPanel - 1) / kPanel;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(
      {at::get_num_threads(), blocks, step_work * batch / kMinWorkPerPart}));

  cpu::PartBarrier barrier(parts);
  std::vector<std::exception_ptr> failures(parts);
  std::atomic<int64_t> failed_step{-1};
  uint64_t seed = 0;
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    const int64_t weight = part_end - part_begin;
    const int64_t b0 = slice_begin(part_begin, blocks, parts);
    const int64_t b1 = slice_begin(part_end, blocks, parts);
    const int64_t v0 = slice_begin(part_begin, head_panels, parts);
    const int64_t v1 = slice_begin(part_end, head_panels, parts);
    const int64_t row_begin = slice_begin(part_begin, batch, parts);
    const int64_t row_end = slice_begin(part_end, batch, parts);
    std::vector<Activations> x_act, h_act;
    for (int64_t l = 0; l < layers; ++l) {
      x_act.emplace_back(wi[l], batch);
      h_act.emplace_back(wh[l], batch);
    }
    Activations top_act(head, batch);
    for (int64_t step = 0; step < num_steps; ++step) {
      const float* h_prev = h_buffers + (step % 2) * h_half;
      float* h_next = h_buffers + ((step + 1) % 2) * h_half;
      for (int64_t l = 0; l < layers; ++l) {
        if (b1 > b0) {
          if (l == 0) {
            for (int64_t b = 0; b < batch; ++b) {
              x_act[0].fill(k, embedding_data + current[b] * embed, embed, b, 1, embed);
            }
          } else {
            x_act[l].fill(k, h_next + (l - 1) * batch * hidden, hidden, 0, batch, hidden);
          }
          h_act[l].fill(k, h_prev + l * batch * hidden, hidden, 0, batch, hidden);
          run(k, wi[l], x_act[l].gemm(wi[l], 0, batch, 4 * b0, 4 * b1, bias_data[l], 0,
                                      gates_data, gates_ld, gates_ld));
          run(k, wh[l], h_act[l].gemm(wh[l], 0, batch, 4 * b0, 4 * b1, gates_data, gates_ld,
                                      gates_data, gates_ld, gates_ld));
          for (int64_t block = b0; block < b1; ++block) {
            cell_block(cell, gates_data + block * 4 * kPanel, gates_ld,
                       c_data + l * batch * hidden, h_next + l * batch * hidden, hidden, batch,
                       hidden, block);
          }
        }
        barrier.arrive_and_wait(weight);
      }
      if (v1 > v0) {
        top_act.fill(k, h_next + (layers - 1) * batch * hidden, hidden, 0, batch, hidden);
        run(k, head, top_act.gemm(head, 0, batch, v0, v1, head_bias_data, 0, logits_data, vocab,
                                  vocab));
      }
      if (part_begin == 0) {
        std::lock_guard<std::mutex> lock(cpu_generator->mutex_);
        seed = cpu_generator->random64();
      }
      barrier.arrive_and_wait(weight);
      if (row_end > row_begin) {
        try {
          cpu::draw_decode_rows(op, logits, temperatures, top_k, top_p, min_p, seed, row_begin,
                                row_end, vocab_in, step, num_steps, current.data(),
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
  const int64_t stopped = failed_step.load();
  h.copy_(h_halves[(stopped >= 0 ? stopped + 1 : num_steps) % 2]);
  for (const std::exception_ptr& failure : failures) {
    if (failure) std::rethrow_exception(failure);
  }
  return tokens;
}

// Which kernels run: (int8 kernel set, bf16 kernel set), e.g. ("avx512-vnni", "avx512-bf16").
std::tuple<std::string, std::string> quant_kernels_cpu() {
  const Kernels& k = kernels();
  return {k.s8_name, k.bf16_name};
}

}  // namespace
}  // namespace quant
}  // namespace fastlstm

TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def(
      "quant_linear_cpu(Tensor x, Tensor packed, Tensor scale, Tensor sums, Tensor? bias, "
      "int out_features) -> Tensor");
  m.def(
      "quant_lstm_layer_cpu(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_ih_scale, "
      "Tensor w_ih_sums, Tensor w_hh, Tensor w_hh_scale, Tensor w_hh_sums, Tensor bias, "
      "bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "quant_decode_cpu(Tensor token, Tensor(a!) h, Tensor(b!) c, Tensor embedding, "
      "Tensor[] w_ih, Tensor[] w_ih_scale, Tensor[] w_ih_sums, Tensor[] w_hh, "
      "Tensor[] w_hh_scale, Tensor[] w_hh_sums, Tensor[] bias, Tensor head_weight, "
      "Tensor head_scale, Tensor head_sums, Tensor? head_bias, float temperature, int top_k, "
      "float top_p, float min_p, Generator? generator, int num_steps) -> Tensor");
  m.def("quant_kernels_cpu() -> (str, str)", &fastlstm::quant::quant_kernels_cpu);
}

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("quant_linear_cpu", &fastlstm::quant::quant_linear_cpu);
  m.impl("quant_lstm_layer_cpu", &fastlstm::quant::quant_lstm_layer_cpu);
  m.impl("quant_decode_cpu", &fastlstm::quant::quant_decode_cpu);
}
