"""Which keys each query of a layer sees, counted on one document that
fills the sequence: the same predicate as kernels.masks on that row, in
numpy (models/flops.py's `visible` convention and its tests).

Rows of a pooled layer sit `stride` positions apart (positions 0, stride,
2 stride, ...), so windows, global prefixes and TGlobal blocks, which are
in positions, cover `stride` times fewer rows there (`in_rows`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from efficient_lm.models.attention import mask_spec
from efficient_lm.models.stack import LayerSpec


def visible_keys(spec: LayerSpec, seq_len: int) -> np.ndarray:
  """Keys each query of one seq_len-token document sees, [T] (positions
  0..T-1, one segment); the same predicate as kernels.masks on that row."""
  t = seq_len
  i = np.arange(t)
  a = spec.attention
  before = i + 1  # keys 0..i (self included)
  after = (t - 1 - i) * (not spec.causal)  # keys i+1..T-1
  if a.kind == "dense":
    return before + after
  w = a.window
  local_before = np.minimum(before, w)  # keys i-w+1..i
  local_after = np.minimum(after, w - 1)  # keys i+1..i+w-1
  n = local_before + local_after
  if a.kind == "sliding_window":
    return n
  if a.kind == "global_local":
    # Prefix keys k < num_global outside the window (and causal if so).
    g = a.num_global
    below = np.minimum(g, np.maximum(0, i - w + 1))
    above = 0 if spec.causal else np.maximum(0, np.minimum(g, t) - (i + w))
    return _global_rows(spec, n + below + above)
  if a.kind == "tglobal":
    # Plus one summary per complete block: those of earlier blocks when
    # causal, all T // k otherwise (models/tglobal.py).
    k = a.tglobal_block
    return n + (i // k if spec.causal else t // k)
  if a.kind == "block_sparse":
    return _global_rows(spec, _block_sparse_keys(spec, t))
  raise ValueError(f"attention.kind={a.kind!r} has no FLOPs rule")


def _global_rows(spec: LayerSpec, keys: np.ndarray) -> np.ndarray:
  """Bidirectional global tokens (queries < num_global) see every key;
  causal ones see only earlier keys, already counted."""
  if spec.causal:
    return keys
  t = len(keys)
  return np.where(np.arange(t) < spec.attention.num_global, t, keys)


def _block_sparse_keys(spec: LayerSpec, t: int) -> np.ndarray:
  """BigBird: |window ∪ prefix ∪ random blocks| per query, each part an
  interval of keys (clipped to the causal limit), counted as the length of
  their union: sort by start, add what reaches past the running end."""
  a = spec.attention
  table = np.asarray(mask_spec(a, causal=spec.causal).block_mask, bool)
  bs = a.block_size
  if t > table.shape[0] * bs:
    raise ValueError(
      f"seq_len={t} is past the block_sparse table, which covers "
      f"{table.shape[0] * bs} positions (model.attention.max_len)"
    )
  i = np.arange(t)
  end = i + 1 if spec.causal else np.full(t, t)  # keys < end may be seen
  w = a.window
  lo = [np.maximum(0, i - w + 1), np.zeros(t, np.int64)]
  hi = [
    np.minimum(t, i + (1 if spec.causal else w)),
    np.minimum(a.num_global, end),
  ]
  rows = table[i // bs]  # [T, blocks]
  r = max(int(rows.sum(1).max()), 1)
  blocks = np.argsort(~rows, axis=1, kind="stable")[:, :r]  # chosen first
  chosen = np.take_along_axis(rows, blocks, axis=1)
  lo = np.concatenate([np.stack(lo, 1), blocks * bs], axis=1)
  hi = np.concatenate(
    [
      np.stack(hi, 1),
      np.where(chosen, np.minimum((blocks + 1) * bs, end[:, None]), 0),
    ],
    axis=1,
  )
  hi = np.maximum(hi, lo)  # empty, not negative
  order = np.argsort(lo, axis=1, kind="stable")
  lo = np.take_along_axis(lo, order, axis=1)
  hi = np.take_along_axis(hi, order, axis=1)
  reach = np.concatenate(
    [np.zeros((t, 1), hi.dtype), np.maximum.accumulate(hi, axis=1)[:, :-1]],
    axis=1,
  )
  return np.maximum(0, hi - np.maximum(lo, reach)).sum(axis=1)


def in_rows(spec: LayerSpec, stride: int) -> LayerSpec:
  """The spec with its position extents counted in rows `stride`
  positions apart (the same masks on positions 0, stride, 2 stride...)."""
  a = spec.attention
  if stride == 1:
    return spec
  return dataclasses.replace(
    spec,
    attention=dataclasses.replace(
      a,
      window=(a.window - 1) // stride + 1,
      num_global=-(-a.num_global // stride),
      tglobal_block=max(a.tglobal_block // stride, 1),
    ),
  )
