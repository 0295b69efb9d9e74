"""Per-step cost of the training loop, this tree vs its earlier host path.

  python -m benchmarks.step_overhead --data=../shared/data/tinyshakespeare.txt

Two models, each trained by `loop.run` in a fresh process, "before" and
"after" runs alternating pair by pair so that a machine whose speed drifts
(shared cores) moves both alike:
  zero         1 layer, width 8, batch 1 x 8 tokens: almost no FLOPs, so its
               steps/s is the host's per-step overhead, the ceiling for small
               models on a fast accelerator;
  shakespeare  configs/shakespeare_char.py (nanoGPT's CPU baby GPT).
"before" is the host path as it was: glibc's default malloc (no
`cpu_runtime.keep_freed_host_memory`) and one device_put per batch array.
Steps after the first few (compilation) and before the last (final
eval and save) are timed (wall, and this process's user +
system CPU and page faults from getrusage); the loss must not change.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("before", "after")
STEPS = {"zero": (3000, 200), "shakespeare": (300, 50)}  # steps, warmup


def _config(model: str, data: str, steps: int):
  from configs import base, shakespeare_char

  if model == "shakespeare":
    c = shakespeare_char.get_config()
  else:
    c = base.get_config()
    c.model.update(
      num_layers=1,
      embed_dim=8,
      num_heads=1,
      num_kv_heads=1,
      mlp_dim=8,
      vocab_size=128,
      dtype="float32",
    )
    c.data.update(source="text", tokenizer="char", seq_len=8)
    c.train.update(batch_size=1, log_every=100, eval_every=steps)
    c.checkpoint.every_steps = steps
  c.data.path = os.path.abspath(data)
  c.train.steps = steps
  return c


def _measure(model: str, variant: str, data: str) -> dict:
  """One run in this process; `variant` must be chosen before JAX starts."""
  from efficient_lm import cpu_runtime

  if variant == "after":
    cpu_runtime.keep_freed_host_memory()
  import jax
  from efficient_lm import config as config_lib
  from efficient_lm import sharding
  from efficient_lm.training import loop

  if variant == "before":
    sharding.host_to_global = lambda mesh, batch: {
      k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh), v
      )
      for k, v in batch.items()
    }
  steps, warmup = STEPS[model]
  cfg = config_lib.from_config_dict(
    _config(model, data, steps), device_count=jax.device_count()
  )
  marks = {}

  def mark(step):
    if step in (warmup, steps - 1):
      r = resource.getrusage(resource.RUSAGE_SELF)
      marks[step] = (
        time.perf_counter(),
        r.ru_utime + r.ru_stime,
        r.ru_stime,
        r.ru_minflt,
      )

  with tempfile.TemporaryDirectory() as workdir:
    summary = loop.run(cfg, workdir, hooks=[mark])
  (w0, c0, s0, f0), (w1, c1, s1, f1) = marks[warmup], marks[steps - 1]
  n = steps - 1 - warmup
  return {
    "ms_step": 1e3 * (w1 - w0) / n,
    "steps_s": n / (w1 - w0),
    "cpu_ms_step": 1e3 * (c1 - c0) / n,
    "sys_ms_step": 1e3 * (s1 - s0) / n,
    "faults_step": (f1 - f0) / n,
    "train_loss": summary["train_loss"],
    "eval_loss": summary["eval_loss"],
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True, help="tinyshakespeare.txt")
  ap.add_argument("--pairs", type=int, default=3)
  ap.add_argument("--models", default="zero,shakespeare")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    model, variant = args.child.split(":")
    print("RESULT " + json.dumps(_measure(model, variant, args.data)))
    return

  runs = {}
  for pair in range(args.pairs):
    for model in args.models.split(","):
      for variant in VARIANTS:
        out = subprocess.run(
          [
            sys.executable,
            "-m",
            "benchmarks.step_overhead",
            f"--data={args.data}",
            f"--child={model}:{variant}",
          ],
          capture_output=True,
          text=True,
          check=True,
        ).stdout
        r = json.loads(out.split("RESULT ", 1)[1])
        runs.setdefault((model, variant), []).append(r)
        print(
          f"pair {pair} {model:11s} {variant:6s} "
          + " ".join(f"{k}={v:.4g}" for k, v in r.items()),
          flush=True,
        )

  print(f"\nmedians over {args.pairs} pairs")
  keys = (
    "ms_step",
    "steps_s",
    "cpu_ms_step",
    "sys_ms_step",
    "faults_step",
    "train_loss",
  )
  print(f"{'model':11s} {'variant':7s} " + " ".join(f"{k:>12s}" for k in keys))
  for model in args.models.split(","):
    for variant in VARIANTS:
      rs = runs[(model, variant)]
      print(
        f"{model:11s} {variant:7s} "
        + " ".join(f"{statistics.median(r[k] for r in rs):12.5g}" for k in keys)
      )
    ratio = statistics.median(
      a["ms_step"] / b["ms_step"]
      for a, b in zip(
        runs[(model, "after")], runs[(model, "before")], strict=True
      )
    )
    print(
      f"{model:11s} after/before wall per step, median of pairs: {ratio:.3f}"
    )


if __name__ == "__main__":
  main()
