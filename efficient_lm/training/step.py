"""The pure train step and the eval step.

State is a plain pytree: {"params": pure dict, "model_state": pure dict of
the model's non-trainable variables (models.ModelState; empty for most
models), "opt_state": optax state, "step": int32}. The model graph (nnx
GraphDef) is static and closed over, so `train_step(state, batch) ->
(state, metrics)` is one pure function that `jax.jit` compiles once with
declared shardings and donation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import nnx

from efficient_lm.models import ModelState
from efficient_lm.training.losses import Objective

State = dict[str, Any]
Batch = dict[str, jax.Array]


def loss_fn(graphdef: nnx.GraphDef, params: Any, model_state: Any,
            batch: Batch, objective: Objective, *,
            causal_routing: bool = False):
  """-> (loss, (objective metrics, model aux, updated model_state)).
  Training routes by top-k; evaluation passes `causal_routing=True`."""
  model = nnx.merge(graphdef, params, model_state)
  logits_BTV, aux = model(batch["inputs"], batch["positions"],
                          batch["segment_ids"],
                          causal_routing=causal_routing)
  loss, metrics = objective(logits_BTV, batch, aux)
  new_model_state = nnx.to_pure_dict(nnx.state(model, ModelState))
  return loss, (metrics, aux, new_model_state)


def make_train_step(graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    objective: Objective) -> Callable[[State, Batch], tuple]:

  def train_step(state: State, batch: Batch):
    grad_fn = jax.value_and_grad(
      lambda p: loss_fn(graphdef, p, state["model_state"], batch, objective),
      has_aux=True)
    (loss, (obj, aux, model_state)), grads = grad_fn(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"],
                                          state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": obj["ce"],
      "total_loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": schedule(state["step"]),
      "tokens": obj["tokens"],
      "aux": aux,   # the model's own entries, apart from the step's
    }
    new_state = {"params": params, "model_state": model_state,
                 "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef,
                   objective: Objective) -> Callable[[Any, Any, Batch], dict]:
  """(params, model_state, batch) -> sums over the batch: `nll_sum` and
  `tokens` (so batches of different fill combine exactly), and the model's
  `aux` entries (per batch; the caller averages them over batches)."""

  def eval_step(params, model_state, batch: Batch):
    _, (obj, aux, _) = loss_fn(graphdef, params, model_state, batch,
                               objective, causal_routing=True)
    return {"nll_sum": obj["ce"] * obj["tokens"], "tokens": obj["tokens"],
            "aux": aux}

  return eval_step
