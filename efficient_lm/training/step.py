"""Loss, the pure train step and the eval step.

State is a plain pytree: {"params": pure dict, "opt_state": optax state,
"step": int32}. The model graph (nnx GraphDef) is static and closed over,
so `train_step(state, batch) -> (state, metrics)` is one pure function
that `jax.jit` compiles once with declared shardings and donation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

State = dict[str, Any]
Batch = dict[str, jax.Array]


def loss_fn(graphdef: nnx.GraphDef, params: Any, batch: Batch,
            z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  model = nnx.merge(graphdef, params)
  logits_BTV = model(batch["inputs"], batch["positions"],
                     batch["segment_ids"])
  mask_BT = (batch["segment_ids"] > 0).astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(
    logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
  nll_BT = lse_BT - target_logit_BT
  tokens = jnp.maximum(mask_BT.sum(), 1.0)
  ce = (nll_BT * mask_BT).sum() / tokens
  loss = ce
  if z_loss:
    # PaLM's z-loss keeps the softmax normaliser near 1 (log Z near 0).
    loss = loss + z_loss * (jnp.square(lse_BT) * mask_BT).sum() / tokens
  return loss, {"ce": ce, "tokens": mask_BT.sum()}


def make_train_step(graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    z_loss: float) -> Callable[[State, Batch], tuple]:

  def train_step(state: State, batch: Batch):
    grad_fn = jax.value_and_grad(
      lambda p: loss_fn(graphdef, p, batch, z_loss), has_aux=True)
    (loss, aux), grads = grad_fn(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"],
                                          state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": aux["ce"],
      "total_loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": schedule(state["step"]),
      "tokens": aux["tokens"],
    }
    new_state = {"params": params, "opt_state": opt_state,
                 "step": state["step"] + 1}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, Batch], dict]:

  def eval_step(params, batch: Batch):
    _, aux = loss_fn(graphdef, params, batch, 0.0)
    # Sum (not mean) so batches of different fill combine exactly.
    return {"nll_sum": aux["ce"] * aux["tokens"], "tokens": aux["tokens"]}

  return eval_step
