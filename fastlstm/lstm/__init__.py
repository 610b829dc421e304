"""The LSTM recurrence: the modules (modules.py), the layer stack and its backend dispatch
(stack.py), the op contract and autograd formula shared by the compiled and Triton ops
(recurrence.py), the plain-torch backend (torch_backend.py), the ops of fastlstm._C (ops.py,
cpu_gemm.py) and the Triton kernels (triton/)."""
from .modules import LSTM, LSTMCell, convert

__all__ = ["LSTM", "LSTMCell", "convert"]
