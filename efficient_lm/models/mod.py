"""Mixture-of-depths (docs/routing.md): the routed block and its router.

A routed block (`RoutedBlock`) scores every token with
`MoDRouter`: r = w·x + b, a linear map of the block's input (the residual
stream). Two ways to use the scores:

  * training (`causal_routing=False`): the top k = floor(capacity * T)
    non-padding tokens of each row (`top_k`, expert-choice over the
    sequence) are gathered with their positions and segment ids, run
    through the block among themselves, and scattered back. Top-k
    membership depends on later tokens' scores, so this is not causal.
  * evaluation / generation (`causal_routing=True`): token i is processed
    iff its own decision logit is > 0: the router's r with
    predictor="router_bce", or a small MLP predictor reading
    stop_gradient(x) with predictor="mlp". Both are taught top-k
    membership by a BCE loss (`bce`), so they learn to imitate top-k
    causally.

Gate: a processed token's update is x + g·Δ(x) with g = sigmoid(r). The
paper multiplies by r itself; sigmoid keeps the multiplier in (0, 1) (an
unbounded r can blow up the residual stream, docs/routing.md) and puts
the router on the gradient path all the same; the raw r is the BCE logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import routing
from efficient_lm.models.block import Block, layer_flops
from efficient_lm.models.layers import DTYPES, param
from efficient_lm.models.stack import LayerSpec
from efficient_lm.sharding import BTD, constrain


def predictor_width(embed_dim: int) -> int:
  """Hidden width of the MLP predictor: small, D / 4 (at least 8)."""
  return max(embed_dim // 4, 8)


class MoDRouter(nnx.Module):
  """Router r = w·x + b (gate and top-k score) and, with predictor="mlp",
  a predictor p = MLP(stop_gradient(x)). `__call__` -> (r_BT, z_BT)
  float32, z the causal decision logit (r itself for "router_bce")."""

  def __init__(
    self, embed_dim: int, *, predictor: str, rngs: nnx.Rngs, param_dtype
  ):
    self.w_D = param(rngs, (embed_dim,), ("embed",), 0.02, param_dtype)
    self.b = nnx.Param(jnp.zeros((), param_dtype), logical_axes=())
    self.use_predictor = predictor == "mlp"
    if self.use_predictor:
      f = predictor_width(embed_dim)
      self.pred_in_DF = param(
        rngs, (embed_dim, f), ("embed", None), 0.02, param_dtype
      )
      self.pred_b_F = nnx.Param(
        jnp.zeros((f,), param_dtype), logical_axes=(None,)
      )
      self.pred_out_F = param(rngs, (f,), (None,), 0.02, param_dtype)
      self.pred_b = nnx.Param(jnp.zeros((), param_dtype), logical_axes=())

  @staticmethod
  def flops(embed_dim: int, predictor: str) -> float:
    """Per token: r = w.x, and the MLP predictor's two matmuls."""
    d = embed_dim
    if predictor != "mlp":
      return 2.0 * d
    f = predictor_width(d)
    return 2.0 * (d + d * f + f)

  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x_BTD.astype(jnp.float32)
    r_BT = jnp.einsum("BTD,D->BT", x, self.w_D[...].astype(jnp.float32))
    r_BT = r_BT + self.b[...].astype(jnp.float32)
    if not self.use_predictor:
      return r_BT, r_BT
    # The predictor learns from the trunk's activations without changing
    # them: no gradient reaches x through it.
    h_BTF = jnp.einsum(
      "BTD,DF->BTF",
      jax.lax.stop_gradient(x),
      self.pred_in_DF[...].astype(jnp.float32),
    )
    h_BTF = jax.nn.silu(h_BTF + self.pred_b_F[...][None, None])
    z_BT = jnp.einsum(
      "BTF,F->BT", h_BTF, self.pred_out_F[...].astype(jnp.float32)
    )
    return r_BT, z_BT + self.pred_b[...].astype(jnp.float32)


class RoutedBlock(Block):
  """A mixture-of-depths block (docs/routing.md).

  Training (`causal_routing=False`): the top k = floor(capacity * T)
  non-padding tokens of each row by router score r, sorted by index, are
  gathered with their positions and segment ids; attention + MLP (pre-norm)
  run among them only; a selected token becomes x + sigmoid(r) * Δ, Δ the
  block's residual update; the others pass bitwise unchanged.

  `causal_routing=True` (evaluation, generation): token i is processed iff
  its own decision logit is > 0. Static shapes: every token is computed,
  the unprocessed ones are no keys (segment 0 on the key side) and get no
  update, so the block is strictly causal. With a `cache` (generation) the
  routing is always causal, and only processed tokens' rows are written
  into the cache (the others go in with segment 0, which cache.write
  drops).

  aux: `loss/mod_bce` (BCE of the decision logit against top-k membership
  over non-padding tokens, times aux_loss_weight), `loss/router_z` (mean r²,
  when router_z_loss > 0), `routing/mod_fraction` and
  `routing/mod_layer{layer}_fraction` (the processed fraction of
  non-padding tokens; the stack names the layer), `routing/mod_agreement`
  (how often the causal decision equals top-k membership). A call with a
  cache reports the fractions only."""

  def __init__(self, cfg: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs):
    super().__init__(cfg, spec, rngs)
    r = cfg.routing
    self.router = MoDRouter(
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
    `cache`, attention reads and extends it -> (Δ, cache or None)."""
    a_BTD, cache = self.attend(x_BTD, pos_BT, seg_BT, cache=cache)
    m_BTD = self.mlp_branch(x_BTD + a_BTD)
    return a_BTD + m_BTD, cache

  def _fractions(self, seg_BT, processed_BT) -> dict:
    frac = routing.masked_mean(processed_BT, seg_BT != 0)
    return {
      "routing/mod_fraction": frac,
      "routing/mod_layer{layer}_fraction": frac,
    }

  def _aux(self, r_BT, z_BT, seg_BT, member_BT, processed_BT):
    valid_BT = seg_BT != 0
    aux = {
      "loss/mod_bce": self.aux_loss_weight
      * routing.bce(z_BT, member_BT, valid_BT),
      **self._fractions(seg_BT, processed_BT),
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
    idx_BM, ok_BM = routing.top_k(
      r_BT, seg_BT, routing.capacity_tokens(self.capacity, t)
    )
    return idx_BM, ok_BM, routing.membership(idx_BM, ok_BM, t)

  def decision(self, x_BTD, seg_BT) -> jax.Array:
    """The causal decision, bool [B, T]: processed iff the decision logit
    is > 0 (never padding). Reads only each token's own state."""
    return (self.router(x_BTD)[1] > 0) & (seg_BT != 0)

  def __call__(
    self, x_BTD, pos_BT, seg_BT, *, cache=None, causal_routing=False
  ):
    r_BT, z_BT = self.router(x_BTD)
    if cache is not None:  # generation: always the causal decision
      processed_BT = (z_BT > 0) & (seg_BT != 0)
      x_BTD, cache = self._update(
        x_BTD, pos_BT, seg_BT, r_BT, processed_BT, cache
      )
      return constrain(x_BTD, BTD), self._fractions(seg_BT, processed_BT), cache
    idx_BM, ok_BM, member_BT = self._topk_membership(r_BT, seg_BT)
    processed_BT = member_BT
    if causal_routing:
      processed_BT = (z_BT > 0) & (seg_BT != 0)
      x_BTD, _ = self._update(x_BTD, pos_BT, seg_BT, r_BT, processed_BT)
    elif idx_BM.shape[1] > 0:  # capacity rounding to no token: identity
      x_sel = routing.gather(x_BTD, idx_BM)
      seg_sel = jnp.where(ok_BM, routing.gather(seg_BT, idx_BM), 0)
      delta, _ = self._delta(x_sel, routing.gather(pos_BT, idx_BM), seg_sel)
      g_BM1 = jax.nn.sigmoid(routing.gather(r_BT, idx_BM))[..., None]
      new_sel = jnp.where(
        ok_BM[..., None], x_sel + g_BM1.astype(x_sel.dtype) * delta, x_sel
      )
      x_BTD = routing.scatter(x_BTD, idx_BM, new_sel)
    aux = self._aux(r_BT, z_BT, seg_BT, member_BT, processed_BT)
    return constrain(x_BTD, BTD), aux

  def _update(self, x_BTD, pos_BT, seg_BT, r_BT, processed_BT, cache=None):
    """Causal routing: x + sigmoid(r) * Δ where processed, x elsewhere."""
    seg_kv = jnp.where(processed_BT, seg_BT, 0)
    delta, cache = self._delta(x_BTD, pos_BT, seg_kv, cache)
    g_BT1 = jax.nn.sigmoid(r_BT)[..., None].astype(x_BTD.dtype)
    x_BTD = jnp.where(processed_BT[..., None], x_BTD + g_BT1 * delta, x_BTD)
    return x_BTD, cache

  @staticmethod
  def training_flops(
    embed_dim: int,
    spec: LayerSpec,
    seq_len: int,
    *,
    capacity: float,
    predictor: str,
  ) -> dict[str, float]:
    """The training (top-k) forward: projections and MLP on the k =
    floor(capacity * T) gathered tokens, attention among those k only
    (dense_tile: the k x k tile; visible: the pairs its mask lets through
    on k consecutive positions, exact for dense causal layers, an upper
    bound for local ones), per token of the sequence; the router (and MLP
    predictor) on every token. Causal routing (evaluation, generation)
    computes every token at static shapes: it costs what a dense layer
    costs (`flops`, inherited from Block)."""
    k = routing.capacity_tokens(capacity, seq_len)
    terms = layer_flops(embed_dim, spec, seq_len, k, k)
    terms["router"] = MoDRouter.flops(embed_dim, predictor)
    return terms
