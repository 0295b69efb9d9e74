"""Optax chain and learning-rate schedule from TrainConfig."""

from __future__ import annotations

import jax
import optax

from efficient_lm.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine to `end_learning_rate`."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
    end_value=cfg.end_learning_rate)


def _decay_mask(params):
  # Weight decay on matrices only (nanoGPT / GPT-3 convention): norms and
  # other vectors are excluded.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
