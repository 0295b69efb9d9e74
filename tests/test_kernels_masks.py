"""MaskSpec predicate and block metadata vs brute force (docs/attention.md)."""

import itertools
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import masks
from kernels.masks import EMPTY, FULL, PARTIAL, MaskSpec

_TABLE = ((1, 0, 1), (0, 1, 0), (1, 1, 0))
SPECS = {
  "full": MaskSpec(),
  "causal": MaskSpec(causal=True),
  "window": MaskSpec(window=(5, 3)),
  "causal_window": MaskSpec(causal=True, window=(7, 0)),
  "left_only": MaskSpec(window=(4, None)),
  "prefix_window": MaskSpec(causal=True, window=(4, 0), global_prefix=3),
  "prefix_rows": MaskSpec(window=(4, 4), global_prefix=3),
  "chunk": MaskSpec(chunk=8),
  "causal_chunk3": MaskSpec(causal=True, chunk=12),
  "suffix": MaskSpec(causal=True, window=(3, 0), global_suffix=4),
  "blocks": MaskSpec(block_mask=_TABLE, block_mask_sizes=(8, 12)),
  "bigbird": MaskSpec(
    causal=True,
    window=(4, 0),
    global_prefix=2,
    block_mask=_TABLE,
    block_mask_sizes=(16, 8),
  ),
  "bigbird_rows": MaskSpec(
    window=(2, 2),
    global_prefix=5,
    block_mask=_TABLE,
    block_mask_sizes=(16, 8),
  ),
}
LAYOUTS = ("contiguous", "packed", "scattered")
# Specs whose tile classification is exact on contiguous positions.
EXACT = (
  "full",
  "causal",
  "window",
  "causal_window",
  "left_only",
  "chunk",
  "causal_chunk3",
  "blocks",
)


def brute_visible(spec, qp, kp, qs, ks, k_is_suffix):
  """Scalar transcription of the predicate in kernels/masks.py."""
  if qs != ks or qs == 0:
    return False
  if spec.causal and kp > qp:
    return False
  parts = []
  if spec.window is not None or spec.chunk is not None:
    ok = True
    if spec.window is not None:
      left, right = spec.window
      ok &= left is None or kp >= qp - left
      ok &= right is None or kp <= qp + right
    if spec.chunk is not None:
      ok &= qp // spec.chunk == kp // spec.chunk
    parts.append(ok)
  if spec.block_mask is not None:
    bq, bk = spec.block_mask_sizes
    t = spec.block_mask
    i, j = qp // bq, kp // bk
    parts.append(0 <= i < len(t) and 0 <= j < len(t[0]) and bool(t[i][j]))
  if not parts:
    return True
  return (
    any(parts)
    or kp < spec.global_prefix
    or (not spec.causal and qp < spec.global_prefix)
    or (spec.global_suffix > 0 and k_is_suffix)
  )


def brute_mask(spec, qp, kp, qs, ks):
  s = len(kp)
  sfx = np.arange(s) >= s - spec.global_suffix
  return np.array(
    [
      [
        brute_visible(spec, qp[i], kp[j], qs[i], ks[j], sfx[j])
        for j in range(s)
      ]
      for i in range(len(qp))
    ]
  )


def brute_kinds(m_TS, bq, bk):
  t, s = m_TS.shape
  tiles = m_TS.reshape(t // bq, bq, s // bk, bk).transpose(0, 2, 1, 3)
  return np.where(
    tiles.all((-1, -2)), FULL, np.where(tiles.any((-1, -2)), PARTIAL, EMPTY)
  )


def _packed_row(rng, t):
  """Documents of 3..16 tokens back to back, positions restarting at each,
  then up to 4 padding tokens: most documents meet inside a tile."""
  pos, seg = np.zeros(t, np.int32), np.zeros(t, np.int32)
  start, doc, end = 0, 1, t - int(rng.integers(0, 5))
  while start < end:
    n = min(int(rng.integers(3, 17)), end - start)
    pos[start : start + n], seg[start : start + n] = np.arange(n), doc
    start, doc = start + n, doc + 1
  return pos, seg


def _inputs(rng, t, s, layout):
  if layout == "contiguous":
    qp = np.arange(t) + (s - t if t < s else 0)
    kp = np.arange(s)
    qs, ks = np.ones(t, np.int32), np.ones(s, np.int32)
    qs[t - rng.integers(0, 5) :] = 0  # padding at the end
    ks[s - rng.integers(0, 5) :] = 0
  elif layout == "packed":  # self-attention over one packed row
    qp, qs = _packed_row(rng, max(t, s))
    kp, ks = qp[:s], qs[:s]
    qp, qs = qp[-t:], qs[-t:]
  else:  # "scattered"
    qp = np.sort(rng.choice(3 * t, t, replace=False))
    kp = rng.integers(0, 3 * t, s)
    qs = np.sort(rng.integers(0, 3, t))
    ks = rng.integers(0, 3, s)
  return [np.asarray(x, np.int32) for x in (qp, kp, qs, ks)]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dense_mask_matches_brute_force(name):
  spec = SPECS[name]
  rng = np.random.default_rng(0)
  for layout in LAYOUTS:
    qp, kp, qs, ks = _inputs(rng, 40, 48, layout)
    got = masks.dense_mask(
      spec, *(jnp.asarray(x)[None] for x in (qp, kp, qs, ks))
    )[0]
    np.testing.assert_array_equal(
      np.asarray(got), brute_mask(spec, qp, kp, qs, ks)
    )


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("bq,bk", [(8, 8), (8, 16), (16, 8)])
def test_block_kinds(name, bq, bk):
  """Exact on contiguous positions (where claimed), conservative always."""
  spec = SPECS[name]
  # crc32, not hash(): str hashes change every run (PYTHONHASHSEED).
  rng = np.random.default_rng(zlib.crc32(f"{name}/{bq}/{bk}".encode()))
  for layout, (t, s) in itertools.product(
    LAYOUTS, ((48, 48), (32, 64), (64, 32))
  ):
    qp, kp, qs, ks = _inputs(rng, t, s, layout)
    want = brute_kinds(brute_mask(spec, qp, kp, qs, ks), bq, bk)
    got = np.asarray(
      masks.classify_blocks(
        spec,
        *(jnp.asarray(x)[None] for x in (qp, kp, qs, ks)),
        block_q=bq,
        block_kv=bk,
      )
    )[0]
    assert not np.any((got == EMPTY) & (want != EMPTY)), "visible tile skipped"
    assert not np.any((got == FULL) & (want != FULL)), "mask wrongly dropped"
    if layout == "contiguous" and name in EXACT:
      np.testing.assert_array_equal(got, want)


def test_compacted_lists():
  kind = np.array([[[0, 2, 0, 1], [0, 0, 0, 0], [1, 1, 2, 2]]], np.int32)
  count, index, kinds = (
    np.asarray(x) for x in masks._compact(jnp.asarray(kind))
  )
  np.testing.assert_array_equal(count, [[2, 0, 4]])
  np.testing.assert_array_equal(
    index, [[[1, 3, 3, 3], [0, 0, 0, 0], [0, 1, 2, 3]]]
  )
  np.testing.assert_array_equal(
    kinds, [[[2, 1, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2]]]
  )


def test_metadata_transpose_is_consistent():
  spec = SPECS["bigbird"]
  rng = np.random.default_rng(1)
  qp, kp, qs, ks = (
    jnp.asarray(x)[None] for x in _inputs(rng, 64, 64, "scattered")
  )
  meta = masks.block_metadata(spec, qp, kp, qs, ks, block_q=8, block_kv=16)
  kind = np.asarray(meta.kind)[0]
  for qb in range(kind.shape[0]):
    n = int(meta.kv_count[0, qb])
    np.testing.assert_array_equal(
      np.asarray(meta.kv_index[0, qb, :n]), np.flatnonzero(kind[qb])
    )
  for kb in range(kind.shape[1]):
    n = int(meta.q_count[0, kb])
    np.testing.assert_array_equal(
      np.asarray(meta.q_index[0, kb, :n]), np.flatnonzero(kind[:, kb])
    )
    np.testing.assert_array_equal(
      np.asarray(meta.q_kind[0, kb, :n]), kind[np.flatnonzero(kind[:, kb]), kb]
    )


def test_spec_is_static_and_validated():
  a = MaskSpec(causal=True, window=[3, 0])
  assert a == MaskSpec(causal=True, window=(3, 0)) and hash(a) == hash(
    MaskSpec(causal=True, window=(3, 0))
  )
  with pytest.raises(ValueError, match="block_mask_sizes"):
    MaskSpec(block_mask=((True,),))
  with pytest.raises(ValueError, match="window"):
    MaskSpec(window=(-1, 0))


def test_floordiv_matches_python():
  x = jnp.arange(-50, 5000, dtype=jnp.int32)
  for c in (1, 3, 8, 12, 127):
    np.testing.assert_array_equal(
      np.asarray(masks.floordiv(x, c)), np.arange(-50, 5000) // c
    )
