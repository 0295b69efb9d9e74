#!/usr/bin/env bash
# The baby GPT against nanoGPT's CPU run of the same shape and schedule.
#
#   benchmarks/vs_nanogpt.sh NANOGPT_DIR [ITERS]
#
# NANOGPT_DIR: a checkout of https://github.com/karpathy/nanoGPT. Its
# shakespeare_char data is prepared from DATA (default
# ../shared/data/tinyshakespeare.txt; its prepare.py, with no download).
# Then nanoGPT (`train.py config/train_shakespeare_char.py --device=cpu
# --compile=False` with its README's CPU flags) and ours
# (configs/shakespeare_char.py) run interleaved, nanoGPT first, ROUNDS
# times each (default 2), ITERS iterations (default 2000, nanoGPT's), both
# on the same THREADS cores (default: all; `taskset` and OMP_NUM_THREADS).
# Prints per run and as medians: ms/iter (median over iterations after the
# first 10, evaluation iterations excluded: nanoGPT's per-iteration time,
# our 50-step windows), tokens/s, wall (startup, compile and evaluations
# included), final val loss (each on its own 20 eval batches), and ours
# over nanoGPT.
#
# Environment: NANOGPT_PYTHON (a Python with torch and numpy; default
# python3), PYTHON (ours; default .venv/bin/python), DATA, THREADS, ROUNDS,
# OUT (logs; default a fresh temporary directory).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 NANOGPT_DIR [ITERS]" >&2
  exit 2
fi
NANO=$(cd "$1" && pwd)
ITERS=${2:-2000}
REPO=$(cd "$(dirname "$0")/.." && pwd)
NANOGPT_PYTHON=${NANOGPT_PYTHON:-python3}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DATA=$(realpath "${DATA:-$REPO/../shared/data/tinyshakespeare.txt}")
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$(mktemp -d -t vs_nanogpt.XXXXXX)}
mkdir -p "$OUT"

if [[ ! -f "$NANO/train.py" || ! -f "$NANO/config/train_shakespeare_char.py" ]]; then
  echo "error: NANOGPT_DIR=$1 is not a nanoGPT checkout (no train.py and" \
    "config/train_shakespeare_char.py)" >&2
  exit 2
fi
if ! [[ "$ITERS" =~ ^[0-9]+$ ]] || ((ITERS < 100)); then
  echo "error: ITERS=$ITERS: expected an integer >= 100" >&2
  exit 2
fi
if [[ ! -f "$DATA" ]]; then
  echo "error: DATA=$DATA does not exist: expected tinyshakespeare.txt" >&2
  exit 2
fi

# nanoGPT's data: its own prepare.py on our copy of the text. prepare.py
# imports requests only to download input.txt, which is already there.
PREP="$NANO/data/shakespeare_char"
if [[ ! -f "$PREP/train.bin" ]] || ! cmp -s "$DATA" "$PREP/input.txt"; then
  cp "$DATA" "$PREP/input.txt"
  (cd "$PREP" && "$NANOGPT_PYTHON" -c "
import runpy, sys, types
sys.modules.setdefault('requests', types.ModuleType('requests'))
runpy.run_path('prepare.py', run_name='__main__')" >"$OUT/prepare.log")
fi

# nanoGPT evaluates every eval_interval iterations only: its last
# iteration must be one (ours always evaluates its last step).
EVAL_EVERY=250
((ITERS % EVAL_EVERY == 0)) || EVAL_EVERY=$ITERS
CORES="0-$((THREADS - 1))"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
echo "nanoGPT $(git -C "$NANO" rev-parse --short HEAD 2>/dev/null || echo '?')," \
  "$ITERS iterations, $THREADS threads (cores $CORES), $ROUNDS rounds;" \
  "logs in $OUT" >&2

run_nano() {
  (cd "$NANO" && taskset -c "$CORES" "$NANOGPT_PYTHON" train.py \
    config/train_shakespeare_char.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \
    --n_layer=4 --n_head=4 --n_embd=128 --max_iters="$ITERS" \
    --lr_decay_iters="$ITERS" --eval_interval="$EVAL_EVERY" --dropout=0.0 \
    --out_dir="$OUT/nano_ckpt")
}

run_ours() {
  rm -rf "$OUT/ours_$1"
  (cd "$REPO" && taskset -c "$CORES" "$PYTHON" -m efficient_lm.train \
    --config=configs/shakespeare_char.py --config.data.path="$DATA" \
    --config.train.steps="$ITERS" --workdir="$OUT/ours_$1")
}

for r in $(seq "$ROUNDS"); do
  for who in nano ours; do
    echo "round $r: $who ($(uptime | sed 's/.*load/load/'))" >&2
    start=$(date +%s.%N)
    "run_$who" "$r" >"$OUT/${who}_$r.log" 2>&1 || {
      echo "error: the $who run failed; see $OUT/${who}_$r.log" >&2
      tail -5 "$OUT/${who}_$r.log" >&2
      exit 1
    }
    end=$(date +%s.%N)
    echo "$who $r $start $end $(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/walls"
  done
done

"$PYTHON" - "$OUT" "$ROUNDS" "$EVAL_EVERY" <<'EOF'
import json, re, statistics, sys

out, rounds, nano_eval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
TOKENS = 12 * 64  # batch x block, both
EVAL_EVERY = 250  # our train.eval_every
walls = {}
for line in open(f"{out}/walls"):
  who, r, start, end, load = line.split()
  walls[who, int(r)] = (float(end) - float(start), float(load))


def nano(r):
  log = open(f"{out}/nano_{r}.log").read()
  times = [
    float(ms)
    for it, ms in re.findall(r"iter (\d+): loss \S+, time ([\d.]+)ms", log)
    if int(it) >= 10 and int(it) % nano_eval
  ]
  val = float(re.findall(r"val loss ([\d.]+)", log)[-1])
  return statistics.median(times), val


def ours(r):
  rows = [json.loads(l) for l in open(f"{out}/ours_{r}/metrics.jsonl")]
  # 50-step windows; those after an evaluation or a save hold its time.
  times = [
    1e3 * row["step_time"]
    for row in rows
    if "step_time" in row and (row["step"] - 1) % EVAL_EVERY >= 50
  ]
  val = [row["eval_loss"] for row in rows if "eval_loss" in row][-1]
  return statistics.median(times), val


res = {"nano": [], "ours": []}
print(f"{'run':10s} {'ms/iter':>8s} {'tokens/s':>9s} {'wall s':>7s} "
      f"{'val loss':>8s} {'load':>5s}")
for r in range(1, rounds + 1):
  for who, fn in (("nano", nano), ("ours", ours)):
    ms, val = fn(r)
    wall, load = walls[who, r]
    res[who].append((ms, TOKENS / ms * 1e3, wall, val))
    print(f"{who + ' ' + str(r):10s} {ms:8.1f} {TOKENS / ms * 1e3:9,.0f} "
          f"{wall:7.1f} {val:8.4f} {load:5.2f}")
med = {}
for who, rows in res.items():
  ms, _, wall, val = (statistics.median(col) for col in zip(*rows))
  med[who] = (ms, TOKENS / ms * 1e3, wall, val)  # tokens/s of the median
for who in ("nano", "ours"):
  ms, tps, wall, val = med[who]
  print(f"{who + ' median':10s} {ms:8.1f} {tps:9,.0f} {wall:7.1f} {val:8.4f}")
n, o = med["nano"], med["ours"]
print(f"ours / nanoGPT: tokens/s {o[1] / n[1]:.2f}x, wall {o[2] / n[2]:.2f}x, "
      f"val loss {o[3] - n[3]:+.3f}")
EOF
