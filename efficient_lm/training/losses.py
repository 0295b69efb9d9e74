"""Training objectives: logits, batch and the model's aux -> (loss, metrics).

`train.objective` picks one. Every objective adds the model's `loss/*` aux
entries to its own loss; the step reports the aux dict itself.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
Objective = Callable[[jax.Array, dict, Metrics], tuple[jax.Array, Metrics]]


def aux_loss(aux: Metrics) -> jax.Array:
  """Sum of the model's auxiliary losses (`loss/*` entries)."""
  return sum((v for k, v in aux.items() if k.startswith("loss/")),
             jnp.zeros((), jnp.float32))


def next_token(logits_BTV: jax.Array, batch: dict, aux: Metrics, *,
               z_loss: float) -> tuple[jax.Array, Metrics]:
  """Cross-entropy of `targets` over non-padding positions (segment > 0),
  plus PaLM's z-loss and the aux losses. `ce` is the mean per token."""
  mask_BT = (batch["segment_ids"] > 0).astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(
    logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
  nll_BT = lse_BT - target_logit_BT
  tokens = mask_BT.sum()
  denom = jnp.maximum(tokens, 1.0)
  ce = (nll_BT * mask_BT).sum() / denom
  loss = ce + aux_loss(aux)
  if z_loss:
    # PaLM's z-loss keeps the softmax normaliser near 1 (log Z near 0).
    loss = loss + z_loss * (jnp.square(lse_BT) * mask_BT).sum() / denom
  return loss, {"ce": ce, "tokens": tokens}


def make_objective(name: str, *, z_loss: float) -> Objective:
  if name == "next_token":
    return lambda logits, batch, aux: next_token(logits, batch, aux,
                                                 z_loss=z_loss)
  raise ValueError(f"train.objective={name!r} is not supported")
