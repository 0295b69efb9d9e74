"""One train step is the same on any mesh; parameters are sharded by rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from efficient_lm import sharding
from efficient_lm.training import loop
from tests.helpers import small_config, two_train_steps

# Float32 everywhere; differences come only from reduction order across
# devices. Loss: rtol 1e-5. Parameters after two AdamW steps (warmup from 0:
# lr 0, then 5e-4) move by ~lr * g / (|g| + 1e-8): where a gradient is
# rounding noise near Adam's eps, reduction order moves the update by up to
# ~1% of lr (seen: 3.5e-6 in one embedding entry). atol 1e-5 = 2% of lr; a
# wrong update is off by ~lr.
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5


def _two_steps(cfg, devices=None):
  """The first step's metrics; the parameters after the second step (the
  first one's learning rate is 0 and leaves them as they were)."""
  t = loop.build_trainer(cfg, devices)
  state = t.init_fn()
  init_params = jax.device_get(state["params"])
  state, metrics = two_train_steps(t, state)
  return t, state, metrics, init_params


@pytest.fixture(scope="module")
def single_device():
  cfg = small_config(**{"mesh.data": 1})
  _, state, metrics, init = _two_steps(cfg, jax.devices()[:1])
  return jax.device_get(state["params"]), metrics, init


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_train_step_matches_single_device(single_device, mesh_shape):
  ref_params, ref_metrics, ref_init = single_device
  d, f, tp = mesh_shape
  cfg = small_config(**{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": tp})
  t, state, metrics, init = _two_steps(cfg)
  jax.tree.map(np.testing.assert_array_equal, init, ref_init)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"],
                             rtol=LOSS_RTOL)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"],
                             rtol=1e-4)
  params = jax.device_get(state["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL),
               params, ref_params)
  # Every parameter moved by about the lr (5e-4), far beyond the tolerance,
  # so the comparison above checks the update, not the init again.
  jax.tree.map(lambda a, b: np.testing.assert_array_less(
    25 * PARAM_ATOL, np.max(np.abs(a - b))), params, init)

  # Parameters are really laid out as the rules table says.
  p = state["params"]
  table = p["embed"]["table_VD"]
  assert table.sharding.spec == P("tensor", "fsdp")
  layer = p["stack"]["groups"]["segment_0"]["layer_0"]
  wq = layer["attn"]["q_DHK"]                   # [layers, D, H, K]
  assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
  down = layer["mlp"]["down_FD"]                # [layers, F, D]
  assert down.sharding.spec == P(None, "tensor", "fsdp")
  shard = table.addressable_shards[0].data.shape
  assert shard == (table.shape[0] // tp, table.shape[1] // f)
  # Adam moments follow their parameter's sharding.
  mu = state["opt_state"][1][0].mu["embed"]["table_VD"]
  assert mu.sharding.spec == table.sharding.spec


def test_activations_are_constrained_and_attention_is_shard_mapped():
  cfg = small_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  t = loop.build_trainer(cfg)
  bs = sharding.batch_sharding(t.mesh)
  batch = {k: jax.ShapeDtypeStruct((8, cfg.data.seq_len), "int32",
                                   sharding=bs)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  text = t.train_step.lower(t.abstract_state, batch).as_text()
  # Logical activation names reach the partitioner ...
  assert text.count("sdy.sharding_constraint") >= cfg.model.num_layers
  # ... and the attention kernel runs per shard (one forward, and the
  # backward of each scanned layer body).
  assert "sdy.manual_computation" in text


def test_logical_rules_do_not_reuse_a_mesh_axis():
  # 'batch' uses data+fsdp; 'embed' (fsdp) in the same spec must replicate.
  assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"),
                                                          None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("no_such_axis",))
