"""LongT5 transient-global attention (METHODS.md §4): a sliding window plus
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
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from efficient_lm.config import AttentionConfig
from efficient_lm.models.attention import Attention, Tokens
from efficient_lm.models.attention import mask_spec as local_mask_spec
from efficient_lm.models.layers import RMSNorm, rope
from efficient_lm.sharding import (BSGK, BT, BTD, BTHK, constrain,
                                   shard_map_by_names)
from kernels.masks import floordiv


def mask_spec(cfg: AttentionConfig, *, causal: bool,
              num_summaries: int) -> kernels.MaskSpec:
  """The sliding-window layer's mask with the last `num_summaries` keys
  global."""
  local = local_mask_spec(dataclasses.replace(cfg, kind="sliding_window"),
                          causal=causal)
  return dataclasses.replace(local, global_suffix=num_summaries)


class Summaries(NamedTuple):
  """Where each token's input is summed, and the summary keys' rows.

  slot_BT: the summary slot a token adds to, -1 for none (padding, causal
  orphans, documents without a complete block). pos_BN, seg_BN: position
  and segment of every slot (segment 0 = empty slot)."""
  slot_BT: jax.Array
  pos_BN: jax.Array
  seg_BN: jax.Array


def summary_slots(pos_BT, seg_BT, *, block: int, causal: bool,
                  num_slots: int, weight_BT=None) -> Summaries:
  """Groups tokens into complete blocks per (segment, pos // block).

  `weight_BT` is how many tokens a row stands for (default 1; 0 drops it);
  a group is complete when its weights add up to `block`. Slots are
  numbered in (segment, block) order; groups past `num_slots` are dropped
  (none are when num_slots >= total weight // block).
  """
  if weight_BT is None:
    weight_BT = jnp.ones_like(pos_BT)
  group = jax.vmap(lambda p, s, w: _group_row(
    p, s, w, block=block, causal=causal, num_slots=num_slots))
  return Summaries(*group(pos_BT.astype(jnp.int32), seg_BT.astype(jnp.int32),
                          weight_BT.astype(jnp.int32)))


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
    [jnp.ones((1,), bool), blk_s[1:] != blk_s[:-1]])
  gid_s = jnp.cumsum(first) - 1                       # group of each token
  count_G = jax.ops.segment_sum(jnp.where(live_s, w_s, 0), gid_s,
                                num_segments=t)
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
  pos_N = jnp.zeros((num_slots,), jnp.int32).at[at].set(
    blk_s * block + offset, mode="drop")
  seg_N = jnp.zeros((num_slots,), jnp.int32).at[at].set(seg_s, mode="drop")
  return slot_T, pos_N, seg_N


def summary_sums(x_BTD, slot_BT, num_slots: int) -> jax.Array:
  """Float32 [B, N, D]: the sum of each slot's rows of x (one-hot matmul:
  MXU-friendly and deterministic, unlike a scatter-add)."""
  x_BTD = jnp.where((slot_BT >= 0)[:, :, None], x_BTD, 0)
  onehot_BTN = (slot_BT[:, :, None] == jnp.arange(num_slots)[None, None, :])
  return jnp.einsum("BTN,BTD->BND", onehot_BTN.astype(x_BTD.dtype), x_BTD,
                    preferred_element_type=jnp.float32)


class TGlobalAttention(Attention):
  """Attention's projections over [x ; block summaries]; see the module
  docstring. Self-attention only."""

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, rope_theta: float, cfg: AttentionConfig,
               causal: bool, rngs: nnx.Rngs, param_dtype, out_std: float,
               norm_eps: float, scale: float | None = None):
    if cfg.kind != "tglobal":
      raise ValueError(f"TGlobalAttention needs attention.kind='tglobal', "
                       f"got {cfg.kind!r}")
    # Attention's projections; its mask (self.mask) is the local part.
    super().__init__(
      embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, rope_theta=rope_theta,
      cfg=dataclasses.replace(cfg, kind="sliding_window"), causal=causal,
      rngs=rngs, param_dtype=param_dtype, out_std=out_std, scale=scale)
    self.summary_norm = RMSNorm(embed_dim, eps=norm_eps,
                                param_dtype=param_dtype)
    self.cfg = cfg
    self.block = cfg.tglobal_block
    self.causal = causal

  def num_slots(self, seq_len: int) -> int:
    """Summary keys of a call over seq_len tokens (module docstring)."""
    return seq_len // self.block

  def __call__(self, q: Tokens, kv: Tokens | None = None) -> jax.Array:
    if kv is not None:
      raise ValueError("TGlobalAttention is self-attention only; got kv "
                       "tokens (pass kv=None)")
    g = self.summaries(q)
    keys = Tokens(jnp.concatenate([q.x_BTD, g.x_BTD], 1),
                  jnp.concatenate([q.pos_BT, g.pos_BT], 1),
                  jnp.concatenate([q.seg_BT, g.seg_BT], 1))
    return self._attend(q, keys, num_summaries=g.x_BTD.shape[1])

  def summaries(self, q: Tokens) -> Tokens:
    """The summary rows g = RMSNorm(sum of a complete block's inputs) with
    their positions and segments, [B, num_slots(T), D]."""
    n = self.num_slots(q.x_BTD.shape[1])
    s = summary_slots(q.pos_BT, q.seg_BT, block=self.block,
                      causal=self.causal, num_slots=n)
    g_BND = self.summary_norm(summary_sums(q.x_BTD, s.slot_BT, n))
    return Tokens(g_BND.astype(q.x_BTD.dtype), s.pos_BN, s.seg_BN)

  def _attend(self, q: Tokens, kv: Tokens, *, num_summaries: int):
    """Attention.__call__ with the last `num_summaries` keys global."""
    dt = q.x_BTD.dtype
    q_BTHK = jnp.einsum("BTD,DHK->BTHK", q.x_BTD, self.q_DHK[...].astype(dt))
    k_BSGK = jnp.einsum("BSD,DGK->BSGK", kv.x_BTD,
                        self.k_DGK[...].astype(dt))
    v_BSGK = jnp.einsum("BSD,DGK->BSGK", kv.x_BTD,
                        self.v_DGK[...].astype(dt))
    q_BTHK = constrain(rope(q_BTHK, q.pos_BT, self.rope_theta), BTHK)
    k_BSGK = constrain(rope(k_BSGK, kv.pos_BT, self.rope_theta), BSGK)
    v_BSGK = constrain(v_BSGK, BSGK)
    mask = mask_spec(self.cfg, causal=self.causal,
                     num_summaries=num_summaries)

    def attend(q_BTHK, k_BSGK, v_BSGK, q_pos, k_pos, q_seg, k_seg):
      return kernels.attention(
        q_BTHK, k_BSGK, v_BSGK, mask=mask, q_pos=q_pos, k_pos=k_pos,
        q_segment_ids=q_seg, kv_segment_ids=k_seg, scale=self.scale,
        logits_soft_cap=self.soft_cap, impl=self.impl)

    o_BTHK = shard_map_by_names(
      attend, (BTHK, BSGK, BSGK, BT, BT, BT, BT), BTHK)(
        q_BTHK, k_BSGK, v_BSGK, q.pos_BT, kv.pos_BT, q.seg_BT, kv.seg_BT)
    out = jnp.einsum("BTHK,HKD->BTD", o_BTHK, self.o_HKD[...].astype(dt))
    return constrain(out, BTD)
