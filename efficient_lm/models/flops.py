"""Analytical FLOPs per token from the layer plan, and parameter counts.

FLOPs count matmuls only (2 per multiply-add), module by module, so a new
block type adds its own term. Attention scores and values are counted in two
conventions, side by side:

  dense_tile  every query against every key of the T x T tile the dense
              kernel computes (PaLM's MFU convention; masked-tile skipping
              is not credited). MFU uses this.
  visible     only the query-key pairs the layer's mask lets through, on
              one document filling the sequence: what a causal, sliding-
              window or sparse layer really costs.

Training is 3x forward (backward = 2x); rematerialisation is not counted
(model FLOPs, as MFU requires). A pooled layer (a funnel / hourglass stage
s, `LayerSpec.stage`) runs on seq_len / factor**s slots, so it costs
1 / factor**s of a full-length layer per token, its attention over that
many keys; pooling and upsampling are not matmuls and are not counted.

Mixture-of-depths: a routed layer runs attention projections and MLP on
k = floor(capacity * T) tokens of T, and attention among those k only
(dense_tile: the k x k tile; visible: the pairs its mask lets through on
k consecutive positions, exact for dense causal layers, an upper bound for
local ones), so per token of the sequence it costs k / T of those terms;
its router (and MLP predictor) runs on every token. These are the FLOPs of
the training (top-k) forward; causal routing (evaluation, generation)
computes every token at static shapes and discards the unprocessed ones,
so it costs what a dense layer costs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import mla, routing, stack
from efficient_lm.models.attention import mask_spec
from efficient_lm.models.transformer import layer_plan


def visible_keys(spec: stack.LayerSpec, seq_len: int) -> np.ndarray:
  """Keys each query of one seq_len-token document sees, [T] (positions
  0..T-1, one segment); the same predicate as kernels.masks on that row."""
  t = seq_len
  i = np.arange(t)
  a = spec.attention
  before = i + 1                              # keys 0..i (self included)
  after = (t - 1 - i) * (not spec.causal)     # keys i+1..T-1
  if a.kind == "dense":
    return before + after
  w = a.window
  local_before = np.minimum(before, w)        # keys i-w+1..i
  local_after = np.minimum(after, w - 1)      # keys i+1..i+w-1
  n = local_before + local_after
  if a.kind == "sliding_window":
    return n
  if a.kind == "global_local":
    # Prefix keys k < num_global outside the window (and causal if so).
    g = a.num_global
    below = np.minimum(g, np.maximum(0, i - w + 1))
    above = (0 if spec.causal else
             np.maximum(0, np.minimum(g, t) - (i + w)))
    return n + below + above
  if a.kind == "tglobal":
    # Plus one summary per complete block: those of earlier blocks when
    # causal, all T // k otherwise (models/tglobal.py).
    k = a.tglobal_block
    return n + (i // k if spec.causal else t // k)
  if a.kind == "block_sparse":
    return _block_sparse_keys(spec, t)
  raise ValueError(f"attention.kind={a.kind!r} has no FLOPs rule")


def _block_sparse_keys(spec: stack.LayerSpec, t: int) -> np.ndarray:
  """BigBird: |window ∪ prefix ∪ random blocks| per query, each part an
  interval of keys (clipped to the causal limit), counted as the length of
  their union: sort by start, add what reaches past the running end."""
  a = spec.attention
  table = np.asarray(mask_spec(a, causal=spec.causal).block_mask, bool)
  bs = a.block_size
  if t > table.shape[0] * bs:
    raise ValueError(
      f"seq_len={t} is past the block_sparse table, which covers "
      f"{table.shape[0] * bs} positions (model.attention.max_len)")
  i = np.arange(t)
  end = i + 1 if spec.causal else np.full(t, t)   # keys < end may be seen
  w = a.window
  lo = [np.maximum(0, i - w + 1), np.zeros(t, np.int64)]
  hi = [np.minimum(t, i + (1 if spec.causal else w)),
        np.minimum(a.num_global, end)]
  rows = table[i // bs]                           # [T, blocks]
  r = max(int(rows.sum(1).max()), 1)
  blocks = np.argsort(~rows, axis=1, kind="stable")[:, :r]  # chosen first
  chosen = np.take_along_axis(rows, blocks, axis=1)
  lo = np.concatenate([np.stack(lo, 1), blocks * bs], axis=1)
  hi = np.concatenate([np.stack(hi, 1), np.where(
    chosen, np.minimum((blocks + 1) * bs, end[:, None]), 0)], axis=1)
  hi = np.maximum(hi, lo)                         # empty, not negative
  order = np.argsort(lo, axis=1, kind="stable")
  lo = np.take_along_axis(lo, order, axis=1)
  hi = np.take_along_axis(hi, order, axis=1)
  reach = np.concatenate([np.zeros((t, 1), hi.dtype),
                          np.maximum.accumulate(hi, axis=1)[:, :-1]], axis=1)
  return np.maximum(0, hi - np.maximum(lo, reach)).sum(axis=1)


def _head_dims(cfg: ModelConfig, spec: stack.LayerSpec) -> tuple[int, int]:
  """(q/k head dim, value head dim) the attention kernel sees."""
  k = cfg.resolved_head_dim
  if spec.attention.projection == "mla":
    m = mla.resolve_dims(spec.attention, k)
    return m.nope_head_dim + m.rope_head_dim, m.v_head_dim
  return k, k


def _attention_core(cfg: ModelConfig, spec: stack.LayerSpec, seq_len: int,
                    convention: str) -> float:
  """QK^T and PV per query token (per slot of a pooled stage)."""
  qk, v = _head_dims(cfg, spec)
  if seq_len == 0:      # a routed layer with no token
    return 0.0
  if convention == "dense_tile":
    keys = seq_len // _stride(cfg, spec)
  elif spec.stage:
    keys = float(_pooled_visible_keys(spec, seq_len, _stride(cfg, spec))
                 .mean())
  else:
    keys = float(visible_keys(spec, seq_len).mean())
  return 2.0 * cfg.num_heads * (qk + v) * keys


def _stride(cfg: ModelConfig, spec: stack.LayerSpec) -> int:
  """Positions between neighbouring tokens of the layer's sequence: a
  stage-s layer of a funnel runs on seq_len / factor**s slots."""
  return cfg.funnel.factor ** spec.stage


def _pooled_visible_keys(spec: stack.LayerSpec, seq_len: int,
                         stride: int) -> np.ndarray:
  """Keys each slot of a pooled layer sees: slots sit `stride` positions
  apart (hourglass slot j at position j * stride), and windows and
  prefixes are in positions, so count with the mask predicate itself."""
  from kernels import masks
  if spec.attention.kind == "tglobal":
    raise ValueError("a pooled tglobal layer has no FLOPs rule")
  n = seq_len // stride
  pos = (np.arange(n, dtype=np.int32) * stride)[None]
  seg = np.ones_like(pos)
  mask = masks.dense_mask(mask_spec(spec.attention, causal=spec.causal),
                          pos, pos, seg, seg)
  return np.asarray(mask)[0].sum(axis=1)


def _attention_proj(cfg: ModelConfig, spec: stack.LayerSpec) -> float:
  d, h, g, k = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                cfg.resolved_head_dim)
  if spec.attention.projection != "mla":
    return 2.0 * (d * h * k * 2 + d * g * k * 2)    # q, o  +  k, v
  c, q, r, n, e = mla.resolve_dims(spec.attention, k)
  query = d * q + q * h * (n + r) if q else d * h * (n + r)
  # Training's naive form: every token's latent is decompressed into the
  # keys and values of all heads (c -> k_nope, v); the shared rope key is
  # projected once.
  return 2.0 * (query + d * (c + r) + c * h * (n + e) + h * e * d)


def _mlp(cfg: ModelConfig) -> float:
  return 2.0 * 3 * cfg.embed_dim * cfg.mlp_dim      # SwiGLU: gate, up, down


def _router(cfg: ModelConfig) -> float:
  """A routed layer's router r = w.x (+ the MLP predictor), every token."""
  d = cfg.embed_dim
  if cfg.routing.predictor != "mlp":
    return 2.0 * d
  f = routing.predictor_width(d)
  return 2.0 * (d + d * f + f)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward and training FLOPs per token; `forward`/`train` use the
  dense_tile convention, `*_visible` the visible one."""
  plan = layer_plan(cfg)
  terms = {"attention_proj": 0.0, "mlp": 0.0,
           "attention_dense_tile": 0.0, "attention_visible": 0.0,
           "router": 0.0, "lm_head": 2.0 * cfg.embed_dim * cfg.vocab_size}
  for spec in plan:
    # A pooled layer (funnel stage s) runs once per factor**s tokens; a
    # routed layer processes k of the seq_len tokens, among themselves.
    per_token = 1.0 / _stride(cfg, spec)
    n = seq_len
    if spec.routed:
      n = routing.capacity_tokens(cfg.routing.capacity, seq_len)
      per_token *= n / seq_len
      terms["router"] += _router(cfg)
    terms["attention_proj"] += _attention_proj(cfg, spec) * per_token
    terms["mlp"] += _mlp(cfg) * per_token
    for conv in ("dense_tile", "visible"):
      terms[f"attention_{conv}"] += (
        _attention_core(cfg, spec, n, conv) * per_token)
  shared = (terms["attention_proj"] + terms["mlp"] + terms["router"]
            + terms["lm_head"])
  forward = shared + terms["attention_dense_tile"]
  forward_visible = shared + terms["attention_visible"]
  return {"forward": forward, "train": 3 * forward,
          "forward_visible": forward_visible,
          "train_visible": 3 * forward_visible,
          **{f"forward/{k}": v for k, v in terms.items()}}


def param_count(abstract_params: Any) -> dict[str, int]:
  """Counts from the (abstract) parameter tree: `total`, and
  `non_embedding` = total minus the input embedding table."""
  sizes = {}
  for path, leaf in nnx.to_flat_state(abstract_params):
    sizes[path] = int(np.prod(leaf.shape)) if leaf.shape else 1
  total = sum(sizes.values())
  embedding = sum(n for path, n in sizes.items() if path[0] == "embed")
  return {"total": total, "non_embedding": total - embedding}
