// Schemas of the LSTM recurrence ops, declared once. Kernels register per device in
// lstm_cpu.cpp (CPU) and lstm_cuda.cu (CUDA). The contract (row layout, packed batch sizes,
// what is saved for backward, the regularizers' arguments) is written out in
// fastlstm/lstm/recurrence.py.
#include <torch/library.h>

TORCH_LIBRARY(fastlstm, m) {
  m.def(
      "recurrence_forward(Tensor xg, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_hh, "
      "Tensor? w_hr, bool reverse, bool save, Tensor? bias=None, Tensor? w_ih=None, "
      "float zoneout_h=0., float zoneout_c=0., Tensor? zoneout_seed=None, "
      "bool zoneout_expected=False, "
      "Tensor? w_hh_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "recurrence_backward(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor batch_sizes, "
      "Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor gates, Tensor cells, bool reverse, "
      "float zoneout_h=0., float zoneout_c=0., Tensor? zoneout_seed=None, "
      "bool zoneout_expected=False, "
      "Tensor? w_hh_mask=None) -> (Tensor, Tensor, Tensor, Tensor)");
}
