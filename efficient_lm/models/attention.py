"""MHA / GQA / MQA attention projections around `kernels.attention`.

The attention math (masking, softmax, blockwise kernels) lives in `kernels/`;
this module only projects, applies RoPE on explicit positions and builds the
static mask spec from the layer's attention spec.

Queries and keys/values come from separate inputs with their own positions
and segment ids (`kv=None` means self-attention): pooled queries over an
unpooled sequence, cached keys and appended summary keys all use this.
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
from efficient_lm.models.layers import RMSNorm, Rope, param, rope
from efficient_lm.sharding import (
  BSGK,
  BT,
  BTD,
  BTHK,
  constrain,
  shard_map_by_names,
)


# The fields of a K/V row a cache may quantize (pos / seg stay int32).
KV = ("k", "v")


class Tokens(NamedTuple):
  """A sequence that attention reads: activations and where they sit. T is
  the rows of this sequence, whatever they stand for (tokens, pooled rows
  of a funnel stage, hourglass slots: their positions say where)."""

  x_BTD: jax.Array
  pos_BT: jax.Array
  seg_BT: jax.Array


def mask_spec(cfg: AttentionConfig, *, causal: bool) -> kernels.MaskSpec:
  """The mask of one layer; windows count tokens including self (and, in a
  bidirectional layer, as many after as before).

  global_local and block_sparse: the first num_global positions of each
  document are global (Longformer, docs/attention.md): every token sees them
  and, bidirectional, they see every token (kernels.masks: global rows); a
  causal global token sees only itself and earlier tokens, like any other.

  block_sparse (BigBird, docs/attention.md): the window and the num_global
  prefix, OR'd with a static table of random key blocks of block_size per
  query block, over ceil(max_len / block_size) blocks; positions past it
  are an error (kernels.attention, masks.block_mask_coverage). Every head
  and every layer of that kind share the one table of random_seed.
  """
  if cfg.kind == "dense":
    return kernels.MaskSpec(causal=causal)
  left = cfg.window - 1
  window = (left, 0 if causal else left)
  if cfg.kind == "sliding_window":
    return kernels.MaskSpec(causal=causal, window=window)
  if cfg.kind == "global_local":
    return kernels.MaskSpec(
      causal=causal, window=window, global_prefix=cfg.num_global
    )
  if cfg.kind == "block_sparse":
    n = -(-cfg.max_len // cfg.block_size)
    table = kernels.masks.bigbird_block_table(
      n,
      num_random_blocks=cfg.num_random_blocks,
      seed=cfg.random_seed,
      causal=causal,
    )
    return kernels.MaskSpec(
      causal=causal,
      window=window,
      global_prefix=cfg.num_global,
      block_mask=table,
      block_mask_sizes=(cfg.block_size,) * 2,
    )
  raise ValueError(f"attention.kind={cfg.kind!r} is not supported")


def cache_slots(
  cfg: AttentionConfig,
  max_len: int | None,
  *,
  num_slots: int | None = None,
  stride: int = 1,
) -> cache_lib.Slots:
  """Where a layer of this kind keeps its generation cache: a rolling
  buffer of `window` rows (after `num_global` prefix rows) for the local
  kinds, a full cache of `max_len` rows otherwise (max_len / stride when
  the layer's tokens sit `stride` positions apart). `num_slots` (an
  existing cache's size) stands in for max_len."""
  prefix = {"sliding_window": 0, "global_local": cfg.num_global}.get(cfg.kind)
  if num_slots is not None:
    if prefix is None:
      return cache_lib.Slots(num_slots=num_slots, stride=stride)
    return cache_lib.Slots.rolling(num_slots - prefix, prefix=prefix)
  if max_len is None:
    raise TypeError("cache_slots needs max_len or num_slots")
  if prefix is None:
    return cache_lib.Slots.full(max_len, stride)
  # No more rows than the sequence can have.
  return cache_lib.Slots.rolling(
    min(cfg.window, max(max_len - prefix, 1)), prefix=prefix
  )


class Attention(nnx.Module):
  """Projections, RoPE and `kernels.attention`: one call path for training,
  prefill and decode (see `__call__`)."""

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
    scale: float | None = None,
    cache_stride: int = 1,
    norm_eps: float = 1e-6,
    norm_plus_one: bool = False,
  ):
    """`rope_theta`: the RoPE base, or a `Rope` with its scaling;
    `norm_eps` / `norm_plus_one`: the q/k norms' (cfg.qk_norm)."""
    d, h, g, k = embed_dim, num_heads, num_kv_heads, head_dim
    self.q_DHK = param(
      rngs, (d, h, k), ("embed", "heads", "head_dim"), 0.02, param_dtype
    )
    self.k_DGK = param(
      rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), 0.02, param_dtype
    )
    self.v_DGK = param(
      rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), 0.02, param_dtype
    )
    self.o_HKD = param(
      rngs, (h, k, d), ("heads", "head_dim", "embed"), out_std, param_dtype
    )

    # Qwen2: q/k/v biases (zero-initialised; never weight-decayed: their
    # last axis is "bias", training/optim.decays).
    def bias(shape, axes):
      if not cfg.qkv_bias:
        return None
      return nnx.Param(jnp.zeros(shape, param_dtype), logical_axes=axes)

    self.q_bias_HK = bias((h, k), ("heads", "bias"))
    self.k_bias_GK = bias((g, k), ("kv_heads", "bias"))
    self.v_bias_GK = bias((g, k), ("kv_heads", "bias"))
    # Qwen3 / Gemma 3: per-head RMSNorm of q and k over head_dim, before
    # RoPE.
    norm = lambda: (
      RMSNorm(k, eps=norm_eps, param_dtype=param_dtype, plus_one=norm_plus_one)
      if cfg.qk_norm
      else None
    )
    self.q_norm = norm()
    self.k_norm = norm()
    self.rope_theta = rope_theta
    self.mask = mask_spec(cfg, causal=causal)
    if scale is None:
      # Gemma: query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
      base = cfg.query_pre_attn_scalar or k
      scale = 1.0 / math.sqrt(base)
    self.scale = scale
    self.soft_cap = cfg.logits_soft_cap
    self.impl = cfg.impl
    self.cfg = cfg
    # Positions between this layer's rows (the layer plan's stride): the
    # full generation cache keeps one slot per row.
    self.cache_stride = cache_stride
    # How K/V rows are stored (cache.KV_CACHE_DTYPES): a generation-time
    # choice (models.set_kv_cache_dtype), not a config key; when not
    # `auto`, every forward reads its K/V through that storage
    # (cache.store / cache.load), with a cache or without.
    self.kv_cache_dtype = "auto"

  @staticmethod
  def projection_flops(
    embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int
  ) -> tuple[float, float]:
    """Matmul FLOPs (per query token: q and output projections, per key
    token: k and v)."""
    d, h, g, k = embed_dim, num_heads, num_kv_heads, head_dim
    return 2.0 * d * h * k * 2, 2.0 * d * g * k * 2

  def queries(self, q: Tokens) -> jax.Array:
    """RoPE'd queries [B, T, H, K]."""
    dt = q.x_BTD.dtype
    q_BTHK = jnp.einsum(
      "BTD,DHK->BTHK", q.x_BTD, jnp.asarray(self.q_DHK[...], dt)
    )
    if self.q_bias_HK is not None:
      q_BTHK = q_BTHK + self.q_bias_HK[...].astype(dt)[None, None]
    if self.q_norm is not None:
      q_BTHK = self.q_norm(q_BTHK)
    return constrain(rope(q_BTHK, q.pos_BT, self.rope_theta), BTHK)

  def kv_rows(self, kv: Tokens) -> dict:
    """The key/value rows of `kv`: RoPE'd k and v [B, S, G, K] with their
    positions and segments (the cache's fields, models/cache.py)."""
    dt = kv.x_BTD.dtype
    k_BSGK = jnp.einsum(
      "BSD,DGK->BSGK", kv.x_BTD, jnp.asarray(self.k_DGK[...], dt)
    )
    v_BSGK = jnp.einsum(
      "BSD,DGK->BSGK", kv.x_BTD, jnp.asarray(self.v_DGK[...], dt)
    )
    if self.k_bias_GK is not None and self.v_bias_GK is not None:
      k_BSGK = k_BSGK + self.k_bias_GK[...].astype(dt)[None, None]
      v_BSGK = v_BSGK + self.v_bias_GK[...].astype(dt)[None, None]
    if self.k_norm is not None:
      k_BSGK = self.k_norm(k_BSGK)
    return {
      "k": constrain(rope(k_BSGK, kv.pos_BT, self.rope_theta), BSGK),
      "v": constrain(v_BSGK, BSGK),
      "pos": kv.pos_BT.astype(jnp.int32),
      "seg": kv.seg_BT.astype(jnp.int32),
    }

  def stored_rows(self, kv: Tokens, cache: dict | None = None):
    """(the new rows of `kv` as the cache stores them, the rows attention
    reads: the cache's and the new ones (`cache.step`), loaded in the
    compute dtype, the cache after the step: None without one). With
    kv_cache_dtype `auto` the first two are `kv_rows(kv)` (after the
    cache's); otherwise a forward without a cache reads its K/V through
    the same storage as a cached step (models/cache.py)."""
    new = cache_lib.store(self.kv_rows(kv), KV, self.kv_cache_dtype)
    rows, written = new, None
    if cache is not None:
      rows, written = cache_lib.step(cache, new, self._slots(cache))
    dt = kv.x_BTD.dtype
    return new, cache_lib.load(rows, KV, self.kv_cache_dtype, dt), written

  def _attend(
    self,
    q_BTHK,
    k_BSGK,
    v_BSGK,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    *,
    mask: kernels.MaskSpec | None = None,
  ):
    """Masked attention (the layer's mask unless `mask` is given) and the
    output projection -> [B, T, D]."""
    mask = self.mask if mask is None else mask

    def attend(q_BTHK, k_BSGK, v_BSGK, q_pos, k_pos, q_seg, k_seg):
      return kernels.attention(
        q_BTHK,
        k_BSGK,
        v_BSGK,
        mask=mask,
        q_pos=q_pos,
        k_pos=k_pos,
        q_segment_ids=q_seg,
        kv_segment_ids=k_seg,
        scale=self.scale,
        logits_soft_cap=self.soft_cap,
        impl=self.impl,
      )

    o_BTHK = shard_map_by_names(
      attend, (BTHK, BSGK, BSGK, BT, BT, BT, BT), BTHK
    )(q_BTHK, k_BSGK, v_BSGK, q_pos, k_pos, q_seg, k_seg)
    dt = o_BTHK.dtype
    out = jnp.einsum("BTHK,HKD->BTD", o_BTHK, jnp.asarray(self.o_HKD[...], dt))
    return constrain(out, BTD)

  @overload
  def __call__(
    self,
    q: Tokens,
    kv: Tokens | None = None,
    *,
    cache: None = None,
    rows: dict | None = None,
  ) -> jax.Array: ...

  @overload
  def __call__(
    self,
    q: Tokens,
    kv: Tokens | None = None,
    *,
    cache: dict,
    rows: dict | None = None,
  ) -> tuple[jax.Array, dict]: ...

  def __call__(
    self,
    q: Tokens,
    kv: Tokens | None = None,
    *,
    cache: dict | None = None,
    rows: dict | None = None,
  ):
    """Queries `q` attend over the keys/values of `kv` (None: q itself),
    the mask deciding what each query sees -> [B, T, D].

    With `cache` (generation) the keys are the cache's rows, then the new
    tokens' own (so a prefill is this call on an empty cache), the new
    rows are written into it, and the call returns (out, new cache); see
    models/cache.py. `rows` (from `kv_rows`, optionally after a cache's
    rows) replaces the projected keys/values: mixture-of-recursions'
    recursive sharing attends later steps over the first step's rows."""
    if rows is not None and cache is not None:
      raise ValueError("attention: pass a cache or given rows, not both")
    written = None
    if rows is None:
      _, rows, written = self.stored_rows(q if kv is None else kv, cache)
    out = self._attend(
      self.queries(q),
      constrain(rows["k"], BSGK),
      constrain(rows["v"], BSGK),
      q.pos_BT,
      rows["pos"],
      q.seg_BT,
      rows["seg"],
    )
    if cache is None:
      return out
    assert written is not None  # a cache comes without given rows (above)
    return out, written

  # -------------------------------------------------------------- generation

  def _slots(self, cache: dict) -> cache_lib.Slots:
    return cache_slots(
      self.cfg, None, num_slots=cache["pos"].shape[1], stride=self.cache_stride
    )

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Empty K/V rows (kv heads only) laid out by `cache_slots`."""
    return cache_lib.empty(
      cache_slots(self.cfg, max_len, stride=self.cache_stride),
      batch,
      self._kv_fields(dtype),
    )

  def _kv_fields(self, dtype) -> dict:
    """K and V [G, K] of the kv heads, stored as kv_cache_dtype says
    (`auto`: `dtype`; int8: plus a scale per token and head)."""
    g, k = self.k_DGK.shape[1:]
    shapes = {"k": (g, k), "v": (g, k)}
    return cache_lib.kv_fields(shapes, self.kv_cache_dtype, dtype)

  def cache_bytes_per_token(self, dtype) -> int:
    """K and V of the kv heads, 2 * G * K elements (docs/attention.md),
    in the stored dtype, plus int8's 2 * G scales: measured from the
    fields of one cached row."""
    return cache_lib.row_nbytes(
      jax.eval_shape(
        lambda: cache_lib.empty(
          cache_lib.Slots(num_slots=1), 1, self._kv_fields(dtype)
        )
      )
    )
