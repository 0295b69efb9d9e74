"""Bad input to the generate, plot and compile-only commands: exactly one
`error:` line on stderr and exit status 1, never a traceback (issue #23).

One char-level decoder run and one funnel-encoder run (written at step 0,
untrained) serve every case; each case is one subprocess, as a user runs
it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from flax import nnx

from efficient_lm import models, runs
from tests.helpers import REPO, cli_env, small_config


def _write(workdir, cfg):
  """A run at step 0 from its initial weights (runs.write_run: nothing
  trains or compiles a train step)."""
  model = models.build(cfg.model, nnx.Rngs(params=0))
  _, params, model_state = nnx.split(model, nnx.Param, models.ModelState)
  runs.write_run(str(workdir), cfg, params, model_state)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_errors")
  (root / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n")
  data = {
    "data.source": "text",
    "data.path": str(root / "t.txt"),
    "data.tokenizer": "char",
  }
  _write(root / "char", small_config(**data))
  funnel = {
    "model.kind": "funnel_encoder",
    "model.funnel.stages": (1, 1),
    "train.objective": "mlm",
  }
  _write(root / "funnel", small_config(**data, **funnel))
  return root


def _run(module, *args, env=None):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=cli_env() if env is None else env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _one_error_line(proc) -> str:
  """The single line of stderr, which must be an `error:` line of a
  command that exited 1."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: "), lines
  return lines[0]


def test_generate_bad_input_is_one_error_line(trained):
  (trained / "not_a_run").mkdir()
  (trained / "no_checkpoint" / "checkpoints").mkdir(parents=True)
  shutil.copy(trained / "char" / "config.json", trained / "no_checkpoint")
  cases = {
    "missing": (["--prompt=the"], "does not exist"),
    "not_a_run": (["--prompt=the"], "is not a training run"),
    "no_checkpoint": (["--prompt=the"], "has no committed checkpoint"),
    "char": (["--prompt=theZ"], "'Z' at character 3 is not in the char"),
    "funnel": (["--prompt=the"], "it cannot generate"),
  }
  for name, (args, message) in cases.items():
    proc = _run("efficient_lm.generate", f"--workdir={trained / name}", *args)
    assert message in _one_error_line(proc), (name, proc.stderr)
  # Checked against the positions the model addresses, before allocating.
  proc = _run(
    "efficient_lm.generate",
    f"--workdir={trained / 'char'}",
    "--prompt=the",
    f"--max_new_tokens={10**12}",
  )
  assert _one_error_line(proc) == (
    f"error: prompt of 3 tokens + max_new_tokens={10**12} = {10**12 + 3} "
    "positions exceeds the 2147483647 the model can address (int32 "
    "positions)"
  )


def test_generate_on_a_corrupt_newest_checkpoint_prints_two_lines(trained):
  """The read falls back to step 0 with one `checkpoint:` line; the
  tensorstore noise of the bad read ("Event loop is closed" tracebacks,
  3 runs in 7 before) stays off the console."""
  ckpts = trained / "corrupt" / "checkpoints"
  shutil.copytree(trained / "char", trained / "corrupt")
  shutil.copytree(ckpts / "0", ckpts / "1")  # a newer step, then broken
  for d, _, files in os.walk(ckpts / "1" / "state"):
    for name in files:
      path = os.path.join(d, name)
      if os.sep + "d" + os.sep in path:  # the array data files
        os.truncate(path, os.path.getsize(path) // 2)
  proc = _run(
    "efficient_lm.generate",
    f"--workdir={trained / 'corrupt'}",
    "--prompt=the",
    "--max_new_tokens=2",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert [line.split(" ", 2)[:2] for line in lines] == [
    ["checkpoint:", "step"],
    ["generate:", "step"],
  ], proc.stderr[-3000:]
  assert "step 1 in" in lines[0] and "step 0 of" in lines[1]


def test_plot_bad_input_is_one_error_line(trained):
  """No JAX_PLATFORMS, as a user runs it: plot applies the CPU-only rule
  (where libtpu is installed, it would otherwise load it and print its
  error-looking lines first)."""
  pytest.importorskip("matplotlib")
  env = cli_env(drop=("TPU_",))
  del env["JAX_PLATFORMS"]
  proc = _run(
    "efficient_lm.plot",
    "routing",
    f"--workdir={trained / 'funnel'}",
    "--text=the",
    f"--out={trained / 'routing.png'}",
    env=env,
  )
  assert _one_error_line(proc) == (
    f"error: {trained / 'funnel'}: a FunnelEncoder model has no routed layers"
  )
  out = trained / "missing" / "loss.png"
  proc = _run(
    "efficient_lm.plot",
    "curves",
    f"--workdir={trained / 'char'}",
    f"--out={out}",
  )
  assert _one_error_line(proc) == (
    f"error: --out={out}: directory {out.parent} does not exist"
  )


def test_compile_only_without_libtpu_names_the_setup_command(tmp_path):
  """As on a machine set up without the dev extra: libtpu is not found."""
  hide = (
    "import importlib.util, runpy, sys; real = importlib.util.find_spec; "
    "importlib.util.find_spec = lambda name, *a: "
    "None if name == 'libtpu' else real(name, *a); "
    "sys.argv[0] = 'train'; "
    "runpy.run_module('efficient_lm.train', run_name='__main__')"
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      hide,
      f"--config={REPO}/configs/tiny.py",
      "--compile_only",
      "--topology=v5e-4",
    ],
    cwd=tmp_path,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  line = _one_error_line(proc)
  assert line.startswith("error: --compile_only needs libtpu"), line
  assert "launch/setup_env.sh dev" in line
