"""runs.write_run: a run written from given weights at step 0 reads back
bitwise, trains on from step 0 through the CLI, evaluates and generates."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_lm import models, runs, sharding
from efficient_lm.generate import Generator
from efficient_lm.training import loop
from efficient_lm.training.fingerprints import flat
from tests.helpers import (
  REPO,
  cli_env,
  logged_losses,
  small_config,
  snapshot,
)

SOURCE = {"from": "tests/test_runs.py", "init_seed": 123, "scale": 1.5}


def _weights(cfg):
  """Parameters unlike the config's own initialisation (another seed,
  scaled), as a pure dict of numpy arrays; the model state as nnx.State."""
  model = models.build(cfg.model, nnx.Rngs(params=123))
  _, params, model_state = nnx.split(model, nnx.Param, models.ModelState)
  params = jax.tree.map(
    lambda p: np.asarray(p) * np.asarray(1.5, p.dtype),
    nnx.to_pure_dict(params),
  )
  return params, model_state


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  cfg = small_config(**{"train.steps": 3, "train.eval_every": 100})
  params, model_state = _weights(cfg)
  workdir = runs.write_run(
    str(root / "run"), cfg, params, model_state, None, SOURCE
  )
  return types.SimpleNamespace(
    root=root,
    workdir=workdir,
    cfg=cfg,
    params=params,
    model_state=nnx.to_pure_dict(model_state),
  )


def test_load_run_gives_back_the_written_params(written):
  run = runs.load_run(written.workdir)
  assert run.step == 0
  got = jax.device_get(run.params)
  assert jax.tree.structure(got) == jax.tree.structure(written.params)
  for a, b in zip(
    jax.tree.leaves(got), jax.tree.leaves(written.params), strict=True
  ):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  default = jax.device_get(
    loop.build_trainer(written.cfg, jax.devices()[:1]).init_fn()["params"]
  )
  assert not np.array_equal(
    jax.tree.leaves(default)[0], jax.tree.leaves(got)[0]
  )
  with open(os.path.join(written.workdir, "config.json")) as f:
    assert json.load(f) == json.loads(written.cfg.to_json())
  with open(os.path.join(written.workdir, "provenance.json")) as f:
    record = json.load(f)
  assert record["source"] == SOURCE and record["step"] == 0
  assert record["host"] == socket.gethostname() and record["time"]
  assert sorted(os.listdir(os.path.join(written.workdir, "checkpoints"))) == [
    "0"
  ]


def test_load_run_evaluates_and_generates(written):
  run = runs.load_run(written.workdir)
  result = runs.evaluate(run, num_batches=2)
  assert result["step"] == 0 and math.isfinite(result["loss"])
  # The same weights merged by hand decode the same greedy tokens.
  graphdef, _, _ = nnx.split(
    models.build(written.cfg.model, nnx.Rngs(0)), nnx.Param, models.ModelState
  )
  model = nnx.merge(graphdef, written.params, written.model_state)
  prompts = [[40, 41, 42, 43], [7, 3]]
  want, _ = Generator(*nnx.split(model)).generate(prompts, max_new_tokens=6)
  got, _ = Generator(run.graphdef, run.variables, mesh=run.mesh).generate(
    prompts, max_new_tokens=6
  )
  assert got == want and all(len(g) == 6 for g in got)


def _step_1_losses(cfg, params, model_state):
  """The first training step's loss, in this process, of a run of `cfg`
  from these weights and of one from the config's own initialisation."""
  t = loop.build_trainer(cfg, jax.devices()[:1])
  it = loop.make_iterator(t, loop.make_tokenizer(cfg), "train")
  batch = sharding.host_to_global(t.mesh, next(it))
  return [
    float(t.train_step(state, batch)[1]["loss"])
    for state in (loop.start_state(t, params, model_state), t.init_fn())
  ]


def test_train_cli_continues_from_step_0(written):
  workdir = written.root / "trained"
  shutil.copytree(written.workdir, workdir)
  # A config file that is the written run's config.json.
  config_py = written.root / "run_config.py"
  config_py.write_text(
    "import json\nimport ml_collections\n\n\ndef get_config():\n"
    f"  with open({str(workdir / 'config.json')!r}) as f:\n"
    "    return ml_collections.ConfigDict(json.load(f))\n"
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.train",
      f"--config={config_py}",
      f"--workdir={workdir}",
      "--config.train.log_every=1",
    ],
    cwd=REPO,
    env=cli_env(),
    check=False,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 0" in proc.stderr
  with open(workdir / "runs.jsonl") as f:
    [start] = [json.loads(line) for line in f]
  assert start["start_step"] == 0 and start["changed"] == {
    "train.log_every": [written.cfg.train.log_every, 1]
  }
  losses = logged_losses(workdir)
  assert sorted(losses) == [1, 2, 3]
  want, fresh = _step_1_losses(written.cfg, written.params, written.model_state)
  np.testing.assert_allclose(losses[1], want, rtol=1e-6)
  assert abs(losses[1] - fresh) > 1e-3  # the written weights made the loss
  assert runs.load_run(str(workdir)).step == 3


def test_write_run_refuses_a_non_empty_workdir(written, tmp_path):
  cfg, params, state = written.cfg, written.params, written.model_state
  before = snapshot(written.workdir)
  with pytest.raises(runs.RunError, match="exists and is not empty"):
    runs.write_run(written.workdir, cfg, params, state)
  assert snapshot(written.workdir) == before
  (tmp_path / "notes.txt").write_text("mine")
  before = snapshot(tmp_path)
  with pytest.raises(runs.RunError) as e:
    runs.write_run(str(tmp_path), cfg, params, state)
  assert len(str(e.value).splitlines()) == 1
  assert snapshot(tmp_path) == before


def test_write_run_refuses_weights_of_another_shape(written, tmp_path):
  leaves, treedef = jax.tree.flatten(written.params)
  key = next(iter(flat(written.params)))
  leaves[0] = leaves[0][..., :-1]
  with pytest.raises(runs.RunError, match=f"params key '{key}': given"):
    runs.write_run(
      str(tmp_path / "new"),
      written.cfg,
      jax.tree.unflatten(treedef, leaves),
      written.model_state,
    )
  assert not (tmp_path / "new").exists()
