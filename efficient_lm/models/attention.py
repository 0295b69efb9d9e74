"""MHA / GQA / MQA attention projections around `kernels.attention`.

The attention math (masking, softmax, blockwise kernels) lives in `kernels/`;
this module only projects, applies RoPE on explicit positions and builds the
static mask spec from the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from efficient_lm.config import AttentionConfig
from efficient_lm.models.layers import param, rope
from efficient_lm.training.sharding import constrain, shard_map_by_names

_Q = ("batch", "length", "act_heads", None)
_KV = ("batch", "length", "act_kv_heads", None)
_BT = ("batch", "length")


def mask_spec(cfg: AttentionConfig) -> kernels.MaskSpec:
  """Causal decoder masks; windows count tokens including self."""
  if cfg.kind == "dense":
    return kernels.MaskSpec(causal=True)
  if cfg.kind == "sliding_window":
    return kernels.MaskSpec(causal=True, window=(cfg.window - 1, 0))
  if cfg.kind == "global_local":
    return kernels.MaskSpec(causal=True, window=(cfg.window - 1, 0),
                            global_prefix=cfg.num_global)
  raise ValueError(f"attention.kind={cfg.kind!r} is not supported")


class Attention(nnx.Module):

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, rope_theta: float, cfg: AttentionConfig,
               rngs: nnx.Rngs, param_dtype, out_std: float):
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
    self.mask = mask_spec(cfg)
    self.soft_cap = cfg.logits_soft_cap
    self.impl = cfg.impl

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array,
               seg_BT: jax.Array) -> jax.Array:
    dt = x_BTD.dtype
    q = jnp.einsum("BTD,DHK->BTHK", x_BTD, self.q_DHK[...].astype(dt))
    k = jnp.einsum("BTD,DGK->BTGK", x_BTD, self.k_DGK[...].astype(dt))
    v = jnp.einsum("BTD,DGK->BTGK", x_BTD, self.v_DGK[...].astype(dt))
    q = constrain(rope(q, pos_BT, self.rope_theta),
                  ("batch", "length", "act_heads", None))
    k = constrain(rope(k, pos_BT, self.rope_theta),
                  ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))

    def attend(q, k, v, pos, seg):
      return kernels.attention(
        q, k, v, mask=self.mask, q_pos=pos, k_pos=pos, q_segment_ids=seg,
        kv_segment_ids=seg, logits_soft_cap=self.soft_cap, impl=self.impl)

    o_BTHK = shard_map_by_names(attend, (_Q, _KV, _KV, _BT, _BT), _Q)(
      q, k, v, pos_BT, seg_BT)
    out = jnp.einsum("BTHK,HKD->BTD", o_BTHK, self.o_HKD[...].astype(dt))
    return constrain(out, ("batch", "length", "act_embed"))
