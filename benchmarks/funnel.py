"""Funnel compression point vs the unpooled encoder; funnel and hourglass
losses on tinyshakespeare.

  python -m benchmarks.funnel                     # FLOPs, CPU time, TPU AOT
  python -m benchmarks.funnel --no_aot            # without libtpu
  python -m benchmarks.funnel --shakespeare=../shared/data/tinyshakespeare.txt

Part 1, compression point: a 36-layer funnel encoder at small width
(`--width`, seq `--seq_len`) compressed once by 2 after layer 6, 12, 18 or
24 (stages (n, 36 - n)), against the unpooled baseline (the same layers with
`funnel.factor = 1`), each with the same upsampling decoder. For each: FLOPs
per input token from the layer plan (models/flops.py) and counted by XLA's
cost analysis of the compiled, unrolled train step; the CPU train-step time
(all five encoders built in this process and stepped in turn, `--reps`
rounds, median per encoder: benchmarks/interleave.py) with the share of
the FLOPs saving it realizes; and, compiled ahead of time for
`--topology` (libtpu), the per-chip memory of the train step. Ratios are to
the baseline of the same run. The target: FLOPs and CPU step time at most
0.65x the baseline with compression after layer 12.

The CPU step time falls faster than the FLOPs: at seq 512 the unpooled
layers' attention (T x S = 2**18 pairs, kernels.attention's dense CPU path
up to DENSE_MAX_PAIRS) holds [B, H, T, S] float32 scores and probabilities
for the backward pass, 4 MiB per array per layer at the default shape, out
of cache, and runs at ~10 GFLOP/s against ~25 at 256 (fwd+bwd, B 4, 2
heads, K 64: 154 ms per layer at 512 against 16 ms at 256, 9.7x for 4x the
FLOPs; the tiled xla_chunked path is 126 ms at 512). The pooled layers
leave that regime, so they save more time than FLOPs.

Part 2 (`--shakespeare`), equal steps on the character-level text: the MLM
loss of configs/tiny_funnel.py against the same model unpooled, and the
next-token loss of configs/tiny_hourglass.py against a decoder with the same
layers, each at `--train_steps`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

POINTS = (6, 12, 18, 24)


def _encoder(after: int | None, args):
  """36 layers, compressed once after `after` (None: unpooled)."""
  from configs import tiny_funnel

  cd = tiny_funnel.get_config()
  m = cd.model
  m.num_layers = 36
  m.embed_dim, m.mlp_dim = args.width, 4 * args.width
  m.num_heads = m.num_kv_heads = max(1, args.width // 64)
  m.funnel.stages = (12, 24) if after is None else (after, 36 - after)
  m.funnel.factor = 1 if after is None else 2
  m.scan_layers = False  # XLA counts every layer (no while loop)
  m.dtype = "float32"
  cd.data.seq_len = args.seq_len
  cd.train.batch_size = args.batch_size
  cd.mesh.data = 1
  return cd


def compression(args):
  import jax
  from benchmarks import interleave
  from efficient_lm import aot, config as config_lib
  from efficient_lm.training import loop

  rows, trainers = {}, {}
  for after in (None, *POINTS):
    name = "unpooled" if after is None else f"after {after}"
    cd = _encoder(after, args)
    cfg = config_lib.from_config_dict(cd, device_count=1)
    t, _, compiled = aot.compile_train_step(cfg, jax.devices()[:1])
    tokens = cfg.train.batch_size * cfg.data.seq_len
    row = {
      "flops_per_token": t.flops["train"],
      "xla_flops_per_token": aot.xla_flops(compiled) / tokens,
    }
    trainers[name] = loop.build_trainer(cfg, jax.devices()[:1])
    if args.topology:
      cd.model.attention.impl = "pallas_tpu"
      devices = aot.topology_devices(aot.parse_topology(args.topology))
      cd.mesh.data, cd.mesh.fsdp = 1, len(devices)
      cd.train.batch_size = max(cd.train.batch_size, len(devices))
      tcfg = config_lib.from_config_dict(cd, device_count=len(devices))
      _, _, tpu = aot.compile_train_step(tcfg, devices)
      mem = tpu.memory_analysis()
      row["tpu_gib_per_chip"] = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
      ) / 2**30
    rows[name] = row
    print(json.dumps({name: row}), flush=True)
  seconds = interleave.step_seconds(trainers, args.reps, 1)
  for name, r in interleave.saving_rows(
    seconds, {n: r["flops_per_token"] for n, r in rows.items()}, "unpooled"
  ).items():
    rows[name]["cpu_step_seconds"] = seconds[name]
    rows[name]["realized_saving"] = r["realized_saving"]
  base = rows["unpooled"]
  print(
    f"\n36-layer funnel encoder, width {args.width}, seq {args.seq_len}, "
    f"batch {args.batch_size}; ratios to unpooled; CPU step: median of "
    f"{args.reps} interleaved rounds, load {os.getloadavg()[0]:.1f}\n"
  )
  cols = ["flops_per_token", "xla_flops_per_token", "cpu_step_seconds"]
  if args.topology:
    cols.append("tpu_gib_per_chip")
  print("| compression | " + " | ".join(cols) + " | realized / FLOPs saving |")
  print("|---" * (len(cols) + 2) + "|")
  for name, r in rows.items():
    cells = [f"{r[c]:.4g} ({r[c] / base[c]:.3f}x)" for c in cols]
    real = r["realized_saving"]
    cells.append("-" if real is None else f"{real:.2f}")
    print(f"| {name} | " + " | ".join(cells) + " |")


def shakespeare(args):
  import jax
  from configs import tiny_funnel, tiny_hourglass
  from efficient_lm import config as config_lib
  from efficient_lm.training import loop

  if not os.path.exists(args.shakespeare):
    print(f"skipped: {args.shakespeare} not found")
    return

  def run(cd):
    cd.data.source, cd.data.tokenizer = "text", "char"
    cd.data.path = os.path.abspath(args.shakespeare)
    cd.train.steps = args.train_steps
    cd.train.warmup_steps = min(cd.train.warmup_steps, args.train_steps)
    cd.train.eval_every = args.train_steps
    cd.mesh.data = -1
    cfg = config_lib.from_config_dict(cd, device_count=jax.device_count())
    with tempfile.TemporaryDirectory() as workdir:
      return loop.run(cfg, workdir)

  pairs = []
  funnel = tiny_funnel.get_config()
  flat = tiny_funnel.get_config()
  flat.model.funnel.factor = 1
  pairs.append(("funnel (MLM)", run(funnel), "unpooled", run(flat)))
  hourglass = tiny_hourglass.get_config()
  decoder = tiny_hourglass.get_config()
  decoder.model.kind = "decoder"
  pairs.append(("hourglass", run(hourglass), "decoder", run(decoder)))
  print(
    f"\n| model | eval loss at {args.train_steps} steps | baseline | "
    "its loss | ratio | tokens/s ratio |"
  )
  print("|---|---|---|---|---|---|")
  for name, s, base_name, b in pairs:
    print(
      f"| {name} | {s['eval_loss']:.4f} | {base_name} | "
      f"{b['eval_loss']:.4f} | {s['eval_loss'] / b['eval_loss']:.3f} | "
      f"{s['tokens_per_sec'] / b['tokens_per_sec']:.2f} |"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--seq_len", type=int, default=512)
  ap.add_argument("--batch_size", type=int, default=4)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--topology", default="v5p:2x2x1")
  ap.add_argument("--no_aot", action="store_true")
  ap.add_argument("--shakespeare", default=None)
  ap.add_argument("--train_steps", type=int, default=600)
  args = ap.parse_args()
  if args.no_aot:
    args.topology = None
  from efficient_lm import cpu_runtime

  cpu_runtime.keep_freed_host_memory()
  if args.shakespeare:
    shakespeare(args)
  else:
    compression(args)


if __name__ == "__main__":
  main()
