"""Hugging Face checkpoints in and out.

  python -m efficient_lm.convert import --hf=DIR --workdir=RUN \
      [--dtype=float32|bfloat16]
  python -m efficient_lm.convert export --workdir=RUN --out=DIR \
      [--shard_size=5GB]

import writes a new run at step 0 (config, checkpoint, tokenizer,
provenance) that `train` continues and `evaluate` / `generate` read;
export writes the run's newest good checkpoint as a directory that
transformers' AutoModelForCausalLM.from_pretrained loads. Families, what is
refused and the memory an import takes: README "Start from a pretrained
model". Bad input is one `error:` line and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from efficient_lm import cpu_runtime
from efficient_lm.cli_args import OneLineParser


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog="python -m efficient_lm.convert", description=__doc__)
  sub = p.add_subparsers(
    dest="command", required=True, parser_class=OneLineParser
  )
  imp = sub.add_parser("import", help="a Hugging Face directory -> a run")
  imp.add_argument("--hf", required=True, help="Hugging Face model directory")
  imp.add_argument("--workdir", required=True, help="the new run's directory")
  imp.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default=None,
    help="parameter dtype (default: the checkpoint's)",
  )
  exp = sub.add_parser("export", help="a run -> a Hugging Face directory")
  exp.add_argument("--workdir", required=True, help="a run's directory")
  exp.add_argument("--out", required=True, help="the new model directory")
  exp.add_argument(
    "--shard_size", default="5GB", help="largest safetensors file (5GB)"
  )
  return p


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  cpu_runtime.use_cpu_only_without_accelerator()
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every write at INFO
  from efficient_lm import runs
  from efficient_lm.data import DataError
  from efficient_lm.hf import exporter, importer
  from efficient_lm.hf.errors import ConvertError

  try:
    if args.command == "import":
      out = importer.import_checkpoint(args.hf, args.workdir, dtype=args.dtype)
    else:
      size = exporter.parse_size(args.shard_size)
      out = exporter.export_run(args.workdir, args.out, shard_size=size)
  except (ConvertError, DataError, *runs.ERRORS) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(f"convert: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
