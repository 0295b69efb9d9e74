"""Throughput accounting (tokens/s, MFU) and metric writers."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Matched by substring
# of `device.device_kind`, most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
  ("TPU v6", 918e12),       # Trillium / v6e
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),  # v5e reports "TPU v5 lite"
  ("TPU v5e", 197e12),
  ("TPU v4", 275e12),
  ("H200", 989e12),
  ("H100", 989e12),         # SXM; PCIe parts are lower
  ("A100", 312e12),
  ("L4", 121e12),
)


def peak_flops(device: jax.Device) -> float | None:
  """Per-chip peak, or None where we have no number (e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  for needle, flops in PEAK_FLOPS:
    if needle.lower() in kind.lower():
      return flops
  return None


def throughput(*, tokens: float, seconds: float, flops_per_token: float,
               num_devices: int, device: jax.Device,
               visible_flops_per_token: float | None = None
               ) -> dict[str, float]:
  """tokens/s, GFLOP/s in both attention conventions, and MFU (dense_tile,
  PaLM's convention) where the chip's peak is known."""
  tps = tokens / max(seconds, 1e-9)
  achieved = tps * flops_per_token
  out = {"tokens_per_sec": tps,
         "gflops_per_sec": achieved / 1e9}
  if visible_flops_per_token is not None:
    out["gflops_per_sec_visible"] = tps * visible_flops_per_token / 1e9
  peak = peak_flops(device)
  if peak is not None:
    out["mfu"] = achieved / (peak * num_devices)
  return out


class WindowMean:
  """Running means of named scalars over a logging window."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}

  def add(self, values: Mapping[str, float]) -> None:
    for k, v in values.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(v)
      self._counts[k] = self._counts.get(k, 0) + 1

  def pop(self) -> dict[str, float]:
    """The means since the last pop; starts a new window."""
    out = {k: v / self._counts[k] for k, v in self._sums.items()}
    self._sums, self._counts = {}, {}
    return out


class MetricWriter:
  """metrics.jsonl (one JSON object a line) + TensorBoard events, process 0.

  `start_step` is the step the run resumes from: rows a killed run wrote
  past it are dropped (those steps run again), and TensorBoard is told to
  purge them, so every step appears once.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               start_step: int = 0):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, start_step)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      # Event files are named by the second and host only: a resume within
      # the same second would overwrite the previous file without a suffix.
      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"),
        purge_step=start_step + 1 if start_step else None,
        filename_suffix=f".{os.getpid()}.{start_step}")
    except ImportError:  # tensorboardX is a dependency; stay usable anyway
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass   # the torn last line of a killed run
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def human(n: float) -> str:
  for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.2f}{unit}"
  return f"{n:.0f}"
