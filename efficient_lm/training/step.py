"""The pure train step and the eval step.

State is a plain pytree: {"params": pure dict, "model_state": pure dict of
the model's non-trainable variables (models.ModelState; empty for most
models), "opt_state": optax state, "step": int32}. The model graph (nnx
GraphDef) is static and closed over, so `train_step(state, batch) ->
(state, metrics)` is one pure function that `jax.jit` compiles once with
declared shardings and donation.

Objectives with a `corrupt(key, batch)` method (MLM) corrupt the batch
inside the step: training from `fold_in(noise_key, step)`, so a resumed run
draws exactly the corruption the uninterrupted one would; evaluation from
a fixed key folded with a hash of the batch's tokens, the same for every
evaluation of the same batch (and every seed and mesh).

With a `teacher(teacher_vars, batch) -> logits` (distillation), both steps
take the frozen teacher's variables as one more argument, run the teacher
on the batch first and add its logits, gradient stopped, as
`batch["teacher_logits"]`: the teacher is an input, never part of the
state, so it has no gradients, no optimizer state and no checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efficient_lm.models import ModelState
from efficient_lm.training.losses import Objective

State = dict[str, Any]
Batch = dict[str, jax.Array]
Teacher = Callable[[Any, Batch], jax.Array]

# The evaluation corruption's key (objectives with `corrupt`).
EVAL_NOISE_SEED = 0


def _corrupted(objective: Objective, key: jax.Array, batch: Batch) -> Batch:
  corrupt = getattr(objective, "corrupt", None)
  return batch if corrupt is None else corrupt(key, batch)


def _with_teacher(
  teacher: Teacher | None, teacher_vars: Any, batch: Batch
) -> Batch:
  if teacher is None:
    return batch
  logits_BTV = jax.lax.stop_gradient(teacher(teacher_vars, batch))
  return {**batch, "teacher_logits": logits_BTV}


def _batch_hash(batch: Batch) -> jax.Array:
  """A uint32 of the batch's tokens and where they sit (wrapping sums:
  exact, so every mesh agrees)."""
  tokens_BT = batch["inputs"].astype(jnp.uint32)
  weight_T = jnp.arange(1, tokens_BT.shape[1] + 1, dtype=jnp.uint32)
  row_B = jnp.arange(1, tokens_BT.shape[0] + 1, dtype=jnp.uint32)
  return jnp.sum(
    tokens_BT * weight_T[None] * (row_B[:, None] * 40503 + 1), dtype=jnp.uint32
  )


def loss_fn(
  graphdef: nnx.GraphDef,
  params: Any,
  model_state: Any,
  batch: Batch,
  objective: Objective,
  *,
  causal_routing: bool = False,
):
  """-> (loss, (objective metrics, model aux, updated model_state)).
  Training routes by top-k; evaluation passes `causal_routing=True`."""
  model = nnx.merge(graphdef, params, model_state)
  logits_BTV, aux = model(
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    causal_routing=causal_routing,
  )
  loss, metrics = objective(logits_BTV, batch, aux)
  new_model_state = nnx.to_pure_dict(nnx.state(model, ModelState))
  return loss, (metrics, aux, new_model_state)


def make_train_step(
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  objective: Objective,
  *,
  noise_key: jax.Array | None = None,
  teacher: Teacher | None = None,
) -> Callable[..., tuple]:
  """`noise_key`: the run's key for batch corruption (MLM); `teacher`:
  the step is (state, batch, teacher_vars) (distillation)."""
  if noise_key is None:
    noise_key = jax.random.key(0)

  def train_step(state: State, batch: Batch, teacher_vars: Any = None):
    batch = _corrupted(
      objective, jax.random.fold_in(noise_key, state["step"]), batch
    )
    batch = _with_teacher(teacher, teacher_vars, batch)
    grad_fn = jax.value_and_grad(
      lambda p: loss_fn(graphdef, p, state["model_state"], batch, objective),
      has_aux=True,
    )
    (loss, (obj, aux, model_state)), grads = grad_fn(state["params"])
    updates, opt_state = optimizer.update(
      grads, state["opt_state"], state["params"]
    )
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": obj["ce"],
      "total_loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": schedule(state["step"]),
      "tokens": obj["tokens"],
      **_extra(obj),  # the objective's own (distillation: kl)
      "aux": aux,  # the model's own entries, apart from the step's
    }
    new_state = {
      "params": params,
      "model_state": model_state,
      "opt_state": opt_state,
      "step": state["step"] + 1,
    }
    return new_state, metrics

  return train_step


def _extra(obj: dict) -> dict:
  """An objective's metrics beyond `ce` and `tokens` (per-token means)."""
  return {k: v for k, v in obj.items() if k not in ("ce", "tokens")}


def make_eval_step(
  graphdef: nnx.GraphDef, objective: Objective, teacher: Teacher | None = None
) -> Callable[..., dict]:
  """(params, model_state, batch[, teacher_vars]) -> sums over the batch:
  `nll_sum` and `tokens` (so batches of different fill combine exactly),
  `sums` of the objective's other per-token metrics (distillation: kl),
  and the model's `aux` entries (per batch; the caller averages them over
  batches)."""

  def eval_step(params, model_state, batch: Batch, teacher_vars: Any = None):
    key = jax.random.fold_in(
      jax.random.key(EVAL_NOISE_SEED), _batch_hash(batch)
    )
    batch = _corrupted(objective, key, batch)
    batch = _with_teacher(teacher, teacher_vars, batch)
    _, (obj, aux, _) = loss_fn(
      graphdef, params, model_state, batch, objective, causal_routing=True
    )
    return {
      "nll_sum": obj["ce"] * obj["tokens"],
      "tokens": obj["tokens"],
      "sums": {k: v * obj["tokens"] for k, v in _extra(obj).items()},
      "aux": aux,
    }

  return eval_step
