"""Hugging Face tensor names <-> our parameter paths, per family.

`tensor_map(cfg, fam)` lists one `Tensor` per Hugging Face tensor of the
model: its name and shape there, our flat parameter key (dotted, as
training/fingerprints.flat spells it), the repeat slot of a stacked layer
parameter (None: not stacked) and the exact, invertible layout change
(transpose and reshape only, so values pass bit-identically both ways).
Plan layer i sits at segment s, pattern position j, repeat r of
models/stack.py `segments(layer_plan(cfg))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from efficient_lm import models
from efficient_lm.config import ModelConfig
from efficient_lm.hf.families import Family
from efficient_lm.models import stack

# Tensors some checkpoints carry that are not parameters (recomputed from
# the config): skipped on import, never written.
NON_PARAMETERS = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str  # Hugging Face name
  shape: tuple[int, ...]  # Hugging Face shape
  key: str  # our flat parameter key
  slot: int | None  # repeat index in a stacked parameter
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _linear(out_shape: tuple[int, ...]):
  """HF Linear weight [out, in] <-> ours [in, *out] (q_DHK, gate_DF, ...)."""

  def to_ours(w):
    return np.ascontiguousarray(w.T).reshape(w.shape[1], *out_shape)

  def to_hf(x):
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)

  return to_ours, to_hf


def _linear_in(in_shape: tuple[int, ...]):
  """HF Linear weight [out, in] <-> ours [*in, out] (o_HKD)."""

  def to_ours(w):
    return np.ascontiguousarray(w.T).reshape(*in_shape, w.shape[0])

  def to_hf(x):
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)

  return to_ours, to_hf


def _reshape(ours: tuple[int, ...]):
  return (
    lambda b: np.ascontiguousarray(b).reshape(ours),
    lambda x: np.ascontiguousarray(x).reshape(-1),
  )


def layer_slots(cfg: ModelConfig) -> list[tuple[int, int, int]]:
  """(segment, pattern position, repeat) of each plan layer."""
  out = []
  for s, seg in enumerate(stack.segments(models.layer_plan(cfg))):
    for r in range(seg.repeats):
      for j in range(len(seg.pattern)):
        out.append((s, j, r))
  # layer = first + r * len(pattern) + j: the loops above run in that order
  return out


def tensor_map(cfg: ModelConfig, fam: Family) -> list[Tensor]:
  d, v = cfg.embed_dim, cfg.vocab_size
  h, g, k, f = (
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.resolved_head_dim,
    cfg.mlp_dim,
  )
  out = [
    Tensor(
      "model.embed_tokens.weight", (v, d), "embed.table_VD", None, _same, _same
    ),
    Tensor("model.norm.weight", (d,), "final_norm.scale", None, _same, _same),
  ]
  if not cfg.tie_embeddings:
    out.append(
      Tensor("lm_head.weight", (v, d), "head_DV", None, *_linear((v,)))
    )
  # HF name suffix, HF shape, our key suffix, transforms
  per_layer = [
    ("self_attn.q_proj.weight", (h * k, d), "attn.q_DHK", _linear((h, k))),
    ("self_attn.k_proj.weight", (g * k, d), "attn.k_DGK", _linear((g, k))),
    ("self_attn.v_proj.weight", (g * k, d), "attn.v_DGK", _linear((g, k))),
    ("self_attn.o_proj.weight", (d, h * k), "attn.o_HKD", _linear_in((h, k))),
    ("mlp.gate_proj.weight", (f, d), "mlp.gate_DF", _linear((f,))),
    ("mlp.up_proj.weight", (f, d), "mlp.up_DF", _linear((f,))),
    ("mlp.down_proj.weight", (d, f), "mlp.down_FD", _linear((d,))),
    ("input_layernorm.weight", (d,), "attn_norm.scale", (_same, _same)),
  ]
  if fam.gemma:
    per_layer += [
      (
        "post_attention_layernorm.weight",
        (d,),
        "post_attn_norm.scale",
        (_same, _same),
      ),
      (
        "pre_feedforward_layernorm.weight",
        (d,),
        "mlp_norm.scale",
        (_same, _same),
      ),
      (
        "post_feedforward_layernorm.weight",
        (d,),
        "post_mlp_norm.scale",
        (_same, _same),
      ),
    ]
  else:
    per_layer.append(
      (
        "post_attention_layernorm.weight",
        (d,),
        "mlp_norm.scale",
        (_same, _same),
      )
    )
  if cfg.attention.qkv_bias:
    per_layer += [
      ("self_attn.q_proj.bias", (h * k,), "attn.q_bias_HK", _reshape((h, k))),
      ("self_attn.k_proj.bias", (g * k,), "attn.k_bias_GK", _reshape((g, k))),
      ("self_attn.v_proj.bias", (g * k,), "attn.v_bias_GK", _reshape((g, k))),
    ]
  if cfg.attention.qk_norm:
    per_layer += [
      ("self_attn.q_norm.weight", (k,), "attn.q_norm.scale", (_same, _same)),
      ("self_attn.k_norm.weight", (k,), "attn.k_norm.scale", (_same, _same)),
    ]
  for i, (s, j, r) in enumerate(layer_slots(cfg)):
    prefix = f"stack.groups.segment_{s}.layer_{j}."
    for name, shape, key, (to_ours, to_hf) in per_layer:
      out.append(
        Tensor(
          f"model.layers.{i}.{name}", shape, prefix + key, r, to_ours, to_hf
        )
      )
  return out


def is_non_parameter(name: str) -> bool:
  return name.endswith(NON_PARAMETERS)
