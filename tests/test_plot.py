"""efficient_lm.plot: curves from metrics.jsonl, FLOPs from the config."""

import json
import os
import subprocess
import sys

import pytest

from efficient_lm import plot
from efficient_lm.models import flops as flops_lib
from tests.helpers import REPO, cli_env, small_config

pytest.importorskip("matplotlib")


def _fake_run(path, cfg, rows):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(cfg.to_json())
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    f.write('{"step": 9, "lo')  # a line cut short by a kill


def test_metrics_keep_the_resumed_rows_and_skip_a_torn_line(tmp_path):
  _fake_run(
    tmp_path,
    small_config(),
    [
      {"step": 1, "loss": 5.0},
      {"step": 2, "loss": 4.0},
      {"step": 2, "loss": 3.5},
      {"step": 2, "eval_loss": 3.9},
    ],
  )
  train, evals = plot.read_metrics(str(tmp_path))
  assert train == [(1, 5.0), (2, 3.5)] and evals == [(2, 3.9)]


def test_flops_per_step_is_the_plan_times_the_batch(tmp_path):
  cfg = small_config(**{"model.num_layers": 4, "data.seq_len": 64})
  _fake_run(tmp_path, cfg, [{"step": 1, "loss": 1.0}])
  per_token = flops_lib.flops_per_token(cfg.model, 64)["train"]
  assert plot.flops_per_step(str(tmp_path)) == pytest.approx(
    per_token * cfg.train.batch_size * 64
  )


def test_curves_cli_writes_a_png_and_bad_workdir_is_one_line(tmp_path):
  for name, n in (("a", 2), ("b", 4)):
    _fake_run(
      tmp_path / name,
      small_config(**{"model.num_layers": n}),
      [{"step": s, "loss": 5.0 / s} for s in range(1, 6)]
      + [{"step": 5, "eval_loss": 1.2}],
    )
  out = tmp_path / "loss.png"
  env = cli_env()
  cmd = [
    sys.executable,
    "-m",
    "efficient_lm.plot",
    "curves",
    f"--workdir={tmp_path / 'a'}",
    f"--workdir={tmp_path / 'b'}",
    f"--out={out}",
  ]
  proc = subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  cmd[-2] = f"--workdir={tmp_path / 'missing'}"
  proc = subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
    f"error: --workdir={tmp_path / 'missing'}: no metrics.jsonl (not a run "
    "directory, or it has not logged a step yet)"
  ]
