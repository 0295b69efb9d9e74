"""Tokenizers: byte-level (default), char-level, SentencePiece model files.

All three share one small interface:
  vocab_size, pad_id / bos_id / eos_id (None when the vocabulary has none),
  encode(str | bytes) -> list[int], decode(ids) -> str, and
  encode_array(data: bytes, name) -> int32 array, the fast path the pipeline
  uses; `name` (a file, or file:line) goes into error messages.
encode never adds bos/eos; the pipeline wraps whole documents with them.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Protocol

import numpy as np

from efficient_lm.config import DataConfig
from efficient_lm.data.errors import DataError
from efficient_lm.data.sources import Corpus, load_corpus

_REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: Optional[int]
  bos_id: Optional[int]
  eos_id: Optional[int]

  def encode(self, text: str | bytes) -> list[int]: ...

  def encode_array(self, data: bytes, name: str) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...


def _as_bytes(text: str | bytes) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _decode_utf8(data: bytes, name: str, tokenizer: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
      f"{name}: not valid UTF-8 at byte offset {e.start}; the {tokenizer} "
      "tokenizer needs UTF-8 text (tokenizer='byte' reads any bytes)"
    ) from None


class ByteTokenizer:
  """UTF-8 bytes 0..255, then pad 256, bos 257, eos 258 (vocab 259)."""

  vocab_size = 259
  pad_id = 256
  bos_id = 257
  eos_id = 258

  def encode(self, text: str | bytes) -> list[int]:
    return self.encode_array(_as_bytes(text), "<input>").tolist()

  def encode_array(self, data: bytes, name: str) -> np.ndarray:
    del name  # every byte string is valid input
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    # Specials vanish; ids past the vocabulary (a model's padded vocab can
    # sample them) show as U+FFFD rather than crash a generation script.
    bad = _REPLACEMENT.encode("utf-8")
    data = b"".join(
      bytes((i,)) if 0 <= i < 256 else (b"" if i < self.vocab_size else bad)
      for i in map(int, ids))
    return data.decode("utf-8", errors="replace")


class CharTokenizer:
  """Id = rank of the character in the sorted vocabulary; no specials.

  Matches nanoGPT's shakespeare_char preparation, so losses compare.
  """

  pad_id = bos_id = eos_id = None

  def __init__(self, chars: str):
    if not chars:
      raise DataError("char tokenizer: the text has no characters")
    self.chars = "".join(sorted(set(chars)))
    self.vocab_size = len(self.chars)
    self._codepoints_V = _codepoints(self.chars)

  @classmethod
  def from_corpus(cls, corpus: Corpus) -> CharTokenizer:
    """Vocabulary of every document, train and eval alike.

    nanoGPT builds it from the whole file too; it also means the eval split
    never meets an unknown character, and the text source can split its
    token stream only after tokenising.
    """
    codepoints = [
      np.unique(_codepoints(_decode_utf8(doc, name, "'char'")))
      for name, doc in zip(corpus.names, corpus.docs)]
    unique = np.unique(np.concatenate(codepoints))
    return cls(unique.astype("<u4").tobytes().decode("utf-32-le"))

  def encode(self, text: str | bytes) -> list[int]:
    if isinstance(text, str):
      text = text.encode("utf-8")
    return self.encode_array(text, "<input>").tolist()

  def encode_array(self, data: bytes, name: str) -> np.ndarray:
    cps = _codepoints(_decode_utf8(data, name, "'char'"))
    ids = np.searchsorted(self._codepoints_V, cps)
    ids = np.minimum(ids, self.vocab_size - 1)
    unknown = np.flatnonzero(self._codepoints_V[ids] != cps)
    if unknown.size:
      at = int(unknown[0])
      raise DataError(
        f"{name}: character {chr(cps[at])!r} at character {at} is not in "
        f"the char vocabulary ({self.vocab_size} characters)")
    return ids.astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    n = self.vocab_size
    return "".join(self.chars[i] if 0 <= i < n else _REPLACEMENT
                   for i in map(int, ids))


def _codepoints(text: str) -> np.ndarray:
  # One C-level pass instead of a Python loop over ~1M characters.
  return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class SentencePieceTokenizer:
  """A trained SentencePiece model file; specials are whatever it defines."""

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      raise DataError(
        f"data.tokenizer={model_path!r}: no such SentencePiece model file")
    import sentencepiece  # pylint: disable=g-import-not-at-top  (optional)

    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    # SentencePiece says -1 for "not defined".
    as_id = lambda i: None if i < 0 else int(i)
    self.pad_id = as_id(self._sp.pad_id())
    self.bos_id = as_id(self._sp.bos_id())
    self.eos_id = as_id(self._sp.eos_id())
    self._unk_id = int(self._sp.unk_id())

  def encode(self, text: str | bytes) -> list[int]:
    return self.encode_array(_as_bytes(text), "<input>").tolist()

  def encode_array(self, data: bytes, name: str) -> np.ndarray:
    text = _decode_utf8(data, name, "SentencePiece")
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    n = self.vocab_size
    return self._sp.decode(
      [i if 0 <= i < n else self._unk_id for i in map(int, ids)])


def make_tokenizer(data_cfg: DataConfig) -> Tokenizer:
  name = data_cfg.tokenizer
  if name == "byte":
    return ByteTokenizer()
  if name == "char":
    return CharTokenizer.from_corpus(load_corpus(data_cfg))
  if name.endswith(".model"):
    return SentencePieceTokenizer(os.path.expanduser(name))
  raise DataError(
    f"data.tokenizer={name!r}: expected 'byte', 'char' or a path to a "
    "SentencePiece .model file")
