"""Quantization schemes on a trained tiny run: bytes, loss, decode speed;
quantization-aware training against post-training quantization at int4.

  python -m benchmarks.quantize                  # configs/tiny.py, 300 steps
  python -m benchmarks.quantize --steps=200 --workdir=runs/qbench
  python -m benchmarks.quantize --qat= --schemes=int8_dynamic  # SmoothQuant

Trains configs/tiny.py (the embedded corpus, byte-level) twice for
`--steps`: once in float, once with quantization-aware training
(train.quantization=`--qat`). Then, for the float run and each scheme
(qwix PTQ, runs.quantize_run), on the first `--eval_batches` eval batches
(the same batches for every row): the parameter bytes (all parameters,
measured from the arrays), the quantized weights' bytes against the same
weights in float32, the eval loss and bits per byte and their deltas
against the float run, greedy decode tokens/s (`--prompts` rows,
`--new_tokens` tokens, the second of two runs: the first compiles) and the
KV cache bytes per token (weight quantization leaves the cache alone).
The QAT rows are the QAT run's weights in float (no simulated
quantization) and quantized with its own scheme (PTQ of the QAT weights);
deltas are against the float run: QAT's quantization gap is the
difference of its two rows, PTQ's the int4 row's delta. The
`int8_dynamic+smooth A` row is int8_dynamic after SmoothQuant with alpha
`--smooth` (efficient_lm/surgery/smooth.py; factors from the first
`--calibration_tokens` tokens of the eval split, as `quantize --smooth`).
Prints a Markdown table and the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

SCHEMES = ("int8_weights", "int4_weights:32", "int8_dynamic", "fp8")


def _config(steps: int, qat: str = ""):
  from configs import tiny
  from efficient_lm import config as config_lib

  cd = tiny.get_config()
  cd.train.steps = steps
  cd.train.eval_every = steps
  cd.checkpoint.every_steps = steps
  cd.checkpoint.async_save = False
  cd.train.quantization = qat
  cd.mesh.data = 1
  return config_lib.from_config_dict(cd, device_count=1)


def _decode_tokens_per_s(run, prompts, new_tokens: int) -> float:
  from efficient_lm.generate import Generator

  gen = Generator(run.graphdef, run.variables, mesh=run.mesh)
  for _ in range(2):  # the first compiles
    _, stats = gen.generate(prompts, max_new_tokens=new_tokens)
  return stats["decode_tokens_per_s"]


def _row(name, run, base, args, prompts):
  from efficient_lm import runs
  from efficient_lm.models import quantization

  r = runs.evaluate(run, args.eval_batches)
  fbytes = quantization.param_bytes(base.params)
  qb, fb = quantization.quantized_bytes(run.params, base.params)
  cache = run.model().cache_bytes_per_token()
  return {
    "scheme": name,
    "param_bytes": quantization.param_bytes(run.params),
    "param_ratio": quantization.param_bytes(run.params) / fbytes,
    "quantized_weight_ratio": qb / fb if fb else 1.0,
    "loss": r["loss"],
    "bpb": r["bpb"],
    "decode_tokens_per_s": _decode_tokens_per_s(run, prompts, args.new_tokens),
    "cache_bytes_per_token": sum(cache),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument(
    "--qat", default="int4_weights:32", help="'' skips the QAT run and rows"
  )
  p.add_argument(
    "--schemes", default=",".join(SCHEMES), help="the PTQ rows, comma list"
  )
  p.add_argument("--eval_batches", type=int, default=16)
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--workdir", help="keep the runs here (default: a tmp dir)")
  p.add_argument("--smooth", type=float, default=0.5)
  p.add_argument("--calibration_tokens", type=int, default=65536)
  args = p.parse_args()
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  import jax

  from efficient_lm import runs
  from efficient_lm.config.schemes import parse_scheme
  from efficient_lm.training import loop

  root = args.workdir or tempfile.mkdtemp(prefix="bench_quantize_")
  fdir, qdir = os.path.join(root, "float"), os.path.join(root, "qat")
  loop.run(_config(args.steps), fdir)
  if args.qat:
    loop.run(_config(args.steps, args.qat), qdir)
  devices = jax.devices()[:1]
  base = runs.load_run(fdir, devices=devices)
  tok = base.tokenizer
  prompts = [tok.encode(t) for t in ("def ", "import ", "class ", "    ")]
  prompts = (prompts * args.prompts)[: args.prompts]
  rows = [_row("float32", base, base, args, prompts)]
  for s in args.schemes.split(","):
    q = runs.quantize_run(base, parse_scheme(s))
    rows.append(_row(s, q, base, args, prompts))
  from efficient_lm.surgery import pipeline, smooth

  batches, _ = pipeline.calibration_batches(base, [], args.calibration_tokens)
  smoothed, _ = smooth.smooth_run(base, args.smooth, batches)
  q = runs.quantize_run(smoothed, parse_scheme("int8_dynamic"))
  rows.append(
    _row(f"int8_dynamic+smooth {args.smooth}", q, base, args, prompts)
  )
  if args.qat:
    qat = runs.load_run(qdir, devices=devices)
    rows.append(
      _row("QAT run, float", runs.without_qat(qat), base, args, prompts)
    )
    rows.append(
      _row(
        f"QAT {args.qat}",
        runs.quantize_run(qat, parse_scheme(args.qat)),
        base,
        args,
        prompts,
      )
    )
  f = rows[0]
  print(
    "| scheme | param bytes | x float | quantized weights x float | "
    "eval loss | loss delta | bpb delta | decode tok/s | cache B/token |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    r["loss_delta"] = r["loss"] - f["loss"]
    r["bpb_delta"] = r["bpb"] - f["bpb"]
    print(
      f"| {r['scheme']} | {r['param_bytes']:,} | {r['param_ratio']:.3f} | "
      f"{r['quantized_weight_ratio']:.3f} | {r['loss']:.4f} | "
      f"{r['loss_delta']:+.4f} | {r['bpb_delta']:+.4f} | "
      f"{r['decode_tokens_per_s']:.1f} | {r['cache_bytes_per_token']:,} |"
    )
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
