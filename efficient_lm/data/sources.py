"""Document sources: the embedded default corpus, text files, JSON lines.

A source only reads raw documents (bytes) and decides which belong to the
eval split; tokenising happens later (pipeline.py), so every tokenizer sees
the same bytes. Everything is read into memory: the corpora this framework
trains on in-process are megabytes, not terabytes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import sysconfig

import numpy as np

from efficient_lm.config import DataConfig
from efficient_lm.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Corpus:
  names: tuple[str, ...]  # one per document, for error messages
  docs: tuple[bytes, ...]
  # Per-document eval flag; None means "split the token stream instead"
  # (the text source, which follows nanoGPT: last fraction of the tokens).
  is_eval_N: np.ndarray | None


def load_corpus(data_cfg: DataConfig) -> Corpus:
  if data_cfg.source == "default":
    return _load_default(data_cfg.eval_fraction)
  if data_cfg.source == "text":
    return _load_text(_require_path(data_cfg))
  if data_cfg.source == "jsonl":
    return _load_jsonl(_require_path(data_cfg), data_cfg.eval_fraction)
  raise DataError(
    f"data.source={data_cfg.source!r}: expected 'default', 'text' or 'jsonl'"
  )


def _require_path(data_cfg: DataConfig) -> str:
  if not data_cfg.path:
    raise DataError(
      f"data.path is empty: data.source={data_cfg.source!r} needs a path"
    )
  return os.path.expanduser(data_cfg.path)


# ------------------------------------------------------------ default corpus


def default_corpus_files() -> list[pathlib.Path]:
  """The standard library's top-level *.py files, sorted by name.

  Top level only: no site-packages, no test suite, about 4.5 MB on 3.13.
  `_sysconfigdata_*` is generated at build time (it holds build paths), so
  it would make the corpus differ between two installs of one version.
  The corpus is fixed for a given Python version, not across versions.
  """
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(
    p
    for p in stdlib.glob("*.py")
    if p.is_file() and not p.name.startswith("_sysconfigdata")
  )


def spread_eval_mask(num_docs: int, eval_fraction: float) -> np.ndarray:
  """Marks floor(num_docs * eval_fraction) documents, evenly spread.

  Document i is eval when floor((i + 1) f) > floor(i f): every ~1/f-th
  document, so the eval files are not just the alphabetically last modules.
  """
  i = np.arange(num_docs, dtype=np.float64)
  return np.floor((i + 1) * eval_fraction) > np.floor(i * eval_fraction)


def _load_default(eval_fraction: float) -> Corpus:
  names, docs = [], []
  for path in default_corpus_files():
    data = path.read_bytes()
    if data:  # a few __init__-like files are empty; they teach nothing.
      names.append(str(path))
      docs.append(data)
  if not docs:
    raise DataError(
      "data.source='default': found no *.py files in the standard library "
      f"at {sysconfig.get_paths()['stdlib']}"
    )
  return Corpus(
    tuple(names), tuple(docs), spread_eval_mask(len(docs), eval_fraction)
  )


# ----------------------------------------------------------- files on disk


def resolve_files(path: str, suffix: str) -> list[str]:
  """A file, a directory (its sorted *{suffix} files) or a glob pattern."""
  if glob.has_magic(path):
    files = sorted(
      f for f in glob.glob(path, recursive=True) if os.path.isfile(f)
    )
    if not files:
      raise DataError(f"data.path={path!r}: the glob matched no files")
    return files
  if os.path.isdir(path):
    files = sorted(
      str(p) for p in pathlib.Path(path).glob(f"*{suffix}") if p.is_file()
    )
    if not files:
      raise DataError(f"data.path={path!r}: directory has no *{suffix} files")
    return files
  if not os.path.exists(path):
    raise DataError(f"data.path={path!r}: no such file or directory")
  return [path]


def _read_nonempty(path: str) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise DataError(f"data file {path!r} is empty (0 bytes)")
  return data


def _load_text(path: str) -> Corpus:
  # Bytes, not str: the byte tokenizer takes any file, and the char
  # tokenizer reports the exact offset of bad UTF-8 itself.
  files = resolve_files(path, ".txt")
  docs = tuple(_read_nonempty(f) for f in files)
  return Corpus(tuple(files), docs, None)


def _jsonl_text(line: bytes, where: str) -> str:
  try:
    obj = json.loads(line)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise DataError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(obj, dict) or "text" not in obj:
    got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
    raise DataError(
      f"{where}: expected an object with a string 'text' field, got {got}"
    )
  text = obj["text"]
  if not isinstance(text, str):
    raise DataError(
      f"{where}: 'text' must be a string, got {type(text).__name__}"
    )
  return text


def _load_jsonl(path: str, eval_fraction: float) -> Corpus:
  names, docs = [], []
  for file in resolve_files(path, ".jsonl"):
    for number, line in enumerate(_read_nonempty(file).split(b"\n"), 1):
      if not line.strip():
        continue
      text = _jsonl_text(line, f"{file}:{number}")
      # Empty texts carry no transition to learn; skipping them keeps a
      # scraped dump with blank records usable.
      if text:
        names.append(f"{file}:{number}")
        # "replace" only matters for lone surrogates ("\ud800"), which JSON
        # allows and UTF-8 cannot hold.
        docs.append(text.encode("utf-8", errors="replace"))
  if not docs:
    raise DataError(
      f"data.path={path!r}: no documents with non-empty "
      "'text' in the JSON lines"
    )
  # The last fraction of the documents, as the text source does with tokens.
  num_train = int(len(docs) * (1.0 - eval_fraction))
  is_eval_N = np.arange(len(docs)) >= num_train
  return Corpus(tuple(names), tuple(docs), is_eval_N)
