"""Attention kinds against sequence length: step time, memory, FLOPs, loss.

  python -m benchmarks.long_context                      # CPU, 1k..8k
  python -m benchmarks.long_context --aot_tpu=v5e:2x2 --lengths=4096,32768
  python -m benchmarks.long_context --shakespeare=../shared/data/tinyshakespeare.txt

CPU (default): a small decoder (2 layers, width 128, 4 heads, batch 1) per
attention kind and length; one compiled train step each, timed over
`--steps` runs after a warm-up, and its compiled temporary memory
(`memory_analysis`). Every kind runs the same kernel (`--impl`,
default xla_chunked, which skips kv chunks the tile metadata marks empty),
so the ratio to dense at each length is the pattern's saving, not a kernel
difference.

--aot_tpu=<topology>: the same train steps compiled (not run) for a TPU
slice with the Pallas TPU kernel: per-chip memory, the FLOPs XLA counts
and the model's `visible` FLOPs (models/flops.py). XLA counts a Mosaic
kernel by its static CostEstimate, which cannot know the data-dependent
tile lists, so its figure is the same for every mask; the visible count is
what the kernel computes.

--shakespeare=<file>: each kind trained for `--train_steps` at seq 256 on
the character-level text (configs/shakespeare_char.py), the final eval
loss beside dense's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

KINDS = ("dense", "sliding_window", "global_local", "block_sparse", "tglobal")


def _config(kind: str, seq_len: int, args, base=None):
  from configs import tiny

  cd = (base or tiny).get_config()
  m = cd.model
  if base is None:
    m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 2, 128, 4, 4
    m.mlp_dim = 256
    cd.train.batch_size = 1
  m.attention.kind = kind
  m.attention.window = args.window
  m.attention.num_global = args.num_global
  m.attention.block_size = args.block_size
  m.attention.max_len = max(seq_len, m.attention.max_len)
  m.attention.impl = args.impl
  cd.data.seq_len = seq_len
  cd.mesh.data = 1
  return cd


def _batch(b, t, vocab):
  import numpy as np

  rng = np.random.default_rng(0)
  return {
    "inputs": rng.integers(0, vocab, (b, t), dtype=np.int32),
    "targets": rng.integers(0, vocab, (b, t), dtype=np.int32),
    "segment_ids": np.ones((b, t), np.int32),
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
  }


def cpu(args):
  import jax
  from efficient_lm import config as config_lib
  from efficient_lm.training import loop

  rows = []
  for t in args.lengths:
    base_time = base_mem = None
    for kind in args.kinds:
      cfg = config_lib.from_config_dict(_config(kind, t, args), device_count=1)
      trainer = loop.build_trainer(cfg, jax.devices()[:1])
      batch = _batch(cfg.train.batch_size, t, cfg.model.vocab_size)
      state = trainer.init_fn()
      compiled = trainer.train_step.lower(state, batch).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      state, m = compiled(state, batch)  # warm-up
      jax.block_until_ready(m)
      start = time.perf_counter()
      for _ in range(args.steps):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
      sec = (time.perf_counter() - start) / args.steps
      if kind == "dense":
        base_time, base_mem = sec, temp
      row = {
        "len": t,
        "kind": kind,
        "step_s": round(sec, 4),
        "temp_MiB": round(temp / 2**20, 1),
        "time_vs_dense": base_time and round(sec / base_time, 3),
        "temp_vs_dense": base_mem and round(temp / base_mem, 3),
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def aot_tpu(args):
  from efficient_lm import aot
  from efficient_lm import config as config_lib

  topo = aot.parse_topology(args.aot_tpu)
  devices = aot.topology_devices(topo)
  for t in args.lengths:
    base = None
    for kind in args.kinds:
      a = argparse.Namespace(**{**vars(args), "impl": "pallas_tpu"})
      cd = _config(kind, t, a)
      cd.train.batch_size = len(devices)
      cd.mesh.data = len(devices)
      cfg = config_lib.from_config_dict(cd, device_count=len(devices))
      try:
        trainer, _, compiled = aot.compile_train_step(cfg, devices)
      except Exception as e:  # the failure (e.g. out of memory) is the row
        print(
          json.dumps(
            {"len": t, "kind": kind, "error": str(e).splitlines()[0][:200]}
          )
        )
        continue
      mem = compiled.memory_analysis()
      flops = aot.xla_flops(compiled)
      tokens = cfg.train.batch_size * t / len(devices)
      visible = trainer.flops["train_visible"] * tokens
      if kind == "dense":
        base = (flops, visible)
      print(
        json.dumps(
          {
            "topology": topo.name,
            "len": t,
            "kind": kind,
            "temp_GiB_per_chip": round(mem.temp_size_in_bytes / 2**30, 3),
            "xla_flops_per_chip": f"{flops:.3e}",
            "xla_flops_vs_dense": base and round(flops / base[0], 3),
            "visible_flops_per_chip": f"{visible:.3e}",
            "visible_vs_dense": base and round(visible / base[1], 3),
          }
        ),
        flush=True,
      )


def shakespeare(args):
  import jax
  from configs import shakespeare_char
  from efficient_lm import config as config_lib
  from efficient_lm.training import loop

  if not os.path.exists(args.shakespeare):
    print(f"skipped: {args.shakespeare} not found")
    return
  results = {}
  for kind in args.kinds:
    cd = _config(kind, 256, args, base=shakespeare_char)
    cd.data.path = os.path.abspath(args.shakespeare)
    cd.train.steps = args.train_steps
    cd.train.eval_every = args.train_steps
    cd.mesh.data = -1
    cfg = config_lib.from_config_dict(cd, device_count=jax.device_count())
    with tempfile.TemporaryDirectory() as workdir:
      summary = loop.run(cfg, workdir)
    results[kind] = summary
  dense = results.get("dense", {}).get("eval_loss")
  print(
    f"| kind | eval loss at {args.train_steps} steps | vs dense | tokens/s |"
  )
  print("|---|---|---|---|")
  for kind, s in results.items():
    ratio = f"{s['eval_loss'] / dense:.3f}" if dense else "-"
    print(
      f"| {kind} | {s['eval_loss']:.4f} | {ratio} | {s['tokens_per_sec']:.0f} |"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--kinds", default=",".join(KINDS))
  ap.add_argument("--lengths", default="1024,2048,4096,8192")
  ap.add_argument("--window", type=int, default=256)
  ap.add_argument("--num_global", type=int, default=16)
  ap.add_argument("--block_size", type=int, default=64)
  ap.add_argument("--impl", default="xla_chunked")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--aot_tpu", default=None, help="e.g. v5e:2x2")
  ap.add_argument("--shakespeare", default=None, help="tinyshakespeare.txt")
  ap.add_argument("--train_steps", type=int, default=500)
  args = ap.parse_args()
  args.kinds = [k for k in args.kinds.split(",") if k]
  args.lengths = [int(x) for x in args.lengths.split(",") if x]
  if "dense" in args.kinds:  # the baseline first, so ratios exist
    args.kinds.remove("dense")
    args.kinds.insert(0, "dense")
  if args.aot_tpu:
    aot_tpu(args)
  elif args.shakespeare:
    shakespeare(args)
  else:
    from efficient_lm import cpu_runtime

    cpu_runtime.keep_freed_host_memory()
    cpu(args)


if __name__ == "__main__":
  main()
