"""Evaluate a trained run on held-out data.

  python -m efficient_lm.evaluate --workdir=runs/tiny
  python -m efficient_lm.evaluate --workdir=runs/tiny --num_batches=8 \
      --config.data.source=text --config.data.path=other.txt

Loads the newest good checkpoint read-only (runs.load_run), makes one pass
over the eval split of the run's data set (or of the one the `--config.data.*`
overrides name), prints a one-line summary to stderr and the result as JSON
to stdout, and appends that JSON as a line to <workdir>/eval.jsonl.
"""

import json
import sys

from absl import app, flags, logging

from efficient_lm import cpu_runtime

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory to evaluate.", required=True
)
_NUM_BATCHES = flags.DEFINE_integer(
  "num_batches",
  None,
  "Evaluate the first N eval batches only (those the "
  "training loop's eval_loss reads). Default: the whole eval split, each "
  "example once.",
)

_QUANTIZE = flags.DEFINE_string(
  "quantize",
  None,
  "Evaluate the run's weights quantized by this scheme (qwix PTQ): "
  "int8_weights, int4_weights[:GROUP] (default group 128), int8_dynamic, "
  "fp8. The float weights are evaluated on the same batches too; the "
  "result adds the deltas and both parameter byte counts.",
)


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each read at INFO
  cpu_runtime.keep_freed_host_memory()  # before JAX starts its CPU client
  cpu_runtime.use_cpu_only_without_accelerator()
  from etils import epath
  from efficient_lm import paths, runs
  from efficient_lm.training.workdir import EVAL

  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  try:
    run = runs.load_run(_WORKDIR.value, overrides=overrides)
    if _QUANTIZE.value is None:
      result = runs.evaluate(run, _NUM_BATCHES.value)
    else:
      result = runs.evaluate_quantized(run, _QUANTIZE.value, _NUM_BATCHES.value)
  except runs.ERRORS as e:
    sys.exit(f"error: {e}")
  print(summary(result), file=sys.stderr, flush=True)
  line = json.dumps(result)
  print(line, flush=True)
  path = epath.Path(run.workdir) / EVAL
  try:
    paths.append_text(path, line + "\n")
  except OSError as e:  # a run on a read-only disk still evaluates
    print(f"warning: could not append to {path}: {e}", file=sys.stderr)


def summary(r: dict) -> str:
  data = r["data_path"] or f"the {r['data_source']} corpus"
  bpb = "n/a" if r["bpb"] is None else f"{r['bpb']:.4f}"
  return (
    f"step {r['step']}: eval loss {r['loss']:.4f}, ppl {r['ppl']:.3f}, "
    f"{bpb} bits/byte over {r['num_tokens']:,} tokens "
    f"({r['num_bytes']:,} bytes, {r['num_batches']} batches) of {data}; "
    f"{r['tokens_per_sec']:,.0f} tokens/s"
  ) + (
    ""
    if "quantize" not in r
    else (
      f"; {r['quantize']}: loss {r['loss_delta']:+.4f} nats against the "
      f"float weights, {r['param_bytes']:,} parameter bytes (float: "
      f"{r['float_param_bytes']:,})"
    )
  )


def parse_flags(argv):
  """absl parsing that leaves the --config.data.* overrides to load_run."""
  rest = [a for a in argv[1:] if not a.startswith("--config.")]
  try:
    positional = flags.FLAGS(argv[:1] + rest)[1:]
  except flags.Error as e:
    sys.exit(f"error: {e}")
  if positional:
    sys.exit(
      f"error: unexpected argument {positional[0]!r} (overrides are "
      "written --config.data.KEY=VALUE)"
    )
  return argv


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
