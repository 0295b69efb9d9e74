"""Throughput accounting (tokens/s, MFU) and metric writers."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import IO, Any

import jax
from etils import epath

from efficient_lm import paths

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Matched by substring
# of `device.device_kind`, most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
  ("TPU v6", 918e12),  # Trillium / v6e
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),  # v5e reports "TPU v5 lite"
  ("TPU v5e", 197e12),
  ("TPU v4", 275e12),
  ("H200", 989e12),
  ("H100", 989e12),  # SXM; PCIe parts are lower
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


def throughput(
  *,
  tokens: float,
  seconds: float,
  flops_per_token: float,
  num_devices: int,
  device: jax.Device,
  visible_flops_per_token: float | None = None,
) -> dict[str, float]:
  """tokens/s, GFLOP/s in both attention conventions, and MFU (dense_tile,
  PaLM's convention) where the chip's peak is known."""
  tps = tokens / max(seconds, 1e-9)
  achieved = tps * flops_per_token
  out = {"tokens_per_sec": tps, "gflops_per_sec": achieved / 1e9}
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

  A remote workdir (gs://) cannot be appended to, and tensorboardX's own
  gs:// writer goes around epath (google-cloud-storage, its own credential
  lookup) and re-uploads the whole event file at every flush. So both
  files are written to a local staging directory and `sync()` uploads each
  one that changed, whole, through epath: every upload replaces a complete
  object, never a torn one. It runs at most every `sync_seconds` from
  `write`, at each checkpoint save (the loop calls it first, so a resumed
  run finds every row up to its checkpoint) and at `close`. The cost is
  the file size per sync, not per row. On a local workdir the files are
  written in place and `sync()` does nothing.
  """

  def __init__(
    self,
    workdir: epath.PathLike,
    *,
    enabled: bool = True,
    start_step: int = 0,
    sync_seconds: float = 60.0,
  ):
    self.enabled = enabled
    self._jsonl: IO[str] | None = None
    self._tb: _EventFile | None = None
    self._remote = None
    self._synced: dict[str, tuple[int, int]] = {}  # name -> (size, mtime)
    self._sync_seconds = sync_seconds
    self._last_sync = time.monotonic()
    if not enabled:
      return
    workdir = epath.Path(workdir)
    if paths.is_remote(workdir):
      self._remote = workdir
      self._local = epath.Path(tempfile.mkdtemp(prefix="efficient_lm-"))
    else:
      workdir.mkdir(parents=True, exist_ok=True)
      self._local = workdir
    kept = _rows_up_to(workdir / METRICS, start_step)
    if kept is not None:
      paths.write_atomic(self._local / METRICS, "".join(kept))
    self._jsonl = (self._local / METRICS).open("a")
    try:
      # Event files are named by the second and host only: a resume within
      # the same second would overwrite the previous file without a suffix.
      self._tb = _EventFile(
        self._local / TENSORBOARD,
        purge_step=start_step + 1 if start_step else None,
        suffix=f".{os.getpid()}.{start_step}",
      )
    except ImportError:  # tensorboardX is a dependency; stay usable anyway
      self._tb = None
    if kept is not None:
      self.sync()  # the dropped rows leave the remote copy now

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    assert self._jsonl is not None, "write after close"
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)
    if time.monotonic() - self._last_sync >= self._sync_seconds:
      self.sync()

  def sync(self) -> None:
    """Uploads every staged file that changed (remote workdirs only)."""
    if self._remote is None:
      return
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    for local in [
      self._local / METRICS,
      *(self._local / TENSORBOARD).glob("*"),
    ]:
      name = os.fspath(local.relative_to(self._local))
      st = os.stat(local)
      if self._synced.get(name) == (st.st_size, st.st_mtime_ns):
        continue
      (self._remote / name).write_bytes(local.read_bytes())
      self._synced[name] = (st.st_size, st.st_mtime_ns)
    self._last_sync = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
    self._jsonl = self._tb = None
    if self._remote is not None:
      self.sync()
      shutil.rmtree(self._local, ignore_errors=True)
      self._remote = None


class _EventFile:
  """TensorBoard scalars, written to the file synchronously.

  tensorboardX's SummaryWriter hands events to a worker thread through a
  multiprocessing queue, and its flush() misses what is still queued: an
  upload right after it lacked the last events in 9 of 10 tries here, even
  after waiting for the queue to report empty. EventsWriter, the file layer
  under SummaryWriter, writes in the caller's thread.
  """

  def __init__(
    self, directory: epath.Path, *, purge_step: int | None, suffix: str
  ):
    from tensorboardX import summary
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    self._pb, self._scalar = event_pb2, summary.scalar
    directory.mkdir(parents=True, exist_ok=True)
    self._writer = EventsWriter(os.fspath(directory / "events"), suffix)
    if purge_step is not None:  # TensorBoard hides the later events
      self._writer.write_event(
        event_pb2.Event(
          wall_time=time.time(),
          step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
      )

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._writer.write_event(
      self._pb.Event(
        wall_time=time.time(), step=step, summary=self._scalar(tag, value)
      )
    )

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _rows_up_to(path: epath.Path, step: int) -> list[str] | None:
  """The rows of `path` up to `step`, or None if it needs no rewrite (it
  is missing, or local and holds no later or torn row)."""
  if not path.exists():
    return None
  lines = path.read_text().splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # the torn last line of a killed run
  if len(keep) == len(lines) and not paths.is_remote(path):
    return None
  return keep


def human(n: float) -> str:
  for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.2f}{unit}"
  return f"{n:.0f}"
