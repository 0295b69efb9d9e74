"""End-to-end training: logs, checkpoints, resume after a kill, SIGTERM, NaN."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from efficient_lm.training import loop
from tests.helpers import (
  REPO,
  SMALL_FLAGS,
  cli_env,
  final_state,
  logged_losses,
  small_config,
  train_cli,
)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  train_cli(straight)
  proc = train_cli(
    crashed,
    "--crash_at=12",
    "--crash_after_checkpoint=10",
    script=("-m", "tests.crash_train"),
    check=False,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  # It really died mid-run, after checkpoint 10 (metrics are read one step
  # late, so the last logged step is 11 or 12).
  assert 10 < max(logged_losses(crashed)) <= 12
  killed_rows = logged_losses(crashed)
  resumed = train_cli(crashed)
  assert "resumed from step 10" in resumed.stderr
  runs = [json.loads(x) for x in open(crashed / "runs.jsonl")]
  assert [r["start_step"] for r in runs] == [0, 10]

  a, b = logged_losses(straight), logged_losses(crashed)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])  # bit-identical
  assert all(killed_rows[s] == b[s] for s in killed_rows)
  step_a, params_a, data_a = final_state(straight)
  step_b, params_b, data_b = final_state(crashed)
  assert step_a == step_b == 20
  assert data_a == data_b  # data position included
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  # Loss clearly falls even in 20 steps of this tiny model.
  assert a[20] < a[1] - 1.0


def test_run_writes_metrics_checkpoints_and_summary(tmp_path, capsys):
  cfg = small_config(
    **{
      "train.steps": 12,
      "train.log_every": 4,
      "train.eval_every": 6,
      "train.eval_batches": 2,
      "checkpoint.every_steps": 6,
      "mesh.data": 8,
    }
  )
  summary = loop.run(cfg, str(tmp_path))  # data-parallel over 8 devices
  records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  train_recs = [r for r in records if "tokens_per_sec" in r]
  assert [r["step"] for r in train_recs] == [4, 8, 12]
  for r in train_recs:
    assert {"loss", "grad_norm", "learning_rate", "step_time"} <= set(r)
    assert r["tokens_per_sec"] > 0 and r["gflops_per_sec"] > 0
  assert [r["step"] for r in records if "eval_loss" in r][:2] == [6, 12]
  assert os.listdir(tmp_path / "tensorboard")
  assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 12
  assert summary["latest_checkpoint"] == 12
  assert summary["eval_loss"] is not None and summary["tokens_per_sec"] > 0
  err = capsys.readouterr().err
  assert "Run completed at step 12" in err and "tokens/s" in err


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "efficient_lm.train",
    *SMALL_FLAGS,
    f"--workdir={workdir}",
    "--config.train.steps=100000",
  ]
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env=cli_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (
    not metrics.exists() or len(metrics.read_text().splitlines()) < 3
  ):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "Run preempted at step" in err
  steps = sorted(
    int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()
  )
  assert steps and steps[-1] >= 3
  assert steps[-1] == max(logged_losses(workdir))  # saved where it stopped


def test_sigterm_during_evaluation_saves_that_step(tmp_path, monkeypatch):
  real_evaluate = loop.evaluate

  def evaluate_then_preempted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-evaluation
    return real_evaluate(*args, **kwargs)

  monkeypatch.setattr(loop, "evaluate", evaluate_then_preempted)
  cfg = small_config(
    **{
      "train.steps": 12,
      "train.eval_every": 3,
      "train.eval_batches": 2,
      "checkpoint.every_steps": 10,
      "mesh.data": 8,
    }
  )
  summary = loop.run(cfg, str(tmp_path))
  assert summary["status"] == "preempted" and summary["final_step"] == 3
  assert os.listdir(tmp_path / "checkpoints") == ["3"]


def test_nan_before_any_save_says_there_is_no_checkpoint(tmp_path):
  cfg = small_config(
    **{
      "train.learning_rate": 1e12,
      "train.grad_clip": 0.0,
      "train.steps": 60,
      "checkpoint.every_steps": 1000,
      "mesh.data": 8,
    }
  )
  with pytest.raises(loop.TrainingError) as e:
    loop.run(cfg, str(tmp_path))
  assert "None" not in str(e.value)
  assert "no checkpoint was saved before this" in str(e.value)


def test_cli_log_lines_without_a_terminal_and_without_libtpu(tmp_path):
  env = cli_env()
  del env["JAX_PLATFORMS"]  # what a user's shell has
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.train",
      *SMALL_FLAGS,
      f"--workdir={tmp_path}",
      "--config.train.steps=4",
      "--config.train.log_every=2",
      "--config.train.eval_every=2",
      "--verbosity=0",
    ],  # jax logs, at INFO, each backend it tries
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = proc.stderr
  # stderr is a pipe here: plain lines, no carriage-return bar.
  assert "\r" not in err
  for line in ("step 1/4: loss ", "step 2/4: eval loss ", "step 4/4: loss "):
    assert f"\n{line}" in err, err[-3000:]
  # The first step is logged (the step-1 loss the README quotes).
  assert min(logged_losses(tmp_path)) == 1
  # A CPU run never asks libtpu for a TPU.
  for libtpu_line in (
    "backend 'tpu'",
    "TPU_WORKER_HOSTNAMES",
    "Failed to find host bounds",
    "Source Location Trace",
  ):
    assert libtpu_line not in err


def test_nan_loss_stops_with_message_and_keeps_good_checkpoint(tmp_path):
  proc = train_cli(
    tmp_path,
    "--config.train.learning_rate=1e12",
    "--config.train.grad_clip=0.0",
    "--config.train.steps=60",
    "--config.checkpoint.every_steps=2",
    check=False,
  )
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: loss=") and "last good checkpoint" in last
  good = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  losses = logged_losses(tmp_path)
  assert all(np.isfinite(losses[s]) for s in good)


@pytest.mark.parametrize(
  "flags,message",
  [
    (
      ["--config.model.num_kv_heads=3"],
      "model.num_heads=4 is not divisible by model.num_kv_heads=3",
    ),
    (
      ["--config.train.batch_size=6", "--config.mesh.fsdp=4"],
      "mesh.fsdp*mesh.tensor=4*1 does not divide the 1 available devices",
    ),
    (["--config.mesh.data=2"], "=2 does not match the 1 available devices"),
    (["--config.model.vocab_size=128"], "model.vocab_size=128 is smaller than"),
    (["--config.data.seq_len=100000000"], "seq_len=100000000"),
    (["--config.model.no_such_key=1"], "no_such_key"),
    (
      ["--config.data.source=text", "--config.data.path=/nonexistent/x.txt"],
      "/nonexistent/x.txt",
    ),
    (
      ["--config=configs/nope.py", "--config.train.steps=3"],
      "config file 'configs/nope.py' does not exist",
    ),
    (
      ["--config={tmp}/bad.py"],
      "config file {tmp}/bad.py, line 2: '(' was never closed",
    ),
    (
      ["--config.train.learnig_rate=1"],
      "unknown config key 'learnig_rate' in --config.train.learnig_rate=1; "
      'did you mean "learning_rate"',
    ),
    (
      ["--config.train.learning_rate=-0.001"],
      "train.learning_rate=-0.001: expected >= 0",
    ),
    (
      ["--config.train.end_learning_rate=0.1"],
      "train.end_learning_rate=0.1: expected between 0 and the peak "
      "train.learning_rate=0.002",
    ),
    (
      ["--config.train.warmup_steps=50"],
      "train.warmup_steps=50: expected between 0 and train.steps=20",
    ),
  ],
)
def test_cli_bad_config_is_one_line_error(tmp_path, flags, message):
  (tmp_path / "bad.py").write_text("def get_config():\n  return dict(\n")
  flags = [f.format(tmp=tmp_path) for f in flags]
  message = message.format(tmp=tmp_path)
  proc = train_cli(tmp_path / "run", *flags, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-1500:]
  assert lines[0].startswith("error: ") and message in lines[0], lines[0]
  assert "\\" not in lines[0]  # no escaped quotes or newlines
