"""Several processes on one box (jax.distributed on CPU): 2 processes x 4
devices against 1 x 8, preemption agreed across processes, restore across
process counts and meshes, and a lost process stopping the others."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from efficient_lm import config as config_lib
from efficient_lm.training import loop
from efficient_lm.training.checkpoint import Checkpointer
from tests.helpers import REPO, SMALL_FLAGS, cli_env, logged_losses

STEPS = 8
FLAGS = [
  *SMALL_FLAGS,
  f"--config.train.steps={STEPS}",
  "--config.checkpoint.every_steps=4",
]
TIMEOUT = 600


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(
  workdir,
  processes: int,
  devices: int,
  *extra,
  script=("-m", "efficient_lm.train"),
) -> list[subprocess.Popen]:
  """`processes` processes of `devices` CPU devices each, one run."""
  env = cli_env()
  env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  dist = []
  port = _port()
  procs = []
  for i in range(processes):
    if processes > 1:
      dist = [
        "--distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ]
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          *script,
          *FLAGS,
          f"--workdir={workdir}",
          *dist,
          *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return procs


def _finish(procs, check=True) -> list[str]:
  errs = []
  for p in procs:
    _, err = p.communicate(timeout=TIMEOUT)
    errs.append(err)
  if check:
    for p, err in zip(procs, errs, strict=True):
      assert p.returncode == 0, err[-3000:]
  return errs


def _run(workdir, processes, devices, *extra, **kw) -> list[str]:
  return _finish(_start(workdir, processes, devices, *extra, **kw))


def _final(workdir):
  """(step, params, data state) of the newest checkpoint, restored onto one
  device whatever mesh and process count saved it."""
  saved = json.load(open(os.path.join(workdir, "config.json")))
  saved["mesh"] = {"data": 1, "fsdp": 1, "tensor": 1}
  t = loop.build_trainer(config_lib.from_config_dict(saved), jax.devices()[:1])
  with Checkpointer(
    os.path.join(workdir, "checkpoints"),
    every_steps=4,
    keep=5,
    async_save=False,
  ) as ckpt:
    step, state, data_state = ckpt.restore_latest(t.abstract_state)
  return step, jax.device_get(state["params"]), data_state


def _assert_same_run(got, want, *, exact: bool, steps=None):
  """Losses at every step (or `steps`) and the final params and data."""
  a, b = logged_losses(want), logged_losses(got)
  steps = sorted(a) if steps is None else steps
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for s in steps:
    if exact:
      assert b[s] == a[s], (s, b[s], a[s])
    else:
      np.testing.assert_allclose(b[s], a[s], rtol=1e-5, err_msg=f"step {s}")
  step_a, params_a, data_a = _final(want)
  step_b, params_b, data_b = _final(got)
  assert step_a == step_b == STEPS and data_a == data_b
  check = (
    np.testing.assert_array_equal
    if exact
    else lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  )
  jax.tree.map(check, params_b, params_a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted run on 1 process x 8 devices and one on 2 x 4."""
  root = tmp_path_factory.mktemp("multihost")
  single, multi = root / "single", root / "multi"
  procs = _start(single, 1, 8) + _start(multi, 2, 4)
  _finish(procs)
  return {"single": single, "multi": multi, "root": root}


def test_two_processes_equal_one(runs):
  """Each process reads only its rows; the global batch, every step's loss
  and the final parameters are the single-process run's."""
  _assert_same_run(runs["multi"], runs["single"], exact=False)
  data_files = os.listdir(runs["multi"] / "checkpoints" / str(STEPS) / "data")
  assert {"process_0.json", "process_1.json"} <= set(data_files)


def test_sigterm_to_one_process_stops_both_at_one_step(runs, tmp_path):
  """SIGTERM to process 1 alone: both save the same step and exit 0; the
  resume is the uninterrupted 2-process run, bit for bit."""
  work = tmp_path / "preempted"
  errs = _run(
    work,
    2,
    4,
    "--crash_at=3",
    "--crash_signal=TERM",
    "--crash_process=1",
    script=("-m", "tests.crash_train"),
  )
  stopped = []
  for err in errs:
    at = re.findall(r"preempted at step (\d+)", err)
    assert len(at) == 1, err[-2000:]
    stopped.append(int(at[0]))
  assert stopped[0] == stopped[1] and 3 < stopped[0] < STEPS, stopped
  n = stopped[0]
  saved = sorted(
    int(p) for p in os.listdir(work / "checkpoints") if p.isdigit()
  )
  assert saved == sorted({4, n}), saved
  _run(work, 2, 4)
  _assert_same_run(work, runs["multi"], exact=True)


def _resume_from_step_4(src, dst):
  """A copy of run `src` as it was after its step-4 save."""
  shutil.copytree(src, dst)
  shutil.rmtree(dst / "checkpoints" / str(STEPS))


def test_one_process_checkpoint_resumes_on_two(runs, tmp_path):
  """Saved by 1 process (process_0.json only), resumed by 2, data position
  included: the rest of the run is the uninterrupted one's."""
  work = tmp_path / "one_to_two"
  _resume_from_step_4(runs["single"], work)
  errs = _run(work, 2, 4)
  assert "resumed from step 4" in errs[0]
  _assert_same_run(work, runs["single"], exact=False)


def test_two_process_checkpoint_resumes_on_one_with_another_mesh(
  runs, tmp_path
):
  """Saved by 2 processes on mesh (8, 1, 1), resumed by 1 on (2, 2, 2): the
  arrays are resharded on restore."""
  work = tmp_path / "two_to_one"
  _resume_from_step_4(runs["multi"], work)
  errs = _run(
    work,
    1,
    8,
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
  )
  assert "resumed from step 4" in errs[0]
  assert "mesh.data" in errs[0]  # the changed config is listed
  _assert_same_run(work, runs["multi"], exact=False)


def test_killed_process_stops_the_other_within_the_bound(tmp_path):
  """kill -9 of process 1: process 0 exits non-zero within the heartbeat
  timeout (plus slack), saying which process was lost."""
  heartbeat = 5
  procs = _start(
    tmp_path / "killed",
    2,
    4,
    "--crash_at=3",
    "--crash_process=1",
    f"--heartbeat_timeout={heartbeat}",
    script=("-m", "tests.crash_train"),
  )
  procs[1].communicate(timeout=TIMEOUT)
  killed_at = time.monotonic()
  assert procs[1].returncode == -signal.SIGKILL
  _, err = procs[0].communicate(timeout=TIMEOUT)
  took = time.monotonic() - killed_at
  assert procs[0].returncode != 0, err[-2000:]
  assert took < heartbeat + 15, took
  # Our line, or the runtime's own when it ends the process first.
  assert (
    "lost process 1 of 2" in err or "stopped sending heartbeats):\n1" in err
  ), err[-3000:]


def test_two_slices_over_dcn_equal_one_process(runs, tmp_path):
  """mesh.dcn=2 across 2 processes (CPU devices report one slice, so each
  process is a slice) x data 4: the batch is split over dcn x data and the
  run is the single-process data=8 run."""
  work = tmp_path / "dcn"
  _run(work, 2, 4, "--config.mesh.dcn=2")
  saved = json.load(open(work / "config.json"))["mesh"]
  assert (saved["dcn"], saved["data"]) == (2, 4), saved
  _assert_same_run(work, runs["single"], exact=False)


def test_step_one_process_cannot_read_is_set_aside_by_all(runs, tmp_path):
  """Process 1's iterator state of the newest step is damaged: both
  processes drop that step (renamed once, by process 0) and resume from the
  previous one, which ends as the uninterrupted run."""
  work = tmp_path / "damaged"
  shutil.copytree(runs["multi"], work)
  os.truncate(work / "checkpoints" / str(STEPS) / "data" / "process_1.json", 3)
  errs = _run(work, 2, 4)
  assert "resumed from step 4" in errs[0], errs[0][-2000:]
  names = os.listdir(work / "checkpoints")
  assert f"{STEPS}.corrupt" in names and f"{STEPS}.corrupt-1" not in names
  _assert_same_run(work, runs["multi"], exact=True)


def test_lost_processes_line_names_exactly_the_missing_ones():
  """Issue #25: our part of the lost-peer report, for known answers of the
  coordinator (the end-to-end test above may see the runtime's message
  instead of ours)."""
  from efficient_lm.multihost import lost_processes_line

  assert lost_processes_line([0, 2], 4, 0, 10) == (
    "error: lost processes 1, 3 of 4 (no heartbeat for 10 s: killed, "
    "crashed or its host gone); stopping process 0"
  )
  assert lost_processes_line([1], 2, 1, 5) == (
    "error: lost process 0 of 2 (no heartbeat for 5 s: killed, crashed or "
    "its host gone); stopping process 1"
  )
  assert lost_processes_line([0, 1], 2, 0, 5) is None  # all alive
  assert lost_processes_line(None, 2, 0, 5) is None  # no answer


@pytest.mark.parametrize("live", [[0, 2], None])
def test_exit_after_failure_reports_the_coordinators_answer(
  monkeypatch, capsys, live
):
  """Issue #25: the survivor's report around a known answer (no runtime):
  its own line, then the lost-process line, or the traceback and the
  no-answer line; status 1; the wait is the heartbeat timeout plus 5 s."""
  from efficient_lm import multihost

  asked = []
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(
    multihost, "live_processes", lambda s: asked.append(s) or live
  )

  def exit_(code):
    raise SystemExit(code)

  monkeypatch.setattr(multihost.os, "_exit", exit_)
  with pytest.raises(SystemExit) as stop:
    multihost.exit_after_failure(RuntimeError("peer closed"), 7)
  assert stop.value.code == 1 and asked == [12]
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert lines[0].startswith("error: process 0 of 3 stopped: ")
  assert "peer closed" in lines[0]
  if live is not None:
    assert lines[1:] == [
      "error: lost process 1 of 3 (no heartbeat for 7 s: killed, crashed "
      "or its host gone); stopping process 0"
    ]
  else:
    assert "Traceback" in err or "RuntimeError: peer closed" in err
    assert lines[-1].startswith(
      "error: the coordinator did not say within 12 s which processes are alive"
    )
    assert "lost process" not in err


def test_initialize_passes_our_failure_bound(monkeypatch):
  """Issue #25: the heartbeat and shutdown timeouts JAX gets are ours."""
  from efficient_lm import multihost

  got = {}
  monkeypatch.setattr(
    jax.distributed, "initialize", lambda **kw: got.update(kw)
  )
  multihost.initialize("host:1234", 2, 1, heartbeat_timeout_s=9)
  assert got == {
    "coordinator_address": "host:1234",
    "num_processes": 2,
    "process_id": 1,
    "heartbeat_timeout_seconds": 9,
    "shutdown_timeout_seconds": 9,
  }
  with pytest.raises(ValueError, match="--heartbeat_timeout=0"):
    multihost.initialize(None, None, None, heartbeat_timeout_s=0)
