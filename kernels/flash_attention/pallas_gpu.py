"""Block-sparse flash attention for GPU: Pallas kernels, Triton lowering.

Implements the backend contract of kernels/flash_attention/vjp.py
(`flash_fwd`, `flash_bwd`). On Hopper (sm90), for bf16 / f16 with the tiles
pallas_mgpu.py takes (block_q 64), the Mosaic GPU kernels there run
instead; everything else runs the Triton kernels below.

Letters: B batch, H query heads, G kv heads (Q = H / G query heads per kv
head), T query length, S key length, K q/k head dim, E value head dim.
Layout [B, H, T, K].

Three kernels, FA2 style, all driven by `masks.BlockMetadata`:
  forward  grid (T/bq, B, H): walks the compacted non-empty kv blocks of its
           q block (`kv_index[:kv_count]`), online softmax in f32.
  dK/dV    grid (S/bk, B, G): walks the transposed list (`q_index`) for each
           of the Q query heads of its kv head, so GQA needs no atomics.
  dQ       grid (T/bq, B, H): walks `kv_index` again.
EMPTY tiles are never visited; the element predicate (`masks.element_mask`,
recomputed from positions and segment ids) runs only on PARTIAL tiles.

Why keep a Triton path although JAX marks that lowering deprecated: it
takes any dtype (exact f32 dots), any power-of-two tile and pre-Hopper GPUs,
and it runs in the generic Pallas interpreter, so it is the portable,
well-tested baseline; pallas_mgpu.py is the Hopper fast path.
Triton tensors must have power-of-two sizes, so head dims are zero-padded
to the next power of two here (exact: zero columns add nothing to q.k, and
the extra output columns are zero and sliced off).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels import masks
from kernels.flash_attention import pallas_mgpu
from kernels.flash_attention.tiles import (
  LOG2E,
  NN,
  NT,
  TN,
  dot,
  pow2_tile,
  soft_cap,
)


def _pad_last(x, n):
  if x.shape[-1] == n:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _compiler_params(head_dim):
  # Wider heads need more warps to hold the f32 accumulators in registers.
  return pl_triton.CompilerParams(
    num_warps=4 if head_dim <= 64 else 8, num_stages=2
  )


def _check(q, k, meta, params):
  b, h, t, _ = q.shape
  g, s = k.shape[1], k.shape[2]
  bq, bk = params.block_q, params.block_kv
  if h % g:
    raise ValueError(f"query heads {h} not a multiple of kv heads {g}")
  if t % bq or s % bk:
    raise ValueError(
      f"lengths ({t}, {s}) must be multiples of blocks ({bq}, {bk}); pad first"
    )
  if meta.kind.shape != (b, t // bq, s // bk):
    raise ValueError(
      f"metadata {meta.kind.shape} does not match tiles {(b, t // bq, s // bk)}"
    )
  # NotImplementedError lets kernels.attention fall back to another impl.
  for n in (bq, bk):
    if n < 16 or n & (n - 1):
      raise NotImplementedError(
        f"pallas_gpu (Triton) tiles must be powers of two >= 16; got "
        f"blocks ({bq}, {bk})"
      )


# ------------------------------------------------------------- tile helpers


def _table(spec):
  """block_mask flattened to an int32 operand (None without a block mask);
  pallas_call refuses captured array constants."""
  if spec.block_mask is None:
    return None
  return jnp.asarray(np.asarray(spec.block_mask, np.int32).reshape(-1))


def _gather_lookup(spec, table_ref, q_pos, k_pos):
  """block_mask[q_pos // bq][k_pos // bk]: one gathered load per element
  (the table is tiny and stays in L1); False outside the table."""
  nq, nk = len(spec.block_mask), len(spec.block_mask[0])
  bq, bk = spec.block_mask_sizes
  qb, kb = masks.floordiv(q_pos, bq), masks.floordiv(k_pos, bk)
  inside = (qb >= 0) & (qb < nq) & (kb >= 0) & (kb < nk)
  idx = jnp.clip(qb, 0, nq - 1) * nk + jnp.clip(kb, 0, nk - 1)
  return inside & (table_ref[idx] != 0)


def _logits(q, k, params):
  """Scaled (and soft-capped) logits in log2 units, plus tanh for the vjp."""
  return soft_cap(dot(q, k, NT) * params.scale, params.logits_soft_cap, LOG2E)


def _mask_tile(s, kind, rows, cols, params):
  """Applies the element predicate only when the tile is PARTIAL."""
  q_pos_ref, q_seg_ref, q_start = rows
  k_pos_ref, k_seg_ref, table_ref, k_start = cols
  bq, bk = s.shape
  spec = params.spec

  def masked(s):
    q_pos = q_pos_ref[pl.ds(q_start, bq)]
    q_seg = q_seg_ref[pl.ds(q_start, bq)]
    k_pos = k_pos_ref[pl.ds(k_start, bk)]
    k_seg = k_seg_ref[pl.ds(k_start, bk)]
    sfx = False
    if spec.global_suffix:
      col = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      sfx = (col >= params.suffix_start) & (col < params.kv_len)
    lookup = None
    if table_ref is not None:
      lookup = functools.partial(_gather_lookup, spec, table_ref)
    vis = masks.element_mask(
      spec,
      q_pos[:, None],
      k_pos[None, :],
      q_seg[:, None],
      k_seg[None, :],
      sfx,
      block_lookup=lookup,
    )
    return jnp.where(vis, s, -jnp.inf)

  return lax.cond(kind == masks.PARTIAL, masked, lambda s: s, s)


def _probs(q, k, lse, kind, rows, cols, params):
  """Recomputed p = exp(s - lse) of one tile, and tanh for the soft cap."""
  s, t = _logits(q, k, params)
  s = _mask_tile(s, kind, rows, cols, params)
  # Rows that see no key have lse = -inf and, since they only occur in
  # PARTIAL tiles, every s = -inf: any finite stand-in gives p = 0.
  lse2 = jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E)
  return jnp.exp2(s - lse2[:, None]), t


def _dlogits(p, dp, delta, t):
  """dL/d(scale * q.k): softmax vjp, then the soft cap's tanh derivative."""
  ds = p * (dp - delta[:, None])
  return ds if t is None else ds * (1.0 - t * t)


# ------------------------------------------------------------------ kernels


def _fwd_kernel(
  count_ref,
  index_ref,
  kind_ref,
  q_pos_ref,
  q_seg_ref,
  k_pos_ref,
  k_seg_ref,
  table_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  *,
  params,
):
  bq, bk = params.block_q, params.block_kv
  q = q_ref[...]
  rows = (q_pos_ref, q_seg_ref, pl.program_id(0) * bq)

  def body(j, carry):
    acc, m, l = carry
    k_start = pl.multiple_of(index_ref[j] * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    s, _ = _logits(q, k, params)
    cols = (k_pos_ref, k_seg_ref, table_ref, k_start)
    s = _mask_tile(s, kind_ref[j], rows, cols, params)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row that has seen nothing keeps m = -inf; subtracting 0 instead
    # keeps exp2(-inf - -inf) from making a NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, NN)
    return acc, m_new, l

  init = (
    jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
  )
  acc, m, l = lax.fori_loop(0, count_ref[...], body, init)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) / LOG2E, -jnp.inf)


def _dkdv_kernel(
  count_ref,
  index_ref,
  kind_ref,
  q_pos_ref,
  q_seg_ref,
  k_pos_ref,
  k_seg_ref,
  table_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  params,
):
  bq, bk = params.block_q, params.block_kv
  k = k_ref[...]
  v = v_ref[...]
  cols = (k_pos_ref, k_seg_ref, table_ref, pl.program_id(0) * bk)
  count = count_ref[...]

  def head(qh, carry):  # one query head of this kv head's group
    def body(j, carry):
      dk, dv = carry
      q_start = pl.multiple_of(index_ref[j] * bq, bq)
      rows = pl.ds(q_start, bq)
      q = q_ref[qh, rows, :]
      do = do_ref[qh, rows, :]
      p, t = _probs(
        q,
        k,
        lse_ref[qh, rows],
        kind_ref[j],
        (q_pos_ref, q_seg_ref, q_start),
        cols,
        params,
      )
      dv = dv + dot(p.astype(do.dtype), do, TN)
      ds = _dlogits(p, dot(do, v, NT), delta_ref[qh, rows], t)
      dk = dk + dot(ds.astype(q.dtype), q, TN)
      return dk, dv

    return lax.fori_loop(0, count, body, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, q_ref.shape[0], head, init)
  dk_ref[...] = (dk * params.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
  count_ref,
  index_ref,
  kind_ref,
  q_pos_ref,
  q_seg_ref,
  k_pos_ref,
  k_seg_ref,
  table_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  *,
  params,
):
  bq, bk = params.block_q, params.block_kv
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  rows = (q_pos_ref, q_seg_ref, pl.program_id(0) * bq)

  def body(j, dq):
    k_start = pl.multiple_of(index_ref[j] * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    cols = (k_pos_ref, k_seg_ref, table_ref, k_start)
    p, t = _probs(q, k, lse, kind_ref[j], rows, cols, params)
    ds = _dlogits(p, dot(do, v, NT), delta, t)
    return dq + dot(ds.astype(k.dtype), k, NN)

  dq = lax.fori_loop(0, count_ref[...], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * params.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------- wrappers


def _row_specs(n_blocks, t, s, table):
  """Metadata row of this block, whole position / segment rows, table."""
  table_spec = None
  if table is not None:
    table_spec = pl.BlockSpec(table.shape, lambda i, b, h: (0,))
  return [
    pl.BlockSpec((None, None), lambda i, b, h: (b, i)),
    pl.BlockSpec((None, None, n_blocks), lambda i, b, h: (b, i, 0)),
    pl.BlockSpec((None, None, n_blocks), lambda i, b, h: (b, i, 0)),
    pl.BlockSpec((None, t), lambda i, b, h: (b, 0)),
    pl.BlockSpec((None, t), lambda i, b, h: (b, 0)),
    pl.BlockSpec((None, s), lambda i, b, h: (b, 0)),
    pl.BlockSpec((None, s), lambda i, b, h: (b, 0)),
    table_spec,
  ]


def _q_tile(bq, width):
  return pl.BlockSpec((None, None, bq, width), lambda i, b, h: (b, h, i, 0))


def _kv_whole(s, width, group):
  return pl.BlockSpec(
    (None, None, s, width), lambda i, b, h: (b, h // group, 0, 0)
  )


def _row_tile(bq):
  return pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))


def _compute_capability():
  """sm version of the (possibly abstract, for AOT) target GPU, or None."""
  try:
    return pl_triton.get_gpu_info().compute_capability
  except (ValueError, RuntimeError):  # no GPU, and no abstract one either
    return None


def _use_mosaic(q, v, params, backward):
  if params.interpret:  # interpreted runs test the Triton kernels
    return False
  cc = _compute_capability()
  # wgmma is sm90 only (Blackwell has tcgen05 instead).
  return (
    cc is not None
    and 90 <= cc < 100
    and pallas_mgpu.unsupported(q, v, params, backward=backward) is None
  )


def flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, params):
  """(o [B, H, T, E] in q.dtype, lse [B, H, T] f32); see vjp.py."""
  _check(q, k, meta, params)
  if _use_mosaic(q, v, params, backward=False):
    return pallas_mgpu.flash_fwd(
      q, k, v, q_pos, k_pos, q_seg, k_seg, meta, params
    )
  b, h, t, kdim = q.shape
  g, s, e = v.shape[1], v.shape[2], v.shape[3]
  group, bq = h // g, params.block_q
  kpad, epad = pow2_tile(kdim), pow2_tile(e)
  table = _table(params.spec)
  o, lse = pl.pallas_call(
    functools.partial(_fwd_kernel, params=params),
    grid=(t // bq, b, h),
    in_specs=[
      *_row_specs(s // params.block_kv, t, s, table),
      _q_tile(bq, kpad),
      _kv_whole(s, kpad, group),
      _kv_whole(s, epad, group),
    ],
    out_specs=[_q_tile(bq, epad), _row_tile(bq)],
    out_shape=[
      jax.ShapeDtypeStruct((b, h, t, epad), q.dtype),
      jax.ShapeDtypeStruct((b, h, t), jnp.float32),
    ],
    compiler_params=_compiler_params(max(kpad, epad)),
    interpret=params.interpret,
    name="flash_fwd_gpu",
  )(
    meta.kv_count,
    meta.kv_index,
    meta.kv_kind,
    q_pos,
    q_seg,
    k_pos,
    k_seg,
    table,
    _pad_last(q, kpad),
    _pad_last(k, kpad),
    _pad_last(v, epad),
  )
  return o[..., :e], lse


def flash_bwd(
  q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params
):
  """(dq, dk, dv) like (q, k, v); delta = rowsum(o * do) - dlse."""
  _check(q, k, meta, params)
  if _use_mosaic(q, v, params, backward=True):
    return pallas_mgpu.flash_bwd(
      q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params
    )
  b, h, t, kdim = q.shape
  g, s, e = v.shape[1], v.shape[2], v.shape[3]
  group, bq, bk = h // g, params.block_q, params.block_kv
  kpad, epad = pow2_tile(kdim), pow2_tile(e)
  table = _table(params.spec)
  seqs = (q_pos, q_seg, k_pos, k_seg, table)
  q_, k_, v_, do_ = (
    _pad_last(q, kpad),
    _pad_last(k, kpad),
    _pad_last(v, epad),
    _pad_last(do, epad),
  )
  cparams = _compiler_params(max(kpad, epad))

  # dK/dV: one program per (kv block, batch, kv head), its Q query heads
  # looped inside over whole [Q, T, *] slabs of q, do, lse and delta.
  def slab(width):
    return pl.BlockSpec((None, group, t, width), lambda i, b, h: (b, h, 0, 0))

  def slab_rows():
    return pl.BlockSpec((None, group, t), lambda i, b, h: (b, h, 0))

  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, params=params),
    grid=(s // bk, b, g),
    in_specs=[
      *_row_specs(t // bq, t, s, table),
      slab(kpad),
      _q_tile(bk, kpad),
      _q_tile(bk, epad),
      slab(epad),
      slab_rows(),
      slab_rows(),
    ],
    out_specs=[_q_tile(bk, kpad), _q_tile(bk, epad)],
    out_shape=[
      jax.ShapeDtypeStruct((b, g, s, kpad), k.dtype),
      jax.ShapeDtypeStruct((b, g, s, epad), v.dtype),
    ],
    compiler_params=cparams,
    interpret=params.interpret,
    name="flash_dkdv_gpu",
  )(meta.q_count, meta.q_index, meta.q_kind, *seqs, q_, k_, v_, do_, lse, delta)

  dq = pl.pallas_call(
    functools.partial(_dq_kernel, params=params),
    grid=(t // bq, b, h),
    in_specs=[
      *_row_specs(s // bk, t, s, table),
      _q_tile(bq, kpad),
      _kv_whole(s, kpad, group),
      _kv_whole(s, epad, group),
      _q_tile(bq, epad),
      _row_tile(bq),
      _row_tile(bq),
    ],
    out_specs=_q_tile(bq, kpad),
    out_shape=jax.ShapeDtypeStruct((b, h, t, kpad), q.dtype),
    compiler_params=cparams,
    interpret=params.interpret,
    name="flash_dq_gpu",
  )(
    meta.kv_count,
    meta.kv_index,
    meta.kv_kind,
    *seqs,
    q_,
    k_,
    v_,
    do_,
    lse,
    delta,
  )
  return dq[..., :kdim], dk[..., :kdim], dv[..., :e]
