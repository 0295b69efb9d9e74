"""Importance criteria: one score per FFN neuron, per kv group of heads,
per layer; higher means keep.

FFN neuron h of a layer (act_h(x) the gated hidden activation
act(x W_gate)_h * (x W_up)_h on the normed input, x over the real tokens
of the calibration batches):

  rmax        max_x ||act_h(x) * W_down[h, :]||_2 (the tutorial's residual
              contribution: |act_h(x)| * ||W_down[h, :]||_2)
  activation  mean_x |act_h(x)| (Minitron)
  taylor      |sum over the neuron's weights w (W_gate[:, h], W_up[:, h],
              W_down[h, :]) of w * dL/dw|, L the mean calibration loss:
              LLM-Pruner's first-order estimate of the loss change when
              the neuron is removed, |L(w) - L(w, neuron zeroed)| ~
              |w . grad L| (its vector-wise form: the derivative of L
              along scaling the neuron's weights, which a finite
              difference of masking checks)
  magnitude   ||(W_gate[:, h], W_up[:, h], W_down[h, :])||_2
  random      uniform draws from `seed` (the control)

kv group g of a layer (its query heads h = g * H/G ... (g + 1) * H/G - 1):

  output      sum over its heads of mean_x ||o_h(x) W_o[h]||_2, o_h the
              head's attention output
  taylor      |sum of w * dL/dw| over q, o of its heads and k, v of the
              group (biases included), as for neurons
  magnitude   the L2 norm of those weights
  random      uniform draws from `seed`

layer l:

  loss        the calibration loss with layer l skipped (its input passed
              on) minus the loss of the whole model: drop the smallest
  cosine      minus the mean cosine similarity of the layer's input and
              output rows: drop the most similar (ShortGPT / Gromov et al.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficient_lm import models
from efficient_lm.surgery import layers as layers_lib
from efficient_lm.surgery.model import (
  Surgery,
  calibration_loss,
  loss_grads,
  per_batch,
)


# The per-layer weights of one FFN neuron / one kv group: (module, name,
# the axis that indexes neurons / query heads / kv groups).
_FFN = (("mlp", "gate_DF", 1), ("mlp", "up_DF", 1), ("mlp", "down_FD", 0))
_QUERY = (("attn", "q_DHK", 1), ("attn", "o_HKD", 0), ("attn", "q_bias_HK", 0))
_KV = (
  ("attn", "k_DGK", 1),
  ("attn", "v_DGK", 1),
  ("attn", "k_bias_GK", 0),
  ("attn", "v_bias_GK", 0),
)


def _per_unit(layer: dict, weights, fn) -> np.ndarray:
  """sum over `weights` of fn(w) reduced to the unit axis."""
  total = 0.0
  for module, name, axis in weights:
    if name in layer[module]:
      a = np.moveaxis(fn(layer[module][name]), axis, 0)
      total = total + a.reshape(a.shape[0], -1).sum(1)
  return np.asarray(total, np.float64)


def _group_sum(per_head: np.ndarray, groups: int) -> np.ndarray:
  return per_head.reshape(groups, -1).sum(1)


def taylor_terms(s: Surgery, batches: Sequence[dict]) -> list:
  """w * dL/dw (signed, float64) for every weight, laid out like the
  layers; L the mean calibration loss."""
  grads = loss_grads(s.model(), batches)
  _, g_layers = layers_lib.unstack(grads, models.layer_plan(s.cfg.model))
  return [
    jax.tree.map(lambda w, g: w.astype(np.float64) * g, w, g)
    for w, g in zip(s.layers, g_layers, strict=True)
  ]


def _random(sizes: Sequence[int], seed: int) -> list:
  rng = np.random.default_rng(seed)
  return [rng.random(n) for n in sizes]


# The jitted per-batch passes (module level: one compile per model
# structure).


def _mlp_stats(model, batch):
  _, out = layers_lib.forward(model, batch, capture=("mlp_hidden",))
  real = (batch["segment_ids"] > 0)[..., None]
  res = []
  for h in out["mlp_hidden"]:
    a = jnp.abs(h.astype(jnp.float32))
    res.append(
      {
        "max": jnp.max(jnp.where(real, a, 0.0), axis=(0, 1)),
        "sum": jnp.sum(jnp.where(real, a, 0.0), axis=(0, 1)),
        "count": jnp.sum(real).astype(jnp.float32),
      }
    )
  return res


def _head_stats(model, batch):
  _, out = layers_lib.forward(model, batch, capture=("heads",))
  real = batch["segment_ids"] > 0
  res = []
  for c_BTHD in out["heads"]:
    norm_BTH = jnp.linalg.norm(c_BTHD, axis=-1)
    res.append(jnp.sum(jnp.where(real[..., None], norm_BTH, 0.0), axis=(0, 1)))
  return res, jnp.sum(real).astype(jnp.float32)


def _skip_losses(model, batch):
  n = sum(seg.repeats * len(seg.pattern) for seg in model.stack.segments)
  skips = jnp.concatenate([jnp.zeros((1, n), bool), jnp.eye(n, dtype=bool)])

  def one(skip):
    logits, _ = layers_lib.forward(model, batch, skip=skip)
    return layers_lib.token_nll(logits, batch)

  return jax.lax.map(one, skips)


def _cosines(model, batch):
  _, out = layers_lib.forward(model, batch, capture=("io",))
  real = batch["segment_ids"] > 0
  res = []
  for io in out["io"]:
    a, b = io[0].astype(jnp.float32), io[1].astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / (
      jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12
    )
    res.append(jnp.sum(jnp.where(real, cos, 0.0)))
  return jnp.stack(res), jnp.sum(real).astype(jnp.float32)


def ffn_scores(
  s: Surgery, batches: Sequence[dict], criterion: str, seed: int = 0
) -> list[np.ndarray]:
  """One score per neuron of each layer's MLP ([F_l] per layer)."""
  if criterion == "random":
    return _random([lay["mlp"]["gate_DF"].shape[1] for lay in s.layers], seed)
  if criterion == "magnitude":
    sq = lambda w: np.square(w.astype(np.float64))
    return [np.sqrt(_per_unit(lay, _FFN, sq)) for lay in s.layers]
  if criterion == "taylor":
    return [
      np.abs(_per_unit(t, _FFN, lambda a: a)) for t in taylor_terms(s, batches)
    ]
  if criterion not in ("rmax", "activation"):
    raise ValueError(f"unknown FFN criterion {criterion!r}")

  outs = per_batch(s.model(), batches, _mlp_stats)
  acc = [
    {
      "max": np.max([o[i]["max"] for o in outs], axis=0),
      "sum": np.sum([o[i]["sum"] for o in outs], axis=0),
      "count": float(sum(o[i]["count"] for o in outs)),
    }
    for i in range(s.num_layers)
  ]
  if criterion == "activation":
    return [
      a["sum"].astype(np.float64) / max(float(a["count"]), 1.0) for a in acc
    ]
  return [
    a["max"].astype(np.float64)
    * np.linalg.norm(lay["mlp"]["down_FD"].astype(np.float64), axis=1)
    for a, lay in zip(acc, s.layers, strict=True)
  ]


def _groups(layer: dict) -> tuple[int, int]:
  """(query heads H, kv groups G) of a qkv layer."""
  return layer["attn"]["q_DHK"].shape[1], layer["attn"]["k_DGK"].shape[1]


def head_scores(
  s: Surgery, batches: Sequence[dict], criterion: str, seed: int = 0
) -> list[np.ndarray]:
  """One score per kv group of each layer ([G_l] per layer)."""
  groups = [_groups(lay)[1] for lay in s.layers]
  if criterion == "random":
    return _random(groups, seed)
  if criterion in ("magnitude", "taylor"):
    per_layer = (
      taylor_terms(s, batches)
      if criterion == "taylor"
      else [
        jax.tree.map(lambda w: np.square(w.astype(np.float64)), lay)
        for lay in s.layers
      ]
    )
    out = []
    for t, g in zip(per_layer, groups, strict=True):
      score = _group_sum(_per_unit(t, _QUERY, lambda a: a), g) + _per_unit(
        t, _KV, lambda a: a
      )
      out.append(np.sqrt(score) if criterion == "magnitude" else np.abs(score))
    return out
  if criterion != "output":
    raise ValueError(f"unknown head criterion {criterion!r}")

  outs = per_batch(s.model(), batches, _head_stats)
  count = max(float(sum(o[1] for o in outs)), 1.0)
  return [
    _group_sum(np.sum([o[0][i] for o in outs], axis=0) / count, groups[i])
    for i in range(s.num_layers)
  ]


def layer_scores(
  s: Surgery, batches: Sequence[dict], criterion: str
) -> np.ndarray:
  """One score per layer ([L]); higher means keep."""
  model = s.model()
  if criterion == "loss":
    outs = per_batch(model, batches, _skip_losses)
    total = np.sum([o[0] for o in outs], axis=0, dtype=np.float64)
    count = max(float(np.sum([o[1][0] for o in outs])), 1.0)
    mean = total / count
    return mean[1:] - mean[0]
  if criterion != "cosine":
    raise ValueError(f"unknown layer criterion {criterion!r}")

  outs = per_batch(model, batches, _cosines)
  count = max(float(sum(o[1] for o in outs)), 1.0)
  return -np.sum([o[0] for o in outs], axis=0, dtype=np.float64) / count


__all__ = [
  "calibration_loss",
  "ffn_scores",
  "head_scores",
  "layer_scores",
]
