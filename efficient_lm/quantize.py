"""python -m efficient_lm.quantize: write a quantized copy of a run.

  python -m efficient_lm.quantize --workdir=SRC --out=DST \
      --scheme=int8_weights|int4_weights[:GROUP]|int8_dynamic|fp8

Reads SRC's newest good checkpoint (runs.load_run; SRC is not written),
quantizes its layers' weights with qwix's PTQ (runs.quantize_run,
models/quantization.py) and writes DST, a run at step 0 (runs.write_run)
whose checkpoint holds the integer (or fp8) weights and their scales and
whose config records the scheme (model.quantization), so `evaluate` and
`generate` load it as it is, without quantizing again. A run trained with
quantization-aware training (train.quantization) is quantized with its
own scheme when --scheme is not given. Prints DST's checkpoint size on
disk against SRC's newest checkpoint. Bad input is one `error:` line and
nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from efficient_lm import cpu_runtime


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, exit 2, like absl's CLIs
    self.exit(2, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
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
  return p


def disk_bytes(path: str) -> int:
  """Bytes of the files under `path` (local disks)."""
  return sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, files in os.walk(path)
    for f in files
  )


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  cpu_runtime.use_cpu_only_without_accelerator()
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  import jax

  from efficient_lm import paths, runs
  from efficient_lm.config.schemes import parse_scheme
  from efficient_lm.models import quantization

  try:
    out = paths.resolve(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
      raise runs.RunError(f"--out={args.out} exists and is not empty")
    if args.scheme is not None:
      parse_scheme(args.scheme, "--scheme")
    src = runs.load_run(args.workdir, devices=jax.local_devices()[:1])
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
      },
      devices=jax.local_devices()[: qrun.config.mesh.size],
    )
  except runs.ERRORS as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
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
