"""Funnel encoder (docs/funnel.md): bidirectional stages with the
sequence mean-pooled between them, and an upsampling decoder.

  embed -> stage 0 (T tokens) -> pool -> stage 1 (T / f) -> ... -> stage S-1
  -> repeat-upsample to T + stage 0's output (the bridge)
  -> `decoder_layers` full-length layers -> final norm -> tied logits

`model.funnel.stages` gives the layers per stage (sum = model.num_layers),
`factor` = f. Every layer is a pre-norm `block.Block` with
bidirectional attention of the family (`attention.pattern` cycles over the
encoder layers, then over the decoder layers). The first layer of a pooled
stage is pool-query-only: queries are the pooled rows, keys / values the
previous stage's full sequence; its output lives at the pooled length.

Pooling (strided, static shapes): slot j of a stage pools rows
j*f .. j*f+f-1 of the previous one. A slot belongs to the document of its
first non-padding source; its segment id and position are that source's
(the "first position of the group" rule: stride slicing on positions), and
its value is the mean of its sources of that document only. A slot with no
non-padding source is padding (segment 0: min-pooled mask). So no slot
mixes documents: where a packed document starts inside a group, its first
up to f-1 rows are left out of that slot (they, and their descendants in
later stages, are in no pooled row); they keep the bridge and the decoder
layers. We chose this over aligning packed pieces to f in the packer: the
data pipeline stays model-agnostic and nothing is padded.

Upsampling repeats slot i of the last stage to rows i*r .. i*r+r-1
(r = f**(S-1)), zeroed where the row's segment differs from the slot's (a
row of another document, or padding), so documents stay apart.

Positions and segment ids are data (docs/attention.md): pooled rows carry
their first source's position into RoPE, windows and TGlobal blocks, so a
window of W positions in stage s covers about W / f**s pooled rows; TGlobal
counts a pooled row as f**s tokens (models/tglobal.py).

`embedding_head`: `embed_documents` gives one vector per document: the mean
of its last-stage rows, RMS-normalised.
"""

from __future__ import annotations

import dataclasses
from typing import NoReturn

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import stack
from efficient_lm.models.attention import Tokens
from efficient_lm.models.block import Block
from efficient_lm.models.layers import DTYPES, RMSNorm
from efficient_lm.models.lm import LanguageModel
from efficient_lm.sharding import BTD, constrain


# ---------------------------------------------------------------- pooling


def pool(x: Tokens, factor: int) -> Tokens:
  """Strided mean pooling by `factor` (see the module docstring): slot j
  of [B, T // factor] pools rows j*factor .. j*factor+factor-1."""
  b, t, d = x.x_BTD.shape
  n, f = t // factor, factor
  seg_BNP = x.seg_BT.reshape(b, n, f)
  pos_BNP = x.pos_BT.reshape(b, n, f)
  live_BNP = seg_BNP != 0
  first_BN1 = jnp.argmax(live_BNP, axis=-1)[..., None]  # 0 when none live
  seg_BN = jnp.take_along_axis(seg_BNP, first_BN1, axis=-1)[..., 0]
  pos_BN = jnp.take_along_axis(pos_BNP, first_BN1, axis=-1)[..., 0]
  keep_BNP = live_BNP & (seg_BNP == seg_BN[..., None])
  x_BNPD = x.x_BTD.reshape(b, n, f, d).astype(jnp.float32)
  sum_BND = jnp.sum(jnp.where(keep_BNP[..., None], x_BNPD, 0.0), axis=2)
  count_BN1 = jnp.maximum(keep_BNP.sum(-1, keepdims=True), 1)
  x_BND = (sum_BND / count_BN1).astype(x.x_BTD.dtype)
  return Tokens(constrain(x_BND, BTD), pos_BN, seg_BN)


def upsample(x: Tokens, seg_BT: jax.Array, repeat: int) -> jax.Array:
  """[B, T // repeat, D] -> [B, T, D]: each slot repeated `repeat` times,
  zero on rows whose segment is not the slot's (or padding)."""
  up_BTD = jnp.repeat(x.x_BTD, repeat, axis=1)
  same_BT = (jnp.repeat(x.seg_BT, repeat, axis=1) == seg_BT) & (seg_BT != 0)
  return constrain(jnp.where(same_BT[..., None], up_BTD, 0), BTD)


# ------------------------------------------------------------- layer plan


def layer_plan(cfg: ModelConfig) -> tuple[stack.LayerSpec, ...]:
  """Encoder layers stage by stage (`stage`, rows factor**stage positions
  apart; `pool_query` on the first layer of each pooled stage, whose keys
  are the previous stage's rows), then the decoder's full-length layers;
  all bidirectional. `attention.pattern` cycles over the encoder layers
  and starts again over the decoder layers; `model.per_layer` shapes run
  over the encoder then the decoder layers."""
  f = cfg.funnel.factor

  def spec(n: int, j: int, stage: int = 0, pool_query: bool = False):
    return stack.LayerSpec(
      attention=dataclasses.replace(
        cfg.attention, kind=cfg.attention.layer_kind(j), pattern=""
      ),
      causal=False,
      stage=stage,
      pool_query=pool_query,
      stride=f**stage,
      kv_stride=f ** (stage - pool_query),
      **cfg.layer_shapes(n),
    )

  plan = []
  for s, count in enumerate(cfg.funnel.stages):
    for j in range(count):
      n = len(plan)
      plan.append(spec(n, n, stage=s, pool_query=(s > 0 and j == 0)))
  for j in range(cfg.funnel.decoder_layers):
    plan.append(spec(len(plan), j))
  return tuple(plan)


def pool_query_call(block: Block, q: Tokens, kv: Tokens) -> jax.Array:
  """A pre-norm block whose queries (and residual stream) are `q` and
  whose keys / values are the normalised `kv`."""
  return block(q.x_BTD, q.pos_BT, q.seg_BT, kv=kv)[0]


# ------------------------------------------------------------------ model


class FunnelEncoder(LanguageModel):
  """tokens, positions, segment ids -> (logits_BTV, aux); see the module
  docstring. Bidirectional: no generation cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.init_embedding_and_head(cfg, rngs)
    pdt = DTYPES[cfg.param_dtype]
    self.factor = cfg.funnel.factor
    self.num_stages = len(cfg.funnel.stages)
    self.remat = cfg.remat
    plan = self.layer_plan(cfg)
    make = lambda spec, r: Block(cfg, spec, r)
    stack_of = lambda specs: stack.Stack(
      tuple(specs), make, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat
    )
    stages, pool_blocks = {}, {}
    for s in range(self.num_stages):
      specs = [p for p in plan[: cfg.num_layers] if p.stage == s]
      if s > 0:
        pool_blocks[f"stage_{s}"] = Block(cfg, specs[0], rngs)
        specs = specs[1:]
      stages[f"stage_{s}"] = stack_of(specs)
    self.stages = nnx.Dict(stages)
    self.pool_blocks = nnx.Dict(pool_blocks)
    self.decoder = stack_of(plan[cfg.num_layers :])
    self.doc_norm = (
      RMSNorm(
        cfg.embed_dim,
        eps=cfg.norm_eps,
        param_dtype=pdt,
        plus_one=cfg.norm_plus_one,
      )
      if cfg.funnel.embedding_head
      else None
    )

  layer_plan = staticmethod(layer_plan)

  def encode(self, tokens_BT, pos_BT, seg_BT):
    """-> (stage 0's output [B, T, D], the last stage's Tokens, aux)."""
    x = Tokens(self.embed_tokens(tokens_BT), pos_BT, seg_BT)
    y_BTD, aux = self.stages["stage_0"](*x)
    auxes = [aux]
    bridge_BTD, x = y_BTD, Tokens(y_BTD, pos_BT, seg_BT)
    for s in range(1, self.num_stages):
      q = pool(x, self.factor)
      call = pool_query_call
      if self.remat != "none":
        call = nnx.remat(call, policy=stack.REMAT_POLICIES[self.remat])
      y_BTD = call(self.pool_blocks[f"stage_{s}"], q, x)
      y_BTD, aux = self.stages[f"stage_{s}"](y_BTD, q.pos_BT, q.seg_BT)
      auxes.append(aux)
      x = Tokens(y_BTD, q.pos_BT, q.seg_BT)
    return bridge_BTD, x, stack.combine_aux(auxes)

  def __call__(
    self, tokens_BT, pos_BT, seg_BT, *, cache=None, causal_routing=False
  ):
    del causal_routing  # no routed layers; the model is bidirectional
    if cache is not None:
      self.init_cache(0, 0)  # raises: an encoder has no generation cache
    bridge_BTD, last, aux = self.encode(tokens_BT, pos_BT, seg_BT)
    x_BTD = bridge_BTD
    if self.num_stages > 1:
      x_BTD = x_BTD + upsample(
        last, seg_BT, self.factor ** (self.num_stages - 1)
      )
    x_BTD, dec_aux = self.decoder(x_BTD, pos_BT, seg_BT)
    return self.logits(x_BTD), stack.combine_aux([aux, dec_aux])

  def stacks(self):
    return (*self.stages.values(), self.decoder)

  def init_cache(self, batch: int, max_len: int) -> NoReturn:
    raise ValueError(
      "model.kind='funnel_encoder' is bidirectional (every token sees the "
      "tokens after it): it cannot generate; generation needs a causal "
      "model (decoder or hourglass)"
    )

  def cache_bytes_per_token(self) -> list[int]:
    return self.init_cache(0, 0)

  def embed_documents(self, tokens_BT, pos_BT, seg_BT):
    """One vector per document: [B, N, D] float32, N = the last stage's
    length; row n is the document with segment id n + 1 (the packer numbers
    a row's documents 1, 2, ...): RMSNorm of the mean of its last-stage
    rows, zeros for a document with none (or no such document)."""
    if self.doc_norm is None:
      raise ValueError("embed_documents needs model.funnel.embedding_head=True")
    _, last, _ = self.encode(tokens_BT, pos_BT, seg_BT)
    n = last.seg_BT.shape[1]
    onehot_BNS = (
      last.seg_BT[:, None, :] == jnp.arange(1, n + 1)[None, :, None]
    ).astype(jnp.float32)
    sum_BND = jnp.einsum(
      "BNS,BSD->BND", onehot_BNS, last.x_BTD.astype(jnp.float32)
    )
    count_BN1 = onehot_BNS.sum(-1)[..., None]
    mean_BND = sum_BND / jnp.maximum(count_BN1, 1.0)
    return jnp.where(count_BN1 > 0, self.doc_norm(mean_BND), 0.0)
