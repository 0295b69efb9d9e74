"""make_iterator: source -> tokenize -> split -> pieces -> pack -> shard.

Batches are dicts of int32 numpy arrays, each [B / process_count, seq_len]:
  inputs, targets  targets[t] is the token after inputs[t] (same document)
  segment_ids      1, 2, ... per piece within a row; 0 = padding
  positions        position within the piece, from 0
The loss mask is `segment_ids > 0`; attention must keep to one segment.

"train" repeats forever, reshuffling the pieces every epoch (a permutation
that depends on seed and epoch only); "eval" repeats in a fixed order, so
the first k batches of a fresh eval iterator are always the same.
`num_epochs=1` makes either split one finite pass instead: every (token,
next token) pair of the split is a target exactly once, the last batch
partly padding.
"""

from __future__ import annotations

from typing import Any, Literal

import grain
import numpy as np

from efficient_lm.config import DataConfig
from efficient_lm.data.errors import DataError
from efficient_lm.data.packing import PackedBatchIterDataset, PieceOrder, Pieces
from efficient_lm.data.sources import Corpus, load_corpus
from efficient_lm.data.tokenizers import Tokenizer, make_tokenizer

Split = Literal["train", "eval"]


class DataIterator:
  """Iterator of batches with a JSON-serialisable, exactly resumable state.

  The state carries a small spec of what produced it; restoring it into an
  iterator built differently (other seq_len, batch, seed or data) is a
  DataError instead of silently different batches. The process index and
  count are not in it: a run may resume on a different number of hosts.
  """

  def __init__(
    self,
    grain_iterator: grain.DatasetIterator,
    spec: dict[str, Any],
    *,
    num_tokens: int,
    num_pieces: int,
  ):
    self._it = grain_iterator
    self._spec = spec
    self.num_tokens = num_tokens  # tokens in this split, bos/eos included
    self.num_pieces = num_pieces  # pieces in one epoch of this split

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"spec": dict(self._spec), "grain": self._it.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    spec = state.get("spec", {})
    diff = sorted(
      k for k in self._spec | spec if spec.get(k) != self._spec.get(k)
    )
    if diff:
      raise DataError(
        "data iterator state does not match this iterator: "
        + ", ".join(
          f"{k}={spec.get(k)!r} (saved) vs {self._spec.get(k)!r}" for k in diff
        )
      )
    self._it.set_state(state["grain"])


def encode_documents(
  tokenizer: Tokenizer, corpus: Corpus
) -> tuple[np.ndarray, np.ndarray]:
  """All documents as one token array, each wrapped in bos/eos if defined.

  Returns (tokens_T, bounds) with document d at tokens_T[bounds[d]:
  bounds[d + 1]].
  """
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  parts = []
  for name, doc in zip(corpus.names, corpus.docs, strict=True):
    ids = tokenizer.encode_array(doc, name)
    parts.append(
      np.concatenate(
        [np.asarray(bos, np.int32), ids, np.asarray(eos, np.int32)]
      )
    )
  bounds = np.zeros(len(parts) + 1, np.int64)
  np.cumsum([len(p) for p in parts], out=bounds[1:])
  return np.concatenate(parts).astype(np.int32), bounds


def split_spans(
  corpus: Corpus, bounds: np.ndarray, split: Split, eval_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
  """[start, end) token spans of the documents (or parts) in `split`."""
  start_N, end_N = bounds[:-1], bounds[1:]
  if corpus.is_eval_N is not None:
    keep = corpus.is_eval_N if split == "eval" else ~corpus.is_eval_N
    return start_N[keep], end_N[keep]
  # The token stream's last fraction is eval; int() as nanoGPT does, which
  # gives tinyshakespeare's 1,003,854 / 111,540 split. A document that
  # straddles the cut is split with it.
  total = int(bounds[-1])
  cut = int(total * (1.0 - eval_fraction))
  lo, hi = (0, cut) if split == "train" else (cut, total)
  start_N, end_N = np.clip(start_N, lo, hi), np.clip(end_N, lo, hi)
  keep = end_N > start_N
  return start_N[keep], end_N[keep]


def _check_batch(
  global_batch_size: int, process_index: int, process_count: int
) -> None:
  if global_batch_size <= 0:
    raise DataError(
      f"global_batch_size={global_batch_size}: expected a positive int"
    )
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(
      f"process_index={process_index}, process_count={process_count}: "
      "expected 0 <= process_index < process_count"
    )
  if global_batch_size % process_count:
    raise DataError(
      f"global_batch_size={global_batch_size} is not divisible by "
      f"process_count={process_count}"
    )


def make_iterator(
  data_cfg: DataConfig,
  split: Split = "train",
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: Tokenizer | None = None,
  num_epochs: int | None = None,
) -> DataIterator:
  """This process's share of every global batch; see the module docstring.

  Reads and tokenises the whole source now, so bad input fails here, before
  anything compiles.
  """
  if split not in ("train", "eval"):
    raise DataError(f"split={split!r}: expected 'train' or 'eval'")
  if num_epochs is not None and num_epochs < 1:
    raise DataError(
      f"num_epochs={num_epochs}: expected >= 1 or None (repeat forever)"
    )
  _check_batch(global_batch_size, process_index, process_count)
  seed = int(seed)  # a NumPy / JAX scalar would not survive json.dumps
  seq_len = data_cfg.seq_len
  if seq_len <= 0:
    raise DataError(f"data.seq_len={seq_len}: expected a positive int")
  if tokenizer is None:
    tokenizer = make_tokenizer(data_cfg)
  corpus = load_corpus(data_cfg)
  tokens_T, bounds = encode_documents(tokenizer, corpus)
  start_N, end_N = split_spans(corpus, bounds, split, data_cfg.eval_fraction)
  num_tokens = int((end_N - start_N).sum())
  pieces = Pieces.from_spans(tokens_T, start_N, end_N, seq_len)
  if num_tokens < seq_len + 1 or not len(pieces):
    hint = (
      f" (data.eval_fraction={data_cfg.eval_fraction})"
      if split == "eval"
      else ""
    )
    raise DataError(
      f"data split {split!r} has {num_tokens} tokens{hint}: too few to "
      f"fill one row of seq_len+1={seq_len + 1} tokens "
      f"(data.seq_len={seq_len})"
    )

  rows = global_batch_size // process_count
  order = PieceOrder(
    len(pieces), seed=seed, shuffle=split == "train" and data_cfg.shuffle
  )
  packed = PackedBatchIterDataset(
    pieces,
    order,
    seq_len=seq_len,
    num_rows=global_batch_size,
    row_start=process_index * rows,
    row_stop=(process_index + 1) * rows,
    num_epochs=num_epochs,
  )
  spec = {
    "split": split,
    "source": data_cfg.source,
    "tokenizer": data_cfg.tokenizer,
    "seq_len": seq_len,
    "global_batch_size": global_batch_size,
    "seed": seed,
    "shuffle": bool(data_cfg.shuffle),
    "num_pieces": len(pieces),
    "num_epochs": num_epochs,
  }
  return DataIterator(
    iter(packed), spec, num_tokens=num_tokens, num_pieces=len(pieces)
  )
