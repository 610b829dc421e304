"""Recurrent language models on fastlstm: tokenizers, the model, training and generation.

    from fastlstm.lm import CharTokenizer, WordTokenizer, LSTMLanguageModel, generate

`fastlstm train` and `fastlstm generate` (see fastlstm.cli) run the same code from the command line.
"""
from .generate import generate
from .model import LSTMLanguageModel
from .tokenizers import CharTokenizer, WordTokenizer, load_tokenizer

__all__ = ["CharTokenizer", "WordTokenizer", "LSTMLanguageModel", "generate", "load_tokenizer"]
