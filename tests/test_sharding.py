"""One train step is the same on any mesh; parameters are sharded by rules."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from efficient_lm import sharding
from efficient_lm.config import ConfigError, MeshConfig
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
  np.testing.assert_allclose(
    metrics["loss"], ref_metrics["loss"], rtol=LOSS_RTOL
  )
  np.testing.assert_allclose(
    metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4
  )
  params = jax.device_get(state["params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL),
    params,
    ref_params,
  )
  # Every parameter moved by about the lr (5e-4), far beyond the tolerance,
  # so the comparison above checks the update, not the init again.
  jax.tree.map(
    lambda a, b: np.testing.assert_array_less(
      25 * PARAM_ATOL, np.max(np.abs(a - b))
    ),
    params,
    init,
  )

  # Parameters are really laid out as the rules table says.
  p = state["params"]
  table = p["embed"]["table_VD"]
  assert table.sharding.spec == P("tensor", "fsdp")
  layer = p["stack"]["groups"]["segment_0"]["layer_0"]
  wq = layer["attn"]["q_DHK"]  # [layers, D, H, K]
  assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
  down = layer["mlp"]["down_FD"]  # [layers, F, D]
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
  batch = {
    k: jax.ShapeDtypeStruct((8, cfg.data.seq_len), "int32", sharding=bs)
    for k in ("inputs", "targets", "segment_ids", "positions")
  }
  text = t.train_step.lower(t.abstract_state, batch).as_text()
  # Logical activation names reach the partitioner ...
  assert text.count("sdy.sharding_constraint") >= cfg.model.num_layers
  # ... and the attention kernel runs per shard (one forward, and the
  # backward of each scanned layer body).
  assert "sdy.manual_computation" in text


def test_logical_rules_do_not_reuse_a_mesh_axis():
  # 'batch' uses dcn+data+fsdp+expert; 'embed' (fsdp) in the same spec
  # replicates.
  assert sharding.logical_to_spec(("batch", "embed")) == P(
    ("dcn", "data", "fsdp", "expert"), None
  )
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("no_such_axis",))


def test_batch_is_split_over_slices_and_parameters_are_not():
  """Across slices (dcn) only data parallelism: the batch is split over
  dcn*data*fsdp, and no parameter or optimizer moment is sharded over dcn
  (each slice holds a full fsdp-sharded copy)."""
  t = loop.build_trainer(
    small_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  )
  assert t.mesh.axis_names == ("dcn", "data", "fsdp", "expert", "tensor")
  assert sharding.batch_sharding(t.mesh).spec == P(
    ("dcn", "data", "fsdp", "expert"), None
  )
  assert sharding.batch_shards(t.mesh) == 4
  specs = [a.sharding.spec for a in jax.tree.leaves(t.abstract_state)]
  assert any("fsdp" in str(s) for s in specs)  # the check below can fail
  assert not [s for s in specs if "dcn" in str(s)]


def test_one_slice_mesh_keeps_the_device_order():
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert mesh.devices.shape == (1, 2, 2, 1, 2)
  assert list(mesh.devices.flat) == jax.devices()


def test_dcn_without_slices_or_processes_is_one_line_error():
  # 8 CPU devices in this one process: no slice_index, one process.
  with pytest.raises(ConfigError) as e:
    sharding.make_mesh(MeshConfig(dcn=2, data=4))
  assert str(e.value) == (
    "mesh.dcn=2: expected the 8 devices in 2 equal processes (the devices "
    "are in one slice); found 1, of 8 devices"
  )


@dataclasses.dataclass(frozen=True)
class _CpuDevice:
  """What mesh_utils reads of a CPU device of a multi-process run: its
  slice_index is 0 on every process (jax 0.11.2)."""

  id: int
  process_index: int
  slice_index: int = 0
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_dcn_groups_processes_when_devices_are_in_one_slice():
  # Two processes of four devices, listed interleaved: each process's
  # devices must fill one dcn index all the same.
  devices = [_CpuDevice(i, i % 2) for i in range(8)]
  grid = sharding.device_grid(
    MeshConfig(dcn=2, data=1, fsdp=2, tensor=2), devices
  )
  assert grid.shape == (2, 1, 2, 1, 2)
  assert [{d.process_index for d in grid[i].flat} for i in range(2)] == [
    {0},
    {1},
  ]
  # Three processes (5 + 3 devices) cannot be two equal slices.
  uneven = [_CpuDevice(i, int(i >= 5)) for i in range(8)]
  with pytest.raises(ConfigError, match=r"found 2, of 5/3 devices$"):
    sharding.device_grid(MeshConfig(dcn=2, data=4), uneven)


@pytest.mark.tpu_aot
def test_dcn_puts_each_tpu_slice_in_one_dcn_index():
  """Real multi-slice device descriptions (libtpu, compile-only) carry
  slice_index; their order must not matter."""
  pytest.importorskip("libtpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(
      platform="tpu", topology_name="v5e:2x2", num_slices=2
    )
  except Exception as e:  # libtpu present but unusable on this host
    pytest.skip(f"no compile-only TPU topology v5e:2x2 x 2: {e}")
  devices = list(desc.devices)[::-1]  # slice 1 first
  mesh = sharding.make_mesh(
    MeshConfig(dcn=2, data=1, fsdp=2, tensor=2), devices
  )
  assert mesh.devices.shape == (2, 1, 2, 1, 2)
  assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [
    {0},
    {1},
  ]
  assert sorted(d.id for d in mesh.devices.flat) == sorted(
    d.id for d in devices
  )
