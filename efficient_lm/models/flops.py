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
(model FLOPs, as MFU requires).

Pooled layers (funnel encoder / hourglass stage s, `LayerSpec.stage`): a
layer of stage s runs T / f**s queries, and its keys are at the same length
except in a funnel's pool-query layer (the previous stage's); FLOPs per
*input* token weigh each layer's query-side terms (q and output
projections, MLP, scores) by its query count and the key-side ones (k, v
projections) by its key count, over T. Pooled rows sit f**s positions
apart, so windows, global prefixes and TGlobal blocks (in positions) cover
f**s times fewer rows there (`_in_rows`). Pooling and upsampling are means
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
"""

from __future__ import annotations

import dataclasses

from typing import Any

import numpy as np
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import mla, mor, routing, stack
from efficient_lm.models.attention import mask_spec
from efficient_lm.models.transformer import layer_plan


def visible_keys(spec: stack.LayerSpec, seq_len: int) -> np.ndarray:
  """Keys each query of one seq_len-token document sees, [T] (positions
  0..T-1, one segment); the same predicate as kernels.masks on that row."""
  t = seq_len
  i = np.arange(t)
  a = spec.attention
  before = i + 1  # keys 0..i (self included)
  after = (t - 1 - i) * (not spec.causal)  # keys i+1..T-1
  if a.kind == "dense":
    return before + after
  w = a.window
  local_before = np.minimum(before, w)  # keys i-w+1..i
  local_after = np.minimum(after, w - 1)  # keys i+1..i+w-1
  n = local_before + local_after
  if a.kind == "sliding_window":
    return n
  if a.kind == "global_local":
    # Prefix keys k < num_global outside the window (and causal if so).
    g = a.num_global
    below = np.minimum(g, np.maximum(0, i - w + 1))
    above = 0 if spec.causal else np.maximum(0, np.minimum(g, t) - (i + w))
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
      f"{table.shape[0] * bs} positions (model.attention.max_len)"
    )
  i = np.arange(t)
  end = i + 1 if spec.causal else np.full(t, t)  # keys < end may be seen
  w = a.window
  lo = [np.maximum(0, i - w + 1), np.zeros(t, np.int64)]
  hi = [
    np.minimum(t, i + (1 if spec.causal else w)),
    np.minimum(a.num_global, end),
  ]
  rows = table[i // bs]  # [T, blocks]
  r = max(int(rows.sum(1).max()), 1)
  blocks = np.argsort(~rows, axis=1, kind="stable")[:, :r]  # chosen first
  chosen = np.take_along_axis(rows, blocks, axis=1)
  lo = np.concatenate([np.stack(lo, 1), blocks * bs], axis=1)
  hi = np.concatenate(
    [
      np.stack(hi, 1),
      np.where(chosen, np.minimum((blocks + 1) * bs, end[:, None]), 0),
    ],
    axis=1,
  )
  hi = np.maximum(hi, lo)  # empty, not negative
  order = np.argsort(lo, axis=1, kind="stable")
  lo = np.take_along_axis(lo, order, axis=1)
  hi = np.take_along_axis(hi, order, axis=1)
  reach = np.concatenate(
    [np.zeros((t, 1), hi.dtype), np.maximum.accumulate(hi, axis=1)[:, :-1]],
    axis=1,
  )
  return np.maximum(0, hi - np.maximum(lo, reach)).sum(axis=1)


def _head_dims(cfg: ModelConfig, spec: stack.LayerSpec) -> tuple[int, int]:
  """(q/k head dim, value head dim) the attention kernel sees."""
  k = cfg.resolved_head_dim
  if spec.attention.projection == "mla":
    m = mla.resolve_dims(spec.attention, k)
    return m.nope_head_dim + m.rope_head_dim, m.v_head_dim
  return k, k


def _attention_proj_split(
  cfg: ModelConfig, spec: stack.LayerSpec
) -> tuple[float, float]:
  """(per query token: q and output projections, per key token: k, v)."""
  d, h, g, k = (
    cfg.embed_dim,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.resolved_head_dim,
  )
  if spec.attention.projection != "mla":
    return 2.0 * d * h * k * 2, 2.0 * d * g * k * 2  # q, o  |  k, v
  c, q, r, n, e = mla.resolve_dims(spec.attention, k)
  query = d * q + q * h * (n + r) if q else d * h * (n + r)
  # Training's naive form: every token's latent is decompressed into the
  # keys and values of all heads (c -> k_nope, v); the shared rope key is
  # projected once.
  return 2.0 * (query + h * e * d), 2.0 * (d * (c + r) + c * h * (n + e))


def _attention_proj(cfg: ModelConfig, spec: stack.LayerSpec) -> float:
  return sum(_attention_proj_split(cfg, spec))


def _strides(cfg: ModelConfig, spec: stack.LayerSpec) -> tuple[int, int]:
  """Positions per query row and per key row of a layer: stage s runs on
  seq_len / factor**s rows (a decoder's layers are all stage 0)."""
  f = cfg.funnel.factor
  return f**spec.stage, f ** (spec.stage - spec.pool_query)


def _pooled_visible_keys(
  spec: stack.LayerSpec, seq_len: int, stride: int
) -> np.ndarray:
  """Keys each row of a pooled layer sees, rows `stride` positions apart
  (positions 0, stride, ...: one document filling the sequence)."""
  return visible_keys(_in_rows(spec, stride), seq_len // stride)


def _in_rows(spec: stack.LayerSpec, stride: int) -> stack.LayerSpec:
  """The spec with its position extents counted in rows `stride`
  positions apart (the same masks on positions 0, stride, 2 stride...)."""
  a = spec.attention
  if stride == 1:
    return spec
  return dataclasses.replace(
    spec,
    attention=dataclasses.replace(
      a,
      window=(a.window - 1) // stride + 1,
      num_global=-(-a.num_global // stride),
      tglobal_block=max(a.tglobal_block // stride, 1),
    ),
  )


def _mlp(cfg: ModelConfig) -> float:
  return 2.0 * 3 * cfg.embed_dim * cfg.mlp_dim  # SwiGLU: gate, up, down


def _router(cfg: ModelConfig) -> float:
  """A routed layer's router r = w.x (+ the MLP predictor), every token."""
  d = cfg.embed_dim
  if cfg.routing.predictor != "mlp":
    return 2.0 * d
  f = routing.predictor_width(d)
  return 2.0 * (d + d * f + f)


def _mor_applications(cfg: ModelConfig, seq_len: int):
  """MoR (models/mor.py): (spec, fraction of the T tokens it runs on, keys
  per query in the dense tile, keys per query visible) per layer
  application. Expert-choice training gathers K_r = max(1, floor(c_r T))
  tokens at step r; token-choice runs every step on all T tokens (masked),
  so its FLOPs are the full depth's. Recursion-wise attention is among the
  K_r gathered tokens (visible: causal over them as one document);
  recursive sharing attends the K_r queries over the step-1 keys of all T."""
  r = cfg.routing
  plan = layer_plan(cfg)
  mapping = mor.layer_map(r.sharing, cfg.num_layers, r.num_recursions)
  middle = r.sharing.startswith("middle_")
  depth = mor.recursed_layers(r.sharing, cfg.num_layers) // r.num_recursions
  full = lambda spec: (
    spec,
    1.0,
    seq_len,
    float(visible_keys(spec, seq_len).mean()),
  )
  out = [full(plan[0])] if middle else []
  off = 1 if middle else 0
  for step, c in enumerate(mor.capacities(r)):
    n = (
      mor.capacity_tokens(c, seq_len)
      if r.router == "expert_choice"
      else seq_len
    )
    for j in range(depth):
      spec = plan[mapping.index(off + j)]
      if r.kv == "recursive_sharing" and step > 0:
        out.append(
          (
            spec,
            n / seq_len,
            seq_len,
            float(visible_keys(spec, seq_len).mean()),
          )
        )
      else:
        out.append((spec, n / seq_len, n, float(visible_keys(spec, n).mean())))
  if middle:
    out.append(full(plan[-1]))
  return out


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
    terms["router"] = 2.0 * cfg.embed_dim * cfg.routing.num_recursions
    for spec, frac, dense_keys, seen_keys in _mor_applications(cfg, seq_len):
      terms["attention_proj"] += frac * _attention_proj(cfg, spec)
      terms["mlp"] += frac * _mlp(cfg)
      qk, v = _head_dims(cfg, spec)
      per_key = 2.0 * cfg.num_heads * (qk + v)
      terms["attention_dense_tile"] += frac * per_key * dense_keys
      terms["attention_visible"] += frac * per_key * seen_keys
  for spec in layer_plan(cfg) if cfg.routing.kind != "mor" else ():
    sq, sk = _strides(cfg, spec)
    nq, nk = seq_len // sq, seq_len // sk  # query rows, key rows
    if spec.routed:  # MoD: k gathered tokens, attending among themselves
      nq = nk = routing.capacity_tokens(cfg.routing.capacity, seq_len)
      terms["router"] += _router(cfg)
      if nq == 0:
        continue
    per_q, per_k = _attention_proj_split(cfg, spec)
    terms["attention_proj"] += (nq * per_q + nk * per_k) / seq_len
    terms["mlp"] += nq * _mlp(cfg) / seq_len
    qk, v = _head_dims(cfg, spec)
    # A pool-query layer's query i sits where key row i * (sq // sk) does.
    keys = visible_keys(_in_rows(spec, sk), nk)[:: sq // sk]
    terms["attention_dense_tile"] += (
      nq * 2.0 * cfg.num_heads * (qk + v) * nk / seq_len
    )
    terms["attention_visible"] += (
      nq * 2.0 * cfg.num_heads * (qk + v) * float(keys.mean()) / seq_len
    )
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
  shared layers `num_recursions` times; the plain model's depth)."""
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
  return out
