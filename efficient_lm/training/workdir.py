"""One run per workdir: the lock, and the record of the runs it held.

  <workdir>/lock         who holds the workdir (host, pid, since); empty
                         when free. Held with flock for the run's lifetime,
                         so the kernel frees it when the holder dies
                         however it dies (kill -9 included).
  <workdir>/config.json  the resolved config of the latest run that started
  <workdir>/runs.jsonl   one line per start: time, host, pid, start step,
                         command-line overrides, and what changed in the
                         config since the previous start
  <workdir>/tokenizer.json  the tokenizer of the latest start
                         (data.save_tokenizer; a SentencePiece model is
                         copied beside it as tokenizer.model, a Hugging
                         Face tokenizer.json as hf_tokenizer.json)
  <workdir>/eval.jsonl   one line per `python -m efficient_lm.evaluate`
  <workdir>/provenance.json  where the weights of a run that runs.write_run
                         made came from (absent in runs trained from init)

Only process 0 touches these files; on a multi-host run the lock belongs to
the job, and the other processes learn the outcome from process 0.

The workdir may be gs://BUCKET/PATH (efficient_lm.paths): every file here
goes through etils.epath. An object store has no flock, and a lock object
alone could not tell a live holder from a preempted one (whose lock would
then block its own resume), so a remote workdir is not locked: the run
warns and goes on unguarded, as on a local filesystem without flock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from efficient_lm import paths

LOCK = "lock"
CONFIG = "config.json"
RUNS = "runs.jsonl"
TOKENIZER = "tokenizer.json"
EVAL = "eval.jsonl"
PROVENANCE = "provenance.json"


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _holder(text: str) -> str:
  try:
    h = json.loads(text)
    return f"host {h['host']}, pid {h['pid']}, since {h['since']}"
  except (ValueError, KeyError, TypeError):
    return "an unreadable holder record"


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds `<workdir>/lock` or raises WorkdirBusy.

  The file is never deleted (a delete would race with a third run opening
  it); releasing empties it. A non-empty file whose flock is free was left
  by a run that died, and is taken over with a message.
  """

  def __init__(self, workdir: epath.PathLike, *, enabled: bool = True):
    self.path = epath.Path(workdir) / LOCK
    self.enabled = enabled
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    problem = self._acquire() if self.enabled else None
    if jax.process_count() > 1:  # every process stops, not only process 0
      busy = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
      if busy and problem is None:
        problem = "process 0 could not lock the workdir (see its log)"
    if problem:
      raise WorkdirBusy(problem)
    return self

  def _acquire(self) -> str | None:
    if paths.is_remote(self.path):
      print(
        f"warning: {self.path.parent} is remote: object stores have no "
        "lock, so nothing guards against a second run in this workdir",
        file=sys.stderr,
        flush=True,
      )
      return None
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      previous = os.pread(fd, 4096, 0).decode(errors="replace")
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return (
          f"workdir {self.path.parent} is in use by another "
          f"run ({_holder(previous)}); wait for it or use another "
          "--workdir"
        )
      # A filesystem without flock (some FUSE mounts): run unguarded.
      print(
        f"warning: cannot lock {self.path} ({e}); not guarding against "
        "a second run in this workdir",
        file=sys.stderr,
        flush=True,
      )
      return None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
      print(
        f"workdir: taking over the lock of a run that is gone "
        f"({_holder(previous)})",
        file=sys.stderr,
        flush=True,
      )
    record = json.dumps(
      {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return None

  def __exit__(self, *exc_info) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # free; closing drops the flock
      os.close(self._fd)
      self._fd = None


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Dotted keys; tuples as lists, as config.json and checkpoints hold
  them, so a value read back from JSON equals the one in the config."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(
  old: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
  """Dotted key -> (old, new) for every leaf that differs; keys missing on
  one side (a config from an older version) count as unchanged."""
  a, b = _flat(old), _flat(new)
  return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(
    f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()
  )


def record_start(
  workdir: epath.PathLike,
  config: Mapping[str, Any],
  *,
  start_step: int,
  overrides: Sequence[str] = (),
) -> None:
  """Writes config.json and appends this start to runs.jsonl.

  Called once the run is known to start (config valid, checkpoint
  restored), so the record never describes a run that did not happen.
  """
  workdir = epath.Path(workdir)
  config_path = workdir / CONFIG
  try:
    changed = config_changes(json.loads(config_path.read_text()), config)
  except (OSError, ValueError):
    changed = None  # first start here (or an unreadable record)
  entry = {
    "time": _now(),
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start_step": start_step,
    "overrides": list(overrides),
    "changed": (
      None if changed is None else {k: list(v) for k, v in changed.items()}
    ),
  }
  write_config(workdir, config)
  paths.append_text(workdir / RUNS, json.dumps(entry) + "\n")


def write_config(workdir: epath.PathLike, config: Mapping[str, Any]) -> None:
  """<workdir>/config.json, replaced atomically (never half-written)."""
  paths.write_atomic(
    epath.Path(workdir) / CONFIG, json.dumps(config, indent=2, sort_keys=True)
  )
