"""LSTMLanguageModel: embedding -> fastlstm.LSTM (batch_first) -> linear head to the vocabulary."""
from __future__ import annotations

import torch
from torch import nn

from ..lstm import LSTM


class LSTMLanguageModel(nn.Module):
    """A recurrent language model: given ids x_1..x_t, logits for x_{t+1} at every position.

    Args:
        vocab_size: number of token ids.
        embed_dim: size of the token embedding (the LSTM's input size).
        hidden_size: LSTM hidden size.
        num_layers: stacked LSTM layers.
        dropout: dropout on the embedding, between LSTM layers and before the head (training only).
        tie_weights: share the embedding matrix with the head's weight; needs
            embed_dim == hidden_size.
        backend: the fastlstm.LSTM backend ("auto" by default).
        weight_drop, locked_dropout, zoneout: fastlstm.LSTM's AWD-LSTM regularizers (off by
            default): DropConnect on the recurrent weights, variational dropout between LSTM
            layers, zoneout of h and c. With them, `dropout` still drops the embedding output
            and the LSTM output (AWD-LSTM's dropouti / dropout) and, between layers, adds to
            locked_dropout.

    forward(ids [B, T] int64, state=None) -> (logits [B, T, vocab_size], (h, c)) with
    h, c [num_layers, B, hidden_size]; pass the returned state back in to continue a sequence.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, tie_weights: bool = False, *, backend: str = "auto",
                 weight_drop: float = 0.0, locked_dropout: float = 0.0, zoneout=0.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim),
                            ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LSTMLanguageModel: {name} must be a positive int; got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LSTMLanguageModel: dropout must be in [0, 1); got {dropout!r}")
        if tie_weights and embed_dim != hidden_size:
            raise ValueError(
                f"LSTMLanguageModel: tie_weights=True shares the embedding [vocab_size, embed_dim] "
                f"with the head [vocab_size, hidden_size], so it needs embed_dim == hidden_size; "
                f"got embed_dim={embed_dim}, hidden_size={hidden_size}")
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.tie_weights = bool(tie_weights)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(self.dropout)
        self.lstm = LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                         dropout=self.dropout if num_layers > 1 else 0.0, backend=backend,
                         weight_drop=weight_drop, locked_dropout=locked_dropout, zoneout=zoneout)
        self.head = nn.Linear(hidden_size, vocab_size)
        if self.tie_weights:
            self.head.weight = self.embedding.weight

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild the model (saved in checkpoints); the
        regularizers only when on."""
        config = {"vocab_size": self.vocab_size, "embed_dim": self.embed_dim,
                  "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                  "dropout": self.dropout, "tie_weights": self.tie_weights}
        for name in ("weight_drop", "locked_dropout", "zoneout"):
            value = getattr(self.lstm, name, 0.0)
            if value not in (0.0, (0.0, 0.0)):
                config[name] = value
        return config

    def init_state(self, batch_size: int, device=None, dtype=None):
        """Zero (h, c), each [num_layers, batch_size, hidden_size]."""
        weight = self.head.weight
        shape = (self.num_layers, batch_size, self.hidden_size)
        h = torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype)
        return h, torch.zeros_like(h)

    def forward(self, ids: torch.Tensor, state=None):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"LSTMLanguageModel: ids must be a [batch, time] tensor; got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"LSTMLanguageModel: ids must be int64 (or int32); got {ids.dtype}")
        x = self.drop(self.embedding(ids))
        out, state = self.lstm(x, state)
        return self.head(self.drop(out)), state
