"""Mixture-of-Recursions (docs/routing.md): shared layers applied up to
`num_recursions` times, a router choosing how deep each token goes.

Layout (`routing.sharing`, §1.1): the decoder's L virtual layers map onto
unique layers by `layer_map`. The middle schemes keep the first and last
layers unique and recurse over the middle L - 2; the recursion block is the
D = (L or L - 2) / N_r consecutive unique layers, applied N_r times. Unique
layers are ordinary decoder `Block`s that exist once (their parameters are
shared by every use; gradients sum over uses). The `sequence` schemes are
parameter maps only: routing needs a contiguous recursion block, so config
validation refuses them with MoR (as the reference code does).

Routers (the hidden state is read in float32):
  * expert_choice: one linear router per step r, z = H w_r, gate
    g = alpha * sigmoid(z). Training (`causal_routing=False`) selects per
    row the top k_r = max(1, floor(c_r * n)) of the tokens still active
    (n = the row's non-padding tokens; nested sets S_r ⊆ S_{r-1}), gathers
    them in ascending index order with their own positions and segment ids
    into a static [B, K_r] array (K_r = max(1, floor(c_r * T))), runs the
    shared layers on them alone and scatters the result back; other tokens
    are not touched (bitwise). A BCE loss teaches z > 0 <=> selected
    (`loss/mor_bce`, weight aux_loss_weight; optional `loss/router_z`).
  * token_choice: one router z = H^1 W [N_r], p = softmax(z); depth
    i = argmax(p + bias) (+1), gate g = p_i; a token runs steps 1..i.
    Balancing: `loss/mor_balance` = w * N_r * sum_j f_j P_j, or loss-free: a
    non-trainable bias (`layers.ModelState`, checkpointed) moved by
    bias_rate * sign(mean load - load) in every training forward.
    Capacity (`routing.token_choice_capacities`, training only): step r
    runs on at most C_r = max(1, ceil(c_r T)) tokens per row, gathered with
    their positions and segment ids into a static [B, C_r] array as
    expert-choice does (`_gathered`), scattered back; c_r = 1 runs the
    step masked over all T. Overflow: the tokens still running at depth
    >= r are taken earliest position first (as capacity-bounded MoE: the
    order depends only on earlier positions); one past C_r exits at step
    r - 1, taking its final update there with its gate g = p_i (its later
    steps skipped). `routing/mor_overflow_fraction`: the tokens cut short.

Update (`routing.update_rule`; default "paper", the released code's rule):
  expert_choice  paper:          H <- H + g * Blocks(H)
                 residual_delta: H <- H + g * (Blocks(H) - H)
  token_choice   continuing tokens H <- Blocks(H) (no gate); a token ending
                 at its depth: H^1 + g * Blocks(H) (paper) or
                 H^1 + g * (Blocks(H) - H^1) (residual_delta), H^1 = the
                 input of the recursions.

Causal routing (evaluation, generation): expert-choice tokens continue at
step r iff they were active at r-1 and z_r > 0 (a step of capacity 1
passes every active token: top-k would too); token-choice is causal as is
(every token runs its chosen depth: capacities bound training only).
Then every step runs on all T tokens with inactive ones given segment id 0
(masked out of attention as queries and keys, dropped from caches) and
their state kept by a select: the decision of one token never depends on
another, so the model is strictly causal. At decode (one token per row) a
step no row is active at is skipped under `lax.cond` (early exit: at batch
1 an exited token costs nothing at later steps; `Recursions._step`).

KV (`routing.kv`): "recursion_wise" — step r attends only among tokens
active at r (each step has its own cache per shared layer);
"recursive_sharing" — step 1 (which every token passes: capacities[0] = 1)
computes K/V of every shared layer once; later steps' queries (active
tokens) attend over those.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from efficient_lm.config import ModelConfig, RoutingConfig, schema
from efficient_lm.config.schema import MoRSharing
from efficient_lm.models import routing, stack
from efficient_lm.models.block import Block, layer_flops, projection_flops
from efficient_lm.models.layers import ModelState, param
from efficient_lm.sharding import BTD, constrain


# ------------------------------------------------------------- the schemes


def layer_map(
  sharing: MoRSharing, num_layers: int, num_recursions: int
) -> tuple[int, ...]:
  """Unique layer used by each virtual layer (docs/routing.md): the
  config's rule, `RoutingConfig.layer_map`."""
  r = RoutingConfig(kind="mor", sharing=sharing, num_recursions=num_recursions)
  return r.layer_map(num_layers)


# ------------------------------------------------------------ the module


class Recursions(nnx.Module):
  """The decoder's layer stack under MoR; the `stack.Stack` interface."""

  def __init__(
    self,
    cfg: ModelConfig,
    make_block: Callable[[stack.LayerSpec, nnx.Rngs], Block],
    *,
    rngs: nnx.Rngs,
  ):
    r = cfg.routing
    self.num_recursions = n = r.num_recursions
    self.router_kind = r.router
    self.update = r.update_rule
    self.kv = r.kv
    self.alpha = r.alpha
    self.capacities = r.resolved_capacities
    self.token_choice_capacities = r.resolved_token_choice_capacities
    self.aux_loss_weight = r.aux_loss_weight
    self.router_z_loss = r.router_z_loss
    self.balancing = r.balancing
    self.balancing_weight = r.balancing_weight
    self.bias_rate = r.bias_rate
    plan = stack.layer_plan(cfg, causal=True)
    mapping = r.layer_map(cfg.num_layers)
    middle = r.unique_ends
    self.depth = r.recursion_depth(cfg.num_layers)
    # Each unique layer takes the spec of its first use (validation checks
    # that all uses agree).
    spec_of = {}
    for layer, u in enumerate(mapping):
      spec_of.setdefault(u, plan[layer])
    off = 1 if middle else 0
    self.first = make_block(spec_of[0], rngs) if middle else None
    self.shared = nnx.List(
      [make_block(spec_of[off + j], rngs) for j in range(self.depth)]
    )
    self.last = make_block(spec_of[self.depth + 1], rngs) if middle else None
    pdt = jnp.dtype(cfg.param_dtype)
    # One column per recursion step (expert-choice) or per depth
    # (token-choice); N(0, 0.02) as the released linear routers.
    self.router_DN = param(rngs, (cfg.embed_dim, n), ("embed", None), 0.02, pdt)
    # Decode skips a recursion step no row is active at (`_step`); False:
    # every step runs masked, the reference the skip must equal.
    self.skip_decode = True
    self.bias_N = (
      ModelState(jnp.zeros((n,), jnp.float32), logical_axes=(None,))
      if r.router == "token_choice" and r.balancing == "loss_free"
      else None
    )

  # ----------------------------------------------------------- pieces

  def _logits(self, x_BTD):
    """Router logits [B, T, U] in float32 (U = recursion steps)."""
    return jnp.einsum(
      "BTD,DU->BTU",
      x_BTD.astype(jnp.float32),
      jnp.asarray(self.router_DN[...], jnp.float32),
    )

  def _shared(self, x_BTD, pos_BT, seg_BT, step: int, rows, caches):
    """The D shared layers on one step's tokens. recursion_wise: attention
    among these tokens (and `caches[j]` if given); recursive_sharing: step 0
    attends over its own K/V (and cache) and returns those rows as `rows`,
    later steps attend over `rows`. -> (x, auxes, rows, new caches)."""
    auxes, out_rows, new_caches = [], [], []
    for j, blk in enumerate(self.shared):
      cache = None if caches is None else caches[j]
      if self.kv == "recursive_sharing" and step > 0:
        x_BTD, aux = blk(x_BTD, pos_BT, seg_BT, rows=rows[j])
      else:
        if self.kv == "recursive_sharing":
          out_rows.append(blk.kv_rows(x_BTD, pos_BT, seg_BT, cache))
        x_BTD, aux, cache = stack.call(blk, x_BTD, pos_BT, seg_BT, cache)
      auxes.append(aux)
      new_caches.append(cache)
    return x_BTD, auxes, (out_rows if step == 0 else rows), new_caches

  def _combine(self, x_BKD, y_BKD, g_BK):
    g = g_BK[..., None].astype(x_BKD.dtype)
    if self.update == "paper":
      return x_BKD + g * y_BKD
    return x_BKD + g * (y_BKD - x_BKD)

  def _gathered(self, x_BTD, pos_BT, seg_BT, idx, ok, r, rows, cs_in, update):
    """Step r on the gathered rows idx_BM (`ok` False: padding slots, given
    segment id 0 and not written back): they keep their own positions and
    segment ids, so attention among them stays causal by original position.
    `update(xs_BMD, y_BMD) -> new rows`. -> (x, auxes, rows, caches)."""
    xs = routing.gather(x_BTD, idx)
    ss = jnp.where(ok, routing.gather(seg_BT, idx), 0)
    y, a, rows, cs = self._shared(
      xs, routing.gather(pos_BT, idx), ss, r, rows, cs_in
    )
    x_BTD = constrain(routing.scatter(x_BTD, idx, update(xs, y), ok), BTD)
    return x_BTD, a, rows, cs

  def _step(self, run, active_BT, t, r, x_BTD, rows, cs_in, cached: bool):
    """One recursion step `run() -> (x, auxes, rows, caches)`. At decode
    (a cache, one token per row; `skip_decode`) it runs under a `lax.cond`
    on "some row is active at this step": a token that has exited costs
    nothing at later steps at batch 1 (its step caches left as they are);
    at batch B the step runs masked for all rows when any is active.
    Recursive sharing's step 1 computes the rows later steps read, and
    every token passes it: it always runs."""
    if not (
      self.skip_decode
      and cached
      and t == 1
      and not (self.kv == "recursive_sharing" and r == 0)
    ):
      return run()
    zero_aux = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: run()[1])
    )
    # What `_shared` returns for a step it did not run.
    rows_out = [] if r == 0 else rows
    cs_out = [None] * len(self.shared) if cs_in is None else cs_in
    return routing.run_if_any(
      active_BT, run, lambda: (x_BTD, zero_aux, rows_out, cs_out)
    )

  # ----------------------------------------------------------- routers

  def _expert_choice(
    self, x_BTD, pos_BT, seg_BT, causal: bool, caches=None, decisions=None
  ):
    b, t, _ = x_BTD.shape
    valid = seg_BT != 0
    n_valid = valid.sum(1)
    total = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    active = valid
    aux, auxes, rows, new_caches = {}, [], None, []
    bce, zl, agree = 0.0, 0.0, 0.0
    for r in range(self.num_recursions):
      c = self.capacities[r]
      # The whole router, then step r's column: a quantized run's router
      # (qwix PTQ) is one per-column-scaled matrix, not N sliced vectors.
      z_BT = jnp.einsum(
        "BTD,DN->BTN",
        x_BTD.astype(jnp.float32),
        jnp.asarray(self.router_DN[...], jnp.float32),
      )[:, :, r]
      g_BT = self.alpha * jax.nn.sigmoid(z_BT)
      idx, ok, top = routing.top_k_selection(z_BT, active, n_valid, c)
      if causal:
        chosen = active & ((z_BT > 0) | (c >= 1.0))
        agree += jnp.sum((chosen == top) & active) / jnp.maximum(
          active.sum(), 1
        )
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        ok = chosen
      else:
        chosen = top
      bce += routing.bce(z_BT, top, active)
      zl += jnp.sum(jnp.square(z_BT) * active) / jnp.maximum(active.sum(), 1)
      cs_in = None if caches is None else caches[r]

      def run(x_BTD=x_BTD, rows=rows, cs_in=cs_in, idx=idx, ok=ok, g_BT=g_BT):
        g_BM = routing.gather(g_BT, idx)
        return self._gathered(
          x_BTD,
          pos_BT,
          seg_BT,
          idx,
          ok,
          r,
          rows,
          cs_in,
          lambda xs, y: self._combine(xs, y, g_BM),
        )

      x_BTD, a, rows, cs = self._step(
        run, chosen, t, r, x_BTD, rows, cs_in, caches is not None
      )
      auxes += a
      new_caches.append(cs)
      active = chosen
      if decisions is not None:
        decisions.append(chosen)
      aux[f"routing/mor_step{r + 1}_fraction"] = chosen.sum() / total
    aux["loss/mor_bce"] = self.aux_loss_weight * bce
    if self.router_z_loss:
      aux["loss/router_z"] = self.router_z_loss * zl
    if causal:
      aux["routing/mor_agreement"] = agree / self.num_recursions
    return x_BTD, aux, auxes, new_caches

  def _token_choice(
    self, x_BTD, pos_BT, seg_BT, causal: bool, caches=None, decisions=None
  ):
    n = self.num_recursions
    valid = seg_BT != 0
    total = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    z_BTU = self._logits(x_BTD)
    p_BTU = jax.nn.softmax(z_BTU, axis=-1)
    bias = (
      jnp.zeros((n,), jnp.float32) if self.bias_N is None else self.bias_N[...]
    )
    depth_BT = jnp.argmax(p_BTU + bias[None, None], axis=-1)
    g_BT = jnp.take_along_axis(p_BTU, depth_BT[..., None], axis=-1)[..., 0]
    onehot = jax.nn.one_hot(depth_BT, n) * valid[..., None]
    load_U = onehot.sum((0, 1)) / total
    prob_U = (p_BTU * valid[..., None]).sum((0, 1)) / total
    aux = {}
    if self.balancing == "aux_loss":
      aux["loss/mor_balance"] = (
        self.balancing_weight * n * jnp.sum(load_U * prob_U)
      )
    elif not causal:  # loss_free: __init__ made the bias
      assert self.bias_N is not None
      self.bias_N[...] = bias + self.bias_rate * jnp.sign(
        jax.lax.stop_gradient(load_U.mean() - load_U)
      )
    if self.router_z_loss:
      lse = jax.nn.logsumexp(z_BTU, axis=-1)
      aux["loss/router_z"] = (
        self.router_z_loss * jnp.sum(jnp.square(lse) * valid) / total
      )
    # Step r processes keep[r]; a token's last processed step is `last`
    # (its depth unless capacity cut it short; -1: padding, or dropped at
    # step 1).
    slots = self._token_choice_slots(x_BTD.shape[1], causal)
    keep = self._token_choice_keep(valid, depth_BT, slots)
    last_BT = jnp.stack(keep).sum(0, dtype=jnp.int32) - 1
    if any(m < x_BTD.shape[1] for m in slots):
      aux["routing/mor_overflow_fraction"] = (
        jnp.sum(valid & (last_BT < depth_BT)) / total
      )
    h1_BTD, auxes, rows, new_caches = x_BTD, [], None, []
    t = x_BTD.shape[1]
    for r in range(n):
      act = keep[r]
      if decisions is not None:
        decisions.append(act)
      cs_in = None if caches is None else caches[r]
      if slots[r] < t:  # capacity-bounded: run on the gathered rows only
        idx, ok = routing.top_k(
          -jnp.arange(t, dtype=jnp.float32)[None],
          act.astype(jnp.int32),
          slots[r],
        )

        def run(x_BTD=x_BTD, rows=rows, cs_in=cs_in, idx=idx, ok=ok, r=r):
          h1_BMD = routing.gather(h1_BTD, idx)
          g_BM = routing.gather(g_BT, idx)
          end_BM = (routing.gather(last_BT, idx) == r)[..., None]

          def update(xs, y):
            return jnp.where(end_BM, self._combine(h1_BMD, y, g_BM), y)

          return self._gathered(
            x_BTD, pos_BT, seg_BT, idx, ok, r, rows, cs_in, update
          )

      else:

        def run(x_BTD=x_BTD, rows=rows, cs_in=cs_in, act=act, r=r):
          y, a, rows, cs = self._shared(
            x_BTD, pos_BT, jnp.where(act, seg_BT, 0), r, rows, cs_in
          )
          final = self._combine(h1_BTD, y, g_BT)
          x_BTD = jnp.where((last_BT > r)[..., None], y, x_BTD)
          x_BTD = jnp.where((last_BT == r)[..., None], final, x_BTD)
          return constrain(x_BTD, BTD), a, rows, cs

      x_BTD, a, rows, cs = self._step(
        run, act, t, r, x_BTD, rows, cs_in, caches is not None
      )
      auxes += a
      new_caches.append(cs)
      aux[f"routing/mor_step{r + 1}_fraction"] = act.sum() / total
    return x_BTD, aux, auxes, new_caches

  def _token_choice_slots(self, t: int, causal: bool) -> tuple[int, ...]:
    """C_r per step: `token_choice_capacities` in training; causal routing
    (evaluation, generation) bounds nothing (all T)."""
    if causal:
      return (t,) * self.num_recursions
    return tuple(
      schema.capacity_slots(c, t) for c in self.token_choice_capacities
    )

  @staticmethod
  def _token_choice_keep(valid_BT, depth_BT, slots) -> list[jax.Array]:
    """The tokens each step processes: at step r those still running with
    depth >= r, the first slots[r] of them per row in position order (as
    capacity-bounded MoE: the order depends only on earlier positions).
    A token past the capacity at step r is not processed at r or later:
    it exits at step r - 1 (its final update applied there)."""
    keep, alive = [], valid_BT
    t = valid_BT.shape[1]
    for r, m in enumerate(slots):
      cand = alive & (depth_BT >= r)
      if m < t:
        cand = cand & (jnp.cumsum(cand, axis=1) <= m)
      keep.append(cand)
      alive = cand
    return keep

  def _route(self, x_BTD, pos_BT, seg_BT, causal, caches=None, decisions=None):
    f = (
      self._expert_choice
      if self.router_kind == "expert_choice"
      else self._token_choice
    )
    return f(x_BTD, pos_BT, seg_BT, causal, caches, decisions)

  # ----------------------------------------------------------- interface

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
    """The first layer, the routed recursions, the last layer -> (x, aux),
    or (x, aux, new cache) with a `cache` (generation: routing always
    causal). Cache: {"first", "last"} for the unique ends and "steps": per
    step r a list of the shared layers' caches (recursion_wise), or
    "shared": the shared layers' step-1 caches (recursive_sharing)."""
    causal = causal_routing or cache is not None
    get = (lambda key: None) if cache is None else cache.get
    auxes, new = [], {}
    if self.first is not None:
      x_BTD, a, new["first"] = stack.call(
        self.first, x_BTD, pos_BT, seg_BT, get("first")
      )
      auxes.append(a)
    if cache is None:
      caches = None
    elif self.kv == "recursion_wise":
      caches = cache["steps"]
    else:
      caches = [cache["shared"]] + [None] * (self.num_recursions - 1)
    x_BTD, aux, a, new_caches = self._route(
      x_BTD, pos_BT, seg_BT, causal, caches
    )
    auxes += a
    if self.last is not None:
      x_BTD, a, new["last"] = stack.call(
        self.last, x_BTD, pos_BT, seg_BT, get("last")
      )
      auxes.append(a)
    aux = {**stack.combine_aux(auxes), **aux}
    if cache is None:
      return x_BTD, aux
    if self.kv == "recursion_wise":
      new["steps"] = new_caches
    else:
      new["shared"] = new_caches[0]
    return x_BTD, aux, new

  def routing_decisions(self, x_BTD, pos_BT, seg_BT) -> dict[str, jax.Array]:
    """{"recursion step r": [B, T] bool}: the tokens step r processes under
    causal routing (efficient_lm.plot routing)."""
    if self.first is not None:
      x_BTD, _ = self.first(x_BTD, pos_BT, seg_BT)
    decisions = []
    self._route(x_BTD, pos_BT, seg_BT, True, decisions=decisions)
    return {f"recursion step {r + 1}": d for r, d in enumerate(decisions)}

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    def layers():
      return [blk.init_cache(batch, max_len, dtype) for blk in self.shared]

    out: dict[str, Any] = {}
    if self.kv == "recursion_wise":
      out["steps"] = [layers() for _ in range(self.num_recursions)]
    else:
      out["shared"] = layers()
    if self.first is not None and self.last is not None:  # unique ends
      out["first"] = self.first.init_cache(batch, max_len, dtype)
      out["last"] = self.last.init_cache(batch, max_len, dtype)
    return out

  def _blocks(self):
    ends = [b for b in (self.first, self.last) if b is not None]
    return [*ends, *self.shared]

  def max_positions(self) -> int | None:
    limits = [
      kernels.masks.block_mask_coverage(b.attn.mask)
      for b in self._blocks()
      if hasattr(getattr(b, "attn", None), "mask")
    ]
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None

  def cache_bytes_per_token(self, dtype) -> list[int]:
    """Per cache (first, each step's shared layers or the shared step-1
    layers, last): bytes per cached token. Recursion-wise step r caches only
    the tokens active at r."""
    shared = [b.cache_bytes_per_token(dtype) for b in self.shared]
    steps = self.num_recursions if self.kv == "recursion_wise" else 1
    ends = (
      [] if self.first is None else [self.first.cache_bytes_per_token(dtype)]
    )
    return (
      ends
      + shared * steps
      + [
        b.cache_bytes_per_token(dtype)
        for b in ([] if self.last is None else [self.last])
      ]
    )

  @staticmethod
  def flops(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward matmul FLOPs per token, summed over the layer applications:
    a step's application runs on the K_r = max(1, floor(c_r T)) gathered
    tokens (expert-choice training) or the C_r = max(1, ceil(c_r T))
    gathered slots of token-choice training (`token_choice_capacities`;
    capacity 1: all T, masked, so the full depth's FLOPs). Recursion-wise
    attention is among the step's tokens (visible: causal over them as one
    document); recursive sharing attends a later step's queries over the
    step-1 keys of all T, which it does not project again. The router: one [D, N_r] matmul."""
    r = cfg.routing
    t, d = seq_len, cfg.embed_dim
    plan = stack.layer_plan(cfg, causal=True)
    mapping = r.layer_map(cfg.num_layers)
    middle = r.unique_ends
    depth = r.recursion_depth(cfg.num_layers)
    parts = [layer_flops(d, plan[0], t, t, t)] if middle else []
    off = 1 if middle else 0
    if r.router == "expert_choice":
      steps = [
        routing.capacity_tokens(c, t, minimum=1) for c in r.resolved_capacities
      ]
    else:
      steps = list(r.token_choice_slots(t))
    for step, n in enumerate(steps):
      for j in range(depth):
        spec = plan[mapping.index(off + j)]
        if r.kv == "recursive_sharing" and step > 0:
          part = layer_flops(d, spec, t, n, t)
          part["attention_proj"] = n * projection_flops(d, spec)[0] / t
        else:
          part = layer_flops(d, spec, t, n, n)
        parts.append(part)
    if middle:
      parts.append(layer_flops(d, plan[-1], t, t, t))
    terms = {k: sum(p[k] for p in parts) for k in parts[0]}
    terms["router"] = 2.0 * d * r.num_recursions
    return terms
