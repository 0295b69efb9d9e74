"""One run per workdir: the lock, the run record, config checks on resume."""

import io
import json
import os
import socket
import subprocess
import sys

import pytest

from efficient_lm.training import console, loop, metrics
from efficient_lm.training.checkpoint import CheckpointError
from efficient_lm.training.workdir import (
  WorkdirBusy,
  WorkdirLock,
  config_changes,
)
from tests.helpers import small_config
from tests.helpers import REPO, SMALL_FLAGS, cli_env


def test_second_run_on_a_held_workdir_fails_fast(tmp_path):
  # This test process plays the first run: it holds the lock.
  with WorkdirLock(str(tmp_path)):
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "efficient_lm.train",
        *SMALL_FLAGS,
        f"--workdir={tmp_path}",
      ],
      cwd=REPO,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=300,
    )
  assert proc.returncode != 0
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("error: workdir ") and "in use by another run" in line
  assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in line
  # The first run's workdir is untouched: no record, metrics or checkpoints.
  assert sorted(os.listdir(tmp_path)) == ["lock"]


def test_lock_of_a_dead_run_is_taken_over(tmp_path, capfd):
  # What a kill -9 leaves: a holder record, but no live flock on the file.
  (tmp_path / "lock").write_text(
    json.dumps(
      {"host": "gone-host", "pid": 999999, "since": "2026-01-01T00:00:00"}
    )
  )
  with WorkdirLock(str(tmp_path)):
    holder = json.loads((tmp_path / "lock").read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
      WorkdirLock(str(tmp_path)).__enter__()
  err = capfd.readouterr().err
  assert "taking over the lock of a run that is gone" in err
  assert "host gone-host, pid 999999" in err
  assert (tmp_path / "lock").read_text() == ""  # released: free again
  with WorkdirLock(str(tmp_path)):
    pass
  assert "taking over" not in capfd.readouterr().err


def test_workdir_record_across_starts(tmp_path, capfd):
  """A finished run, a failed start with another model, a longer schedule."""
  workdir = str(tmp_path)
  base = {
    "train.steps": 4,
    "train.log_every": 2,
    "train.eval_every": 100,
    "checkpoint.every_steps": 4,
    "mesh.data": 8,
  }
  loop.run(small_config(**base), workdir, overrides=["--config.x=1"])
  capfd.readouterr()
  before = {
    name: (tmp_path / name).read_bytes()
    for name in ("config.json", "runs.jsonl", "metrics.jsonl")
  }
  checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))

  other_model = small_config(**base, **{"model.num_layers": 3})
  with pytest.raises(CheckpointError) as e:
    loop.run(other_model, workdir)
  message = str(e.value)
  assert "holds another model: model.num_layers=2 there, 3 in this" in message
  assert {name: (tmp_path / name).read_bytes() for name in before} == before
  assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints

  summary = loop.run(small_config(**base), workdir)
  assert summary["status"] == "already_complete"
  err = capfd.readouterr().err
  assert (
    f"Run already complete at step 4 (train.steps=4): results in "
    f"{workdir}" in err
  )
  assert (tmp_path / "runs.jsonl").read_bytes() == before["runs.jsonl"]

  longer = small_config(**{**base, "train.steps": 6})
  assert loop.run(longer, workdir)["final_step"] == 6
  [changed] = [
    line
    for line in capfd.readouterr().err.splitlines()
    if "changed config" in line
  ]
  assert changed.endswith("with a changed config: train.steps 4 -> 6")
  runs = [json.loads(x) for x in open(tmp_path / "runs.jsonl")]
  assert [r["start_step"] for r in runs] == [0, 4]
  assert runs[0]["overrides"] == ["--config.x=1"] and runs[0]["changed"] is None
  assert runs[1]["changed"] == {"train.steps": [4, 6]}
  assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 6


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_on_a_terminal_and_lines_elsewhere():
  tty, log = _Terminal(), io.StringIO()
  for stream in (tty, log):
    p = console.Progress(10, 0, enabled=True, stream=stream)
    p.advance()
    p.logged(1, 5.5, None)
    p.evaluated(5, 4.25)
    p.logged(10, 3.0, 2000.0)
    p.close()
  assert "loss=3.0000" in tty.getvalue() and "eval=4.2500" in tty.getvalue()
  assert log.getvalue().splitlines() == [
    "step 1/10: loss 5.5000",
    "step 5/10: eval loss 4.2500",
    "step 10/10: loss 3.0000, 2.00k tokens/s",
  ]


def _tensorboard_events(directory):
  """Every Event in the TFRecord files under `directory`, in file order."""
  import struct
  from tensorboardX.proto import event_pb2

  events = []
  for name in sorted(os.listdir(directory)):
    raw = open(os.path.join(directory, name), "rb").read()
    pos = 0
    while pos < len(raw):  # u64 length, u32 crc, data, u32 crc
      (n,) = struct.unpack_from("<Q", raw, pos)
      events.append(event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + n]))
      pos += 12 + n + 4
  return events


def test_resumed_writer_drops_the_killed_runs_later_rows(tmp_path):
  first = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 8):
    first.write(step, {"loss": float(step)})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "lo')  # torn by the kill
  resumed = metrics.MetricWriter(str(tmp_path), start_step=5)
  resumed.write(6, {"loss": 60.0})
  resumed.close()
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in rows] == [
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
    (4, 4.0),
    (5, 5.0),
    (6, 60.0),
  ]
  # Both event files are kept (even within one second), and TensorBoard is
  # told to discard the first run's events from step 6 on.
  events = _tensorboard_events(tmp_path / "tensorboard")
  assert sorted(e.step for e in events if e.summary.value) == [
    1,
    2,
    3,
    4,
    5,
    6,
    6,
    7,
  ]
  assert [e.step for e in events if e.HasField("session_log")] == [6]


def test_config_changes_read_tuples_back_from_json():
  """config.json and a checkpoint's saved config hold tuples as JSON lists:
  the same tuple-valued field is no change, a different one is."""
  cfg = {"model": {"funnel": {"stages": (12, 24)}, "num_layers": 4}}
  saved = json.loads(json.dumps(cfg))
  assert config_changes(saved, cfg) == {}
  other = {"model": {"funnel": {"stages": (12, 12)}, "num_layers": 4}}
  assert config_changes(saved, other) == {
    "model.funnel.stages": ([12, 24], [12, 12])
  }
