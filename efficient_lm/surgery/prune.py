"""Structured pruning: the kept FFN neurons, kv groups of heads and
layers, sliced out of the original arrays (nothing is masked or
re-initialised: every surviving weight is the original one).

Each operation takes the model under surgery and the scores of
importance.py and returns the smaller model and what it did.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from efficient_lm.surgery.model import Surgery


class SurgeryError(ValueError):
  """Bad surgery input (one line)."""


def parse_keep(text: str, flag: str) -> float | int:
  """KEEP: a fraction in (0, 1) (it has a '.'), or a positive integer."""
  try:
    if "." not in text and "e" not in text.lower():
      value: float | int = int(text)
    else:
      value = float(text)
  except ValueError:
    raise SurgeryError(
      f"--{flag}={text}: expected a fraction in (0, 1) or an integer"
    ) from None
  if isinstance(value, float) and not 0.0 < value < 1.0:
    raise SurgeryError(
      f"--{flag}={text}: a fraction must lie in (0, 1) (an integer is a count)"
    )
  if isinstance(value, int) and value < 1:
    raise SurgeryError(f"--{flag}={text}: expected at least 1")
  return value


def _kept(n: int, keep: float | int) -> int:
  return keep if isinstance(keep, int) else round(keep * n)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores, in their original order (ties: the
  lower index first)."""
  order = np.argsort(-np.asarray(scores), kind="stable")
  return np.sort(order[:k])


def summary(scores: Sequence[np.ndarray], kept: Sequence[np.ndarray]) -> list:
  """Per layer: min / mean / max of the scores, of the kept ones and of
  the pruned ones (provenance)."""
  out = []
  for s, k in zip(scores, kept, strict=True):
    s = np.asarray(s, np.float64)
    mask = np.zeros(s.shape, bool)
    mask[k] = True
    row = {}
    for name, part in (("all", s), ("kept", s[mask]), ("pruned", s[~mask])):
      if part.size:
        row[name] = {
          "min": float(part.min()),
          "mean": float(part.mean()),
          "max": float(part.max()),
        }
    out.append(row)
  return out


# ------------------------------------------------------------------- FFN


def ffn_keep(
  scores: Sequence[np.ndarray], keep: float | int, per_layer: bool
) -> list[np.ndarray]:
  """The kept neurons of each layer: the top `keep` (a fraction of each
  layer's width, or a width) per layer; with `per_layer`, the top
  fraction (or width * layers) of all neurons ranked together, each layer
  keeping at least one."""
  widths = [len(s) for s in scores]
  if isinstance(keep, int) and keep > min(widths):
    raise SurgeryError(
      f"--ffn={keep} is above the current MLP width {min(widths)} "
      f"(layer widths {widths})"
    )
  if not per_layer:
    return [
      _top(s, max(_kept(n, keep), 1))
      for s, n in zip(scores, widths, strict=True)
    ]
  total = (
    (keep * len(widths)) if isinstance(keep, int) else round(keep * sum(widths))
  )
  total = max(total, len(widths))
  # Each layer's best neuron first, then the best of the rest globally.
  flat = [
    (float(v), i, h) for i, s in enumerate(scores) for h, v in enumerate(s)
  ]
  best = {i: int(np.argmax(s)) for i, s in enumerate(scores)}
  chosen = {(i, h) for i, h in best.items()}
  rest = sorted(
    (t for t in flat if (t[1], t[2]) not in chosen),
    key=lambda t: (-t[0], t[1], t[2]),
  )
  chosen |= {(i, h) for _, i, h in rest[: total - len(chosen)]}
  return [
    np.array(sorted(h for j, h in chosen if j == i), np.int64)
    for i in range(len(scores))
  ]


def prune_ffn(s: Surgery, kept: Sequence[np.ndarray]) -> Surgery:
  layers = []
  for layer, k in zip(s.layers, kept, strict=True):
    layer = copy.copy(layer)
    mlp = dict(layer["mlp"])
    mlp["gate_DF"] = mlp["gate_DF"][:, k]
    mlp["up_DF"] = mlp["up_DF"][:, k]
    mlp["down_FD"] = mlp["down_FD"][k, :]
    layer["mlp"] = mlp
    layers.append(layer)
  return s.replaced(layers)


# ----------------------------------------------------------------- heads


def check_heads(s: Surgery) -> None:
  m = s.cfg.model
  if (
    m.attention.projection != "qkv"
    or m.attention.kind == "tglobal"
    or any(k == "tglobal" for k in m.attention.pattern_kinds)
  ):
    raise SurgeryError(
      "--heads: only qkv attention of the kinds dense, sliding_window, "
      "global_local, block_sparse (not MLA, not tglobal) is supported"
    )


def heads_keep(
  s: Surgery, scores: Sequence[np.ndarray], keep: float | int
) -> list[np.ndarray]:
  """The kept kv groups of each layer: a fraction of the groups, or
  `keep` query heads (whole groups)."""
  out = []
  for i, (layer, sc) in enumerate(zip(s.layers, scores, strict=True)):
    h, g = layer["attn"]["q_DHK"].shape[1], layer["attn"]["k_DGK"].shape[1]
    r = h // g
    if isinstance(keep, int):
      if keep > h:
        raise SurgeryError(
          f"--heads={keep} is above layer {i}'s {h} query heads"
        )
      if keep % r:
        raise SurgeryError(
          f"--heads={keep}: layer {i} has {h} query heads in {g} kv groups "
          f"of {r}; heads are pruned as whole groups (a multiple of {r})"
        )
      n = keep // r
    else:
      n = round(keep * g)
    if n < 1:
      raise SurgeryError(
        f"--heads={keep} would prune all heads of layer {i} ({g} kv "
        f"groups of {r} heads); keep at least one group"
      )
    out.append(_top(sc, n))
  return out


def prune_heads(s: Surgery, kept: Sequence[np.ndarray]) -> Surgery:
  layers = []
  for layer, groups in zip(s.layers, kept, strict=True):
    attn = dict(layer["attn"])
    h, g = attn["q_DHK"].shape[1], attn["k_DGK"].shape[1]
    r = h // g
    heads = np.array([q * r + j for q in groups for j in range(r)], np.int64)
    for name, axis, idx in (
      ("q_DHK", 1, heads),
      ("o_HKD", 0, heads),
      ("q_bias_HK", 0, heads),
      ("k_DGK", 1, groups),
      ("v_DGK", 1, groups),
      ("k_bias_GK", 0, groups),
      ("v_bias_GK", 0, groups),
    ):
      if name in attn:
        attn[name] = np.take(attn[name], idx, axis=axis)
    layers.append({**layer, "attn": attn})
  return s.replaced(layers)


# ---------------------------------------------------------------- layers


def parse_drop(text: str, num_layers: int) -> int | list[int]:
  """--drop_layers: N (how many, ranked) or i,j,... (which; a single index
  is written with a trailing comma, '3,')."""
  try:
    if "," in text:
      which = [int(t) for t in text.split(",") if t.strip()]
      out: int | list[int] = which
    else:
      out = int(text)
  except ValueError:
    raise SurgeryError(
      f"--drop_layers={text}: expected a count N or indices i,j,..."
    ) from None
  if isinstance(out, int):
    if not 1 <= out < num_layers:
      raise SurgeryError(
        f"--drop_layers={text}: expected 1 <= N < {num_layers} (the model "
        "has that many layers and keeps at least one)"
      )
    return out
  bad = [i for i in out if not 0 <= i < num_layers]
  if bad or len(set(out)) != len(out) or not out:
    raise SurgeryError(
      f"--drop_layers={text}: expected distinct layer indices in "
      f"[0, {num_layers})"
    )
  if len(out) >= num_layers:
    raise SurgeryError(f"--drop_layers={text} would drop every layer")
  return sorted(out)


def drop_layers(s: Surgery, dropped: Sequence[int]) -> Surgery:
  m = s.cfg.model
  keep = [i for i in range(s.num_layers) if i not in set(dropped)]
  if m.attention.pattern.strip():
    kinds = m.attention.pattern_kinds
    new = [m.attention.layer_kind(i) for i in keep]
    if any(k != kinds[j % len(kinds)] for j, k in enumerate(new)):
      raise SurgeryError(
        f"--drop_layers: dropping layers {list(dropped)} breaks "
        f"model.attention.pattern={m.attention.pattern!r} (the kept "
        f"layers' kinds {new} no longer cycle through it)"
      )
  shapes = [dict(m.layer_shapes(i)) for i in keep]
  return s.replaced([s.layers[i] for i in keep], shapes)
