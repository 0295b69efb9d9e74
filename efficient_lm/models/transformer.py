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
from efficient_lm.models import mor, routing, stack
from efficient_lm.models.attention import Attention, Tokens
from efficient_lm.models.layers import Embed, RMSNorm, SwiGLU, param
from efficient_lm.models.mla import MLAttention
from efficient_lm.models.tglobal import TGlobalAttention
from efficient_lm.sharding import BTD, BTV, constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_attention(
  cfg: ModelConfig, spec: stack.LayerSpec, *, rngs: nnx.Rngs, out_std: float
) -> nnx.Module:
  """The attention module of one layer, by projection and kind."""
  a = spec.attention
  kwargs = dict(
    embed_dim=cfg.embed_dim,
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.resolved_head_dim,
    rope_theta=cfg.rope_theta,
    cfg=a,
    causal=spec.causal,
    rngs=rngs,
    param_dtype=DTYPES[cfg.param_dtype],
    out_std=out_std,
  )
  if a.projection == "mla":
    return MLAttention(**kwargs, norm_eps=cfg.norm_eps)
  if a.kind == "tglobal":
    # A funnel's pooled rows stand for factor**stage positions (of the
    # keys' stage: the previous one in a pool-query layer).
    stride = (
      cfg.funnel.factor ** (spec.stage - spec.pool_query)
      if cfg.kind == "funnel_encoder"
      else 1
    )
    return TGlobalAttention(**kwargs, norm_eps=cfg.norm_eps, stride=stride)
  return Attention(**kwargs)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, spec: stack.LayerSpec, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    # GPT-2 style: residual-output projections scaled by 1/sqrt(2 * layers).
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = make_attention(cfg, spec, rngs=rngs, out_std=out_std)
    self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.mlp = SwiGLU(
      cfg.embed_dim, cfg.mlp_dim, rngs=rngs, param_dtype=pdt, out_std=out_std
    )

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


class RoutedBlock(Block):
  """A mixture-of-depths block (METHODS.md §2; models/routing.py).

  Training (`causal_routing=False`): the top k = floor(capacity * T)
  non-padding tokens of each row by router score r, sorted by index, are
  gathered with their positions and segment ids; attention + MLP (pre-norm)
  run among them only; a selected token becomes x + sigmoid(r) * Δ, Δ the
  block's residual update; the others pass bitwise unchanged.

  `causal_routing=True` (evaluation, generation): token i is processed iff
  its own decision logit is > 0. Static shapes: every token is computed,
  the unprocessed ones are no keys (segment 0 on the key side) and get no
  update, so the block is strictly causal. `step` does the same over the
  cache, and writes only processed tokens' rows into it.

  aux: `loss/mod_bce` (BCE of the decision logit against top-k membership
  over non-padding tokens, times aux_loss_weight), `loss/router_z` (mean r²,
  when router_z_loss > 0), `routing/mod_fraction` and
  `routing/mod_layer{layer}_fraction` (the processed fraction of
  non-padding tokens; the stack names the layer), `routing/mod_agreement`
  (how often the causal decision equals top-k membership)."""

  def __init__(self, cfg: ModelConfig, spec: stack.LayerSpec, rngs: nnx.Rngs):
    super().__init__(cfg, spec, rngs)
    r = cfg.routing
    self.router = routing.MoDRouter(
      cfg.embed_dim,
      predictor=r.predictor,
      rngs=rngs,
      param_dtype=DTYPES[cfg.param_dtype],
    )
    self.capacity = r.capacity
    self.aux_loss_weight = r.aux_loss_weight
    self.router_z_loss = r.router_z_loss

  def _delta(self, x_BTD, pos_BT, seg_BT, cache=None):
    """The block's update Δ(x) = attention + MLP without the residual,
    tokens of segment 0 being neither keys nor (useful) queries; with
    `cache`, attention reads and extends it -> (Δ, cache)."""
    h = Tokens(self.attn_norm(x_BTD), pos_BT, seg_BT)
    if cache is None:
      a_BTD = self.attn(h)
    else:
      a_BTD, cache = self.attn.step(h, cache)
    m_BTD = self.mlp(self.mlp_norm(x_BTD + a_BTD))
    return a_BTD + m_BTD, cache

  def _aux(self, r_BT, z_BT, seg_BT, member_BT, processed_BT):
    valid_BT = seg_BT != 0
    frac = routing.masked_mean(processed_BT, valid_BT)
    aux = {
      "loss/mod_bce": self.aux_loss_weight
      * routing.bce(z_BT, member_BT, valid_BT),
      "routing/mod_fraction": frac,
      "routing/mod_layer{layer}_fraction": frac,
      "routing/mod_agreement": routing.masked_mean(
        (z_BT > 0) == member_BT, valid_BT
      ),
    }
    if self.router_z_loss > 0:
      aux["loss/router_z"] = self.router_z_loss * routing.masked_mean(
        jnp.square(r_BT), valid_BT
      )
    return aux

  def _topk_membership(self, r_BT, seg_BT):
    t = r_BT.shape[1]
    idx_BK, ok_BK = routing.top_k(
      r_BT, seg_BT, routing.capacity_tokens(self.capacity, t)
    )
    return idx_BK, ok_BK, routing.membership(idx_BK, ok_BK, t)

  def decision(self, x_BTD, seg_BT) -> jax.Array:
    """The causal decision, bool [B, T]: processed iff the decision logit
    is > 0 (never padding). Reads only each token's own state."""
    return (self.router(x_BTD)[1] > 0) & (seg_BT != 0)

  def __call__(self, x_BTD, pos_BT, seg_BT, *, causal_routing=False):
    r_BT, z_BT = self.router(x_BTD)
    idx_BK, ok_BK, member_BT = self._topk_membership(r_BT, seg_BT)
    if causal_routing:
      processed_BT = (z_BT > 0) & (seg_BT != 0)
      x_BTD, _ = self._update(x_BTD, pos_BT, seg_BT, r_BT, processed_BT)
    elif idx_BK.shape[1] == 0:  # capacity rounds to no token: identity
      processed_BT = member_BT
    else:
      processed_BT = member_BT
      x_sel = routing.gather(x_BTD, idx_BK)
      seg_sel = jnp.where(ok_BK, routing.gather(seg_BT, idx_BK), 0)
      delta, _ = self._delta(x_sel, routing.gather(pos_BT, idx_BK), seg_sel)
      g_BK1 = jax.nn.sigmoid(routing.gather(r_BT, idx_BK))[..., None]
      new_sel = jnp.where(
        ok_BK[..., None], x_sel + g_BK1.astype(x_sel.dtype) * delta, x_sel
      )
      x_BTD = routing.scatter(x_BTD, idx_BK, new_sel)
    aux = self._aux(r_BT, z_BT, seg_BT, member_BT, processed_BT)
    return constrain(x_BTD, BTD), aux

  def _update(self, x_BTD, pos_BT, seg_BT, r_BT, processed_BT, cache=None):
    """Causal routing: x + sigmoid(r) * Δ where processed, x elsewhere."""
    seg_kv = jnp.where(processed_BT, seg_BT, 0)
    delta, cache = self._delta(x_BTD, pos_BT, seg_kv, cache)
    g_BT1 = jax.nn.sigmoid(r_BT)[..., None].astype(x_BTD.dtype)
    x_BTD = jnp.where(processed_BT[..., None], x_BTD + g_BT1 * delta, x_BTD)
    return x_BTD, cache

  def step(self, x_BTD, pos_BT, seg_BT, cache):
    """Generation: always the causal decision; only processed tokens'
    rows reach this layer's cache (the others are written with segment 0,
    which cache.write drops)."""
    r_BT, z_BT = self.router(x_BTD)
    processed_BT = (z_BT > 0) & (seg_BT != 0)
    x_BTD, cache = self._update(
      x_BTD, pos_BT, seg_BT, r_BT, processed_BT, cache
    )
    valid_BT = seg_BT != 0
    frac = routing.masked_mean(processed_BT, valid_BT)
    aux = {
      "routing/mod_fraction": frac,
      "routing/mod_layer{layer}_fraction": frac,
    }
    return constrain(x_BTD, BTD), aux, cache


class Decoder(nnx.Module):
  """Causal decoder: tokens, positions, segment ids -> (logits, aux).

  `block` builds one layer from (cfg, spec, rngs), `routed_block` one
  routed layer (`spec.routed`, mixture-of-depths); tests substitute their
  own block types."""

  def __init__(
    self,
    cfg: ModelConfig,
    rngs: nnx.Rngs,
    *,
    block=Block,
    routed_block=RoutedBlock,
  ):
    pdt = DTYPES[cfg.param_dtype]
    self.dtype = DTYPES[cfg.dtype]
    self.embed = Embed(
      cfg.vocab_size, cfg.embed_dim, rngs=rngs, param_dtype=pdt
    )
    if cfg.routing.kind == "mor":
      # Shared layers applied recursively (models/mor.py), same interface.
      self.stack = mor.Recursions(
        cfg, lambda spec, r: block(cfg, spec, r), rngs=rngs
      )
    else:
      self.stack = stack.Stack(
        stack.layer_plan(cfg, causal=True),
        lambda spec, r: (routed_block if spec.routed else block)(cfg, spec, r),
        rngs=rngs,
        scan=cfg.scan_layers,
        remat=cfg.remat,
      )
    self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.head_DV = (
      None
      if cfg.tie_embeddings
      else param(
        rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), 0.02, pdt
      )
    )

  def __call__(self, tokens_BT, pos_BT, seg_BT, *, causal_routing=False):
    """`causal_routing`: routed layers (MoD / MoR) decide per token from
    its own router output (evaluation, generation) instead of top-k over
    the sequence (training); with it the model is strictly causal."""
    x_BTD = self.embed(tokens_BT, self.dtype)
    x_BTD, aux = self.stack(
      x_BTD, pos_BT, seg_BT, causal_routing=causal_routing
    )
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
    x_BTD = self.embed(tokens_BT, self.dtype)
    out = self.stack.routing_decisions(x_BTD, pos_BT, seg_BT)
    if not out:
      raise ValueError(
        "this model has no routed layers (model.routing.kind='none')"
      )
    return out

  def _logits(self, x_BTD):
    return output_logits(self, x_BTD)


def output_logits(model: nnx.Module, x_BTD: jax.Array) -> jax.Array:
  """`model.final_norm`, then the tied embedding (`head_DV` None) or the
  untied head: float32 logits [B, T, V]. Shared by every model kind."""
  x_BTD = model.final_norm(x_BTD)
  if model.head_DV is None:
    logits = model.embed.attend(x_BTD)
  else:
    logits = jnp.einsum(
      "BTD,DV->BTV",
      x_BTD,
      model.head_DV[...].astype(x_BTD.dtype),
      preferred_element_type=jnp.float32,
    )
  return constrain(logits, BTV)


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.kind == "decoder":
    return Decoder(cfg, rngs)
  if cfg.kind == "funnel_encoder":
    from efficient_lm.models import funnel  # funnel imports this module

    return funnel.FunnelEncoder(cfg, rngs)
  if cfg.kind == "hourglass":
    from efficient_lm.models import hourglass  # it imports Block from here

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
