"""Text corpora and contiguous batches for truncated backpropagation through time."""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig

import torch

# The built-in corpus is bounded so that `fastlstm train` with no --text starts in seconds.
BUILTIN_CORPUS_CHARS = 2_000_000


def builtin_corpus(max_chars: int = BUILTIN_CORPUS_CHARS) -> tuple[str, str]:
    """(text, description): Python source files present wherever the package runs.

    The standard library's own modules, in sorted order; if an installation ships none (some
    strip the .py files), this package's own sources.
    """
    candidates = []
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib and os.path.isdir(stdlib):
        candidates.append((sorted(glob.glob(os.path.join(stdlib, "*.py"))),
                           f"Python standard library sources ({stdlib})"))
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates.append((sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True)),
                       f"fastlstm package sources ({package})"))
    for files, description in candidates:
        pieces, total = [], 0
        for path in files:
            try:
                with open(path, encoding="utf-8") as handle:
                    piece = handle.read()
            except (OSError, UnicodeDecodeError):
                continue
            pieces.append(piece)
            total += len(piece)
            if total >= max_chars:
                break
        if pieces:
            return "".join(pieces)[:max_chars], description
    raise RuntimeError("no built-in corpus found (no readable .py files in the standard library "
                       "or the package); pass --text FILE")


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--text: file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"--text: {path} is not UTF-8 text ({error})") from None
    if not text:
        raise ValueError(f"--text: {path} is empty")
    return text


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters for training, the rest for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction!r}")
    cut = int(round(len(text) * (1.0 - val_fraction)))
    return text[:cut], text[cut:]


def fingerprint(ids: torch.Tensor) -> str:
    """A short hash of a token stream, so a resumed run can check it reads the same data."""
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class ContiguousBatches:
    """Batches for truncated BPTT over one long token stream.

    The stream is cut into `num_streams` equal contiguous pieces, one per batch row; batch k holds
    columns k*seq_len .. (k+1)*seq_len of every piece as inputs and the next token of each as
    targets, so row b of batch k+1 continues row b of batch k and the LSTM state can be carried
    from one batch to the next. With data parallelism each process takes its own `rows` (a slice
    of the streams), so N processes with B rows each see exactly the batch of one process with
    N*B rows.
    """

    def __init__(self, ids: torch.Tensor, num_streams: int, seq_len: int, rows: slice | None = None):
        if ids.dim() != 1:
            raise ValueError(f"ids must be a 1-D token stream; got shape {tuple(ids.shape)}")
        if num_streams < 1 or seq_len < 1:
            raise ValueError(f"batch size and sequence length must be >= 1; got {num_streams}, "
                             f"{seq_len}")
        length = (ids.numel() - 1) // num_streams
        if length < seq_len:
            raise ValueError(
                f"the text is too short: {ids.numel()} tokens give {num_streams} streams of "
                f"{length} tokens, fewer than the sequence length {seq_len}; use a longer text, "
                f"a smaller batch size or a shorter sequence length")
        inputs = ids[:num_streams * length].view(num_streams, length)
        targets = ids[1:num_streams * length + 1].view(num_streams, length)
        if rows is not None:
            inputs, targets = inputs[rows], targets[rows]
        self.inputs = inputs.contiguous()
        self.targets = targets.contiguous()
        self.seq_len = seq_len
        self.num_batches = length // seq_len

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` modulo the epoch: (inputs, targets), each [rows, seq_len]."""
        k = index % self.num_batches
        columns = slice(k * self.seq_len, (k + 1) * self.seq_len)
        return self.inputs[:, columns], self.targets[:, columns]
