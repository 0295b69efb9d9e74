#!/usr/bin/env bash
# JAX-on-GPU smoke run on this machine: checks that jax.devices() shows a
# GPU, trains configs/tiny.py in bf16 with the Pallas GPU attention kernels,
# and prints tokens/s and MFU from the run's metrics.jsonl.
#
#   launch/setup_env.sh gpu && launch/gpu_local.sh [--steps=N] [-- overrides]
#
# The last logged window is reported: it excludes the first step (the
# compile), as the training loop's own throughput does.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

USAGE="launch/gpu_local.sh [--steps=N] [--workdir=DIR] [--python=PATH] \
[--dry-run] [-- TRAIN_FLAGS...]"

STEPS=100
WORKDIR="runs/gpu_local/$(date +%Y%m%d-%H%M%S)"  # fresh: never a resume
PYTHON="${PYTHON:-.venv/bin/python}"
DRY_RUN=0
TRAIN_ARGS=()

while [ "$#" -gt 0 ]; do
  case "$1" in
    --steps=*) STEPS="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) usage_error "unknown flag $1" ;;
  esac
  shift
done
require_count --steps "$STEPS"
if [ "$DRY_RUN" = 0 ] && ! command -v "$PYTHON" >/dev/null; then
  echo "error: no Python at $PYTHON: run launch/setup_env.sh gpu, or pass \
--python=PATH" >&2
  exit 1
fi

# One-line programs, so that --dry-run prints one line per command (the
# f-strings reuse double quotes: Python >= 3.12, as the package requires).
CHECK='import jax, sys; d = jax.devices(); '\
'print(f"gpu_local: {len(d)} x {d[0].device_kind}") '\
'if d[0].platform == "gpu" else sys.exit('\
'f"error: jax.devices() shows no GPU ({d}); install the CUDA build with '\
'launch/setup_env.sh gpu")'
REPORT='import json, sys; '\
'rows = [r for r in map(json.loads, open(sys.argv[1])) '\
'if "tokens_per_sec" in r] '\
'or sys.exit(f"error: no throughput line in {sys.argv[1]}"); '\
'r = rows[-1]; m = r.get("mfu"); '\
'print(f"gpu_local: {r["tokens_per_sec"]:,.0f} tokens/s, " '\
'+ (f"MFU {100 * m:.1f}%" if m is not None else '\
'"MFU n/a (no peak FLOP/s for this GPU in training/metrics.py)") '\
'+ f" (step {r["step"]}, loss {r["loss"]:.3f})")'

run "$PYTHON" -c "$CHECK"
run "$PYTHON" -m efficient_lm.train --config=configs/tiny.py \
  --workdir="$WORKDIR" --config.model.dtype=bfloat16 \
  --config.model.attention.impl=pallas_gpu --config.train.steps="$STEPS" \
  --config.train.log_every=10 --config.train.eval_every="$STEPS" \
  --config.checkpoint.every_steps="$STEPS" "${TRAIN_ARGS[@]}"
run "$PYTHON" -c "$REPORT" "${WORKDIR}/metrics.jsonl"
