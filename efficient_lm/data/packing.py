"""Pieces of documents, packed first-fit into fixed-length rows.

A document of n tokens gives ceil((n - 1) / T) pieces (T = seq_len): piece k
covers tokens [kT, kT + T] (at most T + 1 of them; consecutive pieces share
one token), and yields inputs = piece[:-1], targets = piece[1:]. So every
(token, next token) pair of a document is trained on exactly once per epoch,
and every non-padding position has a real target: the loss mask is just
`segment_ids > 0`.

Letters: B rows this process keeps, T row length (tokens_T: the whole
corpus), and, data only, N document spans, P pieces, R rows of the global
batch.

Rows hold several pieces: `segment_ids` counts them 1, 2, ... within the row
(0 = padding, whose inputs and targets are 0) and `positions` restart at 0 for
every piece, continuation pieces included. A piece cannot attend to the piece
before it anyway, and restarting keeps positions below T, the range the model
sees in every batch.

Why not grain.experimental.FirstFitPackIterDataset over a shuffled grain
MapDataset of pieces: its generic per-element work (~60 us a piece, of which
~10 us is MapDataset.shuffle's index lookup) measured ~1,400 batches/s at
12 x 64 here, short of what the shakespeare benchmark needs. Piece lengths are
known up front, so this packer is a grain IterDataset source that draws a
whole epoch's order at once with numpy, decides on lengths and copies numpy
slices: over 10x faster. It is still a grain IterDataset (.map,
.mp_prefetch with one worker to move it off the main process) and its
iterator has get_state / set_state; several workers would each replay the
whole stream, as the source cannot be sliced between them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class Pieces:
  tokens_T: np.ndarray  # int32, the whole tokenised corpus
  start_P: np.ndarray  # index in tokens_T of each piece's first input
  length_P: np.ndarray  # (input, target) pairs in each piece, 1..seq_len

  @classmethod
  def from_spans(
    cls,
    tokens_T: np.ndarray,
    start_N: np.ndarray,
    end_N: np.ndarray,
    seq_len: int,
  ) -> Pieces:
    """Splits each document span [start, end) of tokens_T into pieces."""
    pairs_N = end_N - start_N - 1  # (token, next token) pairs per span
    keep = pairs_N > 0  # a one-token span has nothing to predict
    start_N, end_N, pairs_N = start_N[keep], end_N[keep], pairs_N[keep]
    count_N = -(-pairs_N // seq_len)  # ceil
    span_P = np.repeat(np.arange(len(count_N)), count_N)
    first_P = np.repeat(np.cumsum(count_N) - count_N, count_N)
    start_P = start_N[span_P] + (np.arange(len(span_P)) - first_P) * seq_len
    length_P = np.minimum(seq_len, end_N[span_P] - 1 - start_P)
    return cls(tokens_T, start_P.astype(np.int64), length_P.astype(np.int64))

  def __len__(self) -> int:
    return len(self.start_P)


class PieceOrder:
  """The infinite stream of piece ids: epoch after epoch of 0..P-1.

  Shuffled epochs use a permutation drawn from (seed, epoch) alone, so any
  stream index maps to the same piece on every run. RandomState because
  NumPy freezes its streams (NEP 19): a checkpoint must replay the same
  order after a NumPy upgrade, which Generator does not promise.
  """

  def __init__(self, num_pieces: int, *, shuffle: bool, seed: int):
    self.num_pieces = num_pieces
    self._shuffle = shuffle
    self._seed = seed % 2**64  # SeedSequence takes non-negative ints only

  def epoch(self, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self.num_pieces)
    words = np.random.SeedSequence([self._seed, epoch]).generate_state(4)
    return np.random.RandomState(words).permutation(self.num_pieces)


class PackedBatchIterDataset(grain.IterDataset):
  """Packs the pieces, in `order`, into batches of `num_rows` rows.

  First-fit over `num_rows` bins (a piece goes to the first row with room);
  the batch is emitted when a piece fits nowhere, and that piece opens the
  next batch. Only rows [row_start, row_stop) are materialised: every
  process makes the same packing decisions (cheap, lengths only) and copies
  just its own rows, so the processes' rows together are exactly the
  one-process batch, and the state does not depend on the process count.

  `num_epochs=None` repeats forever; a number stops after that many passes
  over the pieces, the last batch holding only what is left (each piece
  appears exactly once per epoch, never padded out with the next one's).
  """

  def __init__(
    self,
    pieces: Pieces,
    order: PieceOrder,
    *,
    seq_len: int,
    num_rows: int,
    row_start: int,
    row_stop: int,
    num_epochs: int | None = None,
  ):
    super().__init__()
    self.pieces = pieces
    self._order = order
    self._seq_len = seq_len
    self._num_rows = num_rows
    self._rows = (row_start, row_stop)
    self._num_epochs = num_epochs

  def __iter__(self) -> grain.DatasetIterator:
    end = (
      None if self._num_epochs is None else self._num_epochs * len(self.pieces)
    )
    return _PackedBatchIterator(
      self.pieces,
      self._order,
      seq_len=self._seq_len,
      num_rows=self._num_rows,
      rows=self._rows,
      end=end,
    )

  def __str__(self) -> str:
    return (
      f"PackedBatchIterDataset(num_pieces={len(self.pieces)}, "
      f"seq_len={self._seq_len}, num_rows={self._num_rows})"
    )


class _PackedBatchIterator(grain.DatasetIterator):
  def __init__(
    self,
    pieces: Pieces,
    order: PieceOrder,
    *,
    seq_len: int,
    num_rows: int,
    rows: tuple[int, int],
    end: int | None,
  ):
    super().__init__()
    self._pieces = pieces
    self._order = order
    self._seq_len = seq_len
    self._num_rows = num_rows
    self._rows = rows
    self._end = end  # stream index to stop at; None: never
    self._arange_T = np.arange(seq_len, dtype=np.int32)
    # Index into the piece stream of the first piece not yet in an emitted
    # batch: the whole iterator state.
    self._next = 0
    self._epoch, self._order_P = -1, np.zeros(0, np.int64)

  def get_state(self) -> dict[str, Any]:
    return {"next_piece": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next = int(state["next_piece"])

  def _piece_at(self, k: int) -> int:
    epoch, i = divmod(k, self._order.num_pieces)
    if epoch != self._epoch:
      self._epoch, self._order_P = epoch, self._order.epoch(epoch)
    return int(self._order_P[i])

  def __next__(self) -> dict[str, np.ndarray]:
    tokens_T, start_P, length_P = (
      self._pieces.tokens_T,
      self._pieces.start_P,
      self._pieces.length_P,
    )
    row_start, row_stop = self._rows
    shape = (row_stop - row_start, self._seq_len)
    inputs_BT = np.zeros(shape, np.int32)
    targets_BT = np.zeros(shape, np.int32)
    segment_ids_BT = np.zeros(shape, np.int32)
    positions_BT = np.zeros(shape, np.int32)
    free_R = np.full(self._num_rows, self._seq_len, np.int64)
    pieces_R = [0] * self._num_rows
    if self._end is not None and self._next >= self._end:
      raise StopIteration
    while self._end is None or self._next < self._end:
      piece = self._piece_at(self._next)
      n = int(length_P[piece])
      fits_R = free_R >= n
      row = int(fits_R.argmax())
      if not fits_R[row]:
        break  # this piece opens the next batch
      offset = self._seq_len - int(free_R[row])
      free_R[row] -= n
      pieces_R[row] += 1
      self._next += 1
      if row_start <= row < row_stop:
        b, s = row - row_start, int(start_P[piece])
        cols = slice(offset, offset + n)
        inputs_BT[b, cols] = tokens_T[s : s + n]
        targets_BT[b, cols] = tokens_T[s + 1 : s + n + 1]
        segment_ids_BT[b, cols] = pieces_R[row]
        positions_BT[b, cols] = self._arange_T[:n]
    return {
      "inputs": inputs_BT,
      "targets": targets_BT,
      "segment_ids": segment_ids_BT,
      "positions": positions_BT,
    }
