"""Assembles models from ModelConfig: `build(cfg, rngs)`.

The decoder is pre-norm: x + Attn(Norm(x)), then x + MLP(Norm(x)). With
`scan_layers` the blocks are created stacked (nnx.vmap, leading 'layers'
axis) and applied with one `jax.lax.scan`, which keeps compile time flat in
depth; `remat` wraps the scanned body in `jax.checkpoint`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models.attention import Attention
from efficient_lm.models.layers import Embed, RMSNorm, SwiGLU, param
from efficient_lm.training.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = _DTYPES[cfg.param_dtype]
    # GPT-2 style: residual-output projections scaled by 1/sqrt(2 * layers).
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(
      embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
      rope_theta=cfg.rope_theta, cfg=cfg.attention, rngs=rngs,
      param_dtype=pdt, out_std=out_std)
    self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.mlp = SwiGLU(cfg.embed_dim, cfg.mlp_dim, rngs=rngs, param_dtype=pdt,
                      out_std=out_std)

  def __call__(self, x_BTD, pos_BT, seg_BT):
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), pos_BT, seg_BT)
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return constrain(x_BTD, ("batch", "length", "act_embed"))


class Decoder(nnx.Module):
  """Causal decoder: tokens, positions, segment ids -> float32 logits."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = _DTYPES[cfg.param_dtype]
    self.dtype = _DTYPES[cfg.dtype]
    self.scan_layers = cfg.scan_layers
    self.remat = cfg.remat
    self.embed = Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs,
                       param_dtype=pdt)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked(r):
        return Block(cfg, r)
      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.Dict(
        {f"layer_{i}": Block(cfg, rngs) for i in range(cfg.num_layers)})
    self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.head_DV = None if cfg.tie_embeddings else param(
      rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), 0.02, pdt)

  def _apply_block(self, block_fn):
    if self.remat == "none":
      return block_fn
    return jax.checkpoint(block_fn, policy=_REMAT[self.remat])

  def __call__(self, tokens_BT, pos_BT, seg_BT) -> jax.Array:
    x_BTD = self.embed(tokens_BT, self.dtype)
    if self.scan_layers:
      graphdef, stacked_state = nnx.split(self.blocks)

      def body(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x, pos_BT, seg_BT), None

      x_BTD, _ = jax.lax.scan(self._apply_block(body), x_BTD, stacked_state)
    else:
      for block in self.blocks.values():
        x_BTD = self._apply_block(
          lambda x, b=block: b(x, pos_BT, seg_BT))(x_BTD)
    x_BTD = self.final_norm(x_BTD)
    if self.head_DV is None:
      logits = self.embed.attend(x_BTD)
    else:
      logits = jnp.einsum("BTD,DV->BTV", x_BTD,
                          self.head_DV[...].astype(x_BTD.dtype),
                          preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.kind == "decoder":
    return Decoder(cfg, rngs)
  raise ValueError(f"model.kind={cfg.kind!r} is not supported")


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Analytical training FLOPs per token (forward + backward = 3x forward).

  Counts matmuls only (2 FLOPs per multiply-add): projections, MLP, LM head,
  and attention scores/values over the full T x T tile the dense kernel
  computes (the PaLM MFU convention; masked-block skipping is not credited).
  Rematerialisation is not counted: this is *model* FLOPs, as MFU requires.
  """
  d, h, g = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads
  k, f, v = cfg.resolved_head_dim, cfg.mlp_dim, cfg.vocab_size
  proj = d * h * k * 2 + d * g * k * 2      # q, o  +  k, v
  mlp = 3 * d * f
  attn = 2 * seq_len * h * k                # QK^T and PV, per token
  per_layer = 2 * (proj + mlp + attn)
  forward = cfg.num_layers * per_layer + 2 * d * v
  return {"forward": float(forward), "train": float(3 * forward)}


def param_count(cfg: ModelConfig) -> dict[str, int]:
  d, h, g = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads
  k, f, v = cfg.resolved_head_dim, cfg.mlp_dim, cfg.vocab_size
  per_layer = d * h * k * 2 + d * g * k * 2 + 3 * d * f + 2 * d
  embed = v * d * (1 if cfg.tie_embeddings else 2)
  total = cfg.num_layers * per_layer + embed + d
  return {"total": total, "non_embedding": total - v * d}
