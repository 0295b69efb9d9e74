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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from efficient_lm.config import AttentionConfig
from efficient_lm.models.layers import param, rope
from efficient_lm.sharding import (BSGK, BT, BTD, BTHK, constrain,
                                   shard_map_by_names)


class Tokens(NamedTuple):
  """A sequence that attention reads: activations and where they sit."""
  x_BTD: jax.Array
  pos_BT: jax.Array
  seg_BT: jax.Array


def mask_spec(cfg: AttentionConfig, *, causal: bool) -> kernels.MaskSpec:
  """The mask of one layer; windows count tokens including self (and, in a
  bidirectional layer, as many after as before)."""
  if cfg.kind == "dense":
    return kernels.MaskSpec(causal=causal)
  left = cfg.window - 1
  window = (left, 0 if causal else left)
  if cfg.kind == "sliding_window":
    return kernels.MaskSpec(causal=causal, window=window)
  if cfg.kind == "global_local":
    return kernels.MaskSpec(causal=causal, window=window,
                            global_prefix=cfg.num_global)
  raise ValueError(f"attention.kind={cfg.kind!r} is not supported")


class Attention(nnx.Module):

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, rope_theta: float, cfg: AttentionConfig,
               causal: bool, rngs: nnx.Rngs, param_dtype, out_std: float,
               scale: float | None = None):
    d, h, g, k = embed_dim, num_heads, num_kv_heads, head_dim
    self.q_DHK = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), 0.02,
                       param_dtype)
    self.k_DGK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"),
                       0.02, param_dtype)
    self.v_DGK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"),
                       0.02, param_dtype)
    self.o_HKD = param(rngs, (h, k, d), ("heads", "head_dim", "embed"),
                       out_std, param_dtype)
    self.rope_theta = rope_theta
    self.mask = mask_spec(cfg, causal=causal)
    self.scale = 1.0 / math.sqrt(k) if scale is None else scale
    self.soft_cap = cfg.logits_soft_cap
    self.impl = cfg.impl

  def __call__(self, q: Tokens, kv: Tokens | None = None) -> jax.Array:
    kv = q if kv is None else kv
    dt = q.x_BTD.dtype
    q_BTHK = jnp.einsum("BTD,DHK->BTHK", q.x_BTD, self.q_DHK[...].astype(dt))
    k_BSGK = jnp.einsum("BSD,DGK->BSGK", kv.x_BTD,
                        self.k_DGK[...].astype(dt))
    v_BSGK = jnp.einsum("BSD,DGK->BSGK", kv.x_BTD,
                        self.v_DGK[...].astype(dt))
    q_BTHK = constrain(rope(q_BTHK, q.pos_BT, self.rope_theta), BTHK)
    k_BSGK = constrain(rope(k_BSGK, kv.pos_BT, self.rope_theta), BSGK)
    v_BSGK = constrain(v_BSGK, BSGK)

    def attend(q_BTHK, k_BSGK, v_BSGK, q_pos, k_pos, q_seg, k_seg):
      return kernels.attention(
        q_BTHK, k_BSGK, v_BSGK, mask=self.mask, q_pos=q_pos, k_pos=k_pos,
        q_segment_ids=q_seg, kv_segment_ids=k_seg, scale=self.scale,
        logits_soft_cap=self.soft_cap, impl=self.impl)

    o_BTHK = shard_map_by_names(
      attend, (BTHK, BSGK, BSGK, BT, BT, BT, BT), BTHK)(
        q_BTHK, k_BSGK, v_BSGK, q.pos_BT, kv.pos_BT, q.seg_BT, kv.seg_BT)
    out = jnp.einsum("BTHK,HKD->BTD", o_BTHK, self.o_HKD[...].astype(dt))
    return constrain(out, BTD)
