"""fastlstm: fused LSTM kernels and tooling for recurrent language models in PyTorch."""
from ._backends import available_backends
from .lstm import LSTM, LSTMCell, convert
from .sampling import Sampler, sample
from .quant import quantize
from . import _dynamo_support

_dynamo_support.install()

__version__ = "0.1.0"

__all__ = ["LSTM", "LSTMCell", "convert", "available_backends", "sample", "Sampler", "quantize",
           "__version__"]
