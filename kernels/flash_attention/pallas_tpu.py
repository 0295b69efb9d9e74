"""Block-sparse flash attention as Pallas Mosaic TPU kernels (FA2).

Implements the backend contract of vjp.py. Each kernel's innermost grid axis
walks a compacted list of non-empty tiles from masks.BlockMetadata, passed
by scalar prefetch (SMEM); the index maps read the list, so EMPTY tiles are
never fetched nor computed. List entries past the count repeat the last
index, so the pipeline keeps the resident block and issues no DMA.

Per-row data is passed with a unit minor dim: q positions / segments
[B, T, 1], kv ones [B, 1, S], lse and delta [B, H, T, 1], so each tile
broadcasts (rows, 1) against (1, cols) without relayouts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import compat
from kernels import masks
from kernels.flash_attention.tiles import NN, NT, TN, dot, round_up, soft_cap

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite "-inf": no NaN


def _table(spec):
  """block_mask as a lane-aligned f32 [NPQ, NPK] operand (or None)."""
  if spec.block_mask is None:
    return None
  t = np.asarray(spec.block_mask, np.float32)
  out = np.zeros(
    (round_up(t.shape[0], 128), round_up(t.shape[1], 128)), np.float32
  )
  out[: t.shape[0], : t.shape[1]] = t
  return jnp.asarray(out)


def _mxu_lookup(spec, table, q_pos, k_pos):
  """block_mask[q_pos // bq][k_pos // bk] as two one-hot matmuls."""
  bq, bk = spec.block_mask_sizes
  npq, npk = table.shape
  qb = masks.floordiv(q_pos, bq)  # (rows, 1)
  kb = masks.floordiv(k_pos, bk)  # (1, cols)
  rows = jax.lax.broadcasted_iota(jnp.int32, (q_pos.shape[0], npq), 1)
  onehot_q = (rows == qb).astype(jnp.float32)
  cols = jax.lax.broadcasted_iota(jnp.int32, (npk, k_pos.shape[1]), 0)
  onehot_k = (cols == kb).astype(jnp.float32)
  hit = dot(dot(onehot_q, table, NN), onehot_k, NN)
  return hit > 0.5  # out-of-table positions hit no row / column: False


def _tile_mask(params, q_pos, q_seg, k_pos, k_seg, kv_block, table_ref):
  bk = k_pos.shape[1]
  col = kv_block * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  sfx = (col >= params.suffix_start) & (col < params.kv_len)
  lookup = None
  if table_ref is not None:
    lookup = functools.partial(_mxu_lookup, params.spec, table_ref[...])
  vis = masks.element_mask(
    params.spec, q_pos, k_pos, q_seg, k_seg, sfx, block_lookup=lookup
  )
  return jnp.broadcast_to(vis, (q_pos.shape[0], bk))


def _logits(params, q, k):
  """Scaled (and soft-capped) logits; also tanh for the cap's derivative."""
  return soft_cap(dot(q, k, NT) * params.scale, params.logits_soft_cap)


def _check_tiles(params, t, s):
  """Mosaic tiles are (8, 128): rows of q need 8s, kv rows (lanes) 128s."""
  if params.interpret:
    return
  bq, bk = params.block_q, params.block_kv
  if bq % 8 and bq != t:
    raise NotImplementedError(f"pallas_tpu needs block_q % 8 == 0, got {bq}")
  if bk % 128 and bk != s:
    raise NotImplementedError(
      f"pallas_tpu needs block_kv % 128 == 0 (or one block for all keys), "
      f"got block_kv={bk} for {s} keys"
    )


def _grid_width(count, n, params):
  """Length of the innermost grid axis: the longest tile list.

  On TPU this is a dynamic grid bound, so a sliding window at 32k keys runs
  ~3 steps per q block instead of NK mostly idle ones. The interpreter only
  takes static grids, so it walks all n (idle steps are skipped anyway).
  """
  if params.interpret:
    return n
  return jnp.maximum(jnp.max(count), 1)  # >= 1: outputs are written at the end


def _varying(prefetch, operands):
  out = compat.match_varying(*prefetch, *operands)
  return out[: len(prefetch)], out[len(prefetch) :]


_SMEM_BUDGET = 768 * 1024  # of the 1 MiB SMEM of v4/v5e/v5p/v6e cores


class _Lists:
  """Scalar-prefetch tile lists, flat: count [B*M], entry [B*M*N].

  entry = index * 4 + kind packs both into one SMEM word: SMEM is 1 MiB and
  these lists grow as B * (T / block)^2.
  """

  def __init__(self, count, index, kind):
    self.b, self.m, self.n = index.shape
    words = self.b * self.m * (self.n + 1)
    if words * 4 > _SMEM_BUDGET:
      raise NotImplementedError(
        f"tile lists need {words * 4 // 1024} KiB of SMEM (budget "
        f"{_SMEM_BUDGET // 1024} KiB) for batch {self.b} and {self.m} x "
        f"{self.n} tiles; use larger BlockSizes or shard the batch"
      )
    self.arrays = (count.reshape(-1), (index * 4 + kind).reshape(-1))

  def at(self, refs, b, row, j):
    count, entry = refs
    e = entry[(b * self.m + row) * self.n + j]
    return count[b * self.m + row], e // 4, e % 4


def _q_row_spec(shape):
  """Operands indexed like q's tile on a (b, h, q block, list) grid."""
  return compat.BlockSpec(shape, lambda bi, h, i, j, *r: (bi, h, i, 0))


def _q_major_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, rows, lists, params):
  """BlockSpecs + operands of the kernels that walk kv lists (fwd, dQ).

  Order: q, k, v, q_pos, q_seg, k_pos, k_seg, *rows, [block-mask table].
  """
  kdim, e = q.shape[3], v.shape[3]
  group = q.shape[1] // k.shape[1]
  bq, bk = params.block_q, params.block_kv

  def kv_block(bi, i, j, refs):
    return lists.at(refs, bi, i, j)[1]

  def kv_spec(shape):
    return compat.BlockSpec(
      shape, lambda bi, h, i, j, *r: (bi, h // group, kv_block(bi, i, j, r), 0)
    )

  q_rows = compat.BlockSpec((None, bq, 1), lambda bi, h, i, j, *r: (bi, i, 0))
  kv_cols = compat.BlockSpec(
    (None, 1, bk), lambda bi, h, i, j, *r: (bi, 0, kv_block(bi, i, j, r))
  )
  in_specs = [
    _q_row_spec((None, None, bq, kdim)),
    kv_spec((None, None, bk, kdim)),
    kv_spec((None, None, bk, e)),
    q_rows,
    q_rows,
    kv_cols,
    kv_cols,
  ]
  in_specs += [_q_row_spec((None, None, bq, x.shape[3])) for x in rows]
  operands = [
    q,
    k,
    v,
    q_pos[:, :, None],
    q_seg[:, :, None],
    k_pos[:, None, :],
    k_seg[:, None, :],
    *rows,
  ]
  table = _table(params.spec)
  if table is not None:
    in_specs.append(compat.BlockSpec(table.shape, lambda *_: (0, 0)))
    operands.append(table)
  return in_specs, operands


def _cost(q, k, v, qk, pv, arrays):
  """(flops, transcendentals, bytes) of one kernel for XLA's cost analysis.

  FLOPs are counted on the dense T x S tile, as models/flops.py's
  dense_tile convention does (skipped masked tiles are not credited):
  `qk` products of width K and `pv` of width E per query-key pair. The
  backward follows the flash convention of 2.5x the forward: dkv counts its
  four products (S recomputed, dP, dV, dK), dq only dQ, not the S and dP it
  recomputes again. One exp per query-key pair; bytes are the operands and
  results, each read or written once.
  """
  b, h, t, kdim = q.shape
  pairs = b * h * t * k.shape[2]
  flops = 2 * pairs * (qk * kdim + pv * v.shape[3])
  nbytes = sum(a.size * a.dtype.itemsize for a in arrays)
  return flops, pairs, nbytes


def flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, params):
  b, h, t, _ = q.shape
  s, e = k.shape[2], v.shape[3]
  bq, bk = params.block_q, params.block_kv
  nq, nk = t // bq, s // bk
  _check_tiles(params, t, s)
  lists = _Lists(meta.kv_count, meta.kv_index, meta.kv_kind)
  in_specs, operands = _q_major_inputs(
    q, k, v, q_pos, k_pos, q_seg, k_seg, (), lists, params
  )
  out_specs = [
    _q_row_spec((None, None, bq, e)),
    _q_row_spec((None, None, bq, 1)),
  ]
  prefetch, operands = _varying(lists.arrays, operands)
  out_shape = [
    compat.out_struct((b, h, t, e), q.dtype, operands[0]),
    compat.out_struct((b, h, t, 1), jnp.float32, operands[0]),
  ]
  scratch = [
    compat.vmem((bq, 1), jnp.float32),  # running max m
    compat.vmem((bq, 1), jnp.float32),  # running sum l
    compat.vmem((bq, e), jnp.float32),
  ]  # unnormalised output

  def kernel(*refs):
    list_refs, refs = refs[:2], refs[2:]
    q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref = refs[:7]
    refs = refs[7:]
    table_ref = refs[0] if params.spec.block_mask is not None else None
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[-5:]
    bi, i, j = (compat.program_id(a) for a in (0, 2, 3))
    count, kv_idx, kind = lists.at(list_refs, bi, i, j)

    @compat.when(j == 0)
    def _init():
      m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
      l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
      acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
      s, _ = _logits(params, q_ref[...], k_ref[...])
      vis = None
      if masked:
        vis = _tile_mask(
          params,
          qp_ref[...],
          qs_ref[...],
          kp_ref[...],
          ks_ref[...],
          kv_idx,
          table_ref,
        )
        s = jnp.where(vis, s, _NEG)
      m_prev = m_sc[...]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.exp(s - m_new)
      if vis is not None:  # a row masked so far has m_new == _NEG and p == 1
        p = jnp.where(vis, p, 0.0)
      alpha = jnp.exp(m_prev - m_new)
      l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
      acc_sc[...] = alpha * acc_sc[...] + dot(
        p.astype(v_ref.dtype), v_ref[...], NN
      )
      m_sc[...] = m_new

    live = j < count
    compat.when(live & (kind == masks.FULL))(lambda: step(False))
    compat.when(live & (kind == masks.PARTIAL))(lambda: step(True))

    @compat.when(j == compat.num_programs(3) - 1)
    def _finish():
      l = l_sc[...]
      seen = l > 0.0
      inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
      lse_ref[...] = jnp.where(
        seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf
      )

  grid_spec = compat.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, h, nq, _grid_width(meta.kv_count, nk, params)),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=scratch,
  )
  o, lse = compat.pallas_call(
    kernel,
    out_shape=out_shape,
    grid_spec=grid_spec,
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
    interpret=params.interpret,
    name="flash_fwd",
    cost=_cost(q, k, v, 1, 1, [*operands, *out_shape]),
  )(*prefetch, *operands)
  return o, lse[..., 0]


def _ds(params, q, k, v, do, lse, delta, vis):
  """p and dS of one tile (dS w.r.t. the pre-cap scaled logits)."""
  s, t = _logits(params, q, k)
  p = jnp.exp(s - lse)
  if vis is not None:
    p = jnp.where(vis, p, 0.0)  # also clears rows whose lse is -inf
  dp = dot(do, v, NT)
  ds = p * (dp - delta)
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _bwd_dkv(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params):
  b, h, t, kdim = q.shape
  g, s, e = k.shape[1], k.shape[2], v.shape[3]
  group = h // g
  bq, bk = params.block_q, params.block_kv
  nq, nk = t // bq, s // bk
  lists = _Lists(meta.q_count, meta.q_index, meta.q_kind)
  table = _table(params.spec)

  def q_block(bi, gh, kj, qh, i, *refs):
    return lists.at(refs, bi, kj, i)[1]

  def row_spec(shape):  # q-side operand [B, H, T, x]
    return compat.BlockSpec(
      shape,
      lambda bi, gh, kj, qh, i, *r: (
        bi,
        gh * group + qh,
        q_block(bi, gh, kj, qh, i, *r),
        0,
      ),
    )

  def pos_spec():  # q-side per-row [B, T, 1]
    return compat.BlockSpec(
      (None, bq, 1),
      lambda bi, gh, kj, qh, i, *r: (bi, q_block(bi, gh, kj, qh, i, *r), 0),
    )

  def kv_spec(shape):
    return compat.BlockSpec(
      shape, lambda bi, gh, kj, qh, i, *r: (bi, gh, kj, 0)
    )

  def kv_row_spec():
    return compat.BlockSpec(
      (None, 1, bk), lambda bi, gh, kj, qh, i, *r: (bi, 0, kj)
    )

  in_specs = [
    row_spec((None, None, bq, kdim)),
    kv_spec((None, None, bk, kdim)),
    kv_spec((None, None, bk, e)),
    pos_spec(),
    pos_spec(),
    kv_row_spec(),
    kv_row_spec(),
    row_spec((None, None, bq, e)),
    row_spec((None, None, bq, 1)),
    row_spec((None, None, bq, 1)),
  ]
  operands = [
    q,
    k,
    v,
    q_pos[:, :, None],
    q_seg[:, :, None],
    k_pos[:, None, :],
    k_seg[:, None, :],
    do,
    lse[..., None],
    delta[..., None],
  ]
  if table is not None:
    in_specs.append(compat.BlockSpec(table.shape, lambda *_: (0, 0)))
    operands.append(table)
  out_specs = [kv_spec((None, None, bk, kdim)), kv_spec((None, None, bk, e))]
  prefetch, operands = _varying(lists.arrays, operands)
  out_shape = [
    compat.out_struct(k.shape, k.dtype, operands[0]),
    compat.out_struct(v.shape, v.dtype, operands[0]),
  ]
  scratch = [
    compat.vmem((bk, kdim), jnp.float32),
    compat.vmem((bk, e), jnp.float32),
  ]

  def kernel(*refs):
    list_refs, refs = refs[:2], refs[2:]
    (
      q_ref,
      k_ref,
      v_ref,
      qp_ref,
      qs_ref,
      kp_ref,
      ks_ref,
      do_ref,
      lse_ref,
      delta_ref,
    ) = refs[:10]
    table_ref = refs[10] if table is not None else None
    dk_ref, dv_ref, dk_sc, dv_sc = refs[-4:]
    bi, kj, qh, i = (compat.program_id(a) for a in (0, 2, 3, 4))
    count, _, kind = lists.at(list_refs, bi, kj, i)

    @compat.when((qh == 0) & (i == 0))
    def _init():
      dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
      dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
      q_t = q_ref[...]
      vis = None
      if masked:
        vis = _tile_mask(
          params,
          qp_ref[...],
          qs_ref[...],
          kp_ref[...],
          ks_ref[...],
          kj,
          table_ref,
        )
      do_t = do_ref[...]
      p, ds = _ds(
        params,
        q_t,
        k_ref[...],
        v_ref[...],
        do_t,
        lse_ref[...],
        delta_ref[...],
        vis,
      )
      dv_sc[...] += dot(p.astype(do_t.dtype), do_t, TN)
      dk_sc[...] += dot(ds.astype(q_t.dtype), q_t, TN)

    live = i < count
    compat.when(live & (kind == masks.FULL))(lambda: step(False))
    compat.when(live & (kind == masks.PARTIAL))(lambda: step(True))

    @compat.when((qh == group - 1) & (i == compat.num_programs(4) - 1))
    def _finish():
      dk_ref[...] = (dk_sc[...] * params.scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

  grid_spec = compat.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, g, nk, group, _grid_width(meta.q_count, nq, params)),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=scratch,
  )
  return compat.pallas_call(
    kernel,
    out_shape=out_shape,
    grid_spec=grid_spec,
    dimension_semantics=(
      "parallel",
      "parallel",
      "parallel",
      "arbitrary",
      "arbitrary",
    ),
    interpret=params.interpret,
    name="flash_bwd_dkv",
    cost=_cost(q, k, v, 2, 2, [*operands, *out_shape]),
  )(*prefetch, *operands)


def _bwd_dq(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params):
  b, h, t, kdim = q.shape
  bq, bk = params.block_q, params.block_kv
  nq, nk = t // bq, k.shape[2] // bk
  lists = _Lists(meta.kv_count, meta.kv_index, meta.kv_kind)
  in_specs, operands = _q_major_inputs(
    q,
    k,
    v,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    (do, lse[..., None], delta[..., None]),
    lists,
    params,
  )
  prefetch, operands = _varying(lists.arrays, operands)

  def kernel(*refs):
    list_refs, refs = refs[:2], refs[2:]
    (
      q_ref,
      k_ref,
      v_ref,
      qp_ref,
      qs_ref,
      kp_ref,
      ks_ref,
      do_ref,
      lse_ref,
      delta_ref,
    ) = refs[:10]
    table_ref = refs[10] if params.spec.block_mask is not None else None
    dq_ref, dq_sc = refs[-2:]
    bi, i, j = (compat.program_id(a) for a in (0, 2, 3))
    count, kv_idx, kind = lists.at(list_refs, bi, i, j)

    @compat.when(j == 0)
    def _init():
      dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
      k_t = k_ref[...]
      vis = None
      if masked:
        vis = _tile_mask(
          params,
          qp_ref[...],
          qs_ref[...],
          kp_ref[...],
          ks_ref[...],
          kv_idx,
          table_ref,
        )
      _, ds = _ds(
        params,
        q_ref[...],
        k_t,
        v_ref[...],
        do_ref[...],
        lse_ref[...],
        delta_ref[...],
        vis,
      )
      dq_sc[...] += dot(ds.astype(k_t.dtype), k_t, NN)

    live = j < count
    compat.when(live & (kind == masks.FULL))(lambda: step(False))
    compat.when(live & (kind == masks.PARTIAL))(lambda: step(True))

    @compat.when(j == compat.num_programs(3) - 1)
    def _finish():
      dq_ref[...] = (dq_sc[...] * params.scale).astype(dq_ref.dtype)

  grid_spec = compat.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, h, nq, _grid_width(meta.kv_count, nk, params)),
    in_specs=in_specs,
    out_specs=[_q_row_spec((None, None, bq, kdim))],
    scratch_shapes=[compat.vmem((bq, kdim), jnp.float32)],
  )
  out_shape = [compat.out_struct(q.shape, q.dtype, operands[0])]
  (dq,) = compat.pallas_call(
    kernel,
    out_shape=out_shape,
    grid_spec=grid_spec,
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
    interpret=params.interpret,
    name="flash_bwd_dq",
    cost=_cost(q, k, v, 1, 0, [*operands, *out_shape]),
  )(*prefetch, *operands)
  return dq


def flash_bwd(
  q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params
):
  _check_tiles(params, q.shape[2], k.shape[2])
  dk, dv = _bwd_dkv(
    q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params
  )
  dq = _bwd_dq(
    q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params
  )
  return dq, dk, dv
