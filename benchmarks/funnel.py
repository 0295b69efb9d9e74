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
(median of `--reps` after a warm-up); and, compiled ahead of time for
`--topology` (libtpu), the per-chip memory of the train step. Ratios are to
the baseline of the same run. The target: FLOPs and CPU step time at most
0.65x the baseline with compression after layer 12.

Part 2 (`--shakespeare`), equal steps on the character-level text: the MLM
loss of configs/tiny_funnel.py against the same model unpooled, and the
next-token loss of configs/tiny_hourglass.py against a decoder with the same
layers, each at `--train_steps`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

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


def _step_seconds(t, reps: int) -> float:
  import jax
  import numpy as np

  b, s = t.cfg.train.batch_size, t.cfg.data.seq_len
  rng = np.random.default_rng(0)
  batch = {
    "inputs": rng.integers(0, 256, (b, s), dtype=np.int32),
    "targets": rng.integers(0, 256, (b, s), dtype=np.int32),
    "segment_ids": np.ones((b, s), np.int32),
    "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
  }
  state = t.init_fn()
  state, _ = t.train_step(state, batch)  # compile + warm up
  jax.block_until_ready(state)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, m = t.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compression(args):
  import jax
  from efficient_lm import aot, config as config_lib
  from efficient_lm.training import loop

  rows = {}
  for after in (None, *POINTS):
    name = "unpooled" if after is None else f"after {after}"
    cd = _encoder(after, args)
    cfg = config_lib.from_config_dict(cd, device_count=1)
    t, _, compiled = aot.compile_train_step(cfg, jax.devices()[:1])
    tokens = cfg.train.batch_size * cfg.data.seq_len
    row = {
      "flops_per_token": t.flops["train"],
      "xla_flops_per_token": aot.xla_flops(compiled) / tokens,
      "cpu_step_seconds": _step_seconds(
        loop.build_trainer(cfg, jax.devices()[:1]), args.reps
      ),
    }
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
  base = rows["unpooled"]
  print(
    f"\n36-layer funnel encoder, width {args.width}, seq {args.seq_len}, "
    f"batch {args.batch_size}; ratios to unpooled\n"
  )
  cols = ["flops_per_token", "xla_flops_per_token", "cpu_step_seconds"]
  if args.topology:
    cols.append("tpu_gib_per_chip")
  print("| compression | " + " | ".join(cols) + " |")
  print("|---" * (len(cols) + 1) + "|")
  for name, r in rows.items():
    cells = [f"{r[c]:.4g} ({r[c] / base[c]:.3f}x)" for c in cols]
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
