"""The pre-norm block and its attention / MLP factories.

  x <- x + Attn(Norm(x))
  x <- x + MLP(Norm(x))

(model.post_norms, Gemma 2 / 3: x <- x + Norm(Attn(Norm(x))), likewise for
the MLP.)

Each block is built from its `LayerSpec` (models/stack.py): the attention
kind and projection, the layer's own shapes (MLP width, heads, kv heads,
head dim) and the positions between its rows, so layers may differ.
One `__call__` serves training, prefill and decode: with `cache=` the
attention reads and extends it and the call also returns the new cache.
"""

from __future__ import annotations

import math
from typing import Any, overload

import jax
import numpy as np
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import visibility
from efficient_lm.models.attention import Attention, Tokens
from efficient_lm.models.layers import DTYPES, RMSNorm, SwiGLU, layer_rope
from efficient_lm.models.mla import MLAttention, resolve_dims
from efficient_lm.models.moe import MoE
from efficient_lm.models.stack import LayerSpec
from efficient_lm.models.tglobal import TGlobalAttention
from efficient_lm.sharding import BTD, constrain


def make_attention(
  cfg: ModelConfig, spec: LayerSpec, *, rngs: nnx.Rngs, out_std: float
) -> Attention | MLAttention:
  """The attention module of one layer, by projection and kind
  (TGlobalAttention is an Attention)."""
  a = spec.attention
  kwargs = dict(
    embed_dim=cfg.embed_dim,
    num_heads=spec.num_heads,
    num_kv_heads=spec.num_kv_heads,
    head_dim=spec.head_dim,
    rope_theta=layer_rope(cfg, a.kind),
    cfg=a,
    causal=spec.causal,
    rngs=rngs,
    param_dtype=DTYPES[cfg.param_dtype],
    out_std=out_std,
    cache_stride=spec.stride,
    norm_eps=cfg.norm_eps,
    norm_plus_one=cfg.norm_plus_one,
  )
  if a.projection == "mla":
    return MLAttention(**kwargs)
  if a.kind == "tglobal":
    # A row of the keys' sequence stands for kv_stride positions.
    return TGlobalAttention(**kwargs, stride=spec.kv_stride)
  return Attention(**kwargs)


def make_norm(cfg: ModelConfig) -> RMSNorm:
  """An RMSNorm over the model width (model.norm_eps, norm_plus_one)."""
  return RMSNorm(
    cfg.embed_dim,
    eps=cfg.norm_eps,
    param_dtype=DTYPES[cfg.param_dtype],
    plus_one=cfg.norm_plus_one,
  )


def make_mlp(
  cfg: ModelConfig, spec: LayerSpec, *, rngs: nnx.Rngs, out_std: float
) -> SwiGLU | MoE:
  """The layer's gated MLP, or its mixture of experts (`spec.moe`)."""
  if spec.moe is not None:
    return MoE(
      cfg.embed_dim,
      spec.moe.expert_width(spec.mlp_dim),
      spec.moe,
      rngs=rngs,
      param_dtype=DTYPES[cfg.param_dtype],
      out_std=out_std,
      activation=cfg.mlp_activation,
    )
  return SwiGLU(
    cfg.embed_dim,
    spec.mlp_dim,
    rngs=rngs,
    param_dtype=DTYPES[cfg.param_dtype],
    out_std=out_std,
    activation=cfg.mlp_activation,
  )


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs):
    # GPT-2 style: residual-output projections scaled by 1/sqrt(2 * layers).
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.attn_norm = make_norm(cfg)
    self.attn = make_attention(cfg, spec, rngs=rngs, out_std=out_std)
    self.mlp_norm = make_norm(cfg)
    self.mlp = make_mlp(cfg, spec, rngs=rngs, out_std=out_std)
    # Gemma 2 / 3 sandwich norms (model.post_norms) on each branch's output.
    self.post_attn_norm = make_norm(cfg) if cfg.post_norms else None
    self.post_mlp_norm = make_norm(cfg) if cfg.post_norms else None

  def mlp_branch(self, x_BTD) -> jax.Array:
    """The MLP branch's update: MLP(Norm(x)), post-normed under
    model.post_norms."""
    return self.mlp_update(x_BTD)[0]

  def mlp_update(self, x_BTD, train: bool = True) -> tuple[jax.Array, dict]:
    """(the MLP branch's update, its aux): an MoE MLP reports its routing
    (models/moe.py), and moves its loss-free bias when `train`."""
    h_BTD = self.mlp_norm(x_BTD)
    aux: dict = {}
    if isinstance(self.mlp, MoE):
      m_BTD, aux = self.mlp(h_BTD, train=train)
    else:
      m_BTD = self.mlp(h_BTD)
    if self.post_mlp_norm is not None:
      m_BTD = self.post_mlp_norm(m_BTD)
    return m_BTD, aux

  def attend(
    self,
    x_BTD,
    pos_BT,
    seg_BT,
    *,
    kv: Tokens | None = None,
    cache=None,
    rows=None,
  ) -> tuple[jax.Array, dict | None]:
    """The attention branch on Norm(x) -> (update [B, T, D], new cache or
    None), the update post-normed under model.post_norms. `kv`: another
    sequence's raw rows as keys / values (a funnel's pool-query layer;
    normed here by the same norm); `rows`: given K/V rows (`kv_rows`)
    instead of the projected ones."""
    h = Tokens(self.attn_norm(x_BTD), pos_BT, seg_BT)
    kwargs: dict[str, Any] = {}  # `kv` Tokens, `rows` a dict
    if kv is not None:
      kwargs["kv"] = Tokens(self.attn_norm(kv.x_BTD), kv.pos_BT, kv.seg_BT)
    if rows is not None:
      kwargs["rows"] = rows
    new_cache = None
    if cache is None:
      a_BTD = self.attn(h, **kwargs)
    else:
      a_BTD, new_cache = self.attn(h, cache=cache, **kwargs)
    if self.post_attn_norm is not None:
      a_BTD = self.post_attn_norm(a_BTD)
    return a_BTD, new_cache

  @overload
  def __call__(
    self,
    x_BTD,
    pos_BT,
    seg_BT,
    *,
    kv: Tokens | None = None,
    cache: None = None,
    rows=None,
  ) -> tuple[jax.Array, dict]: ...

  @overload
  def __call__(
    self,
    x_BTD,
    pos_BT,
    seg_BT,
    *,
    kv: Tokens | None = None,
    cache: dict,
    rows=None,
  ) -> tuple[jax.Array, dict, dict | None]: ...

  def __call__(
    self,
    x_BTD,
    pos_BT,
    seg_BT,
    *,
    kv: Tokens | None = None,
    cache=None,
    rows=None,
  ):
    """-> (x, aux), or (x, aux, new cache) with `cache`; see `attend` for
    `kv` and `rows`."""
    a_BTD, new_cache = self.attend(
      x_BTD, pos_BT, seg_BT, kv=kv, cache=cache, rows=rows
    )
    x_BTD = x_BTD + a_BTD
    m_BTD, aux = self.mlp_update(x_BTD, train=cache is None)
    x_BTD = constrain(x_BTD + m_BTD, BTD)
    if cache is None:
      return x_BTD, aux
    return x_BTD, aux, new_cache

  def kv_rows(self, x_BTD, pos_BT, seg_BT, cache=None) -> dict:
    """The K/V rows this block's attention reads for input x (with the
    cache's rows, if given, as stored and read back): what
    mixture-of-recursions' recursive sharing hands to later steps
    (`rows=`); qkv attention only, as validation
    requires of recursive sharing."""
    if not isinstance(self.attn, Attention):
      raise TypeError(f"kv_rows needs qkv attention, not {type(self.attn)}")
    h = Tokens(self.attn_norm(x_BTD), pos_BT, seg_BT)
    return self.attn.stored_rows(h, cache)[1]

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    return self.attn.init_cache(batch, max_len, dtype)

  def cache_bytes_per_token(self, dtype) -> int:
    return self.attn.cache_bytes_per_token(dtype)

  @staticmethod
  def flops(embed_dim: int, spec: LayerSpec, seq_len: int) -> dict[str, float]:
    """Forward matmul FLOPs per input token of one layer over a seq_len
    sequence: projections and MLP for its T / stride query rows (and
    T / kv_stride key rows), attention scores and values in the two
    conventions of models/flops.py."""
    nq, nk = seq_len // spec.stride, seq_len // spec.kv_stride
    return layer_flops(embed_dim, spec, seq_len, nq, nk)


def head_dims(spec: LayerSpec) -> tuple[int, int]:
  """(q/k head dim, value head dim) the attention kernel sees."""
  if spec.attention.projection == "mla":
    m = resolve_dims(spec.attention, spec.head_dim)
    return m.nope_head_dim + m.rope_head_dim, m.v_head_dim
  return spec.head_dim, spec.head_dim


def projection_flops(d: int, spec: LayerSpec) -> tuple[float, float]:
  """(per query row, per key row) projection FLOPs of the layer."""
  if spec.attention.projection == "mla":
    return MLAttention.projection_flops(
      d, spec.num_heads, resolve_dims(spec.attention, spec.head_dim)
    )
  return Attention.projection_flops(
    d, spec.num_heads, spec.num_kv_heads, spec.head_dim
  )


def layer_flops(
  d: int, spec: LayerSpec, seq_len: int, nq: int, nk: int
) -> dict[str, float]:
  """A layer running nq query rows over nk key rows (rows spec.kv_stride
  positions apart), per token of the seq_len sequence."""
  terms = {"attention_proj": 0.0, "mlp": 0.0}
  terms["attention_dense_tile"] = terms["attention_visible"] = 0.0
  if nq == 0:
    return terms
  per_q, per_k = projection_flops(d, spec)
  terms["attention_proj"] = (nq * per_q + nk * per_k) / seq_len
  terms["mlp"] = nq * SwiGLU.flops(d, spec.mlp_dim) / seq_len
  if spec.moe is not None:  # a decoder's layer: stride 1, nq = seq_len
    moe = spec.moe
    terms.update(MoE.flops(d, moe.expert_width(spec.mlp_dim), moe, seq_len))
  qk, v = head_dims(spec)
  per_pair = 2.0 * spec.num_heads * (qk + v)
  # A pool-query layer's query i sits where key row i * (stride /
  # kv_stride) does.
  step = max(spec.stride // spec.kv_stride, 1)
  keys = visibility.visible_keys(visibility.in_rows(spec, spec.kv_stride), nk)[
    ::step
  ]
  terms["attention_dense_tile"] = nq * per_pair * nk / seq_len
  terms["attention_visible"] = nq * per_pair * float(np.mean(keys)) / seq_len
  return terms
