"""SmoothQuant (Xiao et al. 2023): move activation outliers into the
weights before int8_dynamic quantization, folded into the model so the
smoothed float model computes the same function.

For the input X of the linear layers that read one norm's output, per
input channel j

  s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(max|X_j| over the calibration tokens, max|W_j| over every weight row j of
every weight that reads X); the norm's scale is divided by s (Gemma's
(1 + w): 1 + w' = (1 + w) / s) and each weight's rows multiplied by s.
Fold points, per layer of an unrouted decoder:

  attention norm -> q, k, v (MHA / GQA / MQA, any mask) or MLA's dq | q,
                    dkv and kr
  MLP norm       -> gate, up (SwiGLU); the router, the experts' gate / up
                    and the shared experts' gate / up (MoE)
  up -> down     -> up's output columns / s, down's rows * s (SwiGLU:
                    act(gate) * up is linear in up, so this is exact too)

Skipped (reported): TGlobal attention (its block summaries are RMS-normed
sums of the normed input, which a per-channel scale does not commute
with) and the MoE up -> down fold (one scale per expert would be needed).

The statistics come from our own calibration forward (surgery/layers.py
runs the blocks one at a time and captures each norm's output), not
from qwix.contrib.smooth_quant: qwix keeps the factors as a separate
multiply on the activations of each weight at run time (its own
provider) instead of folding them into the norm, and its calibration pass
would meet the layers' `lax.scan` (models/stack.py) as PTQ did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_lm import runs
from efficient_lm.config import ConfigError
from efficient_lm.models.attention import Attention
from efficient_lm.models.layers import ACTIVATIONS, SwiGLU
from efficient_lm.models.mla import MLAttention
from efficient_lm.models.moe import MoE
from efficient_lm.surgery import layers as layers_lib
from efficient_lm.surgery.model import Surgery, per_batch

# Below this a channel's statistic counts as zero (no scaling).
_TINY = 1e-12


def check_alpha(alpha: float) -> None:
  if not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"--smooth={alpha}: expected an alpha in [0, 1]")


def check_supported(cfg) -> None:
  m = cfg.model
  if m.kind != "decoder" or m.routing.kind != "none":
    raise ConfigError(
      f"--smooth: model.kind={m.kind!r}, model.routing.kind="
      f"{m.routing.kind!r}; SmoothQuant handles unrouted decoders only"
    )


def _absmax(a, real):
  a = jnp.abs(a.astype(jnp.float32))
  return jnp.max(jnp.where(real[..., None], a, 0.0), axis=(0, 1))


def _stats(model, batch):
  """Per layer: max |X_j| over the real tokens of the attention input, the
  MLP input and (SwiGLU) the MLP's hidden act(gate) * up."""
  _, out = layers_lib.forward(model, batch, capture=("attn_in", "mlp_in"))
  real = batch["segment_ids"] > 0
  res = []
  for block, a, m in zip(
    layers_lib.blocks(model), out["attn_in"], out["mlp_in"], strict=True
  ):
    r = {"attn_in": _absmax(a, real), "mlp_in": _absmax(m, real)}
    if isinstance(block.mlp, SwiGLU):
      mlp, dt = block.mlp, m.dtype
      gate = jnp.einsum("BTD,DF->BTF", m, mlp.gate_DF[...].astype(dt))
      up = jnp.einsum("BTD,DF->BTF", m, mlp.up_DF[...].astype(dt))
      r["mlp_hidden"] = _absmax(ACTIVATIONS[mlp.activation](gate) * up, real)
    res.append(r)
  return res


def statistics(model, batches: Sequence[dict]) -> list[dict[str, np.ndarray]]:
  """Per layer (plan order) the channel maxima `_stats` names, over all
  `batches`."""
  outs = per_batch(model, batches, _stats)
  return [
    {k: np.max([o[i][k] for o in outs], axis=0) for k in outs[0][i]}
    for i in range(len(outs[0]))
  ]


def factors(act_max, weights: list[tuple[np.ndarray, int]], alpha: float):
  """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), W_j every row j (axis
  `axis` of each weight) that reads X; 1 where either maximum is zero."""
  w_max = np.zeros_like(act_max, dtype=np.float64)
  for w, axis in weights:
    other = tuple(i for i in range(w.ndim) if i != axis)
    w_max = np.maximum(w_max, np.abs(w.astype(np.float64)).max(axis=other))
  a = np.asarray(act_max, np.float64)
  ok = (a > _TINY) & (w_max > _TINY)
  s = np.where(ok, a**alpha / np.where(ok, w_max, 1.0) ** (1 - alpha), 1.0)
  return np.clip(s, 1e-5, None)


def _scaled(w: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
  shape = [1] * w.ndim
  shape[axis] = -1
  return (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)


def _fold_norm(norm: dict, s: np.ndarray, plus_one: bool) -> dict:
  w = norm["scale"].astype(np.float64)
  new = (1.0 + w) / s - 1.0 if plus_one else w / s
  return {**norm, "scale": new.astype(norm["scale"].dtype)}


def _readers(module, names: Sequence[str], axis: int, prefix=()):
  """(path, axis) of each of `names` the module has."""
  return [
    ((*prefix, n), axis) for n in names if getattr(module, n, None) is not None
  ]


def _get(tree: dict, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple, value) -> dict:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _fold(layer, norm, readers, act_max, alpha, plus_one):
  ws = [(_get(layer, p), ax) for p, ax in readers]
  s = factors(act_max, ws, alpha)
  layer = _set(layer, (norm,), _fold_norm(layer[norm], s, plus_one))
  for (p, ax), (w, _) in zip(readers, ws, strict=True):
    layer = _set(layer, p, _scaled(w, s, ax))
  return layer


def smooth_layers(
  surgery: Surgery, stats: list[dict], alpha: float
) -> tuple[list[dict], dict]:
  """The per-layer parameter dicts with every fold point smoothed, and a
  report: {"alpha", "folds": [per layer, the folds done], "skipped":
  [per layer, what was skipped and why]}."""
  plus_one = surgery.cfg.model.norm_plus_one
  model = surgery.model()
  out, folds, skipped = [], [], []
  for layer, st, block in zip(
    surgery.layers, stats, layers_lib.blocks(model), strict=True
  ):
    done, skip = [], []
    attn, mlp = block.attn, block.mlp
    if isinstance(attn, MLAttention):
      names = ("dq_DQ", "q_DHK", "dkv_DC", "kr_DR")
      readers = _readers(attn, names, 0, ("attn",))
    elif type(attn) is Attention:
      readers = _readers(attn, ("q_DHK", "k_DGK", "v_DGK"), 0, ("attn",))
    else:
      readers = []
      skip.append(
        f"attention {type(attn).__name__}: its summaries re-normalise "
        "the normed input"
      )
    if readers:
      layer = _fold(layer, "attn_norm", readers, st["attn_in"], alpha, plus_one)
      done.append("attn_norm->qkv")
    if isinstance(mlp, SwiGLU):
      readers = _readers(mlp, ("gate_DF", "up_DF"), 0, ("mlp",))
      layer = _fold(layer, "mlp_norm", readers, st["mlp_in"], alpha, plus_one)
      # up's columns -> down's rows: h = act(gate) * up is linear in up.
      up, down = layer["mlp"]["up_DF"], layer["mlp"]["down_FD"]
      s = factors(st["mlp_hidden"], [(down, 0)], alpha)
      layer = _set(layer, ("mlp", "up_DF"), _scaled(up, 1.0 / s, 1))
      layer = _set(layer, ("mlp", "down_FD"), _scaled(down, s, 0))
      done += ["mlp_norm->gate,up", "up->down"]
    elif isinstance(mlp, MoE):
      readers = _readers(mlp, ("router_DE",), 0, ("mlp",))
      readers += _readers(mlp, ("gate_EDF", "up_EDF"), 1, ("mlp",))
      if mlp.shared is not None:
        readers += _readers(
          mlp.shared, ("gate_DF", "up_DF"), 0, ("mlp", "shared")
        )
      layer = _fold(layer, "mlp_norm", readers, st["mlp_in"], alpha, plus_one)
      done.append("mlp_norm->router,experts")
      skip.append("MoE up->down: one scale per expert would be needed")
    out.append(layer)
    folds.append(done)
    skipped.append(skip)
  return out, {"alpha": alpha, "folds": folds, "skipped": skipped}


def smooth_params(
  cfg, params: Any, alpha: float, batches: Sequence[dict]
) -> tuple[dict, dict]:
  """(`params`, a pure dict of the model `cfg` describes, smoothed with
  factors from `batches`: host numpy arrays, the report of
  `smooth_layers`)."""
  check_alpha(alpha)
  check_supported(cfg)
  s = Surgery.of(cfg, params)
  stats = statistics(s.model(), batches)
  layers, report = smooth_layers(s, stats, alpha)
  return dataclasses.replace(s, layers=layers).params(), report


def smooth_run(
  run: runs.LoadedRun, alpha: float, batches: Sequence[dict]
) -> tuple[runs.LoadedRun, dict]:
  """`run` with SmoothQuant's factors (from `batches`) folded into its
  float weights (the same function), and the report of `smooth_layers`.
  ConfigError (one line) for an alpha outside [0, 1], a quantized run or
  a model it does not handle."""
  check_alpha(alpha)
  if run.config.model.quantization:
    raise ConfigError(
      f"{run.workdir} is already quantized (model.quantization="
      f"{run.config.model.quantization!r}); smooth its float source run"
    )
  new, report = smooth_params(run.config, run.params, alpha, batches)
  params = jax.tree.map(
    lambda a, old: jax.device_put(a, old.sharding), new, run.params
  )
  return dataclasses.replace(run, params=params), report
