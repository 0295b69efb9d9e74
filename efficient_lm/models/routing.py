"""Mixture-of-depths routing (METHODS.md §2): the router, the causal
predictor, top-k selection, gather / scatter, and the aux losses.

A routed block (models/transformer.py `RoutedBlock`) scores every token with
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
unbounded r can blow up the residual stream, METHODS.md §2.7.2) and puts
the router on the gradient path all the same; the raw r is the BCE logit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.models.layers import param


def capacity_tokens(capacity: float, seq_len: int) -> int:
  """k = floor(capacity * T), the tokens a routed block processes per row.
  The 1e-9 keeps binary rounding from losing one (0.29 * 100 is
  28.999999999999996 in floats)."""
  return max(0, min(seq_len, int(math.floor(capacity * seq_len + 1e-9))))


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


def top_k(
  score_BT: jax.Array, seg_BT: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
  """The k highest-scoring non-padding tokens of each row, indices sorted
  ascending: (idx_BK int32, valid_BK). Padding scores -inf, so a row with
  fewer than k non-padding tokens fills its last picks with padding
  tokens, which are marked invalid (never processed)."""
  masked_BT = jnp.where(seg_BT != 0, score_BT.astype(jnp.float32), -jnp.inf)
  _, idx_BK = jax.lax.top_k(masked_BT, k)
  idx_BK = jnp.sort(idx_BK.astype(jnp.int32), axis=-1)
  valid_BK = jnp.take_along_axis(seg_BT, idx_BK, axis=1) != 0
  return idx_BK, valid_BK


def membership(
  idx_BK: jax.Array, valid_BK: jax.Array, length: int
) -> jax.Array:
  """Bool [B, T]: token t is one of the valid selected indices."""

  def one(i_K, v_K):
    return jnp.zeros((length,), bool).at[i_K].set(v_K, mode="drop")

  return jax.vmap(one)(idx_BK, valid_BK)


def gather(a_BT, idx_BK: jax.Array):
  """Rows of `a_BT` ([B, T] or [B, T, D]) at idx_BK, in index order."""
  if a_BT.ndim == 2:
    return jnp.take_along_axis(a_BT, idx_BK, axis=1)
  return jnp.take_along_axis(a_BT, idx_BK[..., None], axis=1)


def scatter(
  x_BTD: jax.Array, idx_BK: jax.Array, new_BKD: jax.Array
) -> jax.Array:
  """x with rows idx_BK replaced by new_BKD (indices unique per row)."""
  return jax.vmap(lambda x, i, u: x.at[i].set(u))(x_BTD, idx_BK, new_BKD)


def bce(
  logit_BT: jax.Array, target_BT: jax.Array, mask_BT: jax.Array
) -> jax.Array:
  """Mean binary cross-entropy of sigmoid(logit) against the 0/1 target,
  over the tokens of `mask_BT` (float32 scalar; 0 when none)."""
  z = logit_BT.astype(jnp.float32)
  per_BT = jax.nn.softplus(z) - z * target_BT.astype(jnp.float32)
  return masked_mean(per_BT, mask_BT)


def masked_mean(a_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  m = mask_BT.astype(jnp.float32)
  return jnp.sum(a_BT.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)
