"""The host-memory check: a pod-sized config stops before allocating."""

import os
import subprocess
import sys

import jax
import numpy as np

from efficient_lm.training import loop, memory
from tests.helpers import REPO, cli_env, small_config


def _trainer(mesh):
  cfg = small_config(
    **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]}
  )
  return loop.build_trainer(cfg, jax.devices()[: int(np.prod(mesh))])


def test_state_bytes_are_per_shard_plus_gradients():
  # Adam: params + mu + nu (+ the step counts), plus one gradient per param;
  # fsdp 8 shards every matrix 8 ways, so the count is ~1/8 of one device's.
  one = _trainer((1, 1, 1))
  params = sum(
    a.size * a.dtype.itemsize
    for a in jax.tree.leaves(one.abstract_state["params"])
  )
  full = memory.state_bytes_per_device(one.abstract_state)
  assert 4 * params <= full < 4 * params + 4096
  sharded = memory.state_bytes_per_device(_trainer((1, 8, 1)).abstract_state)
  assert full / 8 <= sharded < full / 8 * 1.1  # norms stay replicated


def test_too_big_is_one_line_naming_need_host_and_ways_forward():
  t = _trainer((1, 1, 1))
  need = memory.state_bytes_per_device(t.abstract_state)
  mesh1 = t.mesh
  assert (
    memory.fits_problem(t.abstract_state, mesh1, num_params=10, available=need)
    is None
  )
  msg = memory.fits_problem(
    t.abstract_state,
    mesh1,
    num_params=10,
    topology="v5p-32",
    available=need - 1,
  )
  assert "\n" not in msg
  assert f"needs {need / memory.GIB:.1f} GiB of host memory" in msg
  assert "--compile_only --topology=v5p-32" in msg
  assert "configs/tiny" in msg


def test_cli_stops_before_allocating(tmp_path):
  # 4.3B parameters: 64 GiB of state, more than this machine (or CI) has.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.train",
      "--config=configs/tiny.py",
      f"--workdir={tmp_path}",
      "--config.model.embed_dim=4096",
      "--config.model.mlp_dim=16384",
      "--config.model.num_layers=16",
      "--config.model.num_heads=32",
      "--config.model.num_kv_heads=32",
    ],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
    "error: the training state needs 64.0 GiB"
  ), lines
  assert not os.path.exists(tmp_path / "checkpoints")
  assert not os.path.exists(tmp_path / "runs.jsonl")
