"""Analytical FLOPs per token from the layer plan, and parameter counts.

FLOPs count matmuls only (2 per multiply-add), from the layer plan (one
`LayerSpec` per layer, with its own shapes and strides), each block type
owning its term: `block.Block.flops` (projections, MLP, attention over a
layer's rows), `mod.RoutedBlock.flops` (mixture-of-depths: capacity and
router), `mor.Recursions.flops` (mixture-of-recursions: one term per layer
application); attention modules give their projections'
(`Attention.projection_flops`, `MLAttention.projection_flops`), the MLP its
own (`SwiGLU.flops`). This module adds the head and the conventions.
Attention scores and values are counted in two conventions, side by side:

  dense_tile  every query against every key of the T x T tile the dense
              kernel computes (PaLM's MFU convention; masked-tile skipping
              is not credited). MFU uses this.
  visible     only the query-key pairs the layer's mask lets through, on
              one document filling the sequence: what a causal, sliding-
              window or sparse layer really costs.

Training is 3x forward (backward = 2x); rematerialisation is not counted
(model FLOPs, as MFU requires).

The Hugging Face family switches (model.norm_plus_one, post_norms,
mlp_activation, embed_scale, final_logits_soft_cap, RoPE scaling;
attention qk_norm, qkv_bias, query_pre_attn_scalar) add no matmul: norms,
biases, caps and activations are O(D) or O(V) elementwise work per token
against O(D^2) matmuls, so the counts are the same with them on.

Pooled layers (funnel encoder / hourglass, `LayerSpec.stride` and
`kv_stride`): a layer whose rows sit f**s positions apart runs T / f**s
queries, and its keys are at the same length except in a funnel's
pool-query layer (the previous stage's); FLOPs per
*input* token weigh each layer's query-side terms (q and output
projections, MLP, scores) by its query count and the key-side ones (k, v
projections) by its key count, over T. Pooled rows sit f**s positions
apart, so windows, global prefixes and TGlobal blocks (in positions) cover
f**s times fewer rows there (`visibility.in_rows`). TGlobal layers add
T / tglobal_block summary keys: their K/V projections, and scores and
values against them (`_add_summary_keys`). Pooling and upsampling are means
and copies: no matmul FLOPs.

Mixture-of-depths: a routed layer runs attention projections and MLP on
k = floor(capacity * T) tokens of T, and attention among those k only
(dense_tile: the k x k tile; visible: the pairs its mask lets through on
k consecutive positions, exact for dense causal layers, an upper bound for
local ones), so per token of the sequence it costs k / T of those terms;
its router (and MLP predictor) runs on every token. These are the FLOPs of
the training (top-k) forward; causal routing (evaluation, generation)
computes every token at static shapes and discards the unprocessed ones,
so it costs what a dense layer costs.

Mixture-of-experts (`moe.MoE.flops`): an MoE layer counts the experts that
run, top_k per token when dropless (the active FLOPs, which MFU uses), the
E * C capacity slots of a row over T in capacity mode, plus shared experts
and the router's D x E matmul.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from efficient_lm import models
from efficient_lm.config import ModelConfig
from efficient_lm.models import block as block_lib
from efficient_lm.models.block import Block
from efficient_lm.models.mod import RoutedBlock
from efficient_lm.models.mor import Recursions
from efficient_lm.models.stack import LayerSpec
from efficient_lm.models.visibility import in_rows, visible_keys

# The routed experts' weights in an MoE layer (models/moe.py), [E, ...].
MOE_EXPERTS = ("gate_EDF", "up_EDF", "down_EFD")

__all__ = ["flops_per_token", "param_count", "visible_keys"]


def _in_rows(spec: LayerSpec, stride: int) -> LayerSpec:
  return in_rows(spec, stride)


def _pooled_visible_keys(
  spec: LayerSpec, seq_len: int, stride: int
) -> np.ndarray:
  """Keys each row of a pooled layer sees, rows `stride` positions apart
  (positions 0, stride, ...: one document filling the sequence)."""
  return visible_keys(in_rows(spec, stride), seq_len // stride)


def _layer_terms(cfg: ModelConfig, spec: LayerSpec, seq_len: int) -> dict:
  if spec.routed:
    r = cfg.routing
    return RoutedBlock.training_flops(
      cfg.embed_dim,
      spec,
      seq_len,
      capacity=r.capacity,
      predictor=r.predictor,
    )
  terms = Block.flops(cfg.embed_dim, spec, seq_len)
  if spec.attention.kind == "tglobal":
    _add_summary_keys(terms, cfg.embed_dim, spec, seq_len)
  return terms


def _add_summary_keys(terms, d: int, spec: LayerSpec, seq_len: int):
  """TGlobal's seq_len // tglobal_block summary keys (models/tglobal.py):
  their K/V projections, and in dense_tile every query row against them
  (the visible convention counts them already, `visible_keys`). Building
  them (a segmented sum and an RMSNorm) is O(D) per token, no matmul."""
  num = seq_len // spec.attention.tglobal_block
  per_k = block_lib.projection_flops(d, spec)[1]
  qk, v = block_lib.head_dims(spec)
  nq = seq_len // spec.stride
  terms["attention_proj"] += num * per_k / seq_len
  terms["attention_dense_tile"] += (
    nq * 2.0 * spec.num_heads * (qk + v) * num / seq_len
  )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward and training FLOPs per token; `forward`/`train` use the
  dense_tile convention, `*_visible` the visible one. Routed models count
  what runs: a layer applied to a fraction of the tokens costs that
  fraction (capacity-aware), a recursed layer once per application."""
  terms = {
    "attention_proj": 0.0,
    "mlp": 0.0,
    "attention_dense_tile": 0.0,
    "attention_visible": 0.0,
    "router": 0.0,
    "lm_head": 2.0 * cfg.embed_dim * cfg.vocab_size,
  }
  if cfg.routing.kind == "mor":
    parts = [Recursions.flops(cfg, seq_len)]
  else:
    parts = [_layer_terms(cfg, s, seq_len) for s in models.layer_plan(cfg)]
  for part in parts:
    for k, v in part.items():
      terms[k] += v
  shared = (
    terms["attention_proj"] + terms["mlp"] + terms["lm_head"] + terms["router"]
  )
  forward = shared + terms["attention_dense_tile"]
  forward_visible = shared + terms["attention_visible"]
  return {
    "forward": forward,
    "train": 3 * forward,
    "forward_visible": forward_visible,
    "train_visible": 3 * forward_visible,
    **{f"forward/{k}": v for k, v in terms.items()},
  }


def param_count(
  abstract_params: Any, cfg: ModelConfig | None = None
) -> dict[str, int]:
  """Counts from the (abstract) parameter tree: `total`, and
  `non_embedding` = total minus the input embedding table (unique
  parameters: a shared layer counts once). With `cfg`, also
  `effective_non_embedding`: each layer counted once per application (MoR's
  shared layers `num_recursions` times; the plain model's depth), and
  `active`: the parameters one token uses, total less the routed experts
  it does not pick (an MoE layer's expert weights count top_k /
  num_experts; router and shared experts count whole)."""
  sizes = {}
  for path, leaf in nnx.to_flat_state(abstract_params):
    sizes[path] = int(np.prod(leaf.shape)) if leaf.shape else 1
  total = sum(sizes.values())
  embedding = sum(n for path, n in sizes.items() if path[0] == "embed")
  out = {"total": total, "non_embedding": total - embedding}
  if cfg is not None:
    shared = (
      sum(n for path, n in sizes.items() if path[:2] == ("stack", "shared"))
      if cfg.routing.kind == "mor"
      else 0
    )
    reuse = (cfg.routing.num_recursions - 1) if shared else 0
    out["effective_non_embedding"] = out["non_embedding"] + reuse * shared
    e = cfg.moe
    routed = sum(n for path, n in sizes.items() if path[-1] in MOE_EXPERTS)
    idle = routed * (e.num_experts - e.top_k) // max(e.num_experts, 1)
    out["active"] = total - idle
  return out
