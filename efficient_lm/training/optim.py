"""Optax chain, learning-rate schedule and weight-decay mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import nnx

from efficient_lm import sharding
from efficient_lm.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine to `end_learning_rate`."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
    end_value=cfg.end_learning_rate,
  )


def decays(
  axes: Sequence[str | None], *, decay_embeddings: bool = True
) -> bool:
  """Whether a parameter with these logical axes gets weight decay.

  Decided by what the parameter is, never by its rank: a scanned stack of
  norm scales is [L, D] but still a norm. The 'layers' axis of stacked
  parameters (sharding.logical_axes) does not count.
  """
  names = [a for a in axes if a != "layers"]
  if "vocab" in names:  # token embedding, untied output head
    return decay_embeddings
  if "norm" in names or "bias" in names:  # q/k/v biases are [H, K]
    return False
  # Matrices (nanoGPT / GPT-3 convention); biases and other vectors not.
  return len(names) >= 2


def decay_mask(
  abstract_params: nnx.State, *, decay_embeddings: bool = True
) -> dict[Any, Any]:
  """Bool tree shaped like nnx.to_pure_dict(params), from the parameters'
  `logical_axes` metadata (an abstract state from nnx.eval_shape is enough)."""

  def leaf(var: nnx.Variable) -> nnx.Variable:
    return var.replace(
      decays(sharding.logical_axes(var), decay_embeddings=decay_embeddings)
    )

  return nnx.to_pure_dict(
    jax.tree.map(
      leaf, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
  )


def make_optimizer(
  cfg: TrainConfig, *, decay_mask: Any
) -> optax.GradientTransformation:
  """AdamW with weight decay where `decay_mask` (a bool tree) is True."""
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(
    optax.adamw(
      schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*parts)
