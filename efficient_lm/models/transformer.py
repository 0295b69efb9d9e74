"""Assembles models from ModelConfig: `build(cfg, rngs)`.

The decoder is pre-norm: x + Attn(Norm(x)), then x + MLP(Norm(x)). Its
layers come from the layer plan (models/stack.py): `attention.pattern`
gives each layer its attention kind; identical layers are stacked and run
with one scan.

A model call is `model(tokens_BT, positions_BT, segment_ids_BT) ->
(logits_BTV, aux)`: float32 logits and a flat dict of float32 scalars,
`loss/<name>` entries added to the training loss by the objective and
other entries logged as diagnostics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import mor, stack
from efficient_lm.models.attention import Attention, Tokens
from efficient_lm.models.layers import Embed, RMSNorm, SwiGLU, param
from efficient_lm.models.mla import MLAttention
from efficient_lm.models.tglobal import TGlobalAttention
from efficient_lm.sharding import BTD, BTV, constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_attention(cfg: ModelConfig, spec: stack.LayerSpec, *,
                   rngs: nnx.Rngs, out_std: float) -> nnx.Module:
  """The attention module of one layer, by projection and kind."""
  a = spec.attention
  kwargs = dict(
    embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
    rope_theta=cfg.rope_theta, cfg=a, causal=spec.causal, rngs=rngs,
    param_dtype=DTYPES[cfg.param_dtype], out_std=out_std)
  if a.projection == "mla":
    return MLAttention(**kwargs, norm_eps=cfg.norm_eps)
  if a.kind == "tglobal":
    # A funnel's pooled rows stand for factor**stage positions (of the
    # keys' stage: the previous one in a pool-query layer).
    stride = (cfg.funnel.factor ** (spec.stage - spec.pool_query)
              if cfg.kind == "funnel_encoder" else 1)
    return TGlobalAttention(**kwargs, norm_eps=cfg.norm_eps, stride=stride)
  return Attention(**kwargs)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, spec: stack.LayerSpec,
               rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    # GPT-2 style: residual-output projections scaled by 1/sqrt(2 * layers).
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = make_attention(cfg, spec, rngs=rngs, out_std=out_std)
    self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.mlp = SwiGLU(cfg.embed_dim, cfg.mlp_dim, rngs=rngs, param_dtype=pdt,
                      out_std=out_std)

  def __call__(self, x_BTD, pos_BT, seg_BT):
    h_BTD = self.attn_norm(x_BTD)
    x_BTD = x_BTD + self.attn(Tokens(h_BTD, pos_BT, seg_BT))
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return constrain(x_BTD, BTD), {}

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    return self.attn.init_cache(batch, max_len, dtype)

  def cache_bytes_per_token(self, dtype) -> int:
    return self.attn.cache_bytes_per_token(dtype)

  def step(self, x_BTD, pos_BT, seg_BT, cache):
    """`__call__` for generation: attention reads and extends `cache`."""
    h_BTD = self.attn_norm(x_BTD)
    a_BTD, cache = self.attn.step(Tokens(h_BTD, pos_BT, seg_BT), cache)
    x_BTD = x_BTD + a_BTD
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return constrain(x_BTD, BTD), {}, cache


class Decoder(nnx.Module):
  """Causal decoder: tokens, positions, segment ids -> (logits, aux).

  `block` builds one layer from (cfg, spec, rngs); tests substitute their
  own block types."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, block=Block):
    pdt = DTYPES[cfg.param_dtype]
    self.dtype = DTYPES[cfg.dtype]
    self.embed = Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs,
                       param_dtype=pdt)
    if cfg.routing.kind == "mor":
      # Shared layers applied recursively (models/mor.py), same interface.
      self.stack = mor.Recursions(cfg, lambda spec, r: block(cfg, spec, r),
                                  rngs=rngs)
    else:
      self.stack = stack.Stack(
        stack.layer_plan(cfg, causal=True),
        lambda spec, r: block(cfg, spec, r), rngs=rngs,
        scan=cfg.scan_layers, remat=cfg.remat)
    self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.head_DV = None if cfg.tie_embeddings else param(
      rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), 0.02, pdt)

  def __call__(self, tokens_BT, pos_BT, seg_BT, *, causal_routing=False):
    """`causal_routing`: routed layers (MoD / MoR) decide per token from
    its own router output (evaluation, generation) instead of top-k over
    the sequence (training); with it the model is strictly causal."""
    x_BTD = self.embed(tokens_BT, self.dtype)
    x_BTD, aux = self.stack(x_BTD, pos_BT, seg_BT,
                            causal_routing=causal_routing)
    return self._logits(x_BTD), aux

  def init_cache(self, batch: int, max_len: int) -> dict:
    """Empty generation caches for `batch` rows of up to `max_len`
    positions (models/cache.py)."""
    return self.stack.init_cache(batch, max_len, self.dtype)

  def max_positions(self) -> int | None:
    """Positions a sequence may reach (block-sparse tables); None: any."""
    return self.stack.max_positions()

  def cache_bytes_per_token(self) -> list[int]:
    """Each layer's cache bytes per cached token (the modules' formulas)."""
    return self.stack.cache_bytes_per_token(self.dtype)

  def step(self, tokens_BT, pos_BT, seg_BT, cache):
    """The forward over T new tokens that also extends `cache`:
    (logits_BTV, aux, cache). Prefill is a step on an empty cache.
    Routing is always causal here."""
    x_BTD = self.embed(tokens_BT, self.dtype)
    x_BTD, aux, cache = self.stack.step(x_BTD, pos_BT, seg_BT, cache)
    return self._logits(x_BTD), aux, cache

  def routing_decisions(self, tokens_BT, pos_BT, seg_BT) -> dict:
    """{name: [B, T] bool} — which tokens each routed block / recursion
    step processes under the causal decision (efficient_lm.plot routing)."""
    if not hasattr(self.stack, "routing_decisions"):
      raise ValueError("this model has no routed layers")
    x_BTD = self.embed(tokens_BT, self.dtype)
    return self.stack.routing_decisions(x_BTD, pos_BT, seg_BT)

  def _logits(self, x_BTD):
    x_BTD = self.final_norm(x_BTD)
    if self.head_DV is None:
      logits = self.embed.attend(x_BTD)
    else:
      logits = jnp.einsum("BTD,DV->BTV", x_BTD,
                          self.head_DV[...].astype(x_BTD.dtype),
                          preferred_element_type=jnp.float32)
    return constrain(logits, BTV)


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.kind == "decoder":
    return Decoder(cfg, rngs)
  if cfg.kind == "funnel_encoder":
    from efficient_lm.models import funnel  # funnel imports this module
    return funnel.FunnelEncoder(cfg, rngs)
  if cfg.kind == "hourglass":
    from efficient_lm.models import hourglass   # it imports Block from here
    return hourglass.Hourglass(cfg, rngs)
  raise ValueError(f"model.kind={cfg.kind!r} is not supported")


def layer_plan(cfg: ModelConfig) -> tuple[stack.LayerSpec, ...]:
  """The layer plan of the model `build(cfg)` makes (for FLOPs)."""
  if cfg.kind == "decoder":
    return stack.layer_plan(cfg, causal=True)
  if cfg.kind == "funnel_encoder":
    from efficient_lm.models import funnel  # funnel imports this module
    return funnel.layer_plan(cfg)
  if cfg.kind == "hourglass":
    from efficient_lm.models import hourglass
    return hourglass.layer_plan(cfg)
  raise ValueError(f"model.kind={cfg.kind!r} is not supported")
