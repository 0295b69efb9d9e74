"""python -m efficient_lm.surgery: make a trained run smaller.

  python -m efficient_lm.surgery --workdir=SRC --out=DST \
      [--drop_layers=N|i,j,... --layer_criterion=loss|cosine] \
      [--heads=KEEP --head_criterion=output|taylor|magnitude|random] \
      [--ffn=KEEP --ffn_criterion=rmax|activation|taylor|magnitude|random
       --ffn_per_layer] [--width=KEEP] [--to_gqa=G] \
      [--to_attention=KIND|KIND,KIND,... --config.model.attention.KEY=V] \
      [--to_mla=RANK] [--to_hourglass=k|k,m --hourglass_factor=2] \
      [--to_mor=N_R --config.model.routing.KEY=V] \
      [--to_moe=E --config.model.moe.KEY=V] \
      [--seed=0] [--calibration_tokens=65536] [--config.data.KEY=VALUE ...]

Reads SRC's newest good checkpoint (runs.load_run; SRC is not written),
applies the operations in this order, each ranked on the model the
previous one left: drop layers, prune heads (whole kv groups), prune FFN
neurons, prune the width (residual channels), then the conversions
(efficient_lm/surgery/convert.py): MHA/GQA -> fewer kv groups, another
attention kind or pattern, MLA, an hourglass or a
mixture-of-recursions, and last mixture-of-experts by sparse upcycling
(--to_moe: every routed expert a copy of its layer's MLP); prints a before/after line per operation (parameters, forward
FLOPs per token, KV cache bytes per token, loss on the calibration data)
and writes DST, a run at step 0 (runs.write_run) whose provenance.json
records the source run and step, the calibration data and each operation
with its arguments, kept units and a summary of the importance scores.
KEEP is a fraction in (0, 1) (written with a '.') or an integer (a width;
heads: query heads per layer). Calibration data: the run's eval split, or
the data the --config.data.* overrides name (as efficient_lm.evaluate
takes them), its first --calibration_tokens tokens (whole batches of
train.batch_size x data.seq_len). Bad input is one `error:` line and
nothing is written. Criteria: efficient_lm/surgery/importance.py;
README "Make a model smaller".
"""

from __future__ import annotations

import argparse
import sys

from efficient_lm import cpu_runtime
from efficient_lm.cli_args import OneLineParser
from efficient_lm.surgery import (
  FFN_CRITERIA,
  HEAD_CRITERIA,
  LAYER_CRITERIA,
)

OPERATIONS = (
  "ffn",
  "heads",
  "drop_layers",
  "width",
  "to_gqa",
  "to_attention",
  "to_mla",
  "to_hourglass",
  "to_mor",
  "to_moe",
)


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(
    prog="python -m efficient_lm.surgery",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  p.add_argument("--workdir", required=True, help="the source run (read only)")
  p.add_argument("--out", required=True, help="the new run's directory")
  p.add_argument("--ffn", help="FFN neurons kept: fraction or width")
  p.add_argument("--ffn_criterion", choices=FFN_CRITERIA, default="rmax")
  p.add_argument(
    "--ffn_per_layer",
    action="store_true",
    help="rank all layers' neurons together (non-uniform widths)",
  )
  p.add_argument("--heads", help="heads kept: fraction of kv groups, or count")
  p.add_argument("--head_criterion", choices=HEAD_CRITERIA, default="output")
  p.add_argument("--drop_layers", help="N (ranked) or i,j,... (which)")
  p.add_argument("--layer_criterion", choices=LAYER_CRITERIA, default="loss")
  p.add_argument("--width", help="residual-stream channels kept")
  p.add_argument("--to_gqa", help="kv groups G (mean-pooled)")
  p.add_argument(
    "--to_attention", help="attention kind, or a comma list (a pattern)"
  )
  p.add_argument("--to_mla", help="MLA kv_lora_rank")
  p.add_argument("--to_hourglass", help="k or k,m: layers k+1..m shortened")
  p.add_argument("--hourglass_factor", type=int, help="default 2")
  p.add_argument("--to_mor", help="recursions N_r (middle_cycle)")
  p.add_argument(
    "--to_moe", help="routed experts per MoE layer (sparse upcycling)"
  )
  p.add_argument("--seed", type=int, default=0, help="the random criterion's")
  p.add_argument("--calibration_tokens", type=int, default=65536)
  return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(flags, the --config.data.* overrides); exits with one line on bad
  flags."""
  parser = _parser()
  overrides = [a for a in argv if a.startswith("--config.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
  if all(getattr(args, name) is None for name in OPERATIONS):
    parser.error(f"no operation given (--{', --'.join(OPERATIONS)})")
  if args.calibration_tokens < 1:
    parser.error(
      f"--calibration_tokens={args.calibration_tokens}: expected >= 1"
    )
  return args, overrides


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  cpu_runtime.use_cpu_only_without_accelerator()
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  from efficient_lm import runs
  from efficient_lm.data import DataError
  from efficient_lm.surgery import pipeline
  from efficient_lm.surgery.prune import SurgeryError

  try:
    out = pipeline.run(
      args, overrides, log=lambda line: print(line, flush=True)
    )
  except (SurgeryError, DataError, *runs.ERRORS) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(f"surgery: wrote {out}", file=sys.stderr)
