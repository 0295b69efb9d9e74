"""The routing toolkit shared by mixture-of-depths (models/mod.py),
mixture-of-recursions (models/mor.py) and what routes tokens next:
how many tokens a step takes, top-k selection, gather / scatter of the
selected rows, membership masks and the BCE that teaches a causal decision.

Dimension letters: B batch, T tokens of a row, M tokens a routing step
selects per row (its static capacity), D width.

Selected indices are always sorted ascending, so a gathered sub-sequence
keeps causal order, and gathered rows carry their own positions and segment
ids (docs/attention.md): a gather never renumbers positions.
"""

from __future__ import annotations

from typing import overload

import jax
import jax.numpy as jnp

from efficient_lm.config import schema


@overload
def capacity_tokens(capacity: float, n: int, *, minimum: int = 0) -> int: ...


@overload
def capacity_tokens(
  capacity: float, n: jax.Array, *, minimum: int = 0
) -> jax.Array: ...


def capacity_tokens(capacity: float, n, *, minimum: int = 0):
  """k = max(minimum, floor(capacity * n)) for a Python int n (the config's
  rule, `schema.capacity_tokens`) or an int array n (per row; c <= 1 keeps
  it at most n). MoD takes minimum 0 (a block may process no token), MoR
  minimum 1 (every step keeps one token)."""
  if isinstance(n, int):
    return schema.capacity_tokens(capacity, n, minimum)
  k = jnp.floor(capacity * n + schema.FLOOR_EPS).astype(jnp.int32)
  return jnp.maximum(minimum, k)


def top_k(
  score_BT: jax.Array, seg_BT: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
  """The k highest-scoring non-padding tokens of each row, indices sorted
  ascending: (idx_BM int32, valid_BM), M = k. Padding scores -inf, so a
  row with fewer than k non-padding tokens fills its last picks with
  padding tokens, which are marked invalid (never processed)."""
  masked_BT = jnp.where(seg_BT != 0, score_BT.astype(jnp.float32), -jnp.inf)
  _, idx_BM = jax.lax.top_k(masked_BT, k)
  idx_BM = jnp.sort(idx_BM.astype(jnp.int32), axis=-1)
  valid_BM = jnp.take_along_axis(seg_BT, idx_BM, axis=1) != 0
  return idx_BM, valid_BM


def top_k_selection(z_BT, cand_BT, n_valid_B, capacity: float):
  """Nested (expert-choice) selection of one recursion step: per row the
  top k = min(max(1, floor(capacity * n_valid)), |candidates|) candidates
  by z, candidates being the tokens still active.

  Returns (idx_BM int32 ascending, ok_BM, chosen_BT): M = max(1,
  floor(capacity * T)) slots, the first k of each row real token indices
  in ascending order, the rest `ok = False` (index clipped to T - 1 for
  gathering)."""
  t = z_BT.shape[1]
  m = capacity_tokens(capacity, t, minimum=1)
  k_B = jnp.minimum(
    capacity_tokens(capacity, n_valid_B, minimum=1), cand_BT.sum(1)
  )
  score = jnp.where(cand_BT, z_BT, -jnp.inf)
  _, top_BM = jax.lax.top_k(score, m)
  keep = jnp.arange(m)[None] < k_B[:, None]
  idx_BM = jnp.sort(jnp.where(keep, top_BM, t), axis=1).astype(jnp.int32)
  ok_BM = idx_BM < t
  chosen = membership(idx_BM, ok_BM, t)
  return jnp.minimum(idx_BM, t - 1), ok_BM, chosen


def membership(
  idx_BM: jax.Array, valid_BM: jax.Array, length: int
) -> jax.Array:
  """Bool [B, T]: token t is one of the valid selected indices."""

  def one(i_M, v_M):
    i_M = jnp.where(v_M, i_M, length)  # invalid picks: dropped
    return jnp.zeros((length,), bool).at[i_M].set(True, mode="drop")

  return jax.vmap(one)(idx_BM, valid_BM)


def gather(a_BT, idx_BM: jax.Array):
  """Rows of `a_BT` ([B, T] or [B, T, D]) at idx_BM, in index order."""
  if a_BT.ndim == 2:
    return jnp.take_along_axis(a_BT, idx_BM, axis=1)
  return jnp.take_along_axis(a_BT, idx_BM[..., None], axis=1)


def scatter(
  x_BTD: jax.Array,
  idx_BM: jax.Array,
  new_BMD: jax.Array,
  valid_BM: jax.Array | None = None,
) -> jax.Array:
  """x with rows idx_BM replaced by new_BMD (indices unique per row among
  the valid ones); rows whose `valid_BM` is False are not written."""
  if valid_BM is not None:
    idx_BM = jnp.where(valid_BM, idx_BM, x_BTD.shape[1])  # T: dropped

  def one(x, i, u):
    return x.at[i].set(u.astype(x.dtype), mode="drop")

  return jax.vmap(one)(x_BTD, idx_BM, new_BMD)


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
