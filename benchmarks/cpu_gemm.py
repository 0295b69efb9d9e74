"""The matrix products under two CPU targets of issue #26, timed alone.

  python -m benchmarks.cpu_gemm                     # both parts
  python -m benchmarks.cpu_gemm --part=decode --torch-python=PATH

Each part compiles a *skeleton*: the matrix products of one real step at
its real shapes, in the same order and with the same data dependences,
and nothing else (no norms, softmax, RoPE, cache, sampling or optimizer;
only the residual adds and the gate x up product that chain them). Its
time is a floor for that step on this machine with XLA:CPU's kernels
(YNNPACK / Eigen, both threads): the real step does this and more.

train   the baby GPT of configs/shakespeare_char.py (4 layers, width 128,
        4 heads, MLP 344, vocabulary 128, batch 12 x 64 tokens): forward
        and backward (`jax.value_and_grad`) of the skeleton, weights hot
        in cache as in training; beside it the real train step
        (`training.loop.build_trainer`, AdamW included) in the same run.
        Compare with nanoGPT's ms/iter from `benchmarks/vs_nanogpt.sh`.
decode  the 100m model of `benchmarks.vs_transformers` (20 layers, width
        576, 9 / 3 heads of 64, MLP 1536, tied 49152 x 576 head): one
        decode step at batch 1 and 8 (M = batch) and the 16-token prefill
        (M = 16 x batch), each layer its own arrays (as the Generator holds
        a float32 model on one CPU) and weights rotated through several
        model copies so each product reads them from memory, as decode
        does (396 MB > any cache). `GB/s`: weight bytes read per second.
        With --torch-python, the same decode skeleton in PyTorch (float32,
        `torch.nn.functional.linear`, `torch.set_num_threads(--threads)`),
        the kernels transformers' generate runs on.

Medians over `--reps` timed rounds of `--iters` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import vs_transformers


def _train_shape() -> dict:
  """The baby GPT's shape and batch, read from configs/shakespeare_char.py."""
  from configs import shakespeare_char

  c = shakespeare_char.get_config()
  m = c.model
  return dict(
    layers=m.num_layers,
    width=m.embed_dim,
    heads=m.num_heads,
    mlp=m.mlp_dim,
    vocab=m.vocab_size,
    batch=c.train.batch_size,
    seq=c.data.seq_len,
  )


def _decode_shape() -> dict:
  """vs_transformers' 100m model; prompt: its `--prompt` default."""
  m = vs_transformers.SIZES["100m"]
  return dict(
    layers=m["layers"],
    width=m["hidden"],
    heads=m["heads"],
    kv_heads=m["kv_heads"],
    head_dim=m["hidden"] // m["heads"],
    mlp=m["intermediate"],
    vocab=m["vocab"],
    prompt=16,
  )


TRAIN = _train_shape()
DECODE = _decode_shape()


def _median_time(fn, args_list, reps: int, iters: int) -> float:
  import jax

  jax.block_until_ready(fn(*args_list[0]))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for i in range(iters):
      out = fn(*args_list[i % len(args_list)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters)
  return statistics.median(times)


def _train_skeleton_loss(weights, x_TD, target_TV):
  """The baby GPT's products: q, k, v, scores, mix, o; gate, up, down;
  the tied head. Returns a loss linear in the logits."""
  import jax.numpy as jnp

  s = TRAIN
  b, t, h = s["batch"], s["seq"], s["heads"]
  d = s["width"] // h
  x = x_TD
  for layer in weights["layers"]:
    q = (x @ layer["q"]).reshape(b, t, h, d)
    k = (x @ layer["k"]).reshape(b, t, h, d)
    v = (x @ layer["v"]).reshape(b, t, h, d)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", scores, v).reshape(b * t, -1)
    x = x + mixed @ layer["o"]
    x = x + ((x @ layer["gate"]) * (x @ layer["up"])) @ layer["down"]
  logits = x @ weights["embed"].T
  return jnp.mean(logits * target_TV)


def _train_part(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  s = TRAIN
  rng = np.random.default_rng(0)
  w, f, v = s["width"], s["mlp"], s["vocab"]

  def mat(*shape):
    return jnp.asarray(rng.standard_normal(shape) * 0.02, jnp.float32)

  weights = {
    "layers": [
      {
        "q": mat(w, w),
        "k": mat(w, w),
        "v": mat(w, w),
        "o": mat(w, w),
        "gate": mat(w, f),
        "up": mat(w, f),
        "down": mat(f, w),
      }
      for _ in range(s["layers"])
    ],
    "embed": mat(v, w),
  }
  tokens = s["batch"] * s["seq"]
  x = mat(tokens, w)
  target = mat(tokens, v)
  skeleton = jax.jit(jax.value_and_grad(_train_skeleton_loss))
  per_layer = (
    2 * tokens * (4 * w * w + 3 * w * f) + 4 * s["batch"] * s["seq"] ** 2 * w
  )
  flops = 3 * (s["layers"] * per_layer + 2 * tokens * w * v)
  t_skel = _median_time(skeleton, [(weights, x, target)], args.reps, args.iters)
  t_step = _real_train_step(args)
  return {
    "skeleton_ms": t_skel * 1e3,
    "skeleton_gflops": flops / t_skel / 1e9,
    "step_ms": t_step * 1e3,
    "flops_per_step": flops,
    "tokens_per_step": tokens,
  }


def _real_train_step(args) -> float:
  """Seconds per step of configs/shakespeare_char.py's train step on a fixed
  random batch (no data pipeline, no logging)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import shakespeare_char
  from efficient_lm import config as config_lib
  from efficient_lm.training import loop

  c = shakespeare_char.get_config()
  c.data.path = "unused.txt"
  cfg = config_lib.from_config_dict(c, device_count=jax.device_count())
  trainer = loop.build_trainer(cfg)
  b, t = c.train.batch_size, c.data.seq_len
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.integers(0, 65, (b, t)), jnp.int32),
    "targets": jnp.asarray(rng.integers(0, 65, (b, t)), jnp.int32),
    "positions": jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
    "segment_ids": jnp.ones((b, t), jnp.int32),
    "weights": jnp.ones((b, t), jnp.float32),
  }
  step = trainer.train_step.lower(trainer.abstract_state, batch).compile()
  state = trainer.init_fn()
  for _ in range(5):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    for _ in range(args.iters):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / args.iters)
  return statistics.median(times)


def _decode_shapes() -> list[tuple[str, int, int]]:
  s = DECODE
  w, kv = s["width"], s["kv_heads"] * s["head_dim"]
  return [
    ("q", w, s["heads"] * s["head_dim"]),
    ("k", w, kv),
    ("v", w, kv),
    ("o", s["heads"] * s["head_dim"], w),
    ("gate", w, s["mlp"]),
    ("up", w, s["mlp"]),
    ("down", s["mlp"], w),
  ]


def _decode_skeleton(weights, x_BTD):
  """One step's products, each layer its own arrays, written as the model
  writes them (einsums over [batch, time, width]: XLA picks its kernel by
  these shapes); decode is time 1, prefill the prompt's length."""
  import jax.numpy as jnp

  def dense(x, w):
    return jnp.einsum("btd,df->btf", x, w)

  x = x_BTD
  for layer in weights["layers"]:
    q = dense(x, layer["q"])
    kv = dense(x, layer["k"]) + dense(x, layer["v"])
    x = x + dense(q, layer["o"])
    x = x.at[..., : kv.shape[-1]].add(kv)
    x = x + dense(
      dense(x, layer["gate"]) * dense(x, layer["up"]), layer["down"]
    )
  return jnp.einsum("btd,vd->btv", x, weights["embed"])


def _decode_weight_bytes() -> int:
  s = DECODE
  per_layer = sum(k * n for _, k, n in _decode_shapes())
  return 4 * (s["layers"] * per_layer + s["vocab"] * s["width"])


def _copies(args) -> int:
  """How many copies of the decode weights fill --rotate-mb (at least 2)."""
  return max(2, -(-args.rotate_mb * 2**20 // _decode_weight_bytes()))


def _decode_part(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  s = DECODE
  rng = np.random.default_rng(0)
  weight_bytes = _decode_weight_bytes()
  copies = _copies(args)

  def model():
    def mat(k, n):
      return jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02)

    return {
      "layers": [
        {name: mat(k, n) for name, k, n in _decode_shapes()}
        for _ in range(s["layers"])
      ],
      "embed": mat(s["vocab"], s["width"]),
    }

  models = [model() for _ in range(copies)]
  fn = jax.jit(_decode_skeleton)
  rows = []
  for batch in args.batch:
    for phase, t_len in (("decode", 1), ("prefill", s["prompt"])):
      m = batch * t_len
      x = jnp.asarray(
        rng.standard_normal((batch, t_len, s["width"]), np.float32)
      )
      t = _median_time(fn, [(w, x) for w in models], args.reps, args.iters)
      rows.append(
        {
          "impl": "xla",
          "batch": batch,
          "phase": phase,
          "M": m,
          "ms": t * 1e3,
          "GB/s": weight_bytes / t / 1e9,
        }
      )
  return rows


TORCH_DECODE = r"""
import json, statistics, sys, time, torch
import torch.nn.functional as F
a = json.loads(sys.argv[1]); s = a["decode"]
torch.set_num_threads(a["threads"]); torch.manual_seed(0)
def model():
  return {"layers": [{n: torch.randn(o, i) * 0.02 for n, i, o in a["shapes"]}
                     for _ in range(s["layers"])],
          "embed": torch.randn(s["vocab"], s["width"]) * 0.02}
models = [model() for _ in range(a["copies"])]
def step(w, x):
  for l in w["layers"]:
    q = F.linear(x, l["q"]); kv = F.linear(x, l["k"]) + F.linear(x, l["v"])
    x = x + F.linear(q, l["o"]); x[..., : kv.shape[-1]] += kv
    x = x + F.linear(F.linear(x, l["gate"]) * F.linear(x, l["up"]), l["down"])
  return F.linear(x, w["embed"])
rows = []
with torch.inference_mode():
  for b in a["batch"]:
    for phase, t in (("decode", 1), ("prefill", s["prompt"])):
      m = b * t; x = torch.randn(b, t, s["width"]); step(models[0], x)
      ts = []
      for _ in range(a["reps"]):
        t0 = time.perf_counter()
        for i in range(a["iters"]): step(models[i % len(models)], x)
        ts.append((time.perf_counter() - t0) / a["iters"])
      t = statistics.median(ts)
      rows.append({"impl": "torch", "batch": b, "phase": phase, "M": m,
                   "ms": t * 1e3, "GB/s": a["bytes"] / t / 1e9})
print(json.dumps(rows))
"""


TORCH_TRAIN = r"""
import json, statistics, sys, time, torch
a = json.loads(sys.argv[1]); s = a["train"]
torch.set_num_threads(a["threads"]); torch.manual_seed(0)
b, t, h, w, v = s["batch"], s["seq"], s["heads"], s["width"], a["vocab"]
d = w // h
def p(*shape):
  return (torch.randn(*shape) * 0.02).requires_grad_()
layers = [{"qkv": p(w, 3 * w), "o": p(w, w), "fc": p(w, 4 * w),
           "proj": p(4 * w, w)} for _ in range(s["layers"])]
embed = p(v, w)
x0 = torch.randn(b * t, w); target = torch.randn(b * t, v)
def loss():
  x = x0
  for l in layers:
    q, k, vv = (x @ l["qkv"]).split(w, dim=1)
    q, k, vv = (z.view(b, t, h, d).transpose(1, 2) for z in (q, k, vv))
    mixed = ((q @ k.transpose(-2, -1)) @ vv).transpose(1, 2).reshape(b * t, w)
    x = x + mixed @ l["o"]
    x = x + (x @ l["fc"]) @ l["proj"]
  return ((x @ embed.T) * target).mean()
def step():
  for l in layers:
    for z in l.values(): z.grad = None
  embed.grad = None
  loss().backward()
step()
ts = []
for _ in range(a["reps"]):
  t0 = time.perf_counter()
  for _ in range(a["iters"]): step()
  ts.append((time.perf_counter() - t0) / a["iters"])
print(json.dumps({"ms": statistics.median(ts) * 1e3}))
"""


def _run_torch(args, script: str, payload: dict) -> Any:
  """`script` run by --torch-python with `payload` as JSON in argv[1];
  its last output line, parsed as JSON."""
  out = subprocess.run(
    [args.torch_python, "-c", script, json.dumps(payload)],
    check=True,
    capture_output=True,
    text=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _torch_train(args) -> float:
  """ms/step of nanoGPT's products (fused qkv, 4x GELU-less MLP, tied
  65-entry head) forward and backward in PyTorch."""
  payload = {
    "train": TRAIN,
    "vocab": 65,
    "threads": args.threads,
    "reps": args.reps,
    "iters": args.iters,
  }
  return _run_torch(args, TORCH_TRAIN, payload)["ms"]


def _torch_decode(args) -> list[dict]:
  weight_bytes = _decode_weight_bytes()
  payload = {
    "decode": DECODE,
    "shapes": _decode_shapes(),
    "batch": args.batch,
    "threads": args.threads,
    "reps": args.reps,
    "iters": args.iters,
    "bytes": weight_bytes,
    "copies": _copies(args),
  }
  return _run_torch(args, TORCH_DECODE, payload)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--part", default="train,decode")
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument(
    "--new",
    type=int,
    default=32,
    help="decode: tokens generated per prefill (floor per token)",
  )
  ap.add_argument(
    "--rotate-mb",
    type=int,
    default=800,
    help="decode: weights rotated through this many MiB",
  )
  ap.add_argument(
    "--torch-python",
    default="",
    help="a Python with torch: time the decode skeleton there too",
  )
  args = ap.parse_args(argv)
  parts = [p for p in args.part.split(",") if p]
  bad = sorted(set(parts) - {"train", "decode"})
  if bad:
    sys.exit(f"error: --part={args.part!r}: expected train and/or decode")
  try:
    args.batch = [int(b) for b in args.batch.split(",") if b]
  except ValueError:
    sys.exit(f"error: --batch={args.batch!r}: expected integers, e.g. 1,8")
  if args.torch_python and not os.path.exists(args.torch_python):
    sys.exit(f"error: --torch-python={args.torch_python!r}: no such file")
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
  from efficient_lm import cpu_runtime

  cpu_runtime.keep_freed_host_memory()  # before JAX starts its CPU client
  cpu_runtime.use_cpu_only_without_accelerator()

  if "train" in parts:
    r = _train_part(args)
    tok = r["tokens_per_step"]
    print(
      f"train (baby GPT, {tok} tokens/step, "
      f"{r['flops_per_step'] / 1e9:.2f} GFLOP in products)"
    )
    print(
      f"  products alone: {r['skeleton_ms']:6.2f} ms/step  "
      f"{tok / r['skeleton_ms'] * 1e3:8.0f} tokens/s  "
      f"{r['skeleton_gflops']:5.0f} GFLOP/s"
    )
    print(
      f"  real step:      {r['step_ms']:6.2f} ms/step  "
      f"{tok / r['step_ms'] * 1e3:8.0f} tokens/s  (products "
      f"{r['skeleton_ms'] / r['step_ms']:.0%} of it)"
    )
    if args.torch_python:
      ms = _torch_train(args)
      print(
        f"  nanoGPT's products in PyTorch: {ms:6.2f} ms/step  "
        f"{tok / ms * 1e3:8.0f} tokens/s  (its time / ours: "
        f"{ms / r['skeleton_ms']:.2f})"
      )
  if "decode" in parts:
    rows = _decode_part(args)
    if args.torch_python:
      rows += _torch_decode(args)
    print(
      f"decode skeleton (100m, weights "
      f"{_decode_weight_bytes() / 1e6:.0f} MB read per call)"
    )
    print("  impl   batch  phase     M     ms/call   GB/s  tokens/s (decode)")
    for r in sorted(rows, key=lambda r: (r["batch"], r["phase"], r["impl"])):
      tps = r["batch"] / r["ms"] * 1e3 if r["phase"] == "decode" else None
      print(
        f"  {r['impl']:6s} {r['batch']:5d}  {r['phase']:8s} {r['M']:4d} "
        f"{r['ms']:10.2f} {r['GB/s']:6.1f}  " + (f"{tps:8.1f}" if tps else "")
      )
    floors = generate_floors(rows, args.new)
    print(f"  generate floor ({s_new(args.new)}: decode step + prefill / new):")
    for (impl, b), ms in sorted(floors.items(), key=lambda kv: kv[0][::-1]):
      line = f"    {impl:6s} batch {b}: {ms:7.2f} ms/token  {b / ms * 1e3:7.1f} tokens/s"
      if impl == "xla" and ("torch", b) in floors:
        line += f"  (torch floor / ours: {floors[('torch', b)] / ms:.2f})"
      print(line)


def s_new(new: int) -> str:
  return f"{new} new tokens after a {DECODE['prompt']}-token prompt"


def generate_floors(rows: list[dict], new: int) -> dict[tuple[str, int], float]:
  """(impl, batch) -> ms per generated token if a generate of `new` tokens
  cost only its products: one decode step plus its share of the prefill."""
  by = {(r["impl"], r["batch"], r["phase"]): r["ms"] for r in rows}
  return {
    (impl, b): by[(impl, b, "decode")] + by[(impl, b, "prefill")] / new
    for impl, b, phase in by
    if phase == "decode" and (impl, b, "prefill") in by
  }


if __name__ == "__main__":
  main()
