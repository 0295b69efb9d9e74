"""python -m efficient_lm.quantize: write a quantized copy of a run.

  python -m efficient_lm.quantize --workdir=SRC --out=DST \
      --scheme=int8_weights|int4_weights[:GROUP]|int8_dynamic|fp8 \
      [--smooth=ALPHA --calibration_tokens=65536 --config.data.KEY=VALUE]

Reads SRC's newest good checkpoint (runs.load_run; SRC is not written),
quantizes its layers' weights with qwix's PTQ (runs.quantize_run,
models/quantization.py) and writes DST, a run at step 0 (runs.write_run)
whose checkpoint holds the integer (or fp8) weights and their scales and
whose config records the scheme (model.quantization), so `evaluate` and
`generate` load it as it is, without quantizing again. A run trained with
quantization-aware training (train.quantization) is quantized with its
own scheme when --scheme is not given. --smooth=ALPHA (int8_dynamic
only, ALPHA in [0, 1]) first folds SmoothQuant's per-channel factors into
the float weights (efficient_lm/surgery/smooth.py), measured on the
calibration data surgery takes (the eval split, or the data the
--config.data.* overrides name, its first --calibration_tokens tokens);
DST's provenance records `smooth` (alpha), the calibration data and what
was folded or skipped. Prints DST's checkpoint size on
disk against SRC's newest checkpoint. Bad input is one `error:` line and
nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from efficient_lm import cpu_runtime
from efficient_lm.cli_args import OneLineParser


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(
    prog="python -m efficient_lm.quantize",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  p.add_argument("--workdir", required=True, help="the source run (read only)")
  p.add_argument("--out", required=True, help="the new run's directory")
  p.add_argument(
    "--scheme",
    help="int8_weights, int4_weights[:GROUP] (default group 128), "
    "int8_dynamic or fp8; default: the run's train.quantization",
  )
  p.add_argument(
    "--smooth",
    type=float,
    help="SmoothQuant's alpha in [0, 1] (int8_dynamic only)",
  )
  p.add_argument(
    "--calibration_tokens",
    type=int,
    help="--smooth's calibration tokens (default 65536)",
  )
  return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(flags, the --config.data.* overrides); one `error:` line and exit 2
  on bad flags (a --smooth misuse included)."""
  parser = _parser()
  overrides = [a for a in argv if a.startswith("--config.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
  if args.smooth is None:
    if overrides or args.calibration_tokens is not None:
      parser.error(
        "--calibration_tokens and --config.data.* are --smooth's "
        "calibration data; give --smooth=ALPHA"
      )
    return args, overrides
  if not 0.0 <= args.smooth <= 1.0:
    parser.error(f"--smooth={args.smooth}: expected an alpha in [0, 1]")
  if args.scheme is None or args.scheme != "int8_dynamic":
    parser.error(
      f"--smooth needs --scheme=int8_dynamic (given --scheme="
      f"{args.scheme}): SmoothQuant balances int8 activations against int8 "
      "weights"
    )
  if args.calibration_tokens is None:
    args.calibration_tokens = 65536
  if args.calibration_tokens < 1:
    parser.error(
      f"--calibration_tokens={args.calibration_tokens}: expected >= 1"
    )
  return args, overrides


def disk_bytes(path: str) -> int:
  """Bytes of the files under `path` (local disks)."""
  return sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, files in os.walk(path)
    for f in files
  )


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  cpu_runtime.use_cpu_only_without_accelerator()
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  import jax

  from efficient_lm import paths, runs
  from efficient_lm.config.schemes import parse_scheme
  from efficient_lm.data import DataError
  from efficient_lm.models import quantization
  from efficient_lm.surgery import pipeline, smooth
  from efficient_lm.surgery.prune import SurgeryError

  try:
    out = paths.resolve(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
      raise runs.RunError(f"--out={args.out} exists and is not empty")
    if args.scheme is not None:
      parse_scheme(args.scheme, "--scheme")
    runs.parse_overrides(overrides)
    src = runs.load_run(args.workdir, devices=jax.local_devices()[:1])
    meta = {}
    if args.smooth is not None:
      batches, calib = pipeline.calibration_batches(
        src, overrides, args.calibration_tokens
      )
      src, report = smooth.smooth_run(src, args.smooth, batches)
      meta = {"smooth": args.smooth, "smooth_calibration": calib, **report}
      meta.pop("alpha")
    scheme = args.scheme or src.config.train.quantization
    if not scheme:
      raise runs.RunError(
        f"{src.workdir} was not trained with quantization-aware training "
        "(train.quantization is empty): give --scheme"
      )
    qrun = runs.quantize_run(src, parse_scheme(scheme, "--scheme"))
    written = runs.write_run(
      args.out,
      qrun.config,
      qrun.params,
      qrun.model_state,
      qrun.tokenizer,
      {
        "tool": "efficient_lm.quantize",
        "source_workdir": src.workdir,
        "source_step": src.step,
        "scheme": qrun.config.model.quantization,
        **meta,
      },
      devices=jax.local_devices()[: qrun.config.mesh.size],
    )
  except (SurgeryError, DataError, *runs.ERRORS) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  if meta:
    skipped = sorted({x for per in meta["skipped"] for x in per})
    print(
      f"quantize: smoothed (alpha {args.smooth}, "
      f"{meta['smooth_calibration']['tokens']:,} calibration tokens): "
      f"{sum(map(len, meta['folds']))} folds in {len(meta['folds'])} layers"
      + (f"; skipped: {'; '.join(skipped)}" if skipped else ""),
      flush=True,
    )
  ckpt = os.path.join(src.workdir, "checkpoints", str(src.step))
  before = disk_bytes(ckpt)
  after = disk_bytes(os.path.join(written, "checkpoints", "0"))
  params = quantization.param_bytes(qrun.params)
  print(
    f"quantize: wrote {written} ({qrun.config.model.quantization}): "
    f"checkpoint {after:,} bytes on disk against {before:,} of {ckpt} "
    f"({after / before:.2f}x; SRC's holds the optimizer state too); parameters {params:,} bytes in memory "
    f"against {quantization.param_bytes(src.params):,}",
    flush=True,
  )


if __name__ == "__main__":
  main()
