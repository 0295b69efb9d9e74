"""The layer stack: a static layer plan, stacked parameters, scans.

`layer_plan(cfg)` gives one `LayerSpec` per layer (its attention, whether it
is causal, its own shapes, the positions between its rows, and what routing
and funnels add). `segments(plan)`
groups the plan for compilation:

  * a plan that repeats a pattern, `(A, B) * n` (or `(A,) * n`), is one
    segment: its layers are stacked per pattern position and one `lax.scan`
    runs over the n groups, the pattern unrolled inside the body;
  * any other plan is cut into runs of identical consecutive specs, each run
    one scan.

Parameters are always created stacked (leading axis = the segment's
repeats), whether or not `scan` is on: `scan_layers` only decides how the
stack is *run* (one `lax.scan`, or a Python loop over the same slices), so
the same seed gives the same parameters either way and checkpoints move
between the two. `remat` wraps each scanned body.

A block is called `block(x_BTD, pos_BT, seg_BT) -> (x_BTD, aux)`, `aux` a
dict of float32 scalars, or with `cache=` (generation) -> (x_BTD, aux, new
cache): one call path for training, prefill and decode (`call`). A routed
block (`spec.routed`, mixture-of-depths) also takes `causal_routing=`. The stack sums `loss/*` entries over layers
and averages the others (diagnostics) over the layers that report them; a
key holding `{layer}` is reported per layer, named by the layer's index in
the plan (`routing/mod_layer{layer}_fraction` -> `..._layer3_fraction`).
Non-trainable variables (`layers.ModelState`) that a block updates are
carried out of the scan and written back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from efficient_lm.config import AttentionConfig, ModelConfig, MoEConfig
from efficient_lm.models.layers import ModelState

REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What one layer is; equal specs share a scan. The layer plan of each
  model kind sets every field once (no module re-derives them)."""

  attention: AttentionConfig  # this layer's kind; `pattern` resolved away
  causal: bool = True
  # This layer's own shapes (a pruned or imported model's layers differ):
  # MLP width F, query heads H, kv heads G, head dim K.
  mlp_dim: int = 0
  num_heads: int = 0
  num_kv_heads: int = 0
  head_dim: int = 0
  # Positions between consecutive rows of the layer's queries (`stride`)
  # and keys / values (`kv_stride`): 1 at full length; a funnel stage s or
  # an hourglass's shortened layers run on rows factor**s positions apart.
  stride: int = 1
  kv_stride: int = 1
  # A routed block (mixture-of-depths).
  routed: bool = False
  # Funnel / hourglass stage (sequence length = seq_len / factor**stage).
  stage: int = 0
  # Funnel encoder: the first layer of a pooled stage, whose queries are
  # pooled and whose keys / values are the previous stage's sequence
  # (models/funnel.py).
  pool_query: bool = False
  # A mixture-of-experts MLP (model.moe; models/moe.py): its config, or
  # None for a dense MLP.
  moe: MoEConfig | None = None


@dataclasses.dataclass(frozen=True)
class Segment:
  pattern: tuple[LayerSpec, ...]  # unrolled inside the scan body
  repeats: int  # the scan's length


def layer_plan(
  cfg: ModelConfig, *, causal: bool = True
) -> tuple[LayerSpec, ...]:
  """One spec per layer; `attention.pattern` cycles over the layers.

  Mixture-of-depths (routing.kind "mod") routes every `routing.every`-th
  block counting from 1: layers i (0-based) with (i + 1) % every == 0, so
  every=2 gives dense, routed, dense, routed, ... (the paper's
  interleaving, the first block always dense unless every=1)."""
  return tuple(
    LayerSpec(
      attention=dataclasses.replace(
        cfg.attention, kind=cfg.attention.layer_kind(i), pattern=""
      ),
      causal=causal,
      routed=cfg.routing.routes_layer(i),
      moe=cfg.moe if cfg.moe.moe_layer(i) else None,
      **cfg.layer_shapes(i),
    )
    for i in range(cfg.num_layers)
  )


def unstack_layers(stack: dict, plan: tuple[LayerSpec, ...]) -> list[dict]:
  """A Stack's pure-dict parameters ({"groups": ...}) -> one dict per plan
  layer, in plan order (each leaf the layer's slice of its segment)."""
  out = []
  for i, seg in enumerate(segments(plan)):
    group = stack["groups"][f"segment_{i}"]
    for r in range(seg.repeats):
      for j in range(len(seg.pattern)):
        out.append(jax.tree.map(lambda a, r=r: a[r], group[f"layer_{j}"]))
  return out


def stack_layers(
  layers: list[dict], plan: tuple[LayerSpec, ...], stack=jnp.stack
) -> dict:
  """`unstack_layers`' inverse for `plan` (whose segments may group the
  layers differently); `stack` joins a leaf's slices (np.stack keeps them
  on the host). ValueError if the plan has another number of layers."""
  groups, first = {}, 0
  for i, seg in enumerate(segments(plan)):
    n = len(seg.pattern)
    groups[f"segment_{i}"] = {
      f"layer_{j}": jax.tree.map(
        lambda *xs: stack(xs),
        *[layers[first + r * n + j] for r in range(seg.repeats)],
      )
      for j in range(n)
    }
    first += seg.repeats * n
  if first != len(layers):
    raise ValueError(f"plan has {first} layers, given {len(layers)}")
  return {"groups": groups}


def on_one_cpu(arrays) -> bool:
  """Whether every jax array among `arrays` lies on the same single CPU
  device (and there is one)."""
  devices = set()
  for a in arrays:
    if isinstance(a, jax.Array):
      devices |= a.devices()
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def layer_slice(a: jax.Array, r: int) -> jax.Array:
  """`a[r]`; for an array held on one CPU device, a view of its memory
  (numpy's view placed back as is: XLA:CPU takes an aligned host buffer
  without copying), so unrolling a stack (`Stack.unroll`) costs no
  memory. Elsewhere a copy."""
  if on_one_cpu([a]):
    sharding = a.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec()
      )
    return jax.device_put(np.asarray(a)[r], sharding)
  return a[r]


def _routing_kwargs(spec: LayerSpec, causal_routing: bool) -> dict:
  """What a block of `spec` takes besides its inputs and cache: a routed
  block's `causal_routing`."""
  return {"causal_routing": causal_routing} if spec.routed else {}


def call(block, x_BTD, pos_BT, seg_BT, cache=None, **kwargs):
  """block(x, pos, seg) -> (x, aux, new cache or None), a cache passed
  only when there is one (a layer returns its cache when given one)."""
  if cache is None:
    x_BTD, aux = block(x_BTD, pos_BT, seg_BT, **kwargs)
    return x_BTD, aux, None
  return block(x_BTD, pos_BT, seg_BT, cache=cache, **kwargs)


def segments(plan: tuple[LayerSpec, ...]) -> tuple[Segment, ...]:
  n = len(plan)
  for period in range(1, n):
    if n % period == 0 and plan == plan[:period] * (n // period):
      return (Segment(plan[:period], n // period),)
  runs: list[list] = []
  for spec in plan:
    if runs and runs[-1][0] == spec:
      runs[-1][1] += 1
    else:
      runs.append([spec, 1])
  return tuple(Segment((spec,), r) for spec, r in runs)


def _name_layers(
  seg: Segment, first_layer: int, auxes: list[dict[str, jax.Array]]
) -> list[dict]:
  """Per-layer keys: an entry whose key holds `{layer}` (values stacked
  over the segment's repeats) becomes one entry per layer, named by its
  index in the plan; other entries pass as they are."""
  out = []
  for j, aux in enumerate(auxes):
    named = {}
    for key, value in aux.items():
      if "{layer}" not in key:
        named[key] = value
        continue
      value = jnp.reshape(value, (seg.repeats,))
      for r in range(seg.repeats):
        layer = first_layer + r * len(seg.pattern) + j
        named[key.format(layer=layer)] = value[r]
    out.append(named)
  return out


def combine_aux(auxes: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Per-layer aux dicts (values may be stacked over repeats) -> scalars."""
  sums: dict[str, jax.Array] = {}
  counts: dict[str, int] = {}
  for aux in auxes:
    for key, value in aux.items():
      value = jnp.asarray(value, jnp.float32)
      sums[key] = sums.get(key, 0.0) + value.sum()
      counts[key] = counts.get(key, 0) + value.size
  return {
    k: v if k.startswith("loss/") else v / counts[k] for k, v in sums.items()
  }


def _stacked(make_block, spec: LayerSpec, repeats: int, rngs: nnx.Rngs):
  """`repeats` blocks of `spec`, parameters stacked on a leading axis."""

  @nnx.split_rngs(splits=repeats)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(r):
    return make_block(spec, r)

  return create(rngs)


class Stack(nnx.Module):
  """Runs the layers of `plan`, built by `make_block(spec, rngs)`."""

  def __init__(
    self,
    plan: tuple[LayerSpec, ...],
    make_block: Callable[[LayerSpec, nnx.Rngs], nnx.Module],
    *,
    rngs: nnx.Rngs,
    scan: bool,
    remat: str,
  ):
    self.segments = segments(plan)
    self.scan = scan
    self.remat = remat
    self.unrolled = False  # `unroll`: the layers held apart
    groups = {}
    for i, seg in enumerate(self.segments):
      stacks = {}
      for j, spec in enumerate(seg.pattern):
        stacks[f"layer_{j}"] = _stacked(make_block, spec, seg.repeats, rngs)
      groups[f"segment_{i}"] = nnx.Dict(stacks)
    self.groups = nnx.Dict(groups)

  def unroll(self) -> None:
    """Holds the layers apart, in place: pattern position j of a segment
    becomes `repeats` blocks, block r's arrays `layer_slice(stacked
    leaf, r)` (on CPU views of the stacked memory).
    Calls then run the layers in a Python loop, and `init_cache` gives
    each layer its own cache (`[segment][j][r]` instead of stacked over
    r). Same blocks and arithmetic as the stacked form; for generation
    on CPU (generate.Generator): a scanned (or sliced) stack hands each
    layer its weights through a slice, which XLA:CPU copies out of the
    stack on every step (each weight read twice and written once per
    decoded token), while a layer's own array is read where it lies.
    Not for training: parameters of an unrolled stack do not match the
    run's checkpoint layout."""
    if self.unrolled:
      return
    groups = {}  # built whole before it replaces the stacked groups
    for i, seg in enumerate(self.segments):
      groups[f"segment_{i}"] = nnx.Dict(
        {
          f"layer_{j}": nnx.List(
            [self._block(i, j, r, take=layer_slice) for r in range(seg.repeats)]
          )
          for j in range(len(seg.pattern))
        }
      )
    self.groups = nnx.Dict(groups)
    self.unrolled = True

  def _run_unrolled(
    self, seg: Segment, stacks, x_BTD, pos_BT, seg_BT, caches, causal_routing
  ):
    """`_run_segment` of an unrolled stack: its blocks one by one."""
    n = len(seg.pattern)
    auxes: list[list] = [[] for _ in range(n)]
    new_caches: list[list] = [[] for _ in range(n)]
    for r in range(seg.repeats):
      for j in range(n):
        x_BTD, aux, c = call(
          stacks[f"layer_{j}"][r],
          x_BTD,
          pos_BT,
          seg_BT,
          None if caches is None else caches[j][r],
          **_routing_kwargs(seg.pattern[j], causal_routing),
        )
        auxes[j].append(aux)
        new_caches[j].append(c)
    stacked = [jax.tree.map(lambda *v: jnp.stack(v), *a) for a in auxes]
    return x_BTD, stacked, None if caches is None else new_caches

  def _run_segment(
    self,
    seg: Segment,
    stacks,
    x_BTD,
    pos_BT,
    seg_BT,
    caches=None,
    causal_routing=False,
  ):
    """One segment's layers; with `caches` (one per pattern position,
    stacked over repeats) each block reads and extends its cache and the
    updated caches are returned as well. Routed blocks also get
    `causal_routing`."""
    if self.unrolled:
      return self._run_unrolled(
        seg, stacks, x_BTD, pos_BT, seg_BT, caches, causal_routing
      )
    names = [f"layer_{j}" for j in range(len(seg.pattern))]
    split = [nnx.split(stacks[n], nnx.Param, ModelState) for n in names]
    graphdefs = [s[0] for s in split]
    params = [s[1] for s in split]
    states = [s[2] for s in split]

    # A block whose parameters change form in its call (qwix's PTQ swaps
    # each float weight for its quantized arrays on the first call,
    # models/quantization.py) has them carried out of the scan, like its
    # model state, and the stack rebuilt from them; graphdef j's new form.
    reformed: dict[int, nnx.GraphDef] = {}

    def body(x, layer):
      layer_params, layer_states, layer_caches = layer
      new_states, auxes, new_caches, new_params = [], [], [], []
      for j, (gd, p, st) in enumerate(
        zip(graphdefs, layer_params, layer_states, strict=True)
      ):
        block = nnx.merge(gd, p, st)
        x, aux, c = call(
          block,
          x,
          pos_BT,
          seg_BT,
          None if layer_caches is None else layer_caches[j],
          **_routing_kwargs(seg.pattern[j], causal_routing),
        )
        if c is not None:
          new_caches.append(c)
        new_gd, new_p, new_st = nnx.split(block, nnx.Param, ModelState)
        if new_gd != gd:
          reformed[j] = new_gd
        new_params.append(new_p if new_gd != gd else None)
        new_states.append(new_st)
        auxes.append(aux)
      return x, (new_states, auxes, new_caches or None, new_params)

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
    xs = (params, states, caches)
    if self.scan:
      x_BTD, (new_states, auxes, new_caches, new_params) = jax.lax.scan(
        body, x_BTD, xs
      )
    else:
      outs = []
      for r in range(seg.repeats):
        layer = jax.tree.map(lambda a, r=r: a[r], xs)
        x_BTD, out = body(x_BTD, layer)
        outs.append(out)
      new_states, auxes, new_caches, new_params = jax.tree.map(
        lambda *xs: jnp.stack(xs), *outs
      )
    for j, (n, st) in enumerate(zip(names, new_states, strict=True)):
      if j in reformed:
        stacks[n] = nnx.merge(reformed[j], new_params[j], st)
      else:
        nnx.update(stacks[n], st)
    return x_BTD, auxes, new_caches

  def _first_layers(self):
    """Each segment's first layer index in the plan."""
    first, out = 0, []
    for seg in self.segments:
      out.append(first)
      first += seg.repeats * len(seg.pattern)
    return out

  @overload
  def __call__(
    self, x_BTD, pos_BT, seg_BT, *, cache: None = None, causal_routing=False
  ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

  @overload
  def __call__(
    self, x_BTD, pos_BT, seg_BT, *, cache: dict, causal_routing=False
  ) -> tuple[jax.Array, dict[str, jax.Array], dict]: ...

  def __call__(
    self, x_BTD, pos_BT, seg_BT, *, cache=None, causal_routing=False
  ):
    """The layers in order -> (x, aux), or (x, aux, new cache) when a
    `cache` (from `init_cache`) is given: each block then reads and extends
    its own. `causal_routing` reaches the routed blocks (mixture-of-depths;
    with a cache their routing is always causal)."""
    auxes, new_cache = [], {}
    for i, (seg, first) in enumerate(
      zip(self.segments, self._first_layers(), strict=True)
    ):
      name = f"segment_{i}"
      x_BTD, seg_auxes, new_cache[name] = self._run_segment(
        seg,
        self.groups[name],
        x_BTD,
        pos_BT,
        seg_BT,
        None if cache is None else cache[name],
        causal_routing=causal_routing,
      )
      auxes.extend(_name_layers(seg, first, seg_auxes))
    if cache is None:
      return x_BTD, combine_aux(auxes)
    return x_BTD, combine_aux(auxes), new_cache

  def routing_decisions(self, x_BTD, pos_BT, seg_BT) -> dict:
    """Each routed layer's causal decision (`block.decision`, bool [B, T])
    as `{"layer <i>": ...}`, the layers run one by one with causal routing
    (what evaluation and generation compute; for plots and tests)."""
    out = {}
    for i, (seg, first) in enumerate(
      zip(self.segments, self._first_layers(), strict=True)
    ):
      for r in range(seg.repeats):
        for j, spec in enumerate(seg.pattern):
          block = self._block(i, j, r)
          if spec.routed:
            layer = first + r * len(seg.pattern) + j
            out[f"layer {layer}"] = block.decision(x_BTD, seg_BT)
            x_BTD, _ = block(x_BTD, pos_BT, seg_BT, causal_routing=True)
          else:
            x_BTD, _ = block(x_BTD, pos_BT, seg_BT)
    return out

  # -------------------------------------------------------------- generation

  def _block(self, i: int, j: int, r: int, take=lambda a, r: a[r]):
    """Segment i's block at pattern position j, repeat r (stacked: a
    module of its arrays' slices, `take(stacked array, r)`)."""
    blocks = self.groups[f"segment_{i}"][f"layer_{j}"]
    if self.unrolled:
      return blocks[r]
    gd, p, st = nnx.split(blocks, nnx.Param, ModelState)
    return nnx.merge(gd, *jax.tree.map(lambda a: take(a, r), (p, st)))

  def _first_blocks(self):
    """(segment index, pattern position, the block of the first repeat)."""
    for i, seg in enumerate(self.segments):
      for j in range(len(seg.pattern)):
        yield i, j, self._block(i, j, 0)

  def max_positions(self) -> int | None:
    """The fewest positions any layer's block-sparse table covers (None:
    no layer limits them); generation refuses longer sequences."""
    limits = [
      kernels.masks.block_mask_coverage(blk.attn.mask)
      for _, _, blk in self._first_blocks()
      if hasattr(getattr(blk, "attn", None), "mask")
    ]
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None

  def cache_bytes_per_token(self, dtype) -> list[int]:
    """Each layer's cache bytes per cached token, in layer order."""
    per = {
      (i, j): blk.cache_bytes_per_token(dtype)
      for i, j, blk in self._first_blocks()
    }
    return [
      per[i, j]
      for i, seg in enumerate(self.segments)
      for _ in range(seg.repeats)
      for j in range(len(seg.pattern))
    ]

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Every layer's empty cache, stacked like the parameters:
    `{"segment_<i>": [cache of pattern position j, leading axis repeats]}`.
    A block's `init_cache` reads only static attributes. Unrolled
    (`unroll`): one cache per layer, `[cache of repeat r]` per j."""
    out: dict[str, list] = {
      f"segment_{i}": [] for i in range(len(self.segments))
    }
    for i, j, block in self._first_blocks():
      n = self.segments[i].repeats
      if self.unrolled:
        out[f"segment_{i}"].append(
          [
            self._block(i, j, r).init_cache(batch, max_len, dtype)
            for r in range(n)
          ]
        )
        continue
      out[f"segment_{i}"].append(
        jax.tree.map(
          lambda a, n=n: jnp.broadcast_to(a, (n, *a.shape)),
          block.init_cache(batch, max_len, dtype),
        )
      )
    return out
