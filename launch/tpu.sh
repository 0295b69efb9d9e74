#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (or several slices) with gcloud.
#
#   launch/tpu.sh --config=configs/decoder_1b.py --type=v5e-16 \
#       --workdir=gs://BUCKET/runs/1b [--num_slices=2] \
#       [-- --config.mesh.fsdp=16]
#   launch/tpu.sh --delete [--name=...]  # delete the VM / queued resource
#
# Steps: create the TPU VM unless `describe` finds it (with --num_slices > 1
# or --queued: a queued resource, waited for until ACTIVE); copy this
# repository (committed files, `git archive HEAD`) to every worker; install it
# into ~/efficient_lm/.venv (or --wheel=FILE instead of the source); start
# the same command on every worker of every slice, detached, logging to
# ~/efficient_lm/train.log; then follow worker 0's log (Ctrl-C stops the
# tail, not the run). Arguments after `--` go to efficient_lm.train.
#
# Assumptions (gcloud as of 2025-2026):
# - `gcloud compute tpus tpu-vm create NAME --accelerator-type --version`,
#   `ssh/scp NAME --worker=all` run on every host of the slice;
#   `queued-resources create --node-count=N --node-prefix=P` names the
#   slices P-0 .. P-(N-1), and `delete --force` removes them with it.
# - JAX finds the cluster itself on Cloud TPU (worker list, and for
#   multi-slice the MEGASCALE_* values, from the VM metadata), so every
#   worker runs the identical train command with just --distributed.
# - TPU VM images ship Python 3.10; the package needs >= 3.12, so the
#   install uses uv (pip-installed per user) to fetch a managed Python 3.12.
# - Multi-host checkpoints need a shared workdir: use gs://... there; the
#   local default is only right for one host.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

USAGE="launch/tpu.sh --config=PATH [--workdir=DIR] [--name=NAME] \
[--type=TYPE] [--zone=ZONE] [--project=PROJECT] [--num_slices=N] [--queued] \
[--spot] [--runtime_version=V] [--wheel=FILE] [--delete] [--dry-run] \
[-- TRAIN_FLAGS...]"

CONFIG=""
WORKDIR="${TPU_WORKDIR:-}"
NAME="${TPU_NAME:-efficient-lm}"
TYPE="${TPU_TYPE:-v5litepod-8}"
ZONE="${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-us-west4-a}}"
PROJECT="${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
NUM_SLICES=1
QUEUED=0
SPOT=0
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
WHEEL=""
DELETE=0
DRY_RUN=0
TRAIN_ARGS=()

while [ "$#" -gt 0 ]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --num_slices=*) NUM_SLICES="${1#*=}" ;;
    --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
    --wheel=*) WHEEL="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) usage_error "unknown flag $1" ;;
  esac
  shift
done

require_count --num_slices "$NUM_SLICES"
[ "$NUM_SLICES" -gt 1 ] && QUEUED=1
# gcloud spells v5e as v5litepod; accept the name users write.
case "$TYPE" in
  v5e-*) TYPE="v5litepod-${TYPE#v5e-}" ;;
esac
if [ -z "$RUNTIME_VERSION" ]; then
  case "$TYPE" in
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) usage_error "--type=$TYPE: expected v4-N, v5e-N (v5litepod-N), v5p-N \
or v6e-N, or give --runtime_version" ;;
  esac
fi

# Location flags for every gcloud call; no --project means gcloud's own
# configured project.
LOC=(--zone="$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project="$PROJECT")

if [ "$DELETE" = 1 ]; then
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
  exit 0
fi

[ -n "$CONFIG" ] || usage_error "--config is required"
case "$CONFIG" in
  /*) usage_error "--config=$CONFIG: expected a path inside the repository \
(it is copied to the workers), e.g. configs/tiny.py" ;;
esac
WORKDIR="${WORKDIR:-runs/${NAME}}"
if [ -n "$WHEEL" ] && [ "$DRY_RUN" = 0 ] && [ ! -f "$WHEEL" ]; then
  usage_error "--wheel=$WHEEL: no such file"
fi

# Slice (node) names: one VM, or the queued resource's P-0 .. P-(N-1).
NODES=("$NAME")
if [ "$QUEUED" = 1 ] && [ "$NUM_SLICES" -gt 1 ]; then
  NODES=()
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("${NAME}-${i}"); done
fi

# Create unless it exists. A dry run cannot ask, so it shows the creation.
exists() {
  [ "$DRY_RUN" = 0 ] && "$@" >/dev/null 2>&1
}
if [ "$QUEUED" = 1 ]; then
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
            "--format=value(state.state)")
  if ! exists "${describe[@]}"; then
    create=(gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}"
            --accelerator-type="$TYPE" --runtime-version="$RUNTIME_VERSION")
    if [ "$NUM_SLICES" -gt 1 ]; then
      create+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
    else
      create+=(--node-id="$NAME")
    fi
    [ "$SPOT" = 1 ] && create+=(--spot)
    run "${create[@]}"
  fi
  # Queued resources are granted asynchronously: wait for ACTIVE.
  run "${describe[@]}"
  if [ "$DRY_RUN" = 0 ]; then
    until [ "$("${describe[@]}")" = ACTIVE ]; do
      echo "tpu: waiting for queued resource $NAME to be ACTIVE" >&2
      sleep 30
    done
  fi
else
  if ! exists gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}"; then
    create=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}"
            --accelerator-type="$TYPE" --version="$RUNTIME_VERSION")
    [ "$SPOT" = 1 ] && create+=(--spot)
    run "${create[@]}"
  fi
fi

# Source (always: the configs live there) and, with --wheel, the wheel.
SRC_TGZ="${TMPDIR:-/tmp}/efficient_lm-src.tar.gz"
run git -C "$REPO" archive --format=tar.gz --output="$SRC_TGZ" HEAD
# shellcheck disable=SC2016  # $HOME is the worker's, expanded there
UV='$HOME/.local/bin/uv'
INSTALL="set -e; python3 -m pip install --user -q uv; \
rm -rf efficient_lm/src; mkdir -p efficient_lm/src; \
tar -xzf efficient_lm-src.tar.gz -C efficient_lm/src; cd efficient_lm; \
${UV} venv -q --allow-existing --python 3.12 .venv; \
${UV} pip install -q --python .venv/bin/python"
COPY=("$SRC_TGZ")
if [ -n "$WHEEL" ]; then
  COPY+=("$WHEEL")
  INSTALL="${INSTALL} $(shell_word "../$(basename "$WHEEL")[tpu,gcs]")"
else
  INSTALL="${INSTALL} -e 'src[tpu,gcs]'"
fi

# The one train command, identical on every host of every slice.
TRAIN=(.venv/bin/python -m efficient_lm.train --config="src/${CONFIG}"
       --workdir="$WORKDIR" --distributed "${TRAIN_ARGS[@]}")
START="cd efficient_lm && setsid nohup $(shell_line "${TRAIN[@]}") \
> train.log 2>&1 < /dev/null &"

for node in "${NODES[@]}"; do
  run gcloud compute tpus tpu-vm scp "${COPY[@]}" "${node}:" "${LOC[@]}" \
    --worker=all
  run gcloud compute tpus tpu-vm ssh "$node" "${LOC[@]}" --worker=all \
    --command="$INSTALL"
done
for node in "${NODES[@]}"; do
  run gcloud compute tpus tpu-vm ssh "$node" "${LOC[@]}" --worker=all \
    --command="$START"
done
run gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${LOC[@]}" --worker=0 \
  --command="tail -n +1 -F efficient_lm/train.log"
