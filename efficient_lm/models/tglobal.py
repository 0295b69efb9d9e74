"""LongT5 transient-global attention (docs/attention.md): a sliding window plus
one summary key per completed block of `tglobal_block` tokens.

Every call builds, from the layer's normalised input x, one summary per
complete block of each document: g = RMSNorm(sum of the block's x), with its
own RMSNorm scale. The summaries go through the layer's own K and V
projections and are appended as extra keys after the ordinary ones, so one
softmax covers local || global (`kernels.MaskSpec(global_suffix=n)`: suffix
keys skip the window but keep the segment and causal rules on their own
positions). Nothing is kept across calls ("transient").

Blocks come from positions: token (seg, pos) is in block pos // k of its
segment. A block is complete when all k of its positions are present in the
call (its tokens are counted; positions are unique within a segment), so
packed documents never share a summary and padding (segment 0) is in none.
- Causal (decoders, flaxformer's causal form): summary j sits at position
  (j + 1) * k, so the causal rule lets a token of block b see exactly the
  summaries j < b of its document. Its own block's summary would leak up to
  k - 1 later tokens; the trailing partial block ("orphans") is not
  summarised.
- Bidirectional (encoders, LongT5): every token sees every summary of its
  document; orphan tokens (those of incomplete blocks) are adopted into the
  last complete block of their document (flaxformer's adopt_orphan_tokens);
  a document shorter than k has no summary.

Static number of summary keys: complete blocks are disjoint sets of k
tokens, so a call over T tokens has at most T // k of them, however the
documents are packed or where they start; slots past the complete blocks of
a row are empty (segment 0, invisible to every query).

Positions of summary keys (also their RoPE positions): causal (j + 1) * k,
the first position allowed to see it; bidirectional j * k + k // 2, the
block's middle. We use RoPE at that position instead of LongT5's side
relative-position bias (bucketed global index - block id): the model has no
bias tables, the rotation already makes the query-summary logit depend on
the token's distance to the block, and the blockwise kernels take no bias.

Generation (causal layers, docs/attention.md): the cache holds the window's
K/V rows (a rolling buffer, like a sliding-window layer), the K/V of every
completed block's summary, and the running float32 sum and token count of
the current partial block. A step treats that partial block as one extra
input row standing for its tokens, so a block that completes during the
step is summarised exactly as in the full forward.

Funnel encoder (models/funnel.py): in a pooled stage each row stands for
`stride` = factor**stage positions, so a row weighs `stride` tokens and a
block of tglobal_block positions is complete when its rows cover it
(config: tglobal_block a multiple of every stage's stride). The first
layer of a pooled stage passes pooled queries and `kv` = the previous
stage's rows (bidirectional only): summaries come from the keys' side.

Inside a routed (MoD / MoR) block only blocks whose k tokens were all
routed would be summarised (docs/attention.md); that composition is not
supported yet.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, overload

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from efficient_lm.config import AttentionConfig
from efficient_lm.models import cache as cache_lib
from efficient_lm.models.attention import KV, Attention, Tokens, cache_slots
from efficient_lm.models.attention import mask_spec as local_mask_spec
from efficient_lm.models.layers import RMSNorm, Rope
from efficient_lm.sharding import BSGK, constrain
from kernels.masks import floordiv


def mask_spec(
  cfg: AttentionConfig, *, causal: bool, num_summaries: int
) -> kernels.MaskSpec:
  """The sliding-window layer's mask with the last `num_summaries` keys
  global."""
  local = local_mask_spec(_local(cfg), causal=causal)
  return dataclasses.replace(local, global_suffix=num_summaries)


class Summaries(NamedTuple):
  """Where each token's input is summed, and the summary keys' rows.

  slot_BT: the summary slot a token adds to, -1 for none (padding, causal
  orphans, documents without a complete block). pos_BN, seg_BN: position
  and segment of every slot (segment 0 = empty slot)."""

  slot_BT: jax.Array
  pos_BN: jax.Array
  seg_BN: jax.Array


def summary_slots(
  pos_BT, seg_BT, *, block: int, causal: bool, num_slots: int, weight_BT=None
) -> Summaries:
  """Groups tokens into complete blocks per (segment, pos // block).

  `weight_BT` is how many tokens a row stands for (default 1; 0 drops it);
  a group is complete when its weights add up to `block`. Slots are
  numbered in (segment, block) order; groups past `num_slots` are dropped
  (none are when num_slots >= total weight // block).
  """
  if weight_BT is None:
    weight_BT = jnp.ones_like(pos_BT)
  group = jax.vmap(
    lambda p, s, w: _group_row(
      p, s, w, block=block, causal=causal, num_slots=num_slots
    )
  )
  return Summaries(
    *group(
      pos_BT.astype(jnp.int32),
      seg_BT.astype(jnp.int32),
      weight_BT.astype(jnp.int32),
    )
  )


def _group_row(pos_T, seg_T, w_T, *, block, causal, num_slots):
  t = pos_T.shape[0]
  blk_T = floordiv(pos_T, block)
  live_T = (seg_T != 0) & (w_T > 0)
  # Sort by (segment, block), dead rows last: groups become runs.
  seg_key_T = jnp.where(live_T, seg_T, jnp.iinfo(jnp.int32).max)
  order_T = jnp.lexsort((blk_T, seg_key_T))
  seg_s, blk_s = seg_key_T[order_T], blk_T[order_T]
  live_s, w_s = live_T[order_T], w_T[order_T]
  new_seg = jnp.concatenate([jnp.ones((1,), bool), seg_s[1:] != seg_s[:-1]])
  first = new_seg | jnp.concatenate(
    [jnp.ones((1,), bool), blk_s[1:] != blk_s[:-1]]
  )
  gid_s = jnp.cumsum(first) - 1  # group of each token
  count_G = jax.ops.segment_sum(
    jnp.where(live_s, w_s, 0), gid_s, num_segments=t
  )
  complete_G = count_G == block
  slot_G = jnp.where(complete_G, jnp.cumsum(complete_G) - 1, -1)
  slot_G = jnp.where(slot_G < num_slots, slot_G, -1)
  own_s = slot_G[gid_s]
  slot_s = own_s
  if not causal:
    # Orphans join the last complete block of their segment: slots grow
    # with the block inside a segment, so that is the segment's max slot.
    sid_s = jnp.cumsum(new_seg) - 1
    last_S = jax.ops.segment_max(own_s, sid_s, num_segments=t)
    slot_s = jnp.where(own_s >= 0, own_s, last_S[sid_s])
  slot_s = jnp.where(live_s, slot_s, -1)
  slot_T = jnp.zeros((t,), jnp.int32).at[order_T].set(slot_s.astype(jnp.int32))
  # One row per complete group, written at its slot (others dropped).
  at = jnp.where(first & (own_s >= 0), own_s, num_slots)
  offset = block if causal else block // 2
  pos_N = (
    jnp.zeros((num_slots,), jnp.int32)
    .at[at]
    .set(blk_s * block + offset, mode="drop")
  )
  seg_N = jnp.zeros((num_slots,), jnp.int32).at[at].set(seg_s, mode="drop")
  return slot_T, pos_N, seg_N


def summary_sums(x_BTD, slot_BT, num_slots: int) -> jax.Array:
  """Float32 [B, N, D]: the sum of each slot's rows of x, linear in T.

  Rows are sorted by slot (a slot's rows become one run), summed by a
  segmented scan that restarts at each run, and each slot reads its run's
  last row. Deterministic (a fixed summation tree, no scatter-add) and
  O(T D) work plus an O(T log T) integer sort; the one-hot [T, N] matmul
  it replaces cost 2 N D FLOPs per token, quadratic in T (issue #23). Slots
  need not be contiguous in x: bidirectional orphans join their segment's
  last complete block wherever they sit.
  """
  key_BT = jnp.where(slot_BT >= 0, slot_BT, num_slots).astype(jnp.int32)
  order_BT = jnp.argsort(key_BT, axis=1, stable=True)
  key_BT = jnp.take_along_axis(key_BT, order_BT, axis=1)
  x_BTD = jnp.take_along_axis(
    x_BTD.astype(jnp.float32), order_BT[:, :, None], axis=1
  )
  start_BT = jnp.concatenate(
    [jnp.ones_like(key_BT[:, :1], bool), key_BT[:, 1:] != key_BT[:, :-1]], 1
  )

  def add_within_runs(a, b):
    (a_start, a_sum), (b_start, b_sum) = a, b
    return a_start | b_start, jnp.where(
      b_start[..., None], b_sum, a_sum + b_sum
    )

  _, csum_BTD = jax.lax.associative_scan(
    add_within_runs, (start_BT, x_BTD), axis=1
  )
  slots_N = jnp.arange(num_slots, dtype=jnp.int32)
  end_BN = (
    jax.vmap(lambda k: jnp.searchsorted(k, slots_N, side="right"))(key_BT) - 1
  )
  end_BN = jnp.maximum(end_BN, 0)
  found_BN = jnp.take_along_axis(key_BT, end_BN, axis=1) == slots_N[None]
  sums_BND = jnp.take_along_axis(csum_BTD, end_BN[:, :, None], axis=1)
  return jnp.where(found_BN[:, :, None], sums_BND, 0.0)


class TGlobalAttention(Attention):
  """Attention's projections over [x ; block summaries]; see the module
  docstring. Self-attention only; generation (causal layers) keeps the
  cache of docs/attention.md."""

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
    stride: int = 1,
    cache_stride: int = 1,
    norm_plus_one: bool = False,
  ):
    if cfg.kind != "tglobal":
      raise ValueError(
        f"TGlobalAttention needs attention.kind='tglobal', got {cfg.kind!r}"
      )
    super().__init__(
      embed_dim=embed_dim,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      rope_theta=rope_theta,
      cfg=_local(cfg),
      causal=causal,
      rngs=rngs,
      param_dtype=param_dtype,
      out_std=out_std,
      scale=scale,
      cache_stride=cache_stride,
      norm_eps=norm_eps,
      norm_plus_one=norm_plus_one,
    )
    self.summary_norm = RMSNorm(
      embed_dim, eps=norm_eps, param_dtype=param_dtype, plus_one=norm_plus_one
    )
    self.cfg = cfg
    self.block = cfg.tglobal_block
    self.causal = causal
    self.stride = stride

  def num_slots(self, seq_len: int) -> int:
    """Summary keys of a call over seq_len tokens (module docstring)."""
    return seq_len * self.stride // self.block

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
    """Self-attention; in a bidirectional layer `kv` may be another
    sequence (pooled queries), whose blocks give the summaries. With
    `cache` (generation, causal layers): the step of docs/attention.md,
    returning (out, new cache)."""
    if cache is not None:
      if kv is not None:
        raise ValueError("TGlobal generation is self-attention only")
      return self._step(q, cache)
    if kv is not None and self.causal:
      raise ValueError(
        "causal TGlobalAttention is self-attention only; got "
        "kv tokens (pass kv=None)"
      )
    kv = q if kv is None else kv
    g = self.summaries(kv)
    _, rows, _ = self.stored_rows(_cat(kv, g))
    return self._attend(
      self.queries(q),
      rows["k"],
      rows["v"],
      q.pos_BT,
      jnp.concatenate([kv.pos_BT, g.pos_BT], 1),
      q.seg_BT,
      jnp.concatenate([kv.seg_BT, g.seg_BT], 1),
      num_summaries=g.x_BTD.shape[1],
    )

  def summaries(self, q: Tokens) -> Tokens:
    """The summary rows g = RMSNorm(sum of a complete block's inputs) with
    their positions and segments, [B, num_slots(T), D]."""
    n = self.num_slots(q.x_BTD.shape[1])
    s = summary_slots(
      q.pos_BT,
      q.seg_BT,
      block=self.block,
      causal=self.causal,
      num_slots=n,
      weight_BT=jnp.full(q.pos_BT.shape, self.stride),
    )
    g_BND = self.summary_norm(summary_sums(q.x_BTD, s.slot_BT, n))
    return Tokens(g_BND.astype(q.x_BTD.dtype), s.pos_BN, s.seg_BN)

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
    num_summaries: int = 0,
  ):
    """Attention._attend with the last `num_summaries` keys global (unless
    `mask` is given, as Attention._attend takes it)."""
    if mask is None:
      mask = mask_spec(
        self.cfg, causal=self.causal, num_summaries=num_summaries
      )
    return super()._attend(
      q_BTHK, k_BSGK, v_BSGK, q_pos, k_pos, q_seg, k_seg, mask=mask
    )

  # -------------------------------------------------------------- generation

  def _check_causal(self, what: str):
    if not self.causal:
      raise ValueError(
        f"TGlobalAttention.{what}: generation needs a causal "
        "(decoder) layer; this one is bidirectional"
      )

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """`local`: rolling K/V rows of the window (models/cache.py);
    `global`: K/V of the summaries of completed blocks, a full cache over
    block indices (slot and `pos` field j; the key sits at (j + 1) * k);
    `partial`: the float32 sum of the current block's inputs so far, how
    many tokens it holds, and the latest position and segment (segment 0:
    nothing carried)."""
    self._check_causal("init_cache")
    fields = self._kv_fields(dtype)
    d = self.q_DHK.shape[0]
    return {
      "local": cache_lib.empty(
        cache_slots(_local(self.cfg), max_len), batch, fields
      ),
      "global": cache_lib.empty(
        cache_lib.Slots.full(max_len // self.block), batch, fields
      ),
      "partial": {
        "sum": jnp.zeros((batch, d), jnp.float32),
        "count": jnp.zeros((batch,), jnp.int32),
        "pos": jnp.zeros((batch,), jnp.int32),
        "seg": jnp.zeros((batch,), jnp.int32),
      },
    }

  def _step(self, x: Tokens, cache: dict) -> tuple[jax.Array, dict]:
    """T >= 1 new tokens (positions increasing) over the cache: the
    carried partial block joins the new tokens as one row standing for
    its `count` tokens, so blocks completed in this call get their
    summaries here (visible only to later positions, as in `__call__`)."""
    self._check_causal("generation")
    k, t, dt = self.block, x.x_BTD.shape[1], x.x_BTD.dtype
    part = cache["partial"]
    rows = Tokens(
      jnp.concatenate([part["sum"][:, None], x.x_BTD.astype(jnp.float32)], 1),
      jnp.concatenate([part["pos"][:, None], x.pos_BT.astype(jnp.int32)], 1),
      jnp.concatenate([part["seg"][:, None], x.seg_BT.astype(jnp.int32)], 1),
    )
    weight_BT = jnp.concatenate(
      [part["count"][:, None], jnp.ones_like(x.pos_BT, jnp.int32)], 1
    )
    n = -(-t // k)  # carry < k tokens: at most ceil(T / k) complete
    s = summary_slots(
      rows.pos_BT,
      rows.seg_BT,
      block=k,
      causal=True,
      num_slots=n,
      weight_BT=weight_BT,
    )
    g = Tokens(
      self.summary_norm(summary_sums(rows.x_BTD, s.slot_BT, n)).astype(dt),
      s.pos_BN,
      s.seg_BN,
    )
    # K/V (and int8 scales) of the tokens, then of the summaries, as
    # the caches store them.
    kv, _, _ = self.stored_rows(_cat(x, g))
    kv = {n: a for n, a in kv.items() if n not in ("pos", "seg")}
    new_local = {
      **{n: a[:, :t] for n, a in kv.items()},
      "pos": x.pos_BT.astype(jnp.int32),
      "seg": x.seg_BT.astype(jnp.int32),
    }
    new_global = {
      **{n: a[:, t:] for n, a in kv.items()},
      "pos": floordiv(g.pos_BT, k) - 1,
      "seg": g.seg_BT,
    }
    read = lambda c, new: cache_lib.load(
      cache_lib.concat(c, new), KV, self.kv_cache_dtype, dt
    )
    local = read(cache["local"], new_local)
    glob = read(cache["global"], new_global)
    out = self._attend(
      self.queries(x),
      constrain(jnp.concatenate([local["k"], glob["k"]], 1), BSGK),
      constrain(jnp.concatenate([local["v"], glob["v"]], 1), BSGK),
      x.pos_BT,
      jnp.concatenate([local["pos"], (glob["pos"] + 1) * k], 1),
      x.seg_BT,
      jnp.concatenate([local["seg"], glob["seg"]], 1),
      num_summaries=glob["pos"].shape[1],
    )
    local_slots = cache_slots(
      _local(self.cfg), None, num_slots=cache["local"]["pos"].shape[1]
    )
    global_slots = cache_lib.Slots.full(cache["global"]["pos"].shape[1])
    return out, {
      "local": cache_lib.write(cache["local"], new_local, local_slots),
      "global": cache_lib.write(cache["global"], new_global, global_slots),
      "partial": _carry(rows, weight_BT, k),
    }

  def cache_bytes_per_token(self, dtype) -> int:
    """K and V of the kv heads per cached row, 2 * G * K elements (int8:
    plus 2 * G scales), for the window's rows and one summary row per k
    tokens alike (Attention's); the partial block's float32 sum (D per
    sequence) is not per token."""
    return super().cache_bytes_per_token(dtype)


def _local(cfg: AttentionConfig) -> AttentionConfig:
  """The sliding-window layer that is the local part of a tglobal one."""
  return dataclasses.replace(cfg, kind="sliding_window")


def _cat(x: Tokens, g: Tokens) -> Tokens:
  """Keys of a call: the tokens, then the summaries."""
  return Tokens(
    *(jnp.concatenate([a, b], 1) for a, b in zip(x, g, strict=True))
  )


def _carry(rows: Tokens, weight_BT, block: int) -> dict:
  """The partial block after a step: the (segment, block) of the latest
  live row, its sum and count, unless that block is complete (then
  nothing is carried; its summary is in the global cache)."""
  live_BT = (rows.seg_BT != 0) & (weight_BT > 0)
  t = live_BT.shape[1]
  last_B = t - 1 - jnp.argmax(live_BT[:, ::-1], axis=1)
  pick = lambda a: jnp.take_along_axis(a, last_B[:, None], axis=1)[:, 0]
  pos_B, seg_B = pick(rows.pos_BT), pick(rows.seg_BT)
  same_BT = (
    live_BT
    & (rows.seg_BT == seg_B[:, None])
    & (floordiv(rows.pos_BT, block) == floordiv(pos_B, block)[:, None])
  )
  count_B = jnp.sum(jnp.where(same_BT, weight_BT, 0), axis=1)
  keep_B = jnp.any(live_BT, axis=1) & (count_B < block)
  sum_BD = jnp.sum(jnp.where(same_BT[:, :, None], rows.x_BTD, 0), axis=1)
  return {
    "sum": jnp.where(keep_B[:, None], sum_BD, 0),
    "count": jnp.where(keep_B, count_B, 0).astype(jnp.int32),
    "pos": jnp.where(keep_B, pos_B, 0),
    "seg": jnp.where(keep_B, seg_B, 0),
  }
