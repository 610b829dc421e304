// The sampling op's schema, declared once; kernels register per device in sample_cpu.cpp (CPU)
// and sample_cuda.cu (CUDA), and fastlstm/sampling/sampler.py registers the fake kernel for tracing.
//
// sample(logits [..., V], temperature [...] or None, scalar_temperature, top_k, top_p, generator,
//   min_p=0.0) -> int64 [...]. A None temperature means scalar_temperature for every row (no
//   tensor to build on the Python side, which keeps a small call cheap). The generator is the
//   logits' device's default when None; the kernel draws its seed/offset from it and advances it.
//   min_p (last, with a default, so that callers written before it still match) keeps the tokens
//   with p >= min_p * max p, after top-k and top-p.
#include "sampling/sample_kernels.h"

#include <torch/library.h>

#include <cmath>
#include <limits>

TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def(
      "sample(Tensor logits, Tensor? temperature, float scalar_temperature, int top_k, "
      "float top_p, Generator? generator, float min_p=0.0) -> Tensor");
}

namespace fastlstm {
namespace sampling {

const char* row_error_message(int32_t code) {
  switch (code) {
    case kRowNaN: return "contains NaN";
    case kRowAllNegInf: return "is all -inf (no token can be drawn)";
    case kRowPosInf: return "contains +inf";
    case kRowBadTemperature: return "has a temperature that is negative, NaN or infinite";
    default: return "is invalid";
  }
}

void check_arguments(const at::Tensor& logits, const at::Tensor& temperature, int64_t top_k,
                     double top_p, double min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "fastlstm.sample: logits: expected (rows, vocab); got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                        logits.scalar_type() == at::kBFloat16,
                    "fastlstm.sample: logits must be float32, float16 or bfloat16; got ",
                    logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "fastlstm.sample: logits: the vocabulary is empty");
  TORCH_CHECK_VALUE(logits.is_contiguous(), "fastlstm.sample: logits must be contiguous");
  TORCH_CHECK_VALUE(logits.size(1) <= std::numeric_limits<int32_t>::max(),
                    "fastlstm.sample: logits: vocab must fit in int32; got ", logits.size(1));
  TORCH_CHECK_VALUE(temperature.scalar_type() == at::kFloat && temperature.dim() == 1 &&
                        temperature.size(0) == logits.size(0) && temperature.is_contiguous(),
                    "fastlstm.sample: temperature: expected contiguous float32 (rows,) = (",
                    logits.size(0), ",); got ", temperature.scalar_type(), " ",
                    temperature.sizes());
  TORCH_CHECK_VALUE(temperature.device() == logits.device(),
                    "fastlstm.sample: temperature must be on the logits' device ",
                    logits.device(), "; got ", temperature.device());
  TORCH_CHECK_VALUE(top_k >= 0, "fastlstm.sample: top_k must be >= 0 (0 = off); got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0,
                    "fastlstm.sample: top_p must be in (0, 1] (1 = off); got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0.0 && min_p <= 1.0,
                    "fastlstm.sample: min_p must be in [0, 1] (0 = off); got ", min_p);
}

Rows prepare_rows(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                  double scalar_temperature) {
  TORCH_CHECK_VALUE(logits.dim() >= 1, "fastlstm.sample: logits: expected (..., vocab); got ",
                    logits.sizes());
  const int64_t vocab = logits.size(-1);
  Rows rows;
  rows.logits = logits.reshape({-1, vocab}).contiguous();
  if (temperature.has_value()) {
    TORCH_CHECK_VALUE(temperature->sizes() == logits.sizes().slice(0, logits.dim() - 1),
                      "fastlstm.sample: temperature: expected a float or a tensor of shape ",
                      logits.sizes().slice(0, logits.dim() - 1), " (one per row); got ",
                      temperature->sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(temperature->scalar_type()),
                      "fastlstm.sample: temperature must be floating point; got ",
                      temperature->scalar_type());
    rows.temperature = temperature->reshape({-1}).to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK_VALUE(scalar_temperature >= 0.0 && std::isfinite(scalar_temperature),
                      "fastlstm.sample: temperature must be finite and >= 0; got ",
                      scalar_temperature);
    rows.temperature = at::full({rows.logits.size(0)}, scalar_temperature,
                                logits.options().dtype(at::kFloat));
  }
  return rows;
}

}  // namespace sampling
}  // namespace fastlstm
