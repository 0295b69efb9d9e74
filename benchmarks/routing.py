"""Dense vs mixture-of-depths vs mixture-of-recursions on tinyshakespeare.

  python -m benchmarks.routing --data=../shared/data/tinyshakespeare.txt
  python -m benchmarks.routing --data=... --steps=300 --out=routing_loss.png

Every variant is the same character-level decoder (configs/shakespeare_char
shape, `--layers` virtual layers, seq `--seq_len`), trained in one run each:

  dense       every token through every layer
  mod         MoD, capacity 12.5%, every other block routed
  mor2_ec     MoR, 2 recursions, middle_cycle, expert-choice
  mor3_ec     MoR, 3 recursions, expert-choice
  mor2_tc     MoR, 2 recursions, token-choice (aux-loss balancing)
  mor3_tc     MoR, 3 recursions, token-choice
  mor2_tc_cap   mor2_tc, token-choice capacities (1, 1/2): step 2 gathers
                at most half of each row (the rest exit after step 1)
  mor3_tc_cap   mor3_tc at capacities (1, 2/3, 1/3)

Equal steps: every variant's eval loss after `--steps` steps. Equal FLOPs:
a variant cheaper per token than dense trains on until it has spent
dense's training FLOPs (steps x dense FLOPs/token / its FLOPs/token, rounded
to the eval interval), and its eval loss there is the iso-FLOP figure.
Each run has its own full schedule (warmup, cosine to the end), so a
cheaper variant's equal-steps figure is read mid-schedule, before its
learning rate has decayed as far as dense's: that reading favours dense.
FLOPs per token are the layer plan's (models/flops.py, capacity-aware);
unique parameters are the model's own count (shared layers once). Eval
uses the causal routing decision (what sampling does). Each run's curves
go to `--out` (loss vs steps and vs training FLOPs, efficient_lm.plot).

Step time against FLOPs (issue #26 item 3): every variant's train step is
then timed in this one process, the variants in turn for
`--timing_rounds` rounds of `--timing_steps` steps (benchmarks/
interleave.py), and the table sets each one's median step time against
dense's beside its FLOPs ratio and the share of the FLOPs saving that the
wall clock realizes. `--timing_only` skips the training runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

VARIANTS = {
  "dense": {},
  "mod": {"kind": "mod", "capacity": 0.125, "every": 2},
  "mor2_ec": {"kind": "mor", "num_recursions": 2, "router": "expert_choice"},
  "mor3_ec": {"kind": "mor", "num_recursions": 3, "router": "expert_choice"},
  "mor2_tc": {"kind": "mor", "num_recursions": 2, "router": "token_choice"},
  "mor3_tc": {"kind": "mor", "num_recursions": 3, "router": "token_choice"},
  "mor2_tc_cap": {
    "kind": "mor",
    "num_recursions": 2,
    "router": "token_choice",
    "token_choice_capacities": (1.0, 0.5),
  },
  "mor3_tc_cap": {
    "kind": "mor",
    "num_recursions": 3,
    "router": "token_choice",
    "token_choice_capacities": (1.0, 2 / 3, 1 / 3),
  },
}


def _config(name: str, args, steps: int):
  from configs import shakespeare_char

  cd = shakespeare_char.get_config()
  cd.model.num_layers = args.layers
  cd.data.path = os.path.abspath(args.data)
  cd.data.seq_len = args.seq_len
  cd.train.batch_size = args.batch_size
  cd.train.steps = steps
  cd.train.warmup_steps = min(100, steps // 10)
  cd.train.eval_every = args.eval_every
  cd.train.log_every = args.eval_every // 5 or 1
  cd.checkpoint.every_steps = steps
  for key, value in VARIANTS[name].items():
    cd.model.routing[key] = value
  cd.mesh.data = -1
  return cd


def _parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True, help="tinyshakespeare.txt")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--eval_every", type=int, default=100)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--workdir", default=None, help="keep the runs here")
  ap.add_argument("--out", default="routing_loss.png")
  ap.add_argument("--timing_rounds", type=int, default=5)
  ap.add_argument("--timing_steps", type=int, default=3)
  ap.add_argument("--timing_only", action="store_true")
  return ap.parse_args()


def main():
  args = _parse_args()
  if not os.path.exists(args.data):
    print(f"skipped: {args.data} not found")
    return
  if args.steps % args.eval_every:
    sys.exit(
      f"error: --steps={args.steps} is not a multiple of "
      f"--eval_every={args.eval_every}"
    )

  from efficient_lm import cpu_runtime

  # Before the first JAX computation: the helpers below import jax.
  cpu_runtime.keep_freed_host_memory()
  from efficient_lm import plot

  names = args.variants.split(",")
  fpt, unique = _costs(names, args)
  dense_fpt = fpt.get("dense", max(fpt.values()))
  if args.timing_only:
    _timing(names, args, fpt)
    return
  root = args.workdir or tempfile.mkdtemp(prefix="routing_bench_")

  rows = {}
  for name in names:
    rows[name] = _train(name, args, root, fpt[name], dense_fpt, unique[name])
    print(json.dumps({name: rows[name]}), flush=True)

  plot.curves([os.path.join(root, n) for n in names], args.out)
  _print_table(rows, args, root)
  _timing(names, args, fpt)


def _timing(names, args, fpt):
  """Every variant's train step timed interleaved; the step-time table."""
  import jax
  from benchmarks import interleave
  from efficient_lm import config as config_lib
  from efficient_lm.training import loop

  trainers = {
    name: loop.build_trainer(
      config_lib.from_config_dict(
        _config(name, args, args.steps), device_count=jax.device_count()
      )
    )
    for name in names
  }
  seconds = interleave.step_seconds(
    trainers, args.timing_rounds, args.timing_steps
  )
  base = "dense" if "dense" in names else names[0]
  rows = interleave.saving_rows(seconds, fpt, base)
  print(json.dumps({"step_time": rows}), flush=True)
  interleave.print_table(
    rows,
    base,
    f"{args.layers} layers, seq {args.seq_len}, batch {args.batch_size}, "
    f"median of {args.timing_rounds} x {args.timing_steps} interleaved "
    f"steps each, load {os.getloadavg()[0]:.1f}",
  )


def _costs(names, args):
  """Train FLOPs per token and unique non-embedding parameters, by
  variant."""
  import jax
  from flax import nnx
  from efficient_lm import config as config_lib, models
  from efficient_lm.models import flops as flops_lib

  fpt, unique = {}, {}
  for name in names:
    cfg = config_lib.from_config_dict(
      _config(name, args, args.steps), device_count=jax.device_count()
    )
    fpt[name] = flops_lib.flops_per_token(cfg.model, args.seq_len)["train"]
    abstract = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(0)))
    unique[name] = flops_lib.param_count(nnx.state(abstract, nnx.Param))[
      "non_embedding"
    ]
  return fpt, unique


def _train(name, args, root, fpt, dense_fpt, unique):
  """Trains variant `name` (FLOPs per token `fpt`) until it has spent
  dense's training FLOPs; its row of the table."""
  import jax
  from efficient_lm import config as config_lib, plot
  from efficient_lm.training import loop

  iso = args.steps * dense_fpt / fpt
  iso_steps = max(
    args.steps, int(round(iso / args.eval_every)) * args.eval_every
  )
  cd = _config(name, args, iso_steps)
  cfg = config_lib.from_config_dict(cd, device_count=jax.device_count())
  workdir = os.path.join(root, name)
  t0 = time.perf_counter()
  summary = loop.run(cfg, workdir)
  wall = time.perf_counter() - t0
  _, evals = plot.read_metrics(workdir)
  evals = dict(evals)
  return {
    "eval_loss_equal_steps": evals[args.steps],
    "eval_loss_equal_flops": evals[iso_steps],
    "iso_flop_steps": iso_steps,
    "train_flops_per_token": fpt,
    "flops_ratio_vs_dense": fpt / dense_fpt,
    "unique_non_embedding_params": unique,
    "tokens_per_sec": summary["tokens_per_sec"],
    "wall_seconds": wall,
  }


def _print_table(rows, args, root):
  """The runs' markdown table, each figure against dense's (where dense
  ran)."""
  d = rows.get("dense")
  print(
    f"\n{args.layers} layers, seq {args.seq_len}, batch "
    f"{args.batch_size}, {args.steps} steps; runs in {root}; curves in "
    f"{args.out}\n"
  )
  print(
    "| variant | eval loss, equal steps | vs dense | eval loss, equal "
    "FLOPs (steps) | vs dense | train FLOPs/token vs dense | unique "
    "params vs dense | tokens/s vs dense |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():

    def ratio(key):
      return f"{r[key] / d[key]:.3f}" if d else "-"

    print(
      f"| {name} | {r['eval_loss_equal_steps']:.4f} | "
      f"{ratio('eval_loss_equal_steps')} | "
      f"{r['eval_loss_equal_flops']:.4f} ({r['iso_flop_steps']}) | "
      f"{r['eval_loss_equal_flops'] / d['eval_loss_equal_steps']:.3f} | "
      f"{r['flops_ratio_vs_dense']:.3f} | "
      f"{ratio('unique_non_embedding_params')} | "
      f"{ratio('tokens_per_sec')} |"
      if d
      else f"| {name} | ... |"
    )


if __name__ == "__main__":
  main()
