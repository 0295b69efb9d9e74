#!/usr/bin/env bash
# Train on GKE TPU or GPU node pools: writes a JobSet manifest (indexed Jobs,
# one pod per host) from flags and applies it with kubectl.
#
#   launch/gke.sh --config=configs/decoder_1b.py --image=REGISTRY/efficient-lm \
#       --accelerator=tpu-v5-lite-podslice --topology=4x4 [--num_slices=2] \
#       --workdir=gs://BUCKET/runs/1b [-- --config.mesh.fsdp=16]
#   launch/gke.sh --config=... --accelerator=nvidia-h100-80gb --nodes=2
#   launch/gke.sh ... --dry-run      # print the kubectl command + manifest
#
# Assumptions:
# - The JobSet controller is installed (jobset.x-k8s.io/v1alpha2) and the
#   cluster has a node pool per slice with the GKE labels used below
#   (cloud.google.com/gke-tpu-accelerator / gke-tpu-topology, or
#   cloud.google.com/gke-accelerator for GPUs).
# - --image has this repository at its working directory with the package
#   installed (jax[tpu] or jax[cuda12], and the gcs extra for gs://
#   workdirs); no image is built here.
# - TPU: GKE injects the worker list into each pod (TPU_WORKER_HOSTNAMES /
#   TPU_WORKER_ID, MEGASCALE_* for multi-slice) and JAX reads it, so every
#   pod runs the same command with --distributed. GPU: no such detection;
#   pod 0 of job 0 is the coordinator, reached through the JobSet's headless
#   service (<name>-workers-0-0.<name>), and each pod's process id is its
#   Job completion index.
# - Hosts per TPU slice = chips in --topology / chips per host (4, or all 8
#   of a single-host v5e/v6e 2x4); --chips_per_host overrides.
# - The workdir must be shared storage (gs://...) when there is more than
#   one pod.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

USAGE="launch/gke.sh --config=PATH [--image=IMAGE] [--workdir=DIR] \
[--name=NAME] [--accelerator=tpu-...|nvidia-...] [--topology=AxB[xC]] \
[--chips_per_host=N] [--num_slices=N] [--nodes=N] [--gpus_per_node=N] \
[--port=N] [--max_restarts=N] [--dry-run] [-- TRAIN_FLAGS...]"

CONFIG=""
IMAGE="${GKE_IMAGE:-efficient-lm:latest}"
WORKDIR="${GKE_WORKDIR:-}"
NAME="${GKE_NAME:-efficient-lm}"
ACCELERATOR="${GKE_ACCELERATOR:-tpu-v5-lite-podslice}"
TOPOLOGY="${GKE_TOPOLOGY:-2x4}"
CHIPS_PER_HOST=""
NUM_SLICES=1
NODES=1
GPUS_PER_NODE=8
PORT=1234
MAX_RESTARTS=3
DRY_RUN=0
TRAIN_ARGS=()

while [ "$#" -gt 0 ]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --topology=*) TOPOLOGY="${1#*=}" ;;
    --chips_per_host=*) CHIPS_PER_HOST="${1#*=}" ;;
    --num_slices=*) NUM_SLICES="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS_PER_NODE="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) usage_error "unknown flag $1" ;;
  esac
  shift
done

[ -n "$CONFIG" ] || usage_error "--config is required"
WORKDIR="${WORKDIR:-runs/${NAME}}"
for pair in --num_slices="$NUM_SLICES" --nodes="$NODES" \
            --gpus_per_node="$GPUS_PER_NODE" --port="$PORT"; do
  require_count "${pair%%=*}" "${pair#*=}"
done
case "$MAX_RESTARTS" in
  '' | *[!0-9]*)
    usage_error "--max_restarts=$MAX_RESTARTS: expected 0 or more" ;;
esac

TRAIN=(python -m efficient_lm.train --config="$CONFIG" --workdir="$WORKDIR"
       --distributed)
case "$ACCELERATOR" in
  tpu-*)
    if ! [[ "$TOPOLOGY" =~ ^[1-9][0-9]*(x[1-9][0-9]*){1,2}$ ]]; then
      usage_error "--topology=$TOPOLOGY: expected AxB or AxBxC (e.g. 4x4)"
    fi
    CHIPS=$((${TOPOLOGY//x/*}))
    if [ -z "$CHIPS_PER_HOST" ]; then
      CHIPS_PER_HOST=4
      [ "$CHIPS" -lt 4 ] && CHIPS_PER_HOST="$CHIPS"
      case "$ACCELERATOR:$TOPOLOGY" in
        tpu-v5-lite-*:2x4 | tpu-v6e-*:2x4) CHIPS_PER_HOST=8 ;;
      esac
    fi
    require_count --chips_per_host "$CHIPS_PER_HOST"
    if [ $((CHIPS % CHIPS_PER_HOST)) -ne 0 ]; then
      usage_error "--topology=$TOPOLOGY has $CHIPS chips, not a multiple of \
--chips_per_host=$CHIPS_PER_HOST"
    fi
    HOSTS=$((CHIPS / CHIPS_PER_HOST))
    REPLICAS="$NUM_SLICES"
    SELECTOR="cloud.google.com/gke-tpu-accelerator: ${ACCELERATOR}
              cloud.google.com/gke-tpu-topology: ${TOPOLOGY}"
    RESOURCE="google.com/tpu: ${CHIPS_PER_HOST}"
    ;;
  nvidia-*)
    [ "$NUM_SLICES" = 1 ] || usage_error "--num_slices=$NUM_SLICES is for \
TPU; use --nodes for GPUs"
    HOSTS="$NODES"
    REPLICAS=1
    SELECTOR="cloud.google.com/gke-accelerator: ${ACCELERATOR}"
    RESOURCE="nvidia.com/gpu: ${GPUS_PER_NODE}"
    # shellcheck disable=SC2016  # $(PROCESS_ID) is Kubernetes' expansion
    TRAIN+=(--coordinator_address="${NAME}-workers-0-0.${NAME}:${PORT}"
            --num_processes="$HOSTS" '--process_id=$(PROCESS_ID)')
    ;;
  *) usage_error "--accelerator=$ACCELERATOR: expected a GKE TPU accelerator \
(tpu-v5-lite-podslice, tpu-v5p-slice, tpu-v6e-slice, tpu-v4-podslice) or a \
GPU one (nvidia-h100-80gb, nvidia-a100-80gb, ...)" ;;
esac
TRAIN+=("${TRAIN_ARGS[@]}")

# A YAML double-quoted scalar (JSON string rules are a subset of YAML's).
yaml_str() {
  local s="${1//\\/\\\\}"
  printf '"%s"' "${s//\"/\\\"}"
}

command_yaml() {
  local w
  for w in "${TRAIN[@]}"; do
    printf '                - %s\n' "$(yaml_str "$w")"
  done
}

# GPU pods learn their process id from the Job's completion index.
env_yaml() {
  case "$ACCELERATOR" in
    nvidia-*) cat <<'YAML'
              env:
              - name: PROCESS_ID
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
YAML
    ;;
  esac
}

MANIFEST="$(cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: ${NAME}
  annotations:
    # One slice per node pool.
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  # A restart (e.g. after a preempted node) resumes from the workdir's
  # latest checkpoint.
  failurePolicy:
    maxRestarts: ${MAX_RESTARTS}
  network:
    enableDNSHostnames: true
  replicatedJobs:
  - name: workers
    replicas: ${REPLICAS}
    template:
      spec:
        completionMode: Indexed
        completions: ${HOSTS}
        parallelism: ${HOSTS}
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            nodeSelector:
              ${SELECTOR}
            containers:
            - name: train
              image: $(yaml_str "$IMAGE")
              command:
$(command_yaml)
$(env_yaml)
              resources:
                limits:
                  ${RESOURCE}
YAML
)"
# env_yaml is empty for TPU: drop the blank line it leaves.
MANIFEST="$(printf '%s\n' "$MANIFEST" | sed '/^$/d')"

if [ "$DRY_RUN" = 1 ]; then
  echo "kubectl apply -f - <<'EOF'"
  printf '%s\n' "$MANIFEST"
  echo "EOF"
else
  printf '%s\n' "$MANIFEST" | kubectl apply -f -
  echo "gke: follow process 0 with: kubectl logs -f ${NAME}-workers-0-0-<id>" \
    "(kubectl get pods -l jobset.sigs.k8s.io/jobset-name=${NAME})" >&2
fi
