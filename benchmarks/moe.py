"""Dense vs mixture-of-experts on tinyshakespeare (or the embedded corpus).

  python -m benchmarks.moe --data=../shared/data/tinyshakespeare.txt
  python -m benchmarks.moe --steps=400 --out=moe_loss.png   # embedded corpus
  python -m benchmarks.moe --data=... --variants=dense --workdir=W &   # one
  python -m benchmarks.moe --data=... --workdir=W   # the rest, then the table

Every variant is the same character-level decoder (configs/shakespeare_char
shape: width 128, `--layers` layers, seq `--seq_len`), every MLP replaced as
below, trained in one run each with the same schedule, data and seed:

  dense         SwiGLU MLP of width F = `--mlp_dim`
  dense_4x      SwiGLU of width 4F: the routed MoE's total parameters
  moe8_top2     8 experts of width F/2, top-2, dropless: dense's active
                FLOPs (plus the router's D x 8), 4x its MLP parameters
  moe8_top2_c125  the same with capacity_factor 1.25 (assignments past
                each expert's slots dropped)

MoE layers use the softmax router and the Switch / GShard balance loss
(weight 0.01). Equal active FLOPs: moe8_top2 against dense. Equal total
parameters: moe8_top2 against dense_4x, which spends ~2.7x the training
FLOPs per token; its loss at dense's FLOPs budget is read at the eval step
where its cumulative training FLOPs reach what dense spends in `--steps`
(the eval curve against FLOPs, linearly interpolated). FLOPs per token are models/flops.py's
(active experts only; capacity mode counts its E * C slots). Load balance
is `moe/load_max` (the busiest expert's share of assignments x 8, 1 =
balanced), averaged over layers, at the first and the last logged step.
tokens/s is this host's: XLA's CPU ragged_dot computes every expert group
densely (8x the grouped FLOPs), so dropless MoE is slow here and its CPU
throughput says nothing about a TPU/GPU grouped matmul. Curves (loss vs
steps and vs training FLOPs) go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

MOE = {
  "num_experts": 8,
  "top_k": 2,
  "router": "softmax",
  "balancing": "aux_loss",
  "aux_loss_weight": 0.01,
}
VARIANTS = {
  "dense": {},
  "dense_4x": {"mlp_mult": 4},
  "moe8_top2": {"moe": {**MOE, "capacity_factor": 0.0}},
  "moe8_top2_c125": {"moe": {**MOE, "capacity_factor": 1.25}},
}


def _config(name: str, args):
  from configs import shakespeare_char

  cd = shakespeare_char.get_config()
  cd.name = f"moe_bench_{name}"
  cd.model.num_layers = args.layers
  cd.model.mlp_dim = args.mlp_dim * VARIANTS[name].get("mlp_mult", 1)
  moe = VARIANTS[name].get("moe")
  if moe:
    for key, value in moe.items():
      cd.model.moe[key] = value
    cd.model.moe.expert_mlp_dim = args.mlp_dim // moe["top_k"]
  if args.data:
    cd.data.path = os.path.abspath(args.data)
  else:  # the embedded corpus
    cd.data.source = "default"
    cd.data.path = None
  cd.data.seq_len = args.seq_len
  cd.train.batch_size = args.batch_size
  cd.train.steps = args.steps
  cd.train.warmup_steps = min(100, args.steps // 10)
  cd.train.eval_every = args.eval_every
  cd.train.log_every = args.eval_every // 5 or 1
  cd.train.eval_batches = args.eval_batches
  cd.checkpoint.every_steps = args.steps
  cd.mesh.data = -1
  return cd


def _parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--data", default=None, help="tinyshakespeare.txt (default: embedded)"
  )
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--eval_every", type=int, default=50)
  ap.add_argument("--eval_batches", type=int, default=8)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--mlp_dim", type=int, default=344)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--workdir", default=None, help="keep the runs here")
  ap.add_argument("--out", default="moe_loss.png")
  ap.add_argument(
    "--report",
    action="store_true",
    help="train nothing: the table of the runs in --workdir as far as "
    "they got (compared at the last eval step they all reached)",
  )
  return ap.parse_args()


def _check(args, names):
  for name in names:
    if name not in VARIANTS:
      raise SystemExit(
        f"error: --variants: {name!r} is not one of {', '.join(VARIANTS)}"
      )
  if args.data and not os.path.exists(args.data):
    raise SystemExit(f"error: --data={args.data}: no such file")
  if args.steps <= 0 or args.steps % args.eval_every:
    raise SystemExit(
      f"error: --steps={args.steps} is not a positive multiple of "
      f"--eval_every={args.eval_every}"
    )
  if args.mlp_dim % 2:
    raise SystemExit(
      f"error: --mlp_dim={args.mlp_dim}: expected an even width (experts "
      "are half of it)"
    )


def main():
  args = _parse_args()
  names = args.variants.split(",")
  _check(args, names)

  from efficient_lm import cpu_runtime

  # Before the first JAX computation: the helpers below import jax.
  cpu_runtime.keep_freed_host_memory()

  root = args.workdir or tempfile.mkdtemp(prefix="moe_bench_")
  rows = {}
  for name in names:
    rows[name] = _train(name, args, root)
    print(json.dumps({name: rows[name]}), flush=True)

  try:
    from efficient_lm import plot

    plot.curves([os.path.join(root, n) for n in names], args.out)
  except ImportError as e:  # matplotlib: the plot extra
    print(f"no curves ({e})")
  _print_table(rows, args, root)


def _train(name, args, root):
  """Trains variant `name` (unless its run in `root` is complete: separate
  invocations with --variants=NAME and one --workdir can share the work);
  its row of the table, read from the config and metrics.jsonl."""
  import jax
  from flax import nnx
  from efficient_lm import config as config_lib, models
  from efficient_lm.models import flops as flops_lib
  from efficient_lm.training import loop

  cfg = config_lib.from_config_dict(
    _config(name, args), device_count=jax.device_count()
  )
  workdir = os.path.join(root, name)
  if not args.report and args.steps not in _read(workdir)[0]:
    loop.run(cfg, workdir)
  evals, series = _read(workdir)
  abstract = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(0)))
  params = flops_lib.param_count(nnx.state(abstract, nnx.Param), cfg.model)
  tps = sorted(v for _, v in series.get("tokens_per_sec", []))
  return {
    "eval_losses": evals,
    "train_flops_per_token": flops_lib.flops_per_token(cfg.model, args.seq_len)[
      "train"
    ],
    "params_total": params["total"],
    "params_active": params["active"],
    "tokens_per_sec": tps[len(tps) // 2],  # median over logged steps
    "load_max": series.get("moe/load_max", []),
    "dropped_fraction": series.get("moe/dropped_fraction", []),
  }


def _read(workdir):
  """{eval step: eval loss}, {metric: [(step, value)]} from metrics.jsonl
  (empty when the run has not logged)."""
  evals, series = {}, {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return evals, series
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if "eval_loss" in rec:
        evals[rec["step"]] = rec["eval_loss"]
      for key in ("moe/load_max", "moe/dropped_fraction", "tokens_per_sec"):
        if key in rec:
          series.setdefault(key, []).append((rec["step"], rec[key]))
  return evals, series


def _at_flops(r, budget, args):
  """(eval loss, step): the eval curve against cumulative training FLOPs,
  linearly interpolated at `budget` (None past the run's end)."""
  per_step = r["train_flops_per_token"] * args.batch_size * args.seq_len
  pts = sorted(r["eval_losses"].items())
  for (s0, l0), (s1, l1) in zip(pts, pts[1:], strict=False):
    f0, f1 = s0 * per_step, s1 * per_step
    if f0 <= budget <= f1:
      return l0 + (l1 - l0) * (budget - f0) / (f1 - f0), budget / per_step
  return None, budget / per_step


def _print_table(rows, args, root):
  """The runs' markdown table, each figure against dense's (where dense
  ran)."""
  d = rows.get("dense")
  tokens = args.batch_size * args.seq_len
  at = min(max(r["eval_losses"], default=0) for r in rows.values())
  if at == 0:
    raise SystemExit("error: the runs have no eval step in common yet")
  print(
    f"\n{args.layers} layers of width 128, dense MLP width {args.mlp_dim}, "
    f"seq {args.seq_len}, batch {args.batch_size}, compared at step {at} "
    f"of {args.steps}; "
    f"data {args.data or 'embedded corpus'}; runs in {root}; curves in "
    f"{args.out}\n"
  )
  print(
    "| variant | eval loss | vs dense | eval loss at dense's FLOPs "
    "(step) | train FLOPs/token vs dense | params total / active vs "
    "dense | load_max first → last | dropped | tokens/s vs dense |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    loss = r["eval_losses"][at]
    if d:
      dense_loss = d["eval_losses"][at]
      budget = d["train_flops_per_token"] * tokens * at
      iso, iso_step = _at_flops(r, budget, args)
      iso_text = "-" if iso is None else f"{iso:.4f} ({iso_step:.0f})"
      fl = f"{r['train_flops_per_token'] / d['train_flops_per_token']:.3f}"
      pr = (
        f"{r['params_total'] / d['params_total']:.2f} / "
        f"{r['params_active'] / d['params_active']:.2f}"
      )
      tps = f"{r['tokens_per_sec'] / d['tokens_per_sec']:.2f}"
      vs = f"{loss / dense_loss:.3f}"
    else:
      iso_text, fl, pr, tps, vs = "-", "-", "-", "-", "-"
    lm = [(s, v) for s, v in r["load_max"] if s <= at]
    lm_text = f"{lm[0][1]:.2f} → {lm[-1][1]:.2f}" if lm else "-"
    dr = [(s, v) for s, v in r["dropped_fraction"] if s <= at]
    dr_text = f"{dr[-1][1]:.3f}" if dr else "-"
    print(
      f"| {name} | {loss:.4f} | {vs} | {iso_text} | {fl} | {pr} | "
      f"{lm_text} | {dr_text} | {tps} ({r['tokens_per_sec']:,.0f}) |"
    )
  print("\neval loss by step (cumulative training TFLOPs):")
  for name, r in rows.items():
    pts = ", ".join(
      f"{s}: {v:.4f} ({s * tokens * r['train_flops_per_token'] / 1e12:.2f})"
      for s, v in sorted(r["eval_losses"].items())
    )
    print(f"  {name}: {pts}")


if __name__ == "__main__":
  main()
