"""DeepSeek multi-head latent attention (MLA, docs/attention.md).

Keys and values of all heads come from one small latent per token, and
RoPE lives in a separate ("decoupled") part of the query/key head that
every head shares on the key side:

  c_BSC   = RMSNorm(x W_DKV)                   the kv latent
  kr_BSR  = RoPE(x W_KR)                       one rope key, all heads
  k_BSHK  = [c W_UK ; kr]       v_BSHE = c W_UV
  q_BTHK  = [q_nope ; RoPE(q_rope)]            from x W_Q, or through a
                                               normed query latent
  out     = W_O softmax(q k / sqrt(N + R)) v

Dimension letters beyond the house set: C kv latent (kv_lora_rank), Q
query latent (q_lora_rank), N no-rope part of a q/k head, R rope part, so
K = N + R is the q/k head dim the kernel sees and E the value head dim; in
the absorbed form below L = C + R is the width of the one shared key.

Training uses this naive (decompressed) form through `kernels.attention`
as ordinary multi-head attention with q/k head dim K and value head dim E.

Generation (a call with a cache) caches only c and kr, C + R numbers per token and
layer, and uses the absorbed form: W_UK moves to the query side and W_UV
after the softmax,

  q_nope . (c W_UK_h) = (q_nope W_UK_h^T) . c       per head h
  o_h = (sum_s p_s c_s) W_UV_h

so the scores are [q_nope W_UK^T ; q_rope] . [c ; kr] with one key head
of width C + R shared by all query heads, and the values are c itself: a
single `kernels.attention` call (MQA) over the cached rows. Under tensor
parallelism the query heads are split and that one key/value head is
replicated on every shard.

The mask is the layer's ordinary one (`attention.mask_spec`), so MLA
combines with windows and global prefixes; config refuses it for tglobal.
"""

from __future__ import annotations

import math
from typing import NamedTuple, overload

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from efficient_lm.config import AttentionConfig
from efficient_lm.models import cache as cache_lib
from efficient_lm.models.attention import Tokens, cache_slots, mask_spec
from efficient_lm.models.layers import RMSNorm, Rope, param, rope
from efficient_lm.sharding import (
  BS1L,
  BTC,
  BSGK,
  BT,
  BTD,
  BTHK,
  constrain,
  shard_map_by_names,
)


# The cache fields a quantized cache stores as int8 (cache.py).
LATENTS = ("c", "kr")


class MLADims(NamedTuple):
  kv_lora_rank: int  # C
  q_lora_rank: int  # Q; 0 = queries projected from x directly
  rope_head_dim: int  # R
  nope_head_dim: int  # N
  v_head_dim: int  # E


def resolve_dims(cfg: AttentionConfig, head_dim: int) -> MLADims:
  """The MLA widths of `cfg`; a 0 takes DeepSeek-V2's ratio to the model
  head dim K: kv_lora_rank 4K, rope_head_dim K/2, nope_head_dim K,
  v_head_dim K (q_lora_rank 0 stays 0: no query latent)."""
  k = head_dim
  dims = MLADims(
    kv_lora_rank=cfg.kv_lora_rank or 4 * k,
    q_lora_rank=cfg.q_lora_rank,
    rope_head_dim=cfg.rope_head_dim or k // 2,
    nope_head_dim=cfg.nope_head_dim or k,
    v_head_dim=cfg.v_head_dim or k,
  )
  if dims.rope_head_dim % 2 or not dims.rope_head_dim:
    raise ValueError(
      f"MLA rope_head_dim={dims.rope_head_dim} (from head_dim={k}) must be "
      "even and positive for RoPE; set model.attention.rope_head_dim"
    )
  return dims


class MLAttention(nnx.Module):
  """Same constructor and call as `attention.Attention`, plus `norm_eps`
  (the latent RMSNorms). `num_kv_heads` is accepted and ignored: every
  head has its own keys and values, decompressed from the shared latent.
  `head_dim` only sets the widths left at 0 in `cfg` (`resolve_dims`).
  """

  def __init__(
    self,
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rope_theta: float | Rope,
    cfg: AttentionConfig,
    causal: bool,
    rngs: nnx.Rngs,
    param_dtype,
    out_std: float,
    norm_eps: float,
    scale: float | None = None,
    cache_stride: int = 1,
    norm_plus_one: bool = False,
  ):
    del num_kv_heads
    d, h = embed_dim, num_heads
    dims = resolve_dims(cfg, head_dim)
    c, q, r, n, e = dims
    self.dims = dims
    if q:
      self.dq_DQ = param(rngs, (d, q), ("embed", "q_latent"), 0.02, param_dtype)
      self.q_norm = RMSNorm(
        q, eps=norm_eps, param_dtype=param_dtype, plus_one=norm_plus_one
      )
      self.uq_QHK = param(
        rngs,
        (q, h, n + r),
        ("q_latent", "heads", "head_dim"),
        0.02,
        param_dtype,
      )
    else:
      self.q_DHK = param(
        rngs, (d, h, n + r), ("embed", "heads", "head_dim"), 0.02, param_dtype
      )
    self.dkv_DC = param(rngs, (d, c), ("embed", "kv_latent"), 0.02, param_dtype)
    self.kv_norm = RMSNorm(
      c, eps=norm_eps, param_dtype=param_dtype, plus_one=norm_plus_one
    )
    self.kr_DR = param(rngs, (d, r), ("embed", "head_dim"), 0.02, param_dtype)
    self.uk_CHN = param(
      rngs, (c, h, n), ("kv_latent", "heads", "head_dim"), 0.02, param_dtype
    )
    self.uv_CHE = param(
      rngs, (c, h, e), ("kv_latent", "heads", "head_dim"), 0.02, param_dtype
    )
    self.o_HED = param(
      rngs, (h, e, d), ("heads", "head_dim", "embed"), out_std, param_dtype
    )
    self.rope_theta = rope_theta
    self.mask = mask_spec(cfg, causal=causal)
    self.scale = 1.0 / math.sqrt(n + r) if scale is None else scale
    self.soft_cap = cfg.logits_soft_cap
    self.impl = cfg.impl
    self.cfg = cfg
    self.cache_stride = cache_stride  # as attention.Attention's
    self.kv_cache_dtype = "auto"  # as attention.Attention's

  def _queries(self, q: Tokens) -> tuple[jax.Array, jax.Array]:
    """(no-rope part [B, T, H, N], rotated rope part [B, T, H, R])."""
    dt = q.x_BTD.dtype
    if self.dims.q_lora_rank:
      cq_BTQ = jnp.einsum(
        "BTD,DQ->BTQ", q.x_BTD, jnp.asarray(self.dq_DQ[...], dt)
      )
      cq_BTQ = self.q_norm(constrain(cq_BTQ, BTC))
      q_BTHK = jnp.einsum(
        "BTQ,QHK->BTHK", cq_BTQ, jnp.asarray(self.uq_QHK[...], dt)
      )
    else:
      q_BTHK = jnp.einsum(
        "BTD,DHK->BTHK", q.x_BTD, jnp.asarray(self.q_DHK[...], dt)
      )
    n = self.dims.nope_head_dim
    qr_BTHR = rope(q_BTHK[..., n:], q.pos_BT, self.rope_theta)
    return q_BTHK[..., :n], qr_BTHR

  def _latents(self, kv: Tokens) -> tuple[jax.Array, jax.Array]:
    """(normed kv latent c [B, S, C], rotated shared key [B, S, R]): all a
    token contributes to the keys and values of every head."""
    dt = kv.x_BTD.dtype
    c_BSC = jnp.einsum(
      "BSD,DC->BSC", kv.x_BTD, jnp.asarray(self.dkv_DC[...], dt)
    )
    c_BSC = constrain(self.kv_norm(constrain(c_BSC, BTC)), BTC)
    kr_BSR = jnp.einsum(
      "BSD,DR->BSR", kv.x_BTD, jnp.asarray(self.kr_DR[...], dt)
    )
    kr_BSR = rope(kr_BSR[:, :, None, :], kv.pos_BT, self.rope_theta)[:, :, 0]
    return c_BSC, constrain(kr_BSR, BTC)

  def _attend(
    self, q_BTHK, k_BSGK, v_BSGE, q: Tokens, kv_pos_BS, kv_seg_BS, kv_names
  ) -> jax.Array:
    """kernels.attention per shard: the query heads split over `tensor`,
    the key/value heads as `kv_names` say -> [B, T, H, E]."""

    def attend(q_BTHK, k_BSGK, v_BSGE, q_pos, k_pos, q_seg, k_seg):
      return kernels.attention(
        q_BTHK,
        k_BSGK,
        v_BSGE,
        mask=self.mask,
        q_pos=q_pos,
        k_pos=k_pos,
        q_segment_ids=q_seg,
        kv_segment_ids=k_seg,
        scale=self.scale,
        logits_soft_cap=self.soft_cap,
        impl=self.impl,
      )

    return shard_map_by_names(
      attend, (BTHK, kv_names, kv_names, BT, BT, BT, BT), BTHK
    )(q_BTHK, k_BSGK, v_BSGE, q.pos_BT, kv_pos_BS, q.seg_BT, kv_seg_BS)

  @staticmethod
  def projection_flops(
    embed_dim: int, num_heads: int, dims: MLADims
  ) -> tuple[float, float]:
    """Matmul FLOPs of training's naive form (per query token: the query
    path and the output projection; per key token: every token's latent
    decompressed into the keys and values of all heads, and the shared
    rope key)."""
    d, h = embed_dim, num_heads
    c, q, r, n, e = dims
    query = d * q + q * h * (n + r) if q else d * h * (n + r)
    return 2.0 * (query + h * e * d), 2.0 * (d * (c + r) + c * h * (n + e))

  @overload
  def __call__(
    self, q: Tokens, kv: Tokens | None = None, *, cache: None = None
  ) -> jax.Array: ...

  @overload
  def __call__(
    self, q: Tokens, kv: Tokens | None = None, *, cache: dict
  ) -> tuple[jax.Array, dict]: ...

  def __call__(
    self, q: Tokens, kv: Tokens | None = None, *, cache: dict | None = None
  ):
    """As `attention.Attention.__call__`: training runs the naive
    (decompressed) form; with `cache` (generation) the absorbed form over
    the cached latents, returning (out, new cache)."""
    if cache is not None:
      if kv is not None:
        raise ValueError("MLA generation is self-attention only (kv=None)")
      return self._absorbed(q, cache)
    kv = q if kv is None else kv
    dt = q.x_BTD.dtype
    qn_BTHN, qr_BTHR = self._queries(q)
    q_BTHK = constrain(jnp.concatenate([qn_BTHN, qr_BTHR], axis=-1), BTHK)
    # What a cache would store of these tokens, read back (cache.py).
    stored = self._stored(kv, *self._latents(kv))
    c_BSC, kr_BSR = stored["c"], stored["kr"]
    kn_BSHN = jnp.einsum(
      "BSC,CHN->BSHN", c_BSC, jnp.asarray(self.uk_CHN[...], dt)
    )
    v_BSHE = jnp.einsum(
      "BSC,CHE->BSHE", c_BSC, jnp.asarray(self.uv_CHE[...], dt)
    )
    kr_BSHR = jnp.broadcast_to(
      kr_BSR[:, :, None, :], kn_BSHN.shape[:3] + kr_BSR.shape[-1:]
    )
    k_BSHK = constrain(jnp.concatenate([kn_BSHN, kr_BSHR], axis=-1), BSGK)
    o_BTHE = self._attend(
      q_BTHK, k_BSHK, constrain(v_BSHE, BSGK), q, kv.pos_BT, kv.seg_BT, BSGK
    )
    out = jnp.einsum("BTHE,HED->BTD", o_BTHE, jnp.asarray(self.o_HED[...], dt))
    return constrain(out, BTD)

  # -------------------------------------------------------------- generation

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Empty rows of the normed latent c [C] and the rotated shared key kr
    [R], laid out by `attention.cache_slots` (rolling for windows)."""
    return cache_lib.empty(
      cache_slots(self.cfg, max_len, stride=self.cache_stride),
      batch,
      self._latent_fields(dtype),
    )

  def _latent_fields(self, dtype) -> dict:
    """c [C] and kr [R] stored as kv_cache_dtype says (int8: one scale
    each per token: the latent is shared by every head)."""
    c, r = self.dims.kv_lora_rank, self.dims.rope_head_dim
    shapes = {"c": (c,), "kr": (r,)}
    return cache_lib.kv_fields(shapes, self.kv_cache_dtype, dtype)

  def _new_rows(self, kv: Tokens, c_BSC, kr_BSR) -> dict:
    """The latent rows of `kv` as the cache stores them."""
    new = {
      "c": c_BSC,
      "kr": kr_BSR,
      "pos": kv.pos_BT.astype(jnp.int32),
      "seg": kv.seg_BT.astype(jnp.int32),
    }
    return cache_lib.store(new, LATENTS, self.kv_cache_dtype)

  def _stored(self, kv: Tokens, c_BSC, kr_BSR) -> dict:
    """The latents a cached step would read for these rows (identity under
    kv_cache_dtype `auto`)."""
    return cache_lib.load(
      self._new_rows(kv, c_BSC, kr_BSR),
      LATENTS,
      self.kv_cache_dtype,
      c_BSC.dtype,
    )

  def _absorbed(self, x: Tokens, cache: dict) -> tuple[jax.Array, dict]:
    """T new tokens over the cache and themselves, in the absorbed form
    (module docstring); equals the naive form on the whole sequence."""
    slots = cache_slots(
      self.cfg, None, num_slots=cache["pos"].shape[1], stride=self.cache_stride
    )
    dt = x.x_BTD.dtype
    qn_BTHN, qr_BTHR = self._queries(x)
    new = self._new_rows(x, *self._latents(x))
    read, written = cache_lib.step(cache, new, slots)
    rows = cache_lib.load(read, LATENTS, self.kv_cache_dtype, dt)
    qc_BTHC = jnp.einsum(
      "BTHN,CHN->BTHC", qn_BTHN, jnp.asarray(self.uk_CHN[...], dt)
    )
    q_BTHL = constrain(jnp.concatenate([qc_BTHC, qr_BTHR], axis=-1), BTHK)
    c_BSC = constrain(rows["c"].astype(dt), BTC)
    k_BS1L = jnp.concatenate([c_BSC, rows["kr"].astype(dt)], axis=-1)
    o_BTHC = self._attend(
      q_BTHL,
      k_BS1L[:, :, None],
      c_BSC[:, :, None],
      x,
      rows["pos"],
      rows["seg"],
      BS1L,
    )
    o_BTHE = jnp.einsum(
      "BTHC,CHE->BTHE", o_BTHC, jnp.asarray(self.uv_CHE[...], dt)
    )
    out = jnp.einsum("BTHE,HED->BTD", o_BTHE, jnp.asarray(self.o_HED[...], dt))
    return constrain(out, BTD), written

  def cache_bytes_per_token(self, dtype) -> int:
    """The latent and the shared RoPE key: C + R elements (docs/attention.md,
    MLA), whatever the number of heads, in the stored dtype, plus int8's
    two scales: measured from the fields of one cached row."""
    return cache_lib.row_nbytes(
      jax.eval_shape(
        lambda: cache_lib.empty(
          cache_lib.Slots(num_slots=1), 1, self._latent_fields(dtype)
        )
      )
    )
