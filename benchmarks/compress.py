"""Make a trained model smaller, then recover it: one table and one plot.

  python -m benchmarks.compress [--out=runs/compress] [--teacher_steps=200]
      [--steps=40] [--data=PATH] [--embed_dim=64] [--num_layers=4]
      [--mlp_dim=256] [--seq_len=64] [--batch_size=8]

Trains a teacher (a small MHA decoder on the embedded corpus, or on the
text file --data names; tinyshakespeare.txt with a char tokenizer), then
makes each variant with `python -m efficient_lm.surgery` (run in this
process): FFN pruned to 50% by each criterion (rmax, activation, taylor,
magnitude, random), and the conversions to GQA (half the kv groups), an
hourglass (layers 2..L-1 shortened by 2) and a mixture-of-recursions
(middle_cycle, 2 recursions). Each variant is then trained --steps steps
twice from its step-0 checkpoint: next-token CE only, and distilled from
the teacher (alpha 0.5, T 2), the same data and seed. Prints one
markdown table (parameters, forward FLOPs per token, eval loss right
after surgery, after the CE steps, after the distillation steps, decode
tokens/s of the cached generator) and writes loss_vs_flops.png and
results.json to --out. The defaults take ~10-15 minutes on 2 loaded CPU
cores; the flags scale everything up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time


def _args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="runs/compress")
  ap.add_argument("--data", default=None, help="a text file (char tokenizer)")
  ap.add_argument("--teacher_steps", type=int, default=200)
  ap.add_argument("--steps", type=int, default=40, help="recovery steps")
  ap.add_argument("--num_layers", type=int, default=4)
  ap.add_argument("--embed_dim", type=int, default=64)
  ap.add_argument("--num_heads", type=int, default=4)
  ap.add_argument("--mlp_dim", type=int, default=256)
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--eval_batches", type=int, default=8)
  ap.add_argument("--calibration_tokens", type=int, default=8192)
  ap.add_argument("--decode_tokens", type=int, default=32)
  return ap.parse_args()


VARIANTS = {
  **{
    f"ffn50_{c}": ["--ffn=0.5", f"--ffn_criterion={c}"]
    for c in ("rmax", "activation", "taylor", "magnitude", "random")
  },
  "gqa_half": None,  # --to_gqa=H/2, filled in from the model
  "hourglass_f2": ["--to_hourglass=1", "--hourglass_factor=2"],
  "mor_2": ["--to_mor=2"],
}


def main():
  args = _args()
  from efficient_lm import cpu_runtime

  cpu_runtime.keep_freed_host_memory()  # before JAX starts its CPU client
  cpu_runtime.use_cpu_only_without_accelerator()
  import jax

  from configs import base
  from efficient_lm import config as config_lib
  from efficient_lm import runs
  from efficient_lm.generate import Generator
  from efficient_lm.models import flops as flops_lib
  from efficient_lm.surgery import cli
  from efficient_lm.training import loop

  out = os.path.abspath(args.out)
  if os.path.exists(out) and os.listdir(out):
    raise SystemExit(f"error: --out={args.out} exists and is not empty")
  os.makedirs(out, exist_ok=True)
  cd = base.get_config()
  cd.name = "compress_teacher"
  m = cd.model
  m.num_layers, m.embed_dim, m.num_heads = (
    args.num_layers,
    args.embed_dim,
    args.num_heads,
  )
  m.num_kv_heads, m.mlp_dim, m.dtype = args.num_heads, args.mlp_dim, "float32"
  cd.data.seq_len = args.seq_len
  if args.data:
    cd.data.source, cd.data.path = "text", os.path.abspath(args.data)
    cd.data.tokenizer = "char"
  t = cd.train
  t.steps, t.batch_size, t.learning_rate = (
    args.teacher_steps,
    args.batch_size,
    2e-3,
  )
  t.warmup_steps, t.eval_every, t.eval_batches = 20, 10**9, args.eval_batches
  t.log_every = 50
  cd.checkpoint.every_steps, cd.checkpoint.async_save = 10**9, False
  cfg = config_lib.from_config_dict(cd, device_count=jax.device_count())
  teacher = os.path.join(out, "teacher")
  t0 = time.perf_counter()
  summary = loop.run(cfg, teacher)
  print(
    f"teacher: {args.teacher_steps} steps, eval loss "
    f"{summary['eval_loss']:.4f} ({time.perf_counter() - t0:.0f}s)",
    flush=True,
  )

  def info(workdir):
    run = runs.load_run(workdir)
    c = run.config
    f = flops_lib.flops_per_token(c.model, c.data.seq_len)["forward"]
    n = sum(int(a.size) for a in jax.tree.leaves(run.params))
    return run, n, f

  def decode_speed(run):
    gen = Generator(run.graphdef, run.variables, mesh=run.mesh)
    prompts = [run.tokenizer.encode("The " if args.data else "def ")] * 4
    n = args.decode_tokens
    gen.generate(prompts, max_new_tokens=n)  # compile
    t0 = time.perf_counter()
    gen.generate(prompts, max_new_tokens=n)
    return len(prompts) * n / (time.perf_counter() - t0)

  def recover(src, dst, distill: bool):
    shutil.copytree(src, dst)
    c = runs.load_run(dst).config
    train = dataclasses.replace(
      c.train,
      steps=args.steps,
      learning_rate=1e-3,
      end_learning_rate=1e-4,
      warmup_steps=min(5, args.steps),
      eval_every=10**9,
      log_every=10**9,
      objective="distill" if distill else "next_token",
      distill=dataclasses.replace(
        c.train.distill, teacher=teacher, alpha=0.5, temperature=2.0
      ),
    )
    c = dataclasses.replace(c, train=train)
    return loop.run(c, dst)["eval_loss"]

  run, n, f = info(teacher)
  rows = [
    {
      "variant": "teacher",
      "params": n,
      "flops_per_token": f,
      "surgery": runs.evaluate(run, args.eval_batches)["loss"],
      "ce": None,
      "distill": None,
      "decode_tokens_per_sec": decode_speed(run),
    }
  ]
  for name, flags in VARIANTS.items():
    if flags is None:
      flags = [f"--to_gqa={max(args.num_heads // 2, 1)}"]
    t0 = time.perf_counter()
    dst = os.path.join(out, name)
    cli.main(
      [
        f"--workdir={teacher}",
        f"--out={dst}",
        f"--calibration_tokens={args.calibration_tokens}",
        *flags,
      ]
    )
    run, n, f = info(dst)
    row = {
      "variant": name,
      "params": n,
      "flops_per_token": f,
      "surgery": runs.evaluate(run, args.eval_batches)["loss"],
    }
    row["ce"] = recover(dst, dst + "_ce", distill=False)
    row["distill"] = recover(dst, dst + "_distill", distill=True)
    row["decode_tokens_per_sec"] = decode_speed(runs.load_run(dst + "_ce"))
    rows.append(row)
    print(
      f"{name}: {json.dumps(row)} ({time.perf_counter() - t0:.0f}s)",
      flush=True,
    )
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump({"args": vars(args), "rows": rows}, fh, indent=2)
  print(table(rows, args.steps))
  plot(rows, os.path.join(out, "loss_vs_flops.png"), args.steps)


def table(rows, steps: int) -> str:
  def f(v, fmt):
    return "" if v is None else fmt.format(v)

  lines = [
    f"| variant | parameters | FLOPs/token | eval loss after surgery | "
    f"after {steps} steps CE | after {steps} steps distill | decode tokens/s |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(
      f"| {r['variant']} | {r['params']:,} | {r['flops_per_token'] / 1e6:.3f}M"
      f" | {r['surgery']:.4f} | {f(r['ce'], '{:.4f}')} | "
      f"{f(r['distill'], '{:.4f}')} | {r['decode_tokens_per_sec']:.0f} |"
    )
  return "\n".join(lines)


def plot(rows, path: str, steps: int) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key, marker, label in (
    ("surgery", "x", "after surgery"),
    ("ce", "o", f"after {steps} steps CE"),
    ("distill", "^", f"after {steps} steps distill"),
  ):
    pts = [(r["flops_per_token"], r[key]) for r in rows if r[key] is not None]
    ax.scatter(
      [p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label
    )
  for r in rows:
    ax.annotate(r["variant"], (r["flops_per_token"], r["surgery"]), fontsize=7)
  ax.set_xlabel("forward FLOPs per token")
  ax.set_ylabel("eval loss (nats)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"plot: {path}")


if __name__ == "__main__":
  main()
