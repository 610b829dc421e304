"""Character- and word-level tokenizers: built from text, encode/decode that round-trip, JSON files.

CharTokenizer maps every distinct character of the training text to an id (sorted, so the same
text always gives the same ids). WordTokenizer splits each line on white space, keeps the most
frequent words (a vocabulary limit and a minimum frequency), maps the rest to ``<unk>`` and marks
line ends with ``<eol>``; decode joins words with single spaces, so it round-trips text whose
words are separated by single spaces and whose words are all in the vocabulary.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence


def _write_json_atomic(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False)
    os.replace(temporary, path)


class _Tokenizer:
    kind = ""

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def to_dict(self) -> dict:
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Write the tokenizer to `path` as JSON (atomically)."""
        _write_json_atomic(path, self.to_dict())

    @staticmethod
    def from_dict(payload: dict) -> "_Tokenizer":
        kind = payload.get("kind")
        if kind == CharTokenizer.kind:
            return CharTokenizer(payload["itos"])
        if kind == WordTokenizer.kind:
            return WordTokenizer(payload["itos"])
        raise ValueError(f"tokenizer: unknown kind {kind!r}; expected 'char' or 'word'")

    @staticmethod
    def load(path: str) -> "_Tokenizer":
        """Read a tokenizer written by `save` (either kind)."""
        with open(path, encoding="utf-8") as handle:
            return _Tokenizer.from_dict(json.load(handle))

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids


class CharTokenizer(_Tokenizer):
    """One id per distinct character.

    CharTokenizer.from_text(text) builds the vocabulary; encode(str) -> list[int];
    decode(ids) -> str. A character absent from the vocabulary is an error when encoding.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer: the vocabulary is empty; build it from non-empty text")
        if any(not isinstance(ch, str) or len(ch) != 1 for ch in chars):
            raise ValueError("CharTokenizer: every vocabulary entry must be a single character")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the vocabulary has repeated characters")
        self.itos = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer.from_text: text must be a non-empty string")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as error:
            raise ValueError(f"CharTokenizer.encode: character {error.args[0]!r} is not in the "
                             f"vocabulary of {self.vocab_size} characters") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in self._check_ids(ids))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "itos": self.itos}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class WordTokenizer(_Tokenizer):
    """Words split on white space, a line end as its own token, rare words as ``<unk>``.

    WordTokenizer.from_text(text, max_vocab=None, min_freq=1) keeps at most `max_vocab` entries
    (the two special tokens included), words seen fewer than `min_freq` times become ``<unk>``.
    Ids 0 and 1 are ``<unk>`` and ``<eol>``; the words follow by falling frequency (ties broken
    alphabetically, so the same text always gives the same ids).
    """

    kind = "word"
    UNK = "<unk>"
    EOL = "<eol>"

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[:2] != [self.UNK, self.EOL]:
            raise ValueError(f"WordTokenizer: the vocabulary must start with {self.UNK!r} and "
                             f"{self.EOL!r}")
        if len(set(words)) != len(words):
            raise ValueError("WordTokenizer: the vocabulary has repeated words")
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.unk_id, self.eol_id = 0, 1

    @classmethod
    def from_text(cls, text: str, max_vocab: int | None = None, min_freq: int = 1) -> "WordTokenizer":
        if not isinstance(text, str):
            raise ValueError("WordTokenizer.from_text: text must be a string")
        if max_vocab is not None and (not isinstance(max_vocab, int) or max_vocab < 2):
            raise ValueError(f"WordTokenizer.from_text: max_vocab must be an int >= 2 (room for "
                             f"<unk> and <eol>) or None; got {max_vocab!r}")
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"WordTokenizer.from_text: min_freq must be an int >= 1; got {min_freq!r}")
        counts = collections.Counter(w for line in text.split("\n") for w in line.split())
        counts.pop(cls.UNK, None)
        counts.pop(cls.EOL, None)
        ranked = sorted((w for w, n in counts.items() if n >= min_freq),
                        key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            ranked = ranked[:max_vocab - 2]
        return cls([cls.UNK, cls.EOL] + ranked)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        lines = text.split("\n")
        for index, line in enumerate(lines):
            ids.extend(self.stoi.get(w, self.unk_id) for w in line.split())
            if index < len(lines) - 1:
                ids.append(self.eol_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[str] = []
        line: list[str] = []
        for i in self._check_ids(ids):
            if i == self.eol_id:
                pieces.append(" ".join(line))
                line = []
            else:
                line.append(self.itos[i])
        pieces.append(" ".join(line))
        return "\n".join(pieces)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "itos": self.itos}

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str):
    """CharTokenizer or WordTokenizer, whichever `path` holds."""
    return _Tokenizer.load(path)


def tokenizer_from_dict(payload: dict):
    return _Tokenizer.from_dict(payload)
