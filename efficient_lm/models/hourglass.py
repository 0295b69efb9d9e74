"""Hourglass: a causal funnel decoder (docs/funnel.md).

  tokens -> embed -> `pre` full-length causal layers -> h
         -> shift right by k - 1 -> mean-pool groups of k (the slots)
         -> `shortened` causal layers over the slots
         -> repeat-upsample their update by k, add to h
         -> `post` full-length layers -> final norm -> logits

`model.funnel.stages = (pre, shortened, post)`, `model.funnel.factor = k`.

Causality. After the shift, slot j covers inputs jk-k+1 .. jk and sits at
position jk (the last input it covers; positions are data, docs/attention.md, so
RoPE and every mask of the shortened layers see it there). Upsampling hands
slot j to indices jk .. jk+k-1, each of which comes at or after every input
of the slot. Without the shift (`shift=False`, kept for the negative test
only) slot j covers jk .. jk+k-1 and index jk would see k-1 later inputs.

What is upsampled is the shortened stack's *update* (output - input of the
slots), not its output, so the valley is one more residual branch: with
k = 1 the model is exactly the plain decoder of the same layers. (trax adds
the valley's output itself to h, which at k = 1 doubles h.) No norm is
applied to the update: every block is pre-norm already.

Packed documents. Groups are aligned to array indices (static shape T / k),
and a group keeps only the inputs of the document of its last input (the
slot's segment); inputs of an earlier document in the same group count as
the shift's zeros (the mean still divides by k). A token receives the
upsampled update only from a slot of its own document, so a document that
starts inside a group gets none until its first slot completes. So no slot
mixes two documents, nothing leaks across documents or time, and a
document packed at an index that is a multiple of k gives exactly the
outputs it gives alone (tests/test_hourglass.py); at other offsets its
first group is cut differently.

Generation (`init_cache`, then calls with `cache=`, as generate.py drives
them). Full-length
layers cache per token. The shortened layers cache one row per slot, written
when the slot's group completes (a position p with p % k == 0); the cache
also keeps a rolling buffer of the last k pre-layer outputs h (to pool the
group that completes) and the newest upsampled update (reused for the k - 1
positions after its slot). A step over T > 1 tokens is a prefill on an
empty cache with index == position (generate.py's prefill); T == 1 is a
decode step at any position, and the shortened layers run in it only when
some row completes a group. Their full caches have ceil(max_len / k) rows
(the slot at position jk in row j: the plan gives those layers stride k); a sliding-
window kind keeps its rolling buffer of `window` rows keyed by position,
of which about window / k hold slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import cache as cache_lib
from efficient_lm.models import stack
from efficient_lm.models.attention import Tokens
from efficient_lm.models.block import Block
from efficient_lm.models.lm import LanguageModel
from efficient_lm.sharding import BTD, constrain


def layer_plan(cfg: ModelConfig) -> tuple[stack.LayerSpec, ...]:
  """The decoder's plan with the shortened layers at stage 1: their
  sequence is seq_len / factor, rows (slots) factor positions apart."""
  pre, short, _ = cfg.funnel.stages
  k = cfg.funnel.factor
  return tuple(
    dataclasses.replace(spec, stage=1, stride=k, kv_stride=k)
    if pre <= i < pre + short
    else spec
    for i, spec in enumerate(stack.layer_plan(cfg, causal=True))
  )


def shorten(h_BTD, pos_BT, seg_BT, factor: int, *, shift: bool = True):
  """Shift right by factor - 1 (zeros, segment 0) and mean-pool groups of
  `factor`: Tokens of N = ceil(T / factor) slots, slot j covering indices
  j*factor - factor + 1 .. j*factor (with the shift), at the position and
  segment of its last index. Inputs of another segment count as zeros.

  A trailing incomplete group (T not a multiple of factor) is not a slot:
  with the shift, the last slot ends at index (T - 1) // factor * factor,
  which every input it needs precedes."""
  k = factor
  t = h_BTD.shape[1]
  s = k - 1 if shift else 0
  n = -(-t // k)

  def groups(a):
    pad = [(0, 0)] * a.ndim
    pad[1] = (s, max(n * k - t - s, 0))
    a = jnp.pad(a, pad)[:, : n * k]
    return a.reshape(a.shape[0], n, k, *a.shape[2:])

  h_BNPD, pos_BNP, seg_BNP = groups(h_BTD), groups(pos_BT), groups(seg_BT)
  seg_BN, pos_BN = seg_BNP[:, :, -1], pos_BNP[:, :, -1]
  same_BNP = seg_BNP == seg_BN[:, :, None]
  sum_BND = jnp.sum(
    jnp.where(same_BNP[..., None], h_BNPD, 0), axis=2, dtype=jnp.float32
  )
  x_BND = (sum_BND / k).astype(h_BTD.dtype)
  return Tokens(constrain(x_BND, BTD), pos_BN, seg_BN)


def upsample(d_BND, slot_seg_BN, seg_BT, factor: int):
  """Index i gets slot i // factor's row, zero where the slot belongs to
  another segment (a document that starts inside the group)."""
  t = seg_BT.shape[1]
  d_BTD = jnp.repeat(d_BND, factor, axis=1)[:, :t]
  same_BT = jnp.repeat(slot_seg_BN, factor, axis=1)[:, :t] == seg_BT
  return constrain(jnp.where(same_BT[..., None], d_BTD, 0), BTD)


class Hourglass(LanguageModel):
  """Causal funnel decoder: tokens, positions, segment ids -> (logits,
  aux). `shift=False` drops the k - 1 shift: that model leaks the future
  and exists only for the test that shows it."""

  def __init__(
    self,
    cfg: ModelConfig,
    rngs: nnx.Rngs,
    *,
    shift: bool = True,
    block=None,
  ):
    block = Block if block is None else block
    self.init_embedding_and_head(cfg, rngs)
    self.factor = cfg.funnel.factor
    self.shift = shift
    self.embed_dim = cfg.embed_dim
    pre, short, _ = cfg.funnel.stages
    plan = self.layer_plan(cfg)

    def make(specs):
      return stack.Stack(
        specs,
        lambda spec, r: block(cfg, spec, r),
        rngs=rngs,
        scan=cfg.scan_layers,
        remat=cfg.remat,
      )

    self.pre = make(plan[:pre])
    self.short = make(plan[pre : pre + short])
    self.post = make(plan[pre + short :])

  layer_plan = staticmethod(layer_plan)

  def __call__(
    self, tokens_BT, pos_BT, seg_BT, *, cache=None, causal_routing=False
  ):
    """-> (logits, aux); with `cache` the generation step over T new
    tokens -> (logits, aux, new cache): T > 1 is a prefill on an empty
    cache (index == position), T == 1 a decode step."""
    if cache is not None:
      return self._generate_step(tokens_BT, pos_BT, seg_BT, cache)
    x_BTD, aux = self.hidden(
      self.embed_tokens(tokens_BT),
      pos_BT,
      seg_BT,
      causal_routing=causal_routing,
    )
    return self.logits(x_BTD), aux

  def hidden(self, x_BTD, pos_BT, seg_BT, *, causal_routing=False):
    """Embedded tokens -> (last layer's output, aux): the model between
    the embedding and the final norm (tests differentiate through it)."""
    h_BTD, aux_pre = self.pre(
      x_BTD, pos_BT, seg_BT, causal_routing=causal_routing
    )
    p = shorten(h_BTD, pos_BT, seg_BT, self.factor, shift=self.shift)
    s_BND, aux_short = self.short(
      p.x_BTD, p.pos_BT, p.seg_BT, causal_routing=causal_routing
    )
    x_BTD = h_BTD + upsample(s_BND - p.x_BTD, p.seg_BT, seg_BT, self.factor)
    x_BTD, aux_post = self.post(
      x_BTD, pos_BT, seg_BT, causal_routing=causal_routing
    )
    return x_BTD, stack.combine_aux([aux_pre, aux_short, aux_post])

  # -------------------------------------------------------------- generation

  def stacks(self):
    return (self.pre, self.short, self.post)

  def cache_bytes_per_token(self) -> list[int]:
    """Each layer's cache bytes per token, in layer order: a shortened
    layer caches one row per `factor` tokens (rounded down)."""
    return [
      n // stride
      for s, stride in zip(self.stacks(), (1, self.factor, 1), strict=True)
      for n in s.cache_bytes_per_token(self.dtype)
    ]

  def init_cache(self, batch: int, max_len: int) -> dict:
    d, k = self.embed_dim, self.factor
    return {
      "pre": self.pre.init_cache(batch, max_len, self.dtype),
      "short": self.short.init_cache(batch, max_len, self.dtype),
      "post": self.post.init_cache(batch, max_len, self.dtype),
      # Pre-layer outputs of the newest k positions (the incomplete group).
      "group": cache_lib.empty(
        cache_lib.Slots.rolling(k), batch, {"h": ((d,), self.dtype)}
      ),
      # The upsampled update at the newest position.
      "update": cache_lib.empty(
        cache_lib.Slots.rolling(1), batch, {"d": ((d,), self.dtype)}
      ),
    }

  def _generate_step(self, tokens_BT, pos_BT, seg_BT, cache):
    """(logits_BTV, aux, cache) for T new tokens: T > 1 is a prefill on an
    empty cache (index == position), T == 1 a decode step."""
    if not self.shift:
      raise ValueError(
        "the no-shift hourglass is not causal; it cannot generate"
      )
    x_BTD = self.embed_tokens(tokens_BT)
    h_BTD, aux_pre, pre_c = self.pre(x_BTD, pos_BT, seg_BT, cache=cache["pre"])
    if tokens_BT.shape[1] == 1:
      u_BTD, aux_short, short_c = self._decode_valley(
        h_BTD, pos_BT, seg_BT, cache
      )
    else:
      p = shorten(h_BTD, pos_BT, seg_BT, self.factor)
      s_BND, aux_short, short_c = self.short(
        p.x_BTD, p.pos_BT, p.seg_BT, cache=cache["short"]
      )
      u_BTD = upsample(s_BND - p.x_BTD, p.seg_BT, seg_BT, self.factor)
    x_BTD, aux_post, post_c = self.post(
      h_BTD + u_BTD, pos_BT, seg_BT, cache=cache["post"]
    )
    k = self.factor
    rows = {"pos": pos_BT.astype(jnp.int32), "seg": seg_BT.astype(jnp.int32)}
    cache = {
      "pre": pre_c,
      "short": short_c,
      "post": post_c,
      "group": cache_lib.write(
        cache["group"], {"h": h_BTD, **rows}, cache_lib.Slots.rolling(k)
      ),
      "update": cache_lib.write(
        cache["update"], {"d": u_BTD, **rows}, cache_lib.Slots.rolling(1)
      ),
    }
    return (
      self.logits(x_BTD),
      stack.combine_aux([aux_pre, aux_short, aux_post]),
      cache,
    )

  def _decode_valley(self, h_B1D, pos_B1, seg_B1, cache):
    """The upsampled update for one new token at position p: when p
    completes a group (p % k == 0) pool it from the cached h of p-k+1..p-1
    and this h, run the shortened layers on that slot and cache it; else
    reuse the update cached at p - 1 (same slot)."""
    k = self.factor
    group, last = cache["group"], cache["update"]
    pos_B1 = pos_B1.astype(jnp.int32)
    in_group_BN = (
      (group["pos"] > pos_B1 - k)
      & (group["pos"] < pos_B1)
      & (group["seg"] == seg_B1)
    )
    sum_B1D = jnp.sum(
      jnp.where(in_group_BN[..., None], group["h"], 0),
      axis=1,
      keepdims=True,
      dtype=jnp.float32,
    ) + h_B1D.astype(jnp.float32)
    pooled_B1D = (sum_B1D / k).astype(h_B1D.dtype)
    complete_B1 = (pos_B1 % k == 0) & (seg_B1 != 0)
    # A slot that does not complete is segment 0: invisible, and its cache
    # rows are dropped (cache.write).
    slot_seg_B1 = jnp.where(complete_B1, seg_B1, 0)

    def run(short_cache):
      s_B1D, aux, short_cache = self.short(
        pooled_B1D, pos_B1, slot_seg_B1, cache=short_cache
      )
      return s_B1D - pooled_B1D, aux, short_cache

    # The shortened layers run only when some row completes a group.
    shapes = jax.eval_shape(run, cache["short"])
    new_B1D, aux, short_c = jax.lax.cond(
      jnp.any(complete_B1),
      run,
      lambda c: (
        jnp.zeros_like(pooled_B1D),
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[1]),
        c,
      ),
      cache["short"],
    )
    same_slot_B1 = (last["seg"] == seg_B1) & (last["pos"] // k == pos_B1 // k)
    old_B1D = jnp.where(same_slot_B1[..., None], last["d"], 0)
    u_B1D = jnp.where(complete_B1[..., None], new_B1D, old_B1D)
    return u_B1D.astype(h_B1D.dtype), aux, short_c
