"""The blockwise (FlashAttention-2) algorithm in plain XLA ops: "xla_chunked".

Implements the backend contract of vjp.py, like pallas_tpu.py and
pallas_gpu.py, and runs anywhere XLA does (it is the CPU path past
ops.DENSE_MAX_PAIRS and the fallback of "auto" when a Pallas backend refuses
a case). Each query tile loops over its compacted list of non-EMPTY key
tiles from `masks.block_metadata`, so a sliding window or a sparse pattern
costs about its visible tiles, and memory stays linear in T and S.

Each loop runs only as long as its tile list (a data-dependent trip count),
so the backward pass is written out, FlashAttention-2 style, not derived by
autodiff: dQ walks each query tile's key list, dK / dV each key tile's
query list (the transposed metadata). Hence reverse mode only (jax.grad,
jax.vjp) under vjp.py's custom_vjp; jax.jvp / jax.jacfwd need "xla".

Layout as vjp.py hands it over: q [B, H, T, K], k [B, G, S, K],
v [B, G, S, E], T and S multiples of params.block_q / block_kv. Tiles are
gathered per batch row (each row walks its own list); a loop runs max over
rows of the list length, and a row whose list has ended masks the repeated
last tile whole. Everything is computed in f32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import compat, masks
from kernels.flash_attention.tiles import soft_cap

_HI = jax.lax.Precision.HIGHEST


def _tiles(x, n, axis):
  """Splits `axis` into (n, size / n) and moves the n axis to position 1."""
  shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1 :]
  return jnp.moveaxis(x.reshape(shape), axis, 1)


class _Tiled(NamedTuple):
  """Per-row tile stacks: [B, N, ...] (N = number of tiles)."""

  x: jax.Array  # q [B, NQ, G, Q, bq, K] / k [B, NK, G, bk, K]
  pos: jax.Array  # [B, N, tile]
  seg: jax.Array  # [B, N, tile]


def _split(q, k, v, q_pos, k_pos, q_seg, k_seg, params):
  b, h, t, kd = q.shape
  g = k.shape[1]
  nq, nk = t // params.block_q, k.shape[2] // params.block_kv
  q6 = _tiles(q.reshape(b, g, h // g, t, kd), nq, 3)  # [B, NQ, G, Q, bq, K]
  qt = _Tiled(q6, _tiles(q_pos, nq, 1), _tiles(q_seg, nq, 1))
  kt = _Tiled(_tiles(k, nk, 2), _tiles(k_pos, nk, 1), _tiles(k_seg, nk, 1))
  return qt, kt, _tiles(v, nk, 2)


def _suffix_tiles(params, nk):
  """Bool [NK, bk]: transient-global key columns (vjp.py's contract)."""
  col = np.arange(nk * params.block_kv).reshape(nk, params.block_kv)
  return jnp.asarray((col >= params.suffix_start) & (col < params.kv_len))


def _probs(params, q_BGQtK, k_BGsK, vis_Bts, lse_BGQt=None):
  """Masked logits (lse None) or probabilities exp(s - lse) of one tile
  [B, G, Q, t, s], and the soft cap's tanh (None without a cap)."""
  s = (
    jnp.einsum("BGQTK,BGSK->BGQTS", q_BGQtK, k_BGsK, precision=_HI)
    * params.scale
  )
  s, tanh = soft_cap(s, params.logits_soft_cap)
  vis = vis_Bts[:, None, None]
  if lse_BGQt is None:
    return jnp.where(vis, s, -jnp.inf), tanh
  lse = jnp.where(jnp.isfinite(lse_BGQt), lse_BGQt, 0.0)[..., None]
  return jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0) - lse), 0.0), tanh


def _tile_mask(params, sfx_NC, qp, qs, kp, ks, k_idx_B, live_B):
  vis = masks.element_mask(
    params.spec,
    qp[:, :, None],
    kp[:, None, :],
    qs[:, :, None],
    ks[:, None, :],
    sfx_NC[k_idx_B][:, None, :],
  )
  return vis & live_B[:, None, None]


def _walk(count_B, body, init):
  """body(j, carry) for j < max(count_B): the rows' list lengths."""
  return jax.lax.fori_loop(0, jnp.max(count_B), body, init)


def flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, params):
  """vjp.py backend forward: (o [B, H, T, E] in q.dtype, lse [B, H, T])."""
  b, h, t, _ = q.shape
  e = v.shape[-1]
  qt, kt, v_tiles = _split(q, k, v, q_pos, k_pos, q_seg, k_seg, params)
  sfx_NC = _suffix_tiles(params, kt.x.shape[1])
  rows = jnp.arange(b)

  def query_tile(i):
    q_t = qt.x[:, i].astype(jnp.float32)  # [B, G, Q, bq, K]
    qp, qs = qt.pos[:, i], qt.seg[:, i]
    count_B, index_BN = meta.kv_count[:, i], meta.kv_index[:, i]

    def step(j, carry):
      m, l, acc = carry
      kb = index_BN[:, j]
      vis = _tile_mask(
        params,
        sfx_NC,
        qp,
        qs,
        kt.pos[rows, kb],
        kt.seg[rows, kb],
        kb,
        j < count_B,
      )
      s, _ = _probs(params, q_t, kt.x[rows, kb].astype(jnp.float32), vis)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
      p = jnp.exp(s - m_safe[..., None])
      acc = alpha[..., None] * acc + jnp.einsum(
        "BGQTS,BGSE->BGQTE",
        p,
        v_tiles[rows, kb].astype(jnp.float32),
        precision=_HI,
      )
      return m_new, alpha * l + jnp.sum(p, axis=-1), acc

    shape = q_t.shape[:-1]
    init = compat.varying_like(
      (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (e,), jnp.float32),
      ),
      q_t,
      k,
      v,
      qp,
      qs,
      k_pos,
      k_seg,
      count_B,
      index_BN,
    )
    m, l, acc = _walk(count_B, step, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    lse = jnp.where(
      l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_safe), -jnp.inf
    )
    return acc / l_safe[..., None], lse

  o, lse = jax.lax.map(query_tile, jnp.arange(qt.x.shape[1]))
  # [NQ, B, G, Q, bq, ...] -> [B, H, T, ...]
  o = jnp.moveaxis(o, 0, 3).reshape(b, h, t, e)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, h, t)
  return o.astype(q.dtype), lse


def flash_bwd(
  q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params
):
  """vjp.py backend backward: dq over each query tile's key list, dk / dv
  over each key tile's query list (the transposed metadata)."""
  b, h, t, kd = q.shape
  g, s, e = k.shape[1], k.shape[2], v.shape[-1]
  qt, kt, v_tiles = _split(q, k, v, q_pos, k_pos, q_seg, k_seg, params)
  nq, nk = qt.x.shape[1], kt.x.shape[1]
  sfx_NC = _suffix_tiles(params, nk)
  rows = jnp.arange(b)
  f32 = lambda x: x.astype(jnp.float32)
  # Per-row query-side stacks [B, NQ, G, Q, bq, ...] like qt.x.
  do_t = _tiles(do.reshape(b, g, h // g, t, e), nq, 3)
  lse_t = _tiles(lse.reshape(b, g, h // g, t), nq, 3)
  delta_t = _tiles(delta.reshape(b, g, h // g, t), nq, 3)

  def ds_of(p, tanh, do_c, v_c, delta_c):
    """dL/d(scaled logits before the cap) of one tile."""
    dp = jnp.einsum("BGQTE,BGSE->BGQTS", do_c, v_c, precision=_HI)
    ds = p * (dp - delta_c[..., None])
    return ds if tanh is None else ds * (1.0 - tanh * tanh)

  def dq_tile(i):
    q_c, do_c = f32(qt.x[:, i]), f32(do_t[:, i])
    lse_c, delta_c = lse_t[:, i], delta_t[:, i]
    count_B, index_BN = meta.kv_count[:, i], meta.kv_index[:, i]

    def step(j, dq):
      kb = index_BN[:, j]
      k_c = f32(kt.x[rows, kb])
      vis = _tile_mask(
        params,
        sfx_NC,
        qt.pos[:, i],
        qt.seg[:, i],
        kt.pos[rows, kb],
        kt.seg[rows, kb],
        kb,
        j < count_B,
      )
      p, tanh = _probs(params, q_c, k_c, vis, lse_c)
      ds = ds_of(p, tanh, do_c, f32(v_tiles[rows, kb]), delta_c)
      return dq + jnp.einsum("BGQTS,BGSK->BGQTK", ds, k_c, precision=_HI)

    init = compat.varying_like(
      jnp.zeros(q_c.shape, jnp.float32), q, k, v, do, lse, count_B
    )
    return _walk(count_B, step, init) * params.scale

  def dkv_tile(c):
    k_c, v_c = f32(kt.x[:, c]), f32(v_tiles[:, c])
    kp, ks = kt.pos[:, c], kt.seg[:, c]
    count_B, index_BN = meta.q_count[:, c], meta.q_index[:, c]
    kb = jnp.full((b,), c, jnp.int32)

    def step(j, carry):
      dk, dv = carry
      qb = index_BN[:, j]
      q_c, do_c = f32(qt.x[rows, qb]), f32(do_t[rows, qb])
      vis = _tile_mask(
        params,
        sfx_NC,
        qt.pos[rows, qb],
        qt.seg[rows, qb],
        kp,
        ks,
        kb,
        j < count_B,
      )
      p, tanh = _probs(params, q_c, k_c, vis, lse_t[rows, qb])
      ds = ds_of(p, tanh, do_c, v_c, delta_t[rows, qb])
      dv = dv + jnp.einsum("BGQTS,BGQTE->BGSE", p, do_c, precision=_HI)
      dk = dk + jnp.einsum("BGQTS,BGQTK->BGSK", ds, q_c, precision=_HI)
      return dk, dv

    init = compat.varying_like(
      (jnp.zeros(k_c.shape, jnp.float32), jnp.zeros(v_c.shape, jnp.float32)),
      q,
      k,
      v,
      do,
      lse,
      count_B,
    )
    dk, dv = _walk(count_B, step, init)
    return dk * params.scale, dv

  dq = jax.lax.map(dq_tile, jnp.arange(nq))  # [NQ, B, G, Q, bq, K]
  dq = jnp.moveaxis(dq, 0, 3).reshape(b, h, t, kd)
  dk, dv = jax.lax.map(dkv_tile, jnp.arange(nk))  # [NK, B, G, bk, ...]
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, g, s, kd)
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, g, s, e)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
