"""Train-step time against FLOPs, several models timed in one process.

`step_seconds(trainers, rounds, steps)` runs each model's jitted train step
`steps` times per round, the models in turn, `rounds` rounds (A B C A B C
...), so that a machine whose speed drifts (shared cores) slows every model
alike; each model's figure is the median of its per-step wall times.
`saving_rows` sets them against the FLOPs per token, as ratios to a
baseline: the step-time ratio, the FLOPs ratio, and the realized share of
the FLOPs saving, (1 - time ratio) / (1 - FLOPs ratio).
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, mesh):
  """Random tokens, one document per row, placed on `mesh`."""
  import numpy as np

  from efficient_lm import sharding

  rng = np.random.default_rng(0)
  shape = (batch_size, seq_len)
  batch = {
    "inputs": rng.integers(0, vocab, shape, dtype=np.int32),
    "targets": rng.integers(0, vocab, shape, dtype=np.int32),
    "segment_ids": np.ones(shape, np.int32),
    "positions": np.broadcast_to(
      np.arange(seq_len, dtype=np.int32), shape
    ).copy(),
  }
  return sharding.host_to_global(mesh, batch)


def step_seconds(
  trainers: dict[str, Any], rounds: int, steps: int
) -> dict[str, float]:
  """{name: median seconds per train step}; `trainers` maps a name to a
  loop.Trainer, each stepped on a synthetic batch of its config's shape
  (the first step, which compiles, untimed)."""
  import jax

  runs = {}
  for name, t in trainers.items():
    cfg = t.cfg
    batch = synthetic_batch(
      cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, t.mesh
    )
    state, m = t.train_step(t.init_fn(), batch, *t.step_inputs)
    jax.block_until_ready(m)
    runs[name] = [state, batch]
  times: dict[str, list[float]] = {name: [] for name in trainers}
  for _ in range(rounds):
    for name, t in trainers.items():
      state, batch = runs[name]
      for _ in range(steps):
        t0 = time.perf_counter()
        state, m = t.train_step(state, batch, *t.step_inputs)
        jax.block_until_ready(m)
        times[name].append(time.perf_counter() - t0)
      runs[name][0] = state
  return {name: statistics.median(ts) for name, ts in times.items()}


def saving_rows(
  seconds: dict[str, float], flops: dict[str, float], base: str
) -> dict[str, dict[str, float | None]]:
  """Per name: step time and FLOPs as ratios to `base`'s, and the
  realized share of the FLOPs saving (None where nothing is saved)."""
  rows = {}
  for name in seconds:
    t = seconds[name] / seconds[base]
    f = flops[name] / flops[base]
    rows[name] = {
      "step_seconds": seconds[name],
      "step_time_ratio": t,
      "flops_ratio": f,
      "realized_saving": (1 - t) / (1 - f) if f < 0.999 else None,
    }
  return rows


def print_table(rows: dict[str, dict], base: str, note: str) -> None:
  """Markdown: name | step time | time ratio | FLOPs ratio | realized."""
  print(f"\nTrain-step time against FLOPs, ratios to {base}; {note}\n")
  print(
    "| variant | step | step time vs base | FLOPs vs base | realized / "
    "FLOPs saving |"
  )
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    real = r["realized_saving"]
    print(
      f"| {name} | {1e3 * r['step_seconds']:.1f} ms | "
      f"{r['step_time_ratio']:.3f} | {r['flops_ratio']:.3f} | "
      f"{'-' if real is None else f'{real:.2f}'} |"
    )
