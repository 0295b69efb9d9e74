"""`model.scan_layers` is a compile-time switch only, through the CLI: with
12 layers (layer names past layer_9) and strong weight decay (decay decided
per parameter kind), scanned and unrolled runs from the same seed start
from the same parameters and give the same losses and final parameters up
to float rounding."""

import json
import os

import jax
import numpy as np

from efficient_lm import config as config_lib
from efficient_lm.training import loop
from tests.helpers import final_state, logged_losses, train_cli

# On top of test_train's small flags (later overrides win).
FLAGS = [
  "--config.model.num_layers=12",
  "--config.model.embed_dim=32",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=1",
  "--config.model.mlp_dim=64",
  "--config.data.seq_len=16",
  "--config.train.batch_size=4",
  "--config.train.steps=6",
  "--config.train.warmup_steps=1",
  "--config.train.weight_decay=5.0",
  "--config.train.learning_rate=0.01",
  "--config.checkpoint.every_steps=6",
]


def _run(workdir, scan):
  train_cli(workdir, *FLAGS, f"--config.model.scan_layers={scan}")
  step, params, _ = final_state(workdir)
  assert step == 6
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = config_lib.from_config_dict(json.load(f))
  t = loop.build_trainer(cfg, jax.devices()[:1])
  return logged_losses(workdir), params, t


def test_scanned_and_unrolled_train_alike(tmp_path):
  losses_s, params_s, t_s = _run(tmp_path / "scan", True)
  losses_u, params_u, t_u = _run(tmp_path / "unrolled", False)
  # Same initial parameters from the same seed.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(t_s.init_fn()["params"]),
    jax.device_get(t_u.init_fn()["params"]),
  )
  assert sorted(losses_s) == list(range(1, 7))
  np.testing.assert_allclose(
    [losses_u[s] for s in sorted(losses_u)],
    [losses_s[s] for s in sorted(losses_s)],
    rtol=1e-5,
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_u, params_s
  )
