// The LSTM cell arithmetic, written once for the CPU (.cpp) and CUDA (.cu) kernels.
//
// Gate order i, f, g, o as in nn.LSTM. `Acc` is the accumulation type: float for fp32/fp16/bf16
// inputs, double for float64. Every function is __host__ __device__ inline, so the CPU tests
// exercise the same code the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTLSTM_HD __host__ __device__ __forceinline__
#else
#define FASTLSTM_HD inline
#endif

namespace fastlstm {

#if !defined(__CUDACC__) && !defined(__HIPCC__)
// On the host, unqualified exp/tanh of a float must pick the float overloads, not promote to
// double. Vector types (the CPU kernels' SIMD lanes) bring their own exp/tanh, found by ADL.
using std::exp;
using std::tanh;
#endif

template <typename Acc>
FASTLSTM_HD Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + exp(-x));
}

template <typename Acc>
FASTLSTM_HD Acc tanh_(Acc x) {
  return tanh(x);
}

// Activated gates of one hidden unit.
template <typename Acc>
struct GateValues {
  Acc i, f, g, o;
};

// Forward of one hidden unit: pre-activations in, activated gates and new c out.
// Returns r = o * tanh(c_new), the unit's output before any projection.
template <typename Acc>
FASTLSTM_HD Acc cell_forward(Acc pre_i, Acc pre_f, Acc pre_g, Acc pre_o, Acc c_prev,
                             GateValues<Acc>& gates, Acc& c_new) {
  gates.i = sigmoid(pre_i);
  gates.f = sigmoid(pre_f);
  gates.g = tanh_(pre_g);
  gates.o = sigmoid(pre_o);
  c_new = gates.f * c_prev + gates.i * gates.g;
  return gates.o * tanh_(c_new);
}

// Pre-activation gate gradients of one hidden unit.
template <typename Acc>
struct GateGrads {
  Acc i, f, g, o;
};

// Backward of one hidden unit.
//   dr: gradient reaching r = o * tanh(c) (after the projection's transpose, if any)
//   dc_next: gradient reaching c from the later step (or from c_n)
// Outputs the pre-activation gradients and the gradient to c_prev.
template <typename Acc>
FASTLSTM_HD void cell_backward(const GateValues<Acc>& gates, Acc c, Acc c_prev, Acc dr,
                               Acc dc_next, GateGrads<Acc>& grads, Acc& dc_prev) {
  const Acc tc = tanh_(c);
  const Acc dc = dc_next + dr * gates.o * (Acc(1) - tc * tc);
  grads.i = dc * gates.g * gates.i * (Acc(1) - gates.i);
  grads.f = dc * c_prev * gates.f * (Acc(1) - gates.f);
  grads.g = dc * gates.i * (Acc(1) - gates.g * gates.g);
  grads.o = dr * tc * gates.o * (Acc(1) - gates.o);
  dc_prev = dc * gates.f;
}

// ---- zoneout ---------------------------------------------------------------------------------
// Per row and unit, h (c) keeps its previous value with a keep weight k: 1 with probability p,
// else 0, from a counter-based hash of (seed, stream, row, unit), so the backward regenerates the
// forward's masks and no mask goes through memory; in evaluation k = p. The hash is written out
// in fastlstm/lstm/recurrence.py (zoneout_keep), the specification of every backend's masks.

FASTLSTM_HD uint32_t zoneout_hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x1b873593u;
  return x ^ (x >> 16);
}

// The key of one mask: stream 0 for h, 1 for c.
FASTLSTM_HD uint32_t zoneout_key(uint64_t seed, uint32_t stream) {
  return zoneout_hash32(static_cast<uint32_t>(seed) ^
                        zoneout_hash32(static_cast<uint32_t>(seed >> 32) ^
                                       zoneout_hash32(stream + 1u)));
}

// Whether element e = row * units + unit (mod 2^32) keeps its previous value.
FASTLSTM_HD bool zoneout_keeps(uint32_t key, uint32_t threshold, uint32_t element) {
  return zoneout_hash32(zoneout_hash32(element ^ key) + key) < threshold;
}

// Both masks of one layer and direction. `expected`: evaluation, k = p.
struct ZoneoutMasks {
  bool h = false, c = false, expected = false;
  double prob_h = 0, prob_c = 0;
  uint32_t key_h = 0, key_c = 0, threshold_h = 0, threshold_c = 0;
};

// Keep weight of element (row, unit) of the h mask (for_h) or the c mask; `units` is the mask's
// width (P for h, H for c).
template <typename Acc>
FASTLSTM_HD Acc zoneout_weight(const ZoneoutMasks& masks, bool for_h, int64_t row, int64_t units,
                               int64_t unit) {
  if (masks.expected) return static_cast<Acc>(for_h ? masks.prob_h : masks.prob_c);
  const uint32_t element = static_cast<uint32_t>(row * units + unit);
  return zoneout_keeps(for_h ? masks.key_h : masks.key_c,
                       for_h ? masks.threshold_h : masks.threshold_c, element)
             ? Acc(1)
             : Acc(0);
}

inline uint32_t zoneout_threshold(double probability) {
  const double scaled = probability * 4294967296.0;
  return scaled >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(scaled);
}

inline ZoneoutMasks make_zoneout_masks(double prob_h, double prob_c, int64_t seed, bool expected) {
  ZoneoutMasks masks;
  masks.h = prob_h > 0;
  masks.c = prob_c > 0;
  masks.expected = expected;
  masks.prob_h = prob_h;
  masks.prob_c = prob_c;
  masks.key_h = zoneout_key(static_cast<uint64_t>(seed), 0);
  masks.key_c = zoneout_key(static_cast<uint64_t>(seed), 1);
  masks.threshold_h = zoneout_threshold(prob_h);
  masks.threshold_c = zoneout_threshold(prob_c);
  return masks;
}

}  // namespace fastlstm
