"""Attention mask spec, its element predicate and its block metadata.

One `MaskSpec` describes a mask pattern. It is evaluated on *positions* and
segment ids (data), never on array indices (docs/attention.md). The same spec
builds the dense element mask used by the reference and the per-tile
metadata used by the blockwise kernels.

Element predicate (true = query may attend to key):

  visible = same_segment AND causal AND (suffix_column OR pattern)
  same_segment = q_seg == k_seg AND q_seg != 0      (segment 0 = padding)
  causal       = k_pos <= q_pos                      (if spec.causal)
  pattern      = base OR k_pos < global_prefix
                        OR q_pos < global_prefix     (if not spec.causal)
  base         = OR of the enabled sparsity parts, or True if none is:
                   local  = window AND chunk         (if window or chunk set)
                   blocks = block_mask[q_pos // bq][k_pos // bk]
  window (l, r): q_pos - l <= k_pos <= q_pos + r     (inclusive; None = inf)
  chunk c:       q_pos // c == k_pos // c
  block_mask:    static table over *position* blocks of size
                 `block_mask_sizes=(bq, bk)`; positions outside the table
                 are not visible (kernels.attention refuses concrete ones
                 past `block_mask_coverage`). `bigbird_block_table` builds
                 BigBird's random blocks.

Global prefix: the first `global_prefix` positions of each document are
global tokens (Longformer, BigBird's ITC). Every query sees them (global
columns) and, in a bidirectional spec, they see every key of their document
(global rows). In a causal spec a global row could only see keys at or
before itself, all of which are global columns already, so global rows add
nothing there and are not tested (docs/attention.md: no global token attends
to the future).

Transient-global suffix (TGlobal): the caller appends `global_suffix`
summary keys as the last key columns (after the `S - global_suffix`
ordinary keys), with their own positions and segment ids. Those columns skip
`pattern` but keep `same_segment` and `causal` (evaluated on their
positions). For the causal TGlobal rule "a token of block b sees only
summaries of blocks j < b", give summary j the position (j + 1) * block_len.
Suffix columns are the only index-based notion here: they are a separate set
of keys, not a place in the sequence.

Block metadata (`block_metadata`) for tiles of `block_q x block_kv` rows and
columns; NQ = T / block_q, NK = S / block_kv (lengths must be multiples;
the kernels' wrappers pad first). All int32:

  kind     [B, NQ, NK]  EMPTY=0 / PARTIAL=1 / FULL=2 for every tile.
  kv_count [B, NQ]      number of non-empty kv blocks of each q block.
  kv_index [B, NQ, NK]  their kv block indices, ascending; entries past
                        kv_count repeat the last valid index (0 if none), so
                        a pipelined kernel that walks the padded list
                        re-uses the resident block instead of fetching.
  kv_kind  [B, NQ, NK]  kind of tile (qb, kv_index[qb, j]); EMPTY when padded.
  q_count  [B, NK]      transposed table for dK/dV: non-empty q blocks of
  q_index  [B, NK, NQ]  each kv block, same conventions.
  q_kind   [B, NK, NQ]

Classification is computed at run time in jnp from per-block min/max of the
positions and segment ids of non-padding rows, so it is conservative: FULL
only if every element is visible, EMPTY only if none is. With contiguous
positions it is exact for each single part (causal, window, chunk, prefix,
suffix, block mask) and for causal + window; unions (window OR prefix) can
give PARTIAL for a tile that is in fact FULL.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static, hashable mask pattern; see the module docstring."""

  causal: bool = False
  window: tuple[int | None, int | None] | None = None
  global_prefix: int = 0
  global_suffix: int = 0
  chunk: int | None = None
  block_mask: tuple[tuple[bool, ...], ...] | None = None
  block_mask_sizes: tuple[int, int] | None = None

  def __post_init__(self):
    if self.window is not None:
      if len(self.window) != 2:
        raise ValueError(f"window must be (left, right), got {self.window}")
      for w in self.window:
        if w is not None and w < 0:
          raise ValueError(f"window sides must be >= 0, got {self.window}")
      object.__setattr__(self, "window", tuple(self.window))
    if self.chunk is not None and self.chunk <= 0:
      raise ValueError(f"chunk must be positive, got {self.chunk}")
    if self.global_prefix < 0 or self.global_suffix < 0:
      raise ValueError("global_prefix and global_suffix must be >= 0")
    if self.block_mask is not None:
      table = tuple(tuple(bool(x) for x in row) for row in self.block_mask)
      if not table or len({len(r) for r in table}) != 1 or not table[0]:
        raise ValueError("block_mask must be a non-empty rectangular table")
      object.__setattr__(self, "block_mask", table)
      if self.block_mask_sizes is None or len(self.block_mask_sizes) != 2:
        raise ValueError("block_mask needs block_mask_sizes=(bq, bk)")
      if min(self.block_mask_sizes) <= 0:
        raise ValueError(f"bad block_mask_sizes {self.block_mask_sizes}")
      object.__setattr__(self, "block_mask_sizes", tuple(self.block_mask_sizes))

  @property
  def has_local(self) -> bool:
    return self.window is not None or self.chunk is not None


def floordiv(x, c: int):
  """`x // c` for a static positive int, with ops every backend lowers.

  Powers of two use a shift (exact); other divisors go through f32, which
  is exact for |x| < 2**22 (positions far beyond any context length).
  """
  if c & (c - 1) == 0:
    return jnp.right_shift(x, c.bit_length() - 1)
  xf = x.astype(jnp.float32) + 0.5
  return jnp.floor(xf / np.float32(c)).astype(jnp.int32)


def _block_lookup(spec, q_pos, k_pos):
  """block_mask[q_pos // bq][k_pos // bk]; False outside the table."""
  table = np.asarray(spec.block_mask, dtype=bool)
  bq, bk = spec.block_mask_sizes
  qb, kb = floordiv(q_pos, bq), floordiv(k_pos, bk)
  nq, nk = table.shape
  inside = (qb >= 0) & (qb < nq) & (kb >= 0) & (kb < nk)
  flat = jnp.asarray(table.reshape(-1))
  idx = jnp.clip(qb, 0, nq - 1) * nk + jnp.clip(kb, 0, nk - 1)
  return inside & flat[idx]


def element_mask(
  spec: MaskSpec, q_pos, k_pos, q_seg, k_seg, k_is_suffix, *, block_lookup=None
):
  """The predicate of the module docstring on broadcastable int arrays.

  Used by the dense reference ([B, T, 1] vs [B, 1, S]) and by the kernels
  on PARTIAL tiles. `k_is_suffix` is a bool array (or Python bool) marking
  transient-global columns. `block_lookup(q_pos, k_pos)` may replace the
  gather-based block_mask lookup (kernels cannot gather; they use a one-hot
  matmul with the same meaning).
  """
  visible = (q_seg == k_seg) & (q_seg != 0)
  if spec.causal:
    visible &= k_pos <= q_pos
  parts = []
  if spec.has_local:
    local = True
    if spec.window is not None:
      left, right = spec.window
      if left is not None:
        local = local & (k_pos >= q_pos - left)
      if right is not None:
        local = local & (k_pos <= q_pos + right)
    if spec.chunk is not None:
      local = local & (
        floordiv(q_pos, spec.chunk) == floordiv(k_pos, spec.chunk)
      )
    parts.append(local)
  if spec.block_mask is not None:
    lookup = block_lookup or functools.partial(_block_lookup, spec)
    parts.append(lookup(q_pos, k_pos))
  if parts:
    pattern = parts[0]
    for p in parts[1:]:
      pattern = pattern | p
    if spec.global_prefix:
      pattern = pattern | (k_pos < spec.global_prefix)
      if not spec.causal:
        pattern = pattern | (q_pos < spec.global_prefix)
    if spec.global_suffix:
      pattern = pattern | k_is_suffix
    visible = visible & pattern
  return visible


def suffix_columns(spec: MaskSpec, kv_len: int, padded_len: int | None = None):
  """Bool [padded_len]: which key columns are transient-global summaries.

  `kv_len` is the caller's key length (summaries are its last
  `global_suffix` columns); columns past it are wrapper padding.
  """
  padded_len = kv_len if padded_len is None else padded_len
  if spec.global_suffix > kv_len:
    raise ValueError(
      f"global_suffix={spec.global_suffix} exceeds key length {kv_len}"
    )
  col = np.arange(padded_len)
  return (col >= kv_len - spec.global_suffix) & (col < kv_len)


def dense_mask(spec: MaskSpec, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS):
  """Bool [B, T, S] element mask; segment ids None = all one segment."""
  q_seg_BT = jnp.ones_like(q_pos_BT) if q_seg_BT is None else q_seg_BT
  k_seg_BS = jnp.ones_like(k_pos_BS) if k_seg_BS is None else k_seg_BS
  k_sfx = jnp.asarray(suffix_columns(spec, k_pos_BS.shape[1]))[None, None, :]
  return element_mask(
    spec,
    q_pos_BT[:, :, None],
    k_pos_BS[:, None, :],
    q_seg_BT[:, :, None],
    k_seg_BS[:, None, :],
    k_sfx,
  )


def block_mask_coverage(spec: MaskSpec) -> int | None:
  """Positions 0..coverage-1 lie inside the spec's block table, for queries
  and keys alike; None without a table (every position is covered).

  A position at or past it falls outside the table and the predicate makes
  it invisible, so callers (kernels.attention, generation) refuse it.
  """
  if spec.block_mask is None:
    return None
  assert spec.block_mask_sizes is not None  # MaskSpec checks: table => sizes
  bq, bk = spec.block_mask_sizes
  return min(len(spec.block_mask) * bq, len(spec.block_mask[0]) * bk)


def _mix64(x):
  """SplitMix64 finaliser on uint64 arrays (wraps mod 2**64)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=32)
def bigbird_block_table(
  num_blocks: int, *, num_random_blocks: int, seed: int, causal: bool
) -> tuple[tuple[bool, ...], ...]:
  """BigBird's random key blocks (docs/attention.md): [num_blocks]^2 table,
  True where query block i attends key block j at random.

  Each query block gets `num_random_blocks` distinct key blocks drawn from
  the strictly earlier blocks (causal: fewer for query blocks 0..r-1, which
  have fewer earlier blocks) or from all the other blocks (bidirectional;
  fewer if num_blocks <= r). The window and the global prefix are not in
  the table: MaskSpec.window and .global_prefix add them through the
  predicate's OR, so random blocks may overlap them.

  The draw is static and deterministic: candidate j of query block i is
  ranked by a SplitMix64 hash of (seed, i, j) and the r lowest win, so the
  table depends on nothing but its arguments (no NumPy generator whose
  stream may change between releases). In causal mode row i does not depend
  on num_blocks, so a longer table extends a shorter one. One table serves
  every head and every layer of a model.
  """
  if num_blocks <= 0 or num_random_blocks < 0:
    raise ValueError(
      f"bigbird_block_table: num_blocks={num_blocks} must be > 0 and "
      f"num_random_blocks={num_random_blocks} >= 0"
    )
  i = np.arange(num_blocks, dtype=np.uint64)[:, None]
  j = np.arange(num_blocks, dtype=np.uint64)[None, :]
  # 1-element arrays, not NumPy scalars: scalar ops warn on the (intended)
  # wrap-around.
  key = _mix64(
    np.array([seed % 2**64], np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  )
  rank = _mix64(_mix64(key ^ i) ^ j)
  eligible = (j < i) if causal else (j != i)
  # Ineligible blocks sort last; among the eligible, the r lowest ranks.
  order = np.lexsort((rank, ~eligible), axis=-1)
  chosen = np.zeros((num_blocks, num_blocks), bool)
  r = min(num_random_blocks, num_blocks)
  np.put_along_axis(chosen, order[:, :r], True, axis=-1)
  chosen &= eligible
  return tuple(tuple(bool(x) for x in row) for row in chosen)


# ---------------------------------------------------------------- metadata


class BlockMetadata(NamedTuple):
  kind: jax.Array
  kv_count: jax.Array
  kv_index: jax.Array
  kv_kind: jax.Array
  q_count: jax.Array
  q_index: jax.Array
  q_kind: jax.Array


class _Bounds(NamedTuple):
  """(maybe any element true, surely every element true) per tile."""

  any: jax.Array
  all: jax.Array


def _and(a, b):
  return _Bounds(a.any & b.any, a.all & b.all)


def _or(a, b):
  return _Bounds(a.any | b.any, a.all | b.all)


_BIG = 2**30


def _block_stats(pos_BT, seg_BT, block):
  """Per block over non-padding rows: pos min/max, seg min/max, flags."""
  b, t = pos_BT.shape
  pos = pos_BT.reshape(b, t // block, block)
  seg = seg_BT.reshape(b, t // block, block)
  valid = seg != 0
  pmin = jnp.min(jnp.where(valid, pos, _BIG), axis=-1)
  pmax = jnp.max(jnp.where(valid, pos, -_BIG), axis=-1)
  smin = jnp.min(jnp.where(valid, seg, _BIG), axis=-1)
  smax = jnp.max(jnp.where(valid, seg, -_BIG), axis=-1)
  return pmin, pmax, smin, smax, jnp.any(valid, -1), jnp.all(valid, -1)


def _table_bounds(spec, qlo, qhi, klo, khi):
  """Any/all of block_mask over the position-block rectangle of a tile."""
  table = np.asarray(spec.block_mask, dtype=np.int32)
  nq, nk = table.shape
  bq, bk = spec.block_mask_sizes
  # Summed-area table with a zero border: count over [r0, r1) x [c0, c1).
  sat = np.zeros((nq + 1, nk + 1), np.int32)
  sat[1:, 1:] = table.cumsum(0).cumsum(1)
  sat = jnp.asarray(sat)
  r0, r1 = floordiv(qlo, bq), floordiv(qhi, bq) + 1
  c0, c1 = floordiv(klo, bk), floordiv(khi, bk) + 1
  inside = (r0 >= 0) & (r1 <= nq) & (c0 >= 0) & (c1 <= nk)
  r0c, r1c = jnp.clip(r0, 0, nq), jnp.clip(r1, 0, nq)
  c0c, c1c = jnp.clip(c0, 0, nk), jnp.clip(c1, 0, nk)
  count = sat[r1c, c1c] - sat[r0c, c1c] - sat[r1c, c0c] + sat[r0c, c0c]
  area = jnp.maximum(r1c - r0c, 0) * jnp.maximum(c1c - c0c, 0)
  return _Bounds(count > 0, inside & (count == area) & (area > 0))


def classify_blocks(
  spec,
  q_pos_BT,
  k_pos_BS,
  q_seg_BT,
  k_seg_BS,
  *,
  block_q,
  block_kv,
  kv_len=None,
):
  """Kind [B, NQ, NK] of every tile, conservative (see module docstring).

  `kv_len`: the caller's unpadded key length (locates suffix columns);
  defaults to S.
  """
  t, s = q_pos_BT.shape[1], k_pos_BS.shape[1]
  if t % block_q or s % block_kv:
    raise ValueError(
      f"lengths ({t}, {s}) must be multiples of blocks "
      f"({block_q}, {block_kv}); pad first"
    )
  kv_len = s if kv_len is None else kv_len
  qmin, qmax, qsmin, qsmax, qany, qall = _block_stats(
    q_pos_BT, q_seg_BT, block_q
  )
  kmin, kmax, ksmin, ksmax, kany, kall = _block_stats(
    k_pos_BS, k_seg_BS, block_kv
  )
  # Tile axes: [B, NQ, 1] against [B, 1, NK].
  qmin, qmax, qsmin, qsmax = (x[:, :, None] for x in (qmin, qmax, qsmin, qsmax))
  qany, qall = qany[:, :, None], qall[:, :, None]
  kmin, kmax, ksmin, ksmax = (x[:, None, :] for x in (kmin, kmax, ksmin, ksmax))
  kany, kall = kany[:, None, :], kall[:, None, :]

  seg = _Bounds(
    qany & kany & (qsmin <= ksmax) & (ksmin <= qsmax),
    qall & kall & (qsmin == qsmax) & (ksmin == ksmax) & (qsmin == ksmin),
  )
  # Causal and window both bound d = k_pos - q_pos; intersecting them first
  # keeps causal + window exact on contiguous positions.
  lo, hi = -np.inf, np.inf
  if spec.causal:
    hi = 0
  if spec.window is not None:
    if spec.window[0] is not None:
      lo = -spec.window[0]
    if spec.window[1] is not None:
      hi = min(hi, spec.window[1])
  dmin, dmax = kmin - qmax, kmax - qmin

  def diff_bounds(lo, hi):
    any_, all_ = True, True
    if lo != -np.inf:
      any_, all_ = any_ & (dmax >= lo), all_ & (dmin >= lo)
    if hi != np.inf:
      any_, all_ = any_ & (dmin <= hi), all_ & (dmax <= hi)
    shape = dmin.shape
    return _Bounds(jnp.broadcast_to(any_, shape), jnp.broadcast_to(all_, shape))

  # Causal alone bounds every column (suffix included); the window only
  # applies to the pattern, so it is folded in there.
  causal_only = diff_bounds(-np.inf, 0 if spec.causal else np.inf)
  parts = []
  if spec.has_local:
    local = diff_bounds(lo, hi)
    if spec.chunk is not None:
      c = spec.chunk
      qc0, qc1 = floordiv(qmin, c), floordiv(qmax, c)
      kc0, kc1 = floordiv(kmin, c), floordiv(kmax, c)
      local = _and(
        local,
        _Bounds(
          (qc0 <= kc1) & (kc0 <= qc1),
          (qc0 == qc1) & (kc0 == kc1) & (qc0 == kc0),
        ),
      )
    parts.append(local)
  if spec.block_mask is not None:
    blocks = _table_bounds(spec, qmin, qmax, kmin, kmax)
    parts.append(_and(causal_only, blocks))
  if parts:
    pattern = parts[0]
    for p in parts[1:]:
      pattern = _or(pattern, p)
    if spec.global_prefix:
      n = spec.global_prefix
      pattern = _or(pattern, _and(causal_only, _Bounds(kmin < n, kmax < n)))
      if not spec.causal:  # global rows (see the module docstring)
        pattern = _or(pattern, _Bounds(qmin < n, qmax < n))
    if spec.global_suffix:
      sfx = suffix_columns(spec, kv_len, s).reshape(s // block_kv, block_kv)
      sfx_any = jnp.asarray(sfx.any(-1))[None, None, :]
      sfx_all = jnp.asarray(sfx.all(-1))[None, None, :]
      pattern = _or(pattern, _and(causal_only, _Bounds(sfx_any, sfx_all)))
    total = _and(seg, pattern)
  else:
    total = _and(seg, causal_only)
  return jnp.where(
    total.all, FULL, jnp.where(total.any, PARTIAL, EMPTY)
  ).astype(jnp.int32)


def _compact(kind_BMN):
  """Ascending non-empty indices along the last axis, padded (see doc)."""
  nonempty = kind_BMN != EMPTY
  count = jnp.sum(nonempty, axis=-1, dtype=jnp.int32)
  # Stable sort key: non-empty first, in ascending index order.
  order = jnp.argsort(jnp.where(nonempty, 0, 1), axis=-1, stable=True)
  order = order.astype(jnp.int32)
  j = jax.lax.broadcasted_iota(jnp.int32, kind_BMN.shape, kind_BMN.ndim - 1)
  last = jnp.take_along_axis(
    order, jnp.maximum(count - 1, 0)[..., None], axis=-1
  )
  index = jnp.where(j < count[..., None], order, last)
  kind = jnp.where(
    j < count[..., None], jnp.take_along_axis(kind_BMN, order, axis=-1), EMPTY
  )
  return count, index, kind.astype(jnp.int32)


def block_metadata(
  spec,
  q_pos_BT,
  k_pos_BS,
  q_seg_BT,
  k_seg_BS,
  *,
  block_q,
  block_kv,
  kv_len=None,
) -> BlockMetadata:
  """Tile kinds plus the compacted row and transposed tables."""
  kind = classify_blocks(
    spec,
    q_pos_BT,
    k_pos_BS,
    q_seg_BT,
    k_seg_BS,
    block_q=block_q,
    block_kv=block_kv,
    kv_len=kv_len,
  )
  kv_count, kv_index, kv_kind = _compact(kind)
  q_count, q_index, q_kind = _compact(jnp.swapaxes(kind, 1, 2))
  return BlockMetadata(
    kind, kv_count, kv_index, kv_kind, q_count, q_index, q_kind
  )
