"""Greedy generation against `transformers` on the same weights (issue #26).

  python -m benchmarks.vs_transformers                   # tiny and 100m
  python -m benchmarks.vs_transformers --sizes=100m --rows=float32,bfloat16

For each size, `tools/hf_reference.py make-model` builds a random Llama
with transformers (torch seed 19, float32, tied embeddings; `tiny`: 64
wide, 2 layers, 512 ids; `100m`: SmolLM2-135M's shape with 20 of its 30
layers, 576 wide, 9 heads / 3 kv heads, MLP 1536, 49152 ids = 99.1M
parameters) and saves it as safetensors; our importer
(`efficient_lm.hf.importer`) turns it into a run, loaded as the generate
CLI loads one. Both sides then generate `--new` tokens greedily after the
same `--prompt` random tokens per row (no end-of-sequence stop) at each
`--batch`: transformers through `tools/hf_reference.py bench-generate`
(its own venv, `$EFFICIENT_LM_HF_PYTHON`, default /work/.venv-hf; sdpa
attention, `torch.set_num_threads(--threads)`), ours through
`efficient_lm.generate.Generator.generate`. Both processes are pinned to
the first `--threads` CPUs (sched_setaffinity, which also sizes XLA's CPU
thread pool). Each timed call is the whole generate (prefill included);
one warm-up call each is excluded, and our first call's extra time is
reported as compile. Rounds interleave ours and theirs; medians over
`--reps` rounds. The float32 row's greedy tokens must equal transformers'
(else the comparison is void and the first mismatch is printed); the
bfloat16 / int8 rows report how many tokens agree.

Rows (ours): `float32` (the imported checkpoint), `bfloat16` (imported
with --dtype=bfloat16: weights and compute), `int8` (float32 run loaded
with --quantize=int8_weights). `bound`: tokens/s if a decode step cost
only reading the weights once (parameter bytes of the row) at the memcpy
bandwidth numpy measures in the same run (read + write bytes over time,
one thread), times the batch; `of bound` is the measured tokens/s over it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HF_TOOL = REPO / "tools" / "hf_reference.py"
SIZES = {
  "tiny": dict(
    hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=512
  ),
  "100m": dict(
    hidden=576, layers=20, intermediate=1536, heads=9, kv_heads=3, vocab=49152
  ),
}
ROWS = ("float32", "bfloat16", "int8")


def hf_python() -> str:
  return os.environ.get("EFFICIENT_LM_HF_PYTHON", "/work/.venv-hf/bin/python")


def _hf(args: list[str], threads: int) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH="")
  out = subprocess.run(
    [hf_python(), str(HF_TOOL), *args],
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  if out.returncode:
    sys.exit(f"error: transformers side failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def memcpy_gbps(mb: int = 256, reps: int = 5) -> float:
  """Best of `reps` numpy copies of `mb` MB: (read + write bytes) / s."""
  src = np.ones(mb * 2**20 // 8, np.float64)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return 2 * src.nbytes / best / 1e9


def _load() -> str:
  return f"{os.getloadavg()[0]:.2f}"


def _ours(size_dir: Path, row: str):
  """(Generator, parameter bytes) of one row."""
  import jax

  from efficient_lm import runs
  from efficient_lm.generate import Generator
  from efficient_lm.hf import importer

  dtype = "bfloat16" if row == "bfloat16" else "float32"
  workdir = size_dir / f"run_{dtype}"
  if not workdir.exists():
    importer.import_checkpoint(
      str(size_dir / "model"), str(workdir), dtype=dtype
    )
  run = runs.load_run(
    str(workdir), quantize="int8_weights" if row == "int8" else None
  )
  gen = Generator(run.graphdef, run.variables, mesh=run.mesh)
  nbytes = sum(
    x.size * x.dtype.itemsize for x in jax.tree.leaves(run.variables)
  )
  return gen, nbytes


def _generate(gen, prompts: np.ndarray, new: int):
  t0 = time.perf_counter()
  outs, _ = gen.generate(prompts.tolist(), max_new_tokens=new, eos_id=None)
  return time.perf_counter() - t0, np.array(outs, np.int32)


def _mismatch(ours: np.ndarray, theirs: np.ndarray) -> str | None:
  if ours.shape == theirs.shape and np.array_equal(ours, theirs):
    return None
  bad = np.argwhere(ours != theirs)
  r, i = bad[0]
  return f"row {r} token {i}: ours {ours[r, i]}, transformers {theirs[r, i]}"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="tiny,100m")
  ap.add_argument("--rows", default=",".join(ROWS))
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument(
    "--dir",
    default=None,
    help="where models and runs are kept between invocations (default: "
    "a temporary directory)",
  )
  args = ap.parse_args(argv)
  rows = args.rows.split(",")
  for r in rows:
    if r not in ROWS:
      sys.exit(f"error: --rows: {r!r}: expected some of {', '.join(ROWS)}")
  sizes = args.sizes.split(",")
  for s in sizes:
    if s not in SIZES:
      sys.exit(f"error: --sizes: {s!r}: expected some of {', '.join(SIZES)}")
  if not Path(hf_python()).exists():
    sys.exit(
      f"error: {hf_python()} does not exist: set EFFICIENT_LM_HF_PYTHON to "
      "a Python with torch and transformers"
    )
  cpus = sorted(os.sched_getaffinity(0))
  if args.threads > len(cpus):
    sys.exit(f"error: --threads={args.threads}: this process has {len(cpus)}")
  os.sched_setaffinity(0, cpus[: args.threads])  # before XLA sizes its pool

  from efficient_lm import cpu_runtime

  cpu_runtime.keep_freed_host_memory()
  cpu_runtime.use_cpu_only_without_accelerator()
  import jax

  batches = [int(b) for b in args.batch.split(",")]
  tmp = tempfile.TemporaryDirectory() if args.dir is None else None
  root = Path(args.dir or tmp.name)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  gbps = memcpy_gbps()
  print(
    f"vs_transformers: {args.threads} threads (CPUs {cpus[: args.threads]}), "
    f"prompt {args.prompt} + {args.new} new greedy tokens, {args.reps} "
    f"interleaved rounds, memcpy {gbps:.1f} GB/s, load {_load()}, "
    f"jax {jax.__version__}"
  )
  table = []
  for size in sizes:
    size_dir = root / size
    if not (size_dir / "model" / "config.json").exists():
      spec = [f"--{k}={v}" for k, v in SIZES[size].items()]
      made = _hf(["make-model", str(size_dir / "model"), *spec], args.threads)
      print(f"  {size}: {made['parameters']:,} parameters", flush=True)
    prompts = {
      b: rng.integers(3, 300, (b, args.prompt)).astype(np.int32)
      for b in batches
    }
    for b, p in prompts.items():
      np.save(size_dir / f"prompts_{b}.npy", p)
    # Every row is built before any is run: quantize_run adds a tracing
    # context value, so a row compiled before it would compile again.
    gens = {row: _ours(size_dir, row) for row in rows}
    res = {}
    for row in rows:
      for b in batches:
        res[row, b] = {"s": [], "load": []}
        res[row, b]["first"], _ = _generate(gens[row][0], prompts[b], args.new)
    for row in rows:  # a second pass: anything left to compile is here
      for b in batches:
        _generate(gens[row][0], prompts[b], args.new)
    for b in batches:
      res["hf", b] = {"s": [], "load": []}
    for _ in range(args.reps):
      for b in batches:
        for row in rows:
          s, toks = _generate(gens[row][0], prompts[b], args.new)
          res[row, b]["s"].append(s)
          res[row, b]["load"].append(os.getloadavg()[0])
          res[row, b]["tokens"] = toks
        hf = _hf(
          [
            "bench-generate",
            str(size_dir / "model"),
            str(size_dir / f"prompts_{b}.npy"),
            str(args.new),
            str(args.threads),
          ],
          args.threads,
        )
        res["hf", b]["s"] += hf["seconds"]
        res["hf", b]["load"].append(os.getloadavg()[0])
        res["hf", b]["tokens"] = np.array(hf["tokens"], np.int32)
    for b in batches:
      theirs = res["hf", b]
      hf_tps = b * args.new / float(np.median(theirs["s"]))
      hf_bytes = (size_dir / "model" / "model.safetensors").stat().st_size
      table.append((size, b, "transformers", hf_tps, 1.0, hf_bytes, theirs))
      for row in rows:
        r = res[row, b]
        tps = b * args.new / float(np.median(r["s"]))
        table.append((size, b, row, tps, tps / hf_tps, gens[row][1], r))
  print(
    f"\n{'size':<5} {'batch':>5} {'impl':<12} {'tok/s':>8} {'x HF':>6} "
    f"{'MB/tok':>7} {'bound':>7} {'of bound':>8} {'compile s':>9} "
    f"{'load':>9}  tokens"
  )
  for size, b, name, tps, ratio, nbytes, r in table:
    bound = b * gbps * 1e9 / nbytes
    if name == "transformers":
      agree, comp = "reference", ""
      hf_tokens = r["tokens"]
    else:
      theirs = hf_tokens
      bad = _mismatch(r["tokens"], theirs)
      if name == "float32":
        agree = "equal" if bad is None else f"VOID: first mismatch {bad}"
      else:
        agree = f"{float(np.mean(r['tokens'] == theirs)):.0%} equal"
      comp = f"{r['first'] - float(np.median(r['s'])):.1f}"
    loads = f"{min(r['load']):.1f}-{max(r['load']):.1f}"
    print(
      f"{size:<5} {b:>5} {name:<12} {tps:>8.1f} {ratio:>5.2f}x "
      f"{nbytes / 1e6:>7.1f} {bound:>7.1f} {tps / bound:>7.0%} "
      f"{comp:>9} {loads:>9}  {agree}"
    )
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
