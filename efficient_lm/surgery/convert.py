"""Retrofit conversions of a trained dense decoder (issue #20 item 3): the
same weights rearranged into another architecture, new parameters set so
that the converted model starts where the dense one is (exactly where the
architecture allows it; tests/test_surgery.py checks each identity case).

  to_gqa        MHA / GQA -> fewer kv groups: each new group's k and v
                projections (and biases) the mean of the groups it merges
                (Ainslie et al., GQA uptraining). G = current groups is the
                identity.
  to_attention  another attention kind or per-layer pattern on the same
                weights (the keys window, num_global, tglobal_block, ... as
                --config.model.attention.*). A tglobal layer's new summary
                norm starts at zero scale: its summary rows are zero
                vectors (logit 0, value 0), so the converted layer is the
                local attention with every softmax diluted by the
                summaries it sees, and no other token's content mixed in.
  to_mla        qkv -> DeepSeek MLA with kv_lora_rank C (see `to_mla`: its
                RoPE key is shared by all heads, so exact only for MQA).
  to_hourglass  the layers between k and m (default L - k) shortened by
                `factor` (models/hourglass.py); factor 1 is the identity.
  to_mor        mixture-of-recursions, middle_cycle sharing over N_r
                recursions: the first and last layers kept, each shared
                layer the mean of the layers it replaces; the router
                starts at zero, update_rule residual_delta and alpha 2, so
                a selected token's update is exactly its shared layers'
                (gate 2 * sigmoid(0) = 1).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import jax
import numpy as np
from flax import nnx

from efficient_lm import config as config_lib
from efficient_lm import runs
from efficient_lm import models
from efficient_lm.config import (
  AttentionConfig,
  Config,
  MoEConfig,
  RoutingConfig,
)
from efficient_lm.config.errors import ConfigError
from efficient_lm.models.layers import layer_rope
from efficient_lm.models.upcycle import upcycle
from efficient_lm.surgery import layers as layers_lib
from efficient_lm.surgery.model import Surgery, per_batch
from efficient_lm.surgery.prune import SurgeryError

# --config.model.<section>.KEY overrides the conversions take, and the
# operation each belongs to.
MODEL_SECTIONS = {
  "attention": "to_attention",
  "routing": "to_mor",
  "moe": "to_moe",
}


def split_overrides(
  overrides: list[str],
) -> tuple[list[str], dict[str, dict[str, Any]]]:
  """(--config.data.* overrides, {section: {key: value}} of the
  --config.model.attention.* / routing.* ones, parsed by the field's
  type). ConfigError (one line) for an unknown key or a bad value."""
  data, model = [], {s: {} for s in MODEL_SECTIONS}
  classes = {
    "attention": AttentionConfig,
    "routing": RoutingConfig,
    "moe": MoEConfig,
  }
  for text in overrides:
    name, eq, value = text.partition("=")
    parts = name.removeprefix("--config.").split(".")
    if parts[0] != "model" or len(parts) != 3 or not eq:
      data.append(text)  # runs.parse_overrides says what is wrong
      continue
    section, key = parts[1], parts[2]
    if section not in classes:
      raise ConfigError(
        f"{text}: only data.* and model.attention.* / model.routing.* / "
        "model.moe.* keys (with --to_attention / --to_mor / --to_moe) can "
        "be given"
      )
    hints = typing.get_type_hints(classes[section])
    if key not in hints:
      raise ConfigError(
        f"{text}: unknown key model.{section}.{key}; known: "
        f"{', '.join(sorted(hints))}"
      )
    model[section][key] = runs.parse_value(text, value, hints[key])
  return data, model


def _config(cfg: Config, edit) -> Config:
  """`cfg` with edit(model dict) applied, validated (ConfigError)."""
  d = cfg.to_dict()
  edit(d["model"])
  return config_lib.from_config_dict(d, device_count=cfg.mesh.size)


def _qkv(s: Surgery, flag: str) -> None:
  m = s.cfg.model
  if m.attention.projection != "qkv":
    raise SurgeryError(
      f"--{flag}: the model's attention is projection="
      f"{m.attention.projection!r}; expected qkv"
    )


# ------------------------------------------------------------------- GQA


def parse_count(text: str, flag: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise SurgeryError(
      f"--{flag}={text}: expected a positive integer"
    ) from None
  if value < 1:
    raise SurgeryError(f"--{flag}={text}: expected a positive integer")
  return value


def check_gqa(s: Surgery, groups: int) -> None:
  _qkv(s, "to_gqa")
  for i, layer in enumerate(s.layers):
    g = layer["attn"]["k_DGK"].shape[1]
    if groups > g or g % groups:
      raise SurgeryError(
        f"--to_gqa={groups}: layer {i} has {g} kv groups; expected a "
        f"divisor of {g} (groups are merged, never split)"
      )


def to_gqa(s: Surgery, groups: int) -> Surgery:
  """Each run of G0 / G consecutive kv groups mean-pooled into one."""
  check_gqa(s, groups)
  layers = []
  for layer in s.layers:
    attn = dict(layer["attn"])
    g0 = attn["k_DGK"].shape[1]
    r = g0 // groups
    for name, axis in (
      ("k_DGK", 1),
      ("v_DGK", 1),
      ("k_bias_GK", 0),
      ("v_bias_GK", 0),
    ):
      if name in attn:
        a = np.moveaxis(attn[name], axis, 0)
        a = a.reshape(groups, r, *a.shape[1:]).mean(1, dtype=np.float64)
        attn[name] = np.moveaxis(a.astype(attn[name].dtype), 0, axis)
    layers.append({**layer, "attn": attn})
  return s.replaced(layers)


# -------------------------------------------------------------- attention


def to_attention(s: Surgery, kind: str, keys: dict[str, Any]) -> Surgery:
  """The same weights under attention kind `kind` (a comma list: a
  per-layer pattern) and the given attention keys; tglobal layers gain a
  zero summary norm, layers leaving tglobal drop theirs."""
  m = s.cfg.model

  def edit(d):
    a = d["attention"]
    if "," in kind:
      a["pattern"] = kind
    else:
      a["kind"], a["pattern"] = kind, ""
    a.update(keys)

  if "kind" in keys or "pattern" in keys:
    raise SurgeryError(
      "--config.model.attention.kind / pattern: give the kind as "
      "--to_attention=KIND (a comma list for a per-layer pattern)"
    )
  cfg = _config(s.cfg, edit)
  zero = -1.0 if m.norm_plus_one else 0.0
  layers = []
  for i, layer in enumerate(s.layers):
    attn = dict(layer["attn"])
    if cfg.model.attention.layer_kind(i) == "tglobal":
      if "summary_norm" not in attn:
        scale = layer["attn_norm"]["scale"]
        attn["summary_norm"] = {"scale": np.full_like(scale, zero)}
    else:
      attn.pop("summary_norm", None)
    layers.append({**layer, "attn": attn})
  return Surgery(cfg, s.rest, layers)


# -------------------------------------------------------------------- MLA


def _norm_multiplier(scale: np.ndarray, plus_one: bool) -> np.ndarray:
  return (1.0 + scale if plus_one else scale).astype(np.float64)


def _normed_inputs(s: Surgery, batches: list[dict]) -> list[np.ndarray]:
  """Per layer: the attention inputs' RMS-normalised rows n = h / rms(h)
  (before the norm's scale) over the real calibration tokens, [N, D]."""
  outs = per_batch(s.model(), batches, _io)
  eps = s.cfg.model.norm_eps
  per_layer: list[list] = [[] for _ in s.layers]
  for batch, io in zip(batches, outs, strict=True):
    real = np.asarray(batch["segment_ids"]) > 0
    for i, a in enumerate(io):
      h = a[0][real].astype(np.float64)
      per_layer[i].append(h / np.sqrt((h * h).mean(-1, keepdims=True) + eps))
  return [np.concatenate(p) for p in per_layer]


def _io(model, batch):
  return layers_lib.forward(model, batch, capture=("io",))[1]["io"]


def low_frequency_dims(cfg: Config, layer: int, k: int) -> np.ndarray:
  """bool [K]: the RoPE dims (rotate-half pairs i, i + K/2) whose angle
  stays within 1 radian over the training context (inv_freq * seq_len <=
  1): nearly position-free, so MLA's no-rope part can carry them."""
  kind = cfg.model.attention.layer_kind(layer)
  freq = np.asarray(layer_rope(cfg.model, kind).inv_freq(k), np.float64)
  low = freq * cfg.data.seq_len <= 1.0
  return np.concatenate([low, low])


def check_mla(s: Surgery, rank: int) -> None:
  _qkv(s, "to_mla")
  a = s.cfg.model.attention
  if a.qk_norm or a.qkv_bias:
    raise SurgeryError(
      "--to_mla: the model has attention.qk_norm / qkv_bias, which MLA "
      "has no place for; expected neither"
    )
  dims = {lay["attn"]["q_DHK"].shape[2] for lay in s.layers}
  if len(dims) != 1:
    raise SurgeryError(
      f"--to_mla: the layers' head dims differ ({sorted(dims)}); MLA's head "
      "dims are one setting"
    )
  d = s.cfg.model.embed_dim
  if rank > d:
    raise SurgeryError(
      f"--to_mla={rank}: above the model width {d} (the full rank)"
    )


def to_mla(
  s: Surgery, rank: int, batches: list[dict]
) -> tuple[Surgery, list[dict]]:
  """-> (the MLA model, per layer its reconstruction errors). Every layer
  gets rope_head_dim = nope_head_dim = v_head_dim = K (the dense head
  dim) and kv_lora_rank = `rank`.

  MLA cannot carry a dense model's RoPE'd keys exactly: its rope part is
  one key shared by all heads, and its no-rope part comes through a
  normed latent without rotation. So: the shared rope key is the mean of
  the kv groups' keys (exact for MQA); the rest of each group's key is
  carried by the no-rope part in its low-frequency dims only
  (`low_frequency_dims`; their rotation over the context is ignored) and
  dropped in the others ("key error"); values and those key parts go
  through the latent, a rank-C factorisation (SVD) of the kv projections
  stacked over groups, whitened by the attention norm's scale. The
  latent's RMSNorm (MLA's kv_norm) is linear on inputs of constant norm:
  at C = D the latent is an orthogonal rotation of the normalised input
  (constant RMS, up to the norms' eps) and the whole conversion of an MQA
  model is exact; the latent norm's scale is the per-channel
  least-squares fit over the calibration data (1 at full rank but for
  eps; "latent error": the energy the rank cut drops)."""
  check_mla(s, rank)
  m = s.cfg.model
  inputs = _normed_inputs(s, batches)
  layers, errors = [], []
  for i, layer in enumerate(s.layers):
    attn = layer["attn"]
    wq, wk, wv, wo = (
      attn[n].astype(np.float64) for n in ("q_DHK", "k_DGK", "v_DGK", "o_HKD")
    )
    d, h, k = wq.shape
    g = wk.shape[1]
    mult = _norm_multiplier(layer["attn_norm"]["scale"], m.norm_plus_one)
    mult = np.where(np.abs(mult) > 1e-12, mult, 1.0)
    mean_k = wk.mean(1)  # [D, K]: the shared rope key
    low = low_frequency_dims(s.cfg, i, k)
    res = (wk - mean_k[:, None]) * low  # [D, G, K] carried by no-rope
    dropped = (wk - mean_k[:, None]) * ~low
    # The latent: n -> n Q, the kv maps of n (x = n * mult) factorised.
    big = np.concatenate(
      [
        (res * mult[:, None, None]).reshape(d, -1),
        (wv * mult[:, None, None]).reshape(d, -1),
      ],
      axis=1,
    )  # [D, 2 G K]
    # Left singular vectors, completed to a basis of R^D (full_matrices):
    # at C = D the latent is an orthogonal rotation of n.
    u, sv, _ = np.linalg.svd(big, full_matrices=True)
    q_basis = u[:, :rank]  # [D, C]
    z = inputs[i] @ q_basis  # [N, C]
    r = np.sqrt((z * z).mean(-1, keepdims=True) + m.norm_eps)
    scale = (z * z / r).sum(0) / np.maximum((z * z / r**2).sum(0), 1e-30)
    proj = q_basis.T  # [C, D]
    uk = np.einsum("CD,DGK->CGK", proj, res * mult[:, None, None])
    uv = np.einsum("CD,DGK->CGK", proj, wv * mult[:, None, None])
    heads = np.arange(h) // (h // g)  # each query head's kv group
    f = _dense_scale(m, k) * np.sqrt(2 * k)  # dense scale / MLA's
    q_new = np.concatenate([wq * low[None, None] * f, wq * f], axis=-1)
    new = {
      "q_DHK": q_new,
      "dkv_DC": q_basis / mult[:, None],
      "kv_norm": {"scale": scale - 1.0 if m.norm_plus_one else scale},
      "kr_DR": mean_k,
      "uk_CHN": uk[:, heads],
      "uv_CHE": uv[:, heads],
      "o_HED": wo,
    }
    dt = attn["q_DHK"].dtype
    layers.append({**layer, "attn": jax.tree.map(lambda a: a.astype(dt), new)})
    lost = big - q_basis @ (q_basis.T @ big)
    errors.append(
      {
        "layer": i,
        "key_error": float(
          np.linalg.norm(dropped * mult[:, None, None])
          / max(np.linalg.norm(wk * mult[:, None, None]), 1e-30)
        ),
        "latent_error": float(
          np.linalg.norm(lost) / max(np.linalg.norm(big), 1e-30)
        ),
        "singular_values": [float(v) for v in sv[: rank + 1]],
      }
    )
  shapes = [dict(m.layer_shapes(i)) for i in range(s.num_layers)]

  def edit(dm):
    a = dm["attention"]
    a.update(
      projection="mla",
      kv_lora_rank=rank,
      q_lora_rank=0,
      rope_head_dim=shapes[0]["head_dim"],
      nope_head_dim=shapes[0]["head_dim"],
      v_head_dim=shapes[0]["head_dim"],
      query_pre_attn_scalar=None,
    )

  cfg = _config(s.cfg, edit)
  return Surgery(cfg, s.rest, layers), errors


def _dense_scale(m, k: int) -> float:
  base = m.attention.query_pre_attn_scalar or k
  return 1.0 / float(np.sqrt(base))


# --------------------------------------------------------------- hourglass


def parse_hourglass(text: str, num_layers: int) -> tuple[int, int]:
  """--to_hourglass=k (shorten after layer k, back after layer L - k) or
  k,m (back after layer m) -> (k, m) with 0 <= k < m <= L."""
  try:
    parts = [int(t) for t in text.split(",")]
  except ValueError:
    raise SurgeryError(
      f"--to_hourglass={text}: expected k or k,m (layer counts)"
    ) from None
  if len(parts) == 1:
    parts.append(num_layers - parts[0])
  k, m = parts[:2]
  if len(parts) != 2 or not 0 <= k < m <= num_layers:
    raise SurgeryError(
      f"--to_hourglass={text}: expected 0 <= k < m <= {num_layers} (layers "
      f"k+1..m are shortened; m defaults to {num_layers} - k)"
    )
  return k, m


def to_hourglass(s: Surgery, k: int, m: int, factor: int) -> Surgery:
  if factor < 1:
    raise SurgeryError(f"--hourglass_factor={factor}: expected >= 1")
  n = s.num_layers

  def edit(d):
    d["kind"] = "hourglass"
    d["funnel"]["stages"] = (k, m - k, n - m)
    d["funnel"]["factor"] = factor

  return Surgery(_config(s.cfg, edit), s.rest, s.layers)


# -------------------------------------------------------------------- MoR


def to_mor(s: Surgery, recursions: int, keys: dict[str, Any]) -> Surgery:
  n = s.num_layers
  base: dict[str, Any] = {
    "kind": "mor",
    "sharing": "middle_cycle",
    "num_recursions": recursions,
    "update_rule": "residual_delta",
    "alpha": 2.0,
  }
  routing = {**base, **keys}
  if routing["sharing"] != "middle_cycle" or routing["kind"] != "mor":
    raise SurgeryError(
      "--to_mor: converts with routing.sharing='middle_cycle' only"
    )

  def edit(d):
    d["routing"].update(routing)

  try:
    cfg = _config(s.cfg, edit)
  except ConfigError as e:
    raise SurgeryError(f"--to_mor={recursions}: {e}") from None
  depth = cfg.model.routing.recursion_depth(n)
  groups = [
    [1 + j + r * depth for r in range(recursions)] for j in range(depth)
  ]
  shared = []
  for j, members in enumerate(groups):
    shapes = {jax.tree.map(np.shape, s.layers[i]).__repr__() for i in members}
    if len(shapes) != 1:
      raise SurgeryError(
        f"--to_mor={recursions}: layers {members} share shared layer {j} "
        "but differ in shape"
      )
    shared.append(
      jax.tree.map(
        lambda *a: np.mean(np.stack(a), 0, dtype=np.float64).astype(a[0].dtype),
        *[s.layers[i] for i in members],
      )
    )
  embed = s.cfg.model.embed_dim
  dt = s.layers[0]["mlp_norm"]["scale"].dtype
  extra = {"router_DN": np.zeros((embed, recursions), dt)}
  return dataclasses.replace(
    Surgery(cfg, s.rest, [s.layers[0], *shared, s.layers[-1]]),
    stack_extra=extra,
  )


def moe_config(cfg: Config, experts: int, keys: dict[str, Any]) -> Config:
  """`cfg` with `experts` routed experts per MoE layer and the
  --config.model.moe.* keys, validated (SurgeryError, one line)."""
  if cfg.model.moe.num_experts:
    raise SurgeryError(
      f"--to_moe={experts}: the model already has experts "
      f"(model.moe.num_experts={cfg.model.moe.num_experts})"
    )

  def edit(d):
    d["moe"].update({**keys, "num_experts": experts})

  try:
    return _config(cfg, edit)
  except ConfigError as e:
    raise SurgeryError(f"--to_moe={experts}: {e}") from None


def to_moe(
  cfg: Config, params: dict, experts: int, keys: dict[str, Any], seed: int
) -> tuple[Config, dict, dict]:
  """Sparse upcycling (models/upcycle.py): every routed expert of an MoE
  layer a copy of its dense MLP, the routers and model state (loss-free
  biases) from a fresh init of the MoE model at `seed`; at step 0 its
  logits equal the dense model's (with num_shared_experts, whose down
  projections start at zero, too). -> (config, params, model state)."""
  new_cfg = moe_config(cfg, experts, keys)
  model = models.build(new_cfg.model, nnx.Rngs(params=seed))
  _, init, state = nnx.split(model, nnx.Param, models.ModelState)
  try:
    new = upcycle(params, nnx.to_pure_dict(init), new_cfg.model)
  except ValueError as e:  # an expert width other than the dense MLP's
    raise SurgeryError(
      f"--to_moe={experts}: {e}; set model.moe.expert_mlp_dim to 0"
    ) from None
  new = jax.tree.map(np.asarray, jax.device_get(new))
  return new_cfg, new, nnx.to_pure_dict(state)
