"""Tokenizers: byte-level (default), char-level, SentencePiece model files.

All three share one small interface:
  vocab_size, pad_id / bos_id / eos_id (None when the vocabulary has none),
  mask_id: the MLM mask token (train.objective='mlm'), for every tokenizer
  the first id past its vocabulary (byte 259, char len(chars),
  SentencePiece its piece count): no text encodes to it, the model's
  vocabulary must cover it (model.vocab_size > mask_id), it is never a
  target, and decode shows it as U+FFFD (SentencePiece: its unknown
  piece), like any id past the vocabulary;
  encode(str | bytes) -> list[int], decode(ids) -> str, and
  encode_array(data: bytes, name) -> int32 array, the fast path the pipeline
  uses; `name` (a file, or file:line) goes into error messages;
  bytes_per_id() -> int64 [vocab_size], the UTF-8 bytes each id stands for
  (what bits per byte divides by).
encode never adds bos/eos; the pipeline wraps whole documents with them.

save_tokenizer / load_tokenizer write and read a run's `tokenizer.json`
(training writes it into the workdir), so a trained model is read back with
the exact vocabulary it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np
from etils import epath

from efficient_lm import paths
from efficient_lm.config import DataConfig
from efficient_lm.data.errors import DataError
from efficient_lm.data.sources import Corpus, load_corpus

_REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
  # Read-only (properties), so that a class attribute `pad_id = 256` or
  # `pad_id = None` satisfies `int | None`: a writable protocol attribute
  # would have to be declared `int | None` by every implementation.
  @property
  def vocab_size(self) -> int: ...

  @property
  def mask_id(self) -> int: ...

  @property
  def pad_id(self) -> int | None: ...

  @property
  def bos_id(self) -> int | None: ...

  @property
  def eos_id(self) -> int | None: ...

  def encode(self, text: str | bytes) -> list[int]: ...

  def encode_array(self, data: bytes, name: str) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def bytes_per_id(self) -> np.ndarray: ...


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
  """UTF-8 bytes 0..255, then pad 256, bos 257, eos 258 (vocab 259); the
  MLM mask id 259 is past the vocabulary (module docstring), so saved
  tokenizers and decoders trained before it keep their 259 ids."""

  vocab_size = 259
  pad_id = 256
  bos_id = 257
  eos_id = 258
  mask_id = 259

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
      for i in map(int, ids)
    )
    return data.decode("utf-8", errors="replace")

  def bytes_per_id(self) -> np.ndarray:
    """One byte for each of 0..255; specials stand for no text."""
    return (np.arange(self.vocab_size) < 256).astype(np.int64)


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
    self.mask_id = self.vocab_size
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
      for name, doc in zip(corpus.names, corpus.docs, strict=True)
    ]
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
        f"the char vocabulary ({self.vocab_size} characters)"
      )
    return ids.astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    n = self.vocab_size
    return "".join(
      self.chars[i] if 0 <= i < n else _REPLACEMENT for i in map(int, ids)
    )

  def bytes_per_id(self) -> np.ndarray:
    """The UTF-8 length of each character (1 to 4)."""
    return np.array([len(c.encode("utf-8")) for c in self.chars], np.int64)


def _codepoints(text: str) -> np.ndarray:
  # One C-level pass instead of a Python loop over ~1M characters.
  return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class SentencePieceTokenizer:
  """A trained SentencePiece model file; specials are whatever it defines."""

  def __init__(self, model_path: str):
    # epath: the copy in a gs:// workdir is read from there.
    if not epath.Path(model_path).is_file():
      raise DataError(
        f"data.tokenizer={model_path!r}: no such SentencePiece model file"
      )
    import sentencepiece  # pylint: disable=g-import-not-at-top  (optional)

    self.model_path = model_path
    # The bytes are kept so save_tokenizer copies the model that is in use,
    # even if the file changes afterwards.
    self.model_proto = epath.Path(model_path).read_bytes()
    try:
      self._sp = sentencepiece.SentencePieceProcessor(
        model_proto=self.model_proto
      )
    except RuntimeError as e:
      raise DataError(
        f"{model_path}: not a SentencePiece model "
        f"({str(e).strip().splitlines()[0]})"
      ) from None
    self.vocab_size = int(self._sp.get_piece_size())
    self.mask_id = self.vocab_size
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
      [i if 0 <= i < n else self._unk_id for i in map(int, ids)]
    )

  def bytes_per_id(self) -> np.ndarray:
    """The UTF-8 length of each piece, its word-boundary mark (U+2581)
    counted as the one space it decodes to; a byte-fallback piece is one
    byte; control (bos/eos/pad), unknown and unused pieces count zero (an
    unknown piece's text is not known)."""
    sp = self._sp

    def length(i: int) -> int:
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return 0
      if sp.is_byte(i):
        return 1
      return len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    return np.array([length(i) for i in range(self.vocab_size)], np.int64)


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
    "SentencePiece .model file"
  )


# ------------------------------------------------------------ tokenizer.json

SENTENCEPIECE_COPY = "tokenizer.model"


def save_tokenizer(tok: Tokenizer, path: epath.PathLike) -> None:
  """Writes `path` (JSON) describing `tok` so load_tokenizer rebuilds it.

  {"kind": "byte"}; {"kind": "char", "chars": the exact sorted vocabulary};
  {"kind": "sentencepiece", "model_file": "tokenizer.model", "source": the
  path it was loaded from, "sha256": of the model}: the model itself is
  copied beside `path`, so the directory is self-contained even when the
  original file moves or changes. Files are replaced atomically.
  """
  path = epath.Path(path)
  desc: dict[str, str | int]
  if isinstance(tok, ByteTokenizer):
    desc = {"kind": "byte"}
  elif isinstance(tok, CharTokenizer):
    desc = {"kind": "char", "chars": tok.chars}
  elif isinstance(tok, SentencePieceTokenizer):
    paths.write_atomic(path.parent / SENTENCEPIECE_COPY, tok.model_proto)
    source = tok.model_path
    if not paths.is_remote(source):
      source = os.path.abspath(source)
    desc = {
      "kind": "sentencepiece",
      "model_file": SENTENCEPIECE_COPY,
      "source": source,
      "sha256": hashlib.sha256(tok.model_proto).hexdigest(),
    }
  else:
    raise TypeError(f"cannot save a tokenizer of type {type(tok).__name__}")
  desc["vocab_size"] = tok.vocab_size
  paths.write_atomic(
    path,
    (json.dumps(desc, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
  )


def load_tokenizer(path: epath.PathLike) -> Tokenizer:
  """The tokenizer that save_tokenizer described in `path`; DataError (one
  line) if the file is unreadable or does not describe what it held."""
  path = epath.Path(path)
  try:
    desc = json.loads(path.read_text(encoding="utf-8"))
    kind = desc["kind"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(
      f"{path}: not a readable tokenizer description ({type(e).__name__}: {e})"
    ) from None
  if kind == "byte":
    tok = ByteTokenizer()
  elif kind == "char":
    tok = CharTokenizer(desc.get("chars", ""))
  elif kind == "sentencepiece":
    model = path.parent / str(desc.get("model_file"))
    if not paths.is_remote(model):
      model = model.resolve()
    if model.is_file():  # else the constructor says it is missing
      digest = hashlib.sha256(model.read_bytes()).hexdigest()
      if digest != desc.get("sha256"):
        raise DataError(
          f"{model}: sha256 {digest} differs from the "
          f"{desc.get('sha256')} recorded in {path}"
        )
    tok = SentencePieceTokenizer(os.fspath(model))
  else:
    raise DataError(
      f"{path}: kind={kind!r}: expected 'byte', 'char' or 'sentencepiece'"
    )
  if tok.vocab_size != desc.get("vocab_size"):
    raise DataError(
      f"{path}: the {kind} tokenizer has {tok.vocab_size} ids, "
      f"the file records vocab_size={desc.get('vocab_size')}"
    )
  return tok
