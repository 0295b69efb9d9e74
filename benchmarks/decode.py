"""Decode speed of every efficient decoder against dense, in one run.

  python -m benchmarks.decode                       # batch 1 and 8
  python -m benchmarks.decode --batch=1 --reps=5 --variants=dense,mod,mor

Each variant is the same randomly initialised decoder (`--layers` x
`--width`, head dim 64, char-sized vocabulary, float32) with one method
switched on; `efficient_lm.generate.Generator` prefills `--prompt` random
tokens and decodes `--new` more, sampled at temperature 1 from seed 0
(the generate CLI's path: one jitted step per token, a jitted sample
between; greedy decoding of a random model repeats one token, so every
routing decision would be the same). Variants and batch sizes
are interleaved round by round (`--reps` rounds after one compiling run
each), and each row's decode tokens/s is the median over rounds; ratios
are against dense at the same batch in the same run.

  dense      MHA (kv heads = heads)
  gqa        kv heads = heads / 4
  mla        multi-head latent attention (DeepSeek-V2 default ratios)
  window     sliding window of `--window` tokens (rolling cache)
  tglobal    TGlobal: the window plus one summary key per 8 tokens
  mod        mixture-of-depths, capacity 12.5%, every 2nd block routed
  mod_masked the same model decoding masked (every block computed:
             skip_decode=False, what decode did before issue #26)
  mor        mixture-of-recursions, 2 recursions, expert choice,
             middle_cycle, capacities (1, 1/2), recursion-wise KV
  mor_masked the same, every recursion step computed
  hourglass  the middle half of the layers on pairs of tokens

Routers are untrained: MoD's router weights are scaled by 50 and each
routed layer's bias is bisected on random tokens so that its causal
decision processes ~12.5% of tokens, what a trained router's BCE teaches;
MoR's step-2 router, zero-mean, passes about half. The fraction routing really
processed in the timed decodes (`routed` column: MoD, the routed layers'
mean; MoR, step 2's) is measured on the generated sequences.

FLOPs per decoded token are analytic (models/flops.py, visible
convention: attention over the keys each query sees): a decode step at
position p costs what the forward adds for position p, so over positions
P..P+N-1 it is (T f(T) - P f(P)) / N, f = `flops_per_token(cfg, .)
["forward_visible"]`, T = P + N. Routed models count what routing runs
at the fraction routing processed in the timed decodes (MoD a routed
block, MoR step 2), i.e. what decode with skipping computes at batch 1;
`*_masked` rows at full capacity (every block computed). At batch B a
skipped step is one no row is processed in, so batch 8 computes more than
its row says (see README).
`cache B/tok`: each layer's cache bytes per cached token summed over
layers (models' own formula; MoD / MoR recursion-wise layers hold only
processed tokens, not discounted here); `alloc B/pos`: the bytes the
cache allocates for one sequence of T positions, over T (windows cap it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

VARIANTS = (
  "dense",
  "gqa",
  "mla",
  "window",
  "tglobal",
  "mod",
  "mod_masked",
  "mor",
  "mor_masked",
  "hourglass",
)
MOD_CAPACITY = 0.125


def _overrides(name: str, args) -> dict:
  heads = args.width // 64
  mod = {
    "model.routing.kind": "mod",
    "model.routing.capacity": MOD_CAPACITY,
    "model.routing.every": 2,
  }
  mor = {
    "model.routing.kind": "mor",
    "model.routing.num_recursions": 2,
    "model.routing.router": "expert_choice",
    "model.routing.sharing": "middle_cycle",
  }
  third = args.layers // 4
  return {
    "dense": {},
    "gqa": {"model.num_kv_heads": max(heads // 4, 1)},
    "mla": {"model.attention.projection": "mla"},
    "window": {
      "model.attention.kind": "sliding_window",
      "model.attention.window": args.window,
    },
    "tglobal": {
      "model.attention.kind": "tglobal",
      "model.attention.window": args.window,
      "model.attention.tglobal_block": 8,
    },
    "mod": mod,
    "mod_masked": mod,
    "mor": mor,
    "mor_masked": mor,
    "hourglass": {
      "model.kind": "hourglass",
      "model.funnel.stages": (third, args.layers - 2 * third, third),
      "model.funnel.factor": 2,
    },
  }[name]


def _config(name: str, args):
  from configs import base
  from efficient_lm import config as config_lib

  cd = base.get_config()
  m = cd.model
  m.num_layers = args.layers
  m.embed_dim = args.width
  m.num_heads = m.num_kv_heads = args.width // 64
  m.mlp_dim = args.mlp
  m.vocab_size = 256
  m.dtype = m.param_dtype = "float32"
  m.scan_layers = args.scan_layers == "true"
  cd.data.seq_len = args.prompt + args.new
  cd.mesh.data = 1
  for key, value in _overrides(name, args).items():
    node = cd
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.from_config_dict(cd)


def decode_flops(cfg, prompt: int, new: int) -> float:
  """Analytic FLOPs per decoded token over positions prompt..prompt+new-1
  (module docstring)."""
  from efficient_lm.models import flops

  def total(t):
    return t * flops.flops_per_token(cfg, t)["forward_visible"]

  t = prompt + new
  return (total(t) - total(prompt)) / new


def _routers(model):
  from flax import nnx

  from efficient_lm.models.mod import RoutedBlock
  from efficient_lm.models.mor import Recursions

  return [
    m
    for _, m in nnx.iter_modules(model)
    if isinstance(m, (RoutedBlock, Recursions))
  ]


def _routed_fraction(model, seqs: np.ndarray, prompt: int) -> float | None:
  """Mean fraction of decoded positions a MoD routed layer (mean over
  layers) or MoR's last step processes, from the causal decisions."""
  import jax
  import jax.numpy as jnp

  if not _routers(model):
    return None
  tok = jnp.asarray(seqs)
  pos = jnp.broadcast_to(jnp.arange(tok.shape[1], dtype=jnp.int32), tok.shape)
  dec = jax.jit(model.routing_decisions)(tok, pos, jnp.ones_like(tok))
  masks = [np.asarray(v)[:, prompt:] for v in dec.values()]
  if any(k.startswith("recursion") for k in dec):
    masks = masks[-1:]
  return float(np.mean(masks))


def _calibrate_mod(model, args, rng) -> None:
  """Scale every MoD router's w by 50 (logits of order one, as a trained
  router's) and set each routed layer's bias b so that its causal
  decision processes ~MOD_CAPACITY of random tokens (bisection, all
  layers at once: a layer's input settles once the earlier ones have)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from efficient_lm.models.mod import RoutedBlock

  blocks = [m for m in _routers(model) if isinstance(m, RoutedBlock)]
  if not blocks:
    return
  # The stacked routed blocks of the one (dense, routed) x n segment: b
  # has one entry per routed layer, in layer order.
  (blk,) = blocks
  blk.router.w_D[...] = blk.router.w_D[...] * 50.0
  t = args.prompt + args.new
  tok = jnp.asarray(rng.integers(0, 256, (8, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tok.shape)
  gd, state = nnx.split(model)

  @jax.jit
  def fractions(state, b):
    m = nnx.merge(gd, state)
    (x,) = [x for x in _routers(m) if isinstance(x, RoutedBlock)]
    x.router.b[...] = b
    dec = m.routing_decisions(tok, pos, jnp.ones_like(tok))
    order = sorted(dec, key=lambda k: int(k.split()[-1]))
    return jnp.stack([dec[k].mean() for k in order])

  lo = np.full(blk.router.b[...].shape, -20.0)
  hi = -lo
  for _ in range(40):
    mid = (lo + hi) / 2
    over = np.asarray(fractions(state, jnp.asarray(mid))) > MOD_CAPACITY
    lo, hi = np.where(over, lo, mid), np.where(over, mid, hi)
  blk.router.b[...] = jnp.asarray((lo + hi) / 2, blk.router.b[...].dtype)


def _setup(name: str, args, rng):
  from flax import nnx

  from efficient_lm.generate import Generator
  from efficient_lm.models import build

  cfg = _config(name, args)
  model = build(cfg.model, nnx.Rngs(0))
  _calibrate_mod(model, args, rng)
  for m in _routers(model):
    m.skip_decode = not name.endswith("_masked")
  gd, state = nnx.split(model)
  return cfg, model, Generator(gd, state)


def _run(gen, prompts, args, seed: int):
  """(prompts + new tokens, seconds of each decode step): the Generator's
  jitted prefill, then `--new` decode steps, each timed alone (dispatch
  and compute, to block_until_ready); tokens sampled at temperature 1."""
  import jax
  import jax.numpy as jnp

  buf, lens, longest = gen._batch(prompts, args.new + 1, None, None)
  logits, cache = gen._start(buf, lens, longest, True)
  key, cur = jax.random.key(seed), lens.copy()
  seqs, times = [list(p) for p in prompts], []
  for i in range(args.new):
    tok = gen._sample(
      logits, jax.random.fold_in(key, i), temperature=1.0, top_k=0, top_p=1.0
    )
    t0 = time.perf_counter()
    logits, cache = gen._decode(gen.variables, cache, tok, jnp.asarray(cur))
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - t0)
    for row, t in zip(seqs, np.asarray(tok), strict=True):
      row.append(int(t))
    cur += 1
  return np.array(seqs), times


def _routed_flops(cfg, frac: float, args) -> float:
  """Decode FLOPs with the routed fraction measured instead of the
  configured capacity (MoD: capacity; MoR: step 2's capacity)."""
  import dataclasses

  r = cfg.routing
  if r.kind == "mod":
    r = dataclasses.replace(r, capacity=frac)
  else:
    r = dataclasses.replace(r, capacities=(1.0, frac))
  m = dataclasses.replace(cfg, routing=r)
  return decode_flops(m, args.prompt, args.new)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--width", type=int, default=384)
  ap.add_argument("--mlp", type=int, default=1024)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--window", type=int, default=16)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument(
    "--scan_layers",
    default="true",
    choices=("true", "false"),
    help="model.scan_layers of every variant (MoR is always unrolled)",
  )
  args = ap.parse_args(argv)

  import jax

  from efficient_lm import cpu_runtime

  cpu_runtime.use_cpu_only_without_accelerator()
  names = args.variants.split(",")
  if "dense" not in names:
    names = ["dense", *names]
  batches = [int(b) for b in args.batch.split(",")]
  rng = np.random.default_rng(0)
  prompts = {
    b: rng.integers(0, 256, (b, args.prompt)).tolist() for b in batches
  }
  t = args.prompt + args.new
  print(
    f"decode: {jax.devices()[0].device_kind}, {args.layers} layers x "
    f"{args.width} wide, mlp {args.mlp}, prompt {args.prompt} + "
    f"{args.new} new tokens sampled, {args.reps} interleaved rounds, "
    f"scan_layers={args.scan_layers}"
  )
  setups, rows = {}, {}
  for name in names:
    t0 = time.perf_counter()
    cfg, model, gen = setups[name] = _setup(name, args, rng)
    for b in batches:
      _run(gen, prompts[b], args, 0)  # compile
      stats = gen.cache_stats(1, t + 1)
      rows[name, b] = {
        "times": [],
        "outs": [],
        "flops": decode_flops(cfg.model, args.prompt, args.new),
        "cache": sum(stats["cache_bytes_per_token"]),
        "alloc": stats["cache_bytes"] / (t + 1),
      }
    print(f"  built {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
  order = [(name, b) for b in batches for name in names]
  for rep in range(args.reps):
    rng.shuffle(order)  # no variant always first after a pause
    for name, b in order:
      seqs, times = _run(setups[name][2], prompts[b], args, rep)
      rows[name, b]["times"] += times
      rows[name, b]["outs"].append(seqs)
  print(
    f"\n{'variant':<11} {'batch':>5} {'tok/s':>8} {'x dense':>8} "
    f"{'MFLOP/tok':>10} {'dense/FLOPs':>11} {'realized':>8} "
    f"{'routed':>7} {'cache B/tok':>11} {'alloc B/pos':>11}"
  )
  for b in batches:
    base = rows["dense", b]
    base_tps = b / float(np.median(base["times"]))
    for name in names:
      r = rows[name, b]
      tps = b / float(np.median(r["times"]))
      speed = tps / base_tps
      cfg, model, _ = setups[name]
      frac = _routed_fraction(model, np.concatenate(r["outs"]), args.prompt)
      # Routed models: the FLOPs at the fraction routing processed; masked
      # decode computes every block (full capacity).
      if frac is not None:
        full = 1.0 if name.endswith("_masked") else frac
        fl = _routed_flops(cfg.model, full, args)
      else:
        fl = r["flops"]
      # Realized share of the FLOPs saving: (1 - time ratio) / (1 - FLOPs
      # ratio); only where the saving is >= 5%.
      saving = 1 - fl / base["flops"]
      realized = (1 - 1 / speed) / saving if saving >= 0.05 else None
      print(
        f"{name:<11} {b:>5} {tps:>8.1f} {speed:>7.2f}x "
        f"{fl / 1e6:>10.2f} {base['flops'] / fl:>10.2f}x "
        f"{'' if realized is None else f'{realized:.2f}':>8} "
        f"{'' if frac is None else f'{frac:.3f}':>7} "
        f"{r['cache']:>11,} {r['alloc']:>11,.0f}"
      )


if __name__ == "__main__":
  main()
