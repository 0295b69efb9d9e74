"""Hugging Face `tokenizer.json` files (the `tokenizers` library): the fourth
tokenizer kind, what pretrained checkpoints come with.

Two kinds of BPE are taken, the two that real checkpoints use:
  byte-level (GPT-2, Qwen, Llama 3: a ByteLevel decoder): every piece is
    spelt in GPT-2's byte alphabet (256 printable characters, one a byte);
  SentencePiece-style (Llama 2, Mistral, Gemma: a Metaspace decoder, or a
    Replace of '▁' by ' '): pieces are text with '▁' for a space, and with
    byte_fallback a piece '<0xNN>' is the single byte NN.
Any other model (WordPiece, Unigram, WordLevel) or BPE decoder is refused
with one line: bits per byte needs the exact bytes of every id, and those
are only known for the two kinds above.

bytes_per_id, the UTF-8 bytes each id stands for (bits per byte divides by
their sum over the targets):
  byte-level: the number of bytes the piece spells;
  SentencePiece-style: '<0xNN>' (byte_fallback) 1; otherwise the UTF-8
    length of the piece with each '▁' counted as the one space it decodes to;
  special added tokens (bos, eos, pad, chat markers) and the model's unknown
    piece: 0 (no text, or text that is not known); a non-special added token
    the UTF-8 length of its content (the text it matches and decodes to).
So sum(bytes_per_id[encode(text)]) == len(text.encode()) for either kind,
with one exception, counted on purpose: a tokenizer that prepends a space to
the text (Metaspace prepend_scheme 'first' / 'always' where the text does
not start with a space already, a Prepend('▁') normalizer always, ByteLevel
add_prefix_space: Llama 2 and Mistral do, Gemma, Qwen and Llama 3 do not)
makes its first piece stand for that space too, so the ids stand for
len(text.encode()) + 1 bytes: the space is in the ids the model predicts,
as SentencePieceTokenizer counts its dummy prefix. The pipeline encodes one
document at a time, so that is one byte more per document. Bytes are those
of the text as the tokenizer sees it: after its normalizer (Qwen's NFC
leaves NFC text, nearly all text, unchanged), and a '▁' (U+2581) in the
text is a space to a SentencePiece-style tokenizer (it decodes as one), so
1 byte, not 3. A character that byte-level BPE has no piece for, or that
SentencePiece-style BPE without byte_fallback maps to its unknown piece,
counts 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from types import EllipsisType
from typing import Any

import numpy as np
import tokenizers
from etils import epath

from efficient_lm.data.errors import DataError, decode_utf8

_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# The special ids a checkpoint's config files name.
_SPECIALS = ("bos", "eos", "pad")


def _byte_alphabet() -> dict[str, int]:
  """GPT-2's byte-level alphabet, character -> the byte it stands for:
  printable Latin-1 bytes stand for themselves, the other 68 bytes are
  spelt U+0100 onwards in byte order (openai/gpt-2 encoder.py)."""
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  chars = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in chars]
  chars.update({b: chr(256 + n) for n, b in enumerate(others)})
  return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_alphabet()


def _nodes(node: Any) -> list[dict[str, Any]]:
  """A decoder / pre-tokenizer / normalizer and, for a Sequence, its
  members (recursively), as JSON objects."""
  if not isinstance(node, dict):
    return []
  members = [
    m
    for key in ("decoders", "pretokenizers", "normalizers")
    for m in node.get(key) or ()
  ]
  return [node, *(n for m in members for n in _nodes(m))]


def _space_mark(spec: dict[str, Any]) -> str | None:
  """'byte' for a byte-level decoder; the character that stands for a
  space ('▁') for a SentencePiece-style one; None for any other."""
  for node in _nodes(spec.get("decoder")):
    kind = node.get("type")
    if kind == "ByteLevel":
      return "byte"
    if kind == "Metaspace":
      return str(node.get("replacement", "\u2581"))
    if kind == "Replace" and node.get("content") == " ":
      pattern = node.get("pattern") or {}
      if isinstance(pattern.get("String"), str):
        return pattern["String"]
  return None


def _read_json(path: epath.Path) -> dict[str, Any]:
  """The JSON object in `path`; {} if there is no such file."""
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_bytes().decode("utf-8"))
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: expected a JSON object")
  return value


def _checkpoint_ids(
  directory: epath.Path, vocab: dict[str, int]
) -> dict[str, int | None]:
  """bos / eos / pad ids of the checkpoint in `directory`: each from
  config.json's `<name>_token_id` (a list: its first), else from
  tokenizer_config.json's `<name>_token` (a string, or an object with a
  `content`) looked up in `vocab`, else None."""
  config = _read_json(directory / "config.json")
  tok_config = _read_json(directory / "tokenizer_config.json")
  ids: dict[str, int | None] = {}
  for name in _SPECIALS:
    value = config.get(f"{name}_token_id")
    if isinstance(value, list):
      value = value[0] if value else None
    if value is not None:
      if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(
          f"{directory / 'config.json'}: {name}_token_id={value!r}: "
          "expected an int, a list of ints or null"
        )
      ids[name] = value
      continue
    token = tok_config.get(f"{name}_token")
    if isinstance(token, dict):
      token = token.get("content")
    if token is not None and token not in vocab:
      raise DataError(
        f"{directory / 'tokenizer_config.json'}: {name}_token={token!r} "
        "is not in the tokenizer's vocabulary"
      )
    ids[name] = None if token is None else vocab[token]
  return ids


def _parse(path: str, text: str) -> tuple[dict[str, Any], tokenizers.Tokenizer]:
  """The JSON of a tokenizer.json and the library's tokenizer of it;
  DataError (one line) if it is not one."""
  try:
    spec = json.loads(text)
  except ValueError as e:
    raise DataError(f"{path}: not JSON ({e})") from None
  if isinstance(spec, dict) and "kind" in spec and "model" not in spec:
    raise DataError(
      f"{path}: an efficient_lm run's tokenizer description, not a "
      "Hugging Face tokenizer.json (load it with load_tokenizer)"
    )
  try:
    tok = tokenizers.Tokenizer.from_str(text)
  except Exception as e:  # the library raises plain Exception
    why = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise DataError(
      f"{path}: not a Hugging Face tokenizer.json ({why})"
    ) from None
  return spec, tok


class HFTokenizer:
  """A Hugging Face tokenizer.json (module docstring: the kinds taken and
  what each id's bytes are).

  bos / eos / pad: an explicit id (or None: the tokenizer has none) wins;
  left out (...), it comes from the checkpoint files beside `path`
  (_checkpoint_ids). encode never adds them (add_special_tokens=False):
  the pipeline wraps whole documents. mask_id is the first id past the
  vocabulary, as for the other kinds. `hf_json` is the file's text, kept
  so a run's copy is the tokenizer in use even if the file changes.
  """

  def __init__(
    self,
    path: str,
    *,
    bos_id: int | None | EllipsisType = ...,
    eos_id: int | None | EllipsisType = ...,
    pad_id: int | None | EllipsisType = ...,
  ):
    # epath: a gs:// file (or a run's copy there) is read from there.
    file = epath.Path(path)
    if not file.is_file():
      raise DataError(
        f"data.tokenizer={path!r}: no such Hugging Face tokenizer.json file"
      )
    self.path = path
    self.hf_json = decode_utf8(file.read_bytes(), path, "Hugging Face")
    spec, self._tok = _parse(path, self.hf_json)
    model = spec["model"]
    self._space = self._check_kind(path, model, _space_mark(spec))
    self._unk = model.get("unk_token")
    self._byte_fallback = bool(model.get("byte_fallback"))
    self._bytes_V: np.ndarray | None = None
    vocab = self._tok.get_vocab(with_added_tokens=True)
    # An added token may sit past a gap in the ids: cover it.
    self.vocab_size = max(
      self._tok.get_vocab_size(with_added_tokens=True),
      max(vocab.values(), default=-1) + 1,
    )
    self.mask_id = self.vocab_size
    given = {"bos": bos_id, "eos": eos_id, "pad": pad_id}
    found: dict[str, int | None] = {}
    if any(isinstance(v, EllipsisType) for v in given.values()):
      found = _checkpoint_ids(file.parent, vocab)
    ids = {
      k: found[k] if isinstance(v, EllipsisType) else v
      for k, v in given.items()
    }
    for name, i in ids.items():
      if i is not None and not 0 <= i < self.vocab_size:
        raise DataError(
          f"{path}: {name}_id={i} is not an id of its "
          f"{self.vocab_size}-id vocabulary"
        )
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

  @staticmethod
  def _check_kind(path: str, model: dict[str, Any], space: str | None) -> str:
    kind = model.get("type", "BPE")
    affix = model.get("continuing_subword_prefix") or model.get(
      "end_of_word_suffix"
    )
    if kind != "BPE":
      what = f"model type {kind!r}"
    elif affix:
      what = f"a BPE tokenizer with the word affix {affix!r}"
    elif space is None:
      what = "a BPE tokenizer whose decoder is neither ByteLevel nor Metaspace"
    else:
      return space
    raise DataError(
      f"{path}: {what}: expected byte-level BPE (GPT-2, Qwen, Llama 3) or "
      "SentencePiece-style BPE (Llama 2, Mistral, Gemma), the kinds whose "
      "bytes per id are exact"
    )

  def encode(self, text: str | bytes) -> list[int]:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return self.encode_array(data, "<input>").tolist()

  def encode_array(self, data: bytes, name: str) -> np.ndarray:
    text = decode_utf8(data, name, "Hugging Face")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """The library's decode (special tokens skipped); an id past the
    vocabulary shows as U+FFFD, the runs of ids around it decoded apart."""
    runs: list[list[int]] = [[]]
    for i in map(int, ids):
      if 0 <= i < self.vocab_size:
        runs[-1].append(i)
      else:
        runs.append([])
    return _REPLACEMENT.join(self._tok.decode(r) for r in runs)

  def bytes_per_id(self) -> np.ndarray:
    """int64 [vocab_size]: the rule of the module docstring."""
    if self._bytes_V is None:
      out = np.zeros(self.vocab_size, np.int64)
      for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
        out[i] = self._piece_bytes(piece)
      for i, token in self._tok.get_added_tokens_decoder().items():
        out[i] = 0 if token.special else len(token.content.encode("utf-8"))
      self._bytes_V = out
    return self._bytes_V.copy()

  def _piece_bytes(self, piece: str) -> int:
    if piece == self._unk:
      return 0
    if self._space == "byte":
      # A piece outside the alphabet cannot come out of byte-level text.
      if all(c in _BYTE_LEVEL for c in piece):
        return len(piece)
      return 0
    if self._byte_fallback and _BYTE_PIECE.fullmatch(piece):
      return 1
    return len(piece.replace(self._space, " ").encode("utf-8"))
