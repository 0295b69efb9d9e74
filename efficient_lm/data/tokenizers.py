"""Tokenizers: byte-level (default), char-level, SentencePiece model files,
Hugging Face tokenizer.json files (HFTokenizer, hf_tokenizer.py).

All four share one small interface:
  vocab_size, pad_id / bos_id / eos_id (None when the vocabulary has none),
  mask_id: the MLM mask token (train.objective='mlm'), for every tokenizer
  the first id past its vocabulary (byte 259, char len(chars),
  SentencePiece its piece count, Hugging Face its vocabulary size): no text encodes to it, the model's
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
import sys
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
from etils import epath

from efficient_lm import paths
from efficient_lm.config import DataConfig
from efficient_lm.data.errors import DataError, decode_utf8
from efficient_lm.data.hf_tokenizer import HFTokenizer
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
      np.unique(_codepoints(decode_utf8(doc, name, "'char'")))
      for name, doc in zip(corpus.names, corpus.docs, strict=True)
    ]
    unique = np.unique(np.concatenate(codepoints))
    return cls(unique.astype("<u4").tobytes().decode("utf-32-le"))

  def encode(self, text: str | bytes) -> list[int]:
    if isinstance(text, str):
      text = text.encode("utf-8")
    return self.encode_array(text, "<input>").tolist()

  def encode_array(self, data: bytes, name: str) -> np.ndarray:
    cps = _codepoints(decode_utf8(data, name, "'char'"))
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
    text = decode_utf8(data, name, "SentencePiece")
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


def make_tokenizer(
  data_cfg: DataConfig, run_copy: epath.PathLike | None = None
) -> Tokenizer:
  """The tokenizer `data_cfg.tokenizer` names.

  `run_copy`: a run's tokenizer.json (save_tokenizer). A model or
  tokenizer.json file that no longer exists is then read from the run's own
  copy, if that copy was saved from the same path: a run resumes after its
  tokenizer file moved or was deleted, as evaluate reads it.
  """
  name = data_cfg.tokenizer
  if name == "byte":
    return ByteTokenizer()
  if name == "char":
    return CharTokenizer.from_corpus(load_corpus(data_cfg))
  kinds = {".model": SentencePieceTokenizer, ".json": HFTokenizer}
  kind = kinds.get(os.path.splitext(name)[1])
  if kind is None:
    raise DataError(
      f"data.tokenizer={name!r}: expected 'byte', 'char', a path to a "
      "SentencePiece .model file or to a Hugging Face tokenizer.json (*.json)"
    )
  path = os.path.expanduser(name)
  if run_copy is not None and not epath.Path(path).exists():
    kept = _kept_copy(epath.Path(run_copy), path)
    if kept is not None:
      return kept
  return kind(path)


# ------------------------------------------------------------ tokenizer.json

SENTENCEPIECE_COPY = "tokenizer.model"
HF_COPY = "hf_tokenizer.json"


def _source(path: str) -> str:
  """What a run records as where its tokenizer file came from."""
  return path if paths.is_remote(path) else os.path.abspath(path)


def _kept_copy(run_copy: epath.Path, path: str) -> Tokenizer | None:
  """The tokenizer `run_copy` describes if it was saved from `path`."""
  if not run_copy.is_file():
    return None
  try:
    source = json.loads(run_copy.read_text(encoding="utf-8")).get("source")
  except (OSError, ValueError, AttributeError):
    return None  # load_run reports an unreadable description
  if source != _source(path):
    return None
  print(
    f"note: data.tokenizer={path!r} does not exist: using the run's copy "
    f"of it ({run_copy})",
    file=sys.stderr,
    flush=True,
  )
  return load_tokenizer(run_copy)


def _checked_copy(path: epath.Path, desc: dict[str, Any], key: str) -> str:
  """The file `desc[key]` beside the description `path`, its sha256 checked
  against the recorded one (a missing file is left to the tokenizer's
  constructor to report)."""
  copy = path.parent / str(desc.get(key))
  if not paths.is_remote(copy):
    copy = copy.resolve()
  if copy.is_file():
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    if digest != desc.get("sha256"):
      raise DataError(
        f"{copy}: sha256 {digest} differs from the "
        f"{desc.get('sha256')} recorded in {path}"
      )
  return os.fspath(copy)


def save_tokenizer(tok: Tokenizer, path: epath.PathLike) -> None:
  """Writes `path` (JSON) describing `tok` so load_tokenizer rebuilds it.

  {"kind": "byte"}; {"kind": "char", "chars": the exact sorted vocabulary};
  {"kind": "sentencepiece", "model_file": "tokenizer.model", "source": the
  path it was loaded from, "sha256": of the model}: the model itself is
  copied beside `path`, so the directory is self-contained even when the
  original file moves or changes; {"kind": "huggingface", "json_file":
  "hf_tokenizer.json", "source", "sha256", "bos_id", "eos_id", "pad_id"}:
  likewise, the tokenizer.json copied, its special ids (which came from the
  checkpoint's config files) recorded. Files are replaced atomically.
  """
  path = epath.Path(path)
  desc: dict[str, str | int | None]
  if isinstance(tok, ByteTokenizer):
    desc = {"kind": "byte"}
  elif isinstance(tok, CharTokenizer):
    desc = {"kind": "char", "chars": tok.chars}
  elif isinstance(tok, SentencePieceTokenizer):
    paths.write_atomic(path.parent / SENTENCEPIECE_COPY, tok.model_proto)
    desc = {
      "kind": "sentencepiece",
      "model_file": SENTENCEPIECE_COPY,
      "source": _source(tok.model_path),
      "sha256": hashlib.sha256(tok.model_proto).hexdigest(),
    }
  elif isinstance(tok, HFTokenizer):
    data = tok.hf_json.encode("utf-8")
    paths.write_atomic(path.parent / HF_COPY, data)
    desc = {
      "kind": "huggingface",
      "json_file": HF_COPY,
      "source": _source(tok.path),
      "sha256": hashlib.sha256(data).hexdigest(),
      "bos_id": tok.bos_id,
      "eos_id": tok.eos_id,
      "pad_id": tok.pad_id,
    }
  else:
    raise TypeError(f"cannot save a tokenizer of type {type(tok).__name__}")
  desc["vocab_size"] = tok.vocab_size
  paths.write_atomic(
    path,
    (json.dumps(desc, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
  )


def identity(tok: Tokenizer) -> dict[str, Any]:
  """What makes two tokenizers the same, wherever their files were read
  from: the kind and vocabulary size, and the char vocabulary, the
  SentencePiece model's or the Hugging Face tokenizer.json's sha256 (and
  its special ids). Distillation compares a teacher's with the student's."""
  out: dict[str, Any] = {
    "kind": type(tok).__name__,
    "vocab_size": tok.vocab_size,
  }
  if isinstance(tok, CharTokenizer):
    out["chars"] = tok.chars
  elif isinstance(tok, SentencePieceTokenizer):
    out["sha256"] = hashlib.sha256(tok.model_proto).hexdigest()
  elif isinstance(tok, HFTokenizer):
    out["sha256"] = hashlib.sha256(tok.hf_json.encode("utf-8")).hexdigest()
    out.update(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  return out


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
    tok = SentencePieceTokenizer(_checked_copy(path, desc, "model_file"))
  elif kind == "huggingface":
    ids = {k: desc.get(k) for k in ("bos_id", "eos_id", "pad_id")}
    if not all(i is None or type(i) is int for i in ids.values()):
      raise DataError(f"{path}: special ids {ids}: expected ints or null")
    tok = HFTokenizer(_checked_copy(path, desc, "json_file"), **ids)
  else:
    raise DataError(
      f"{path}: kind={kind!r}: expected 'byte', 'char', 'sentencepiece' or "
      "'huggingface'"
    )
  if tok.vocab_size != desc.get("vocab_size"):
    raise DataError(
      f"{path}: the {kind} tokenizer has {tok.vocab_size} ids, "
      f"the file records vocab_size={desc.get('vocab_size')}"
    )
  return tok
