"""The whole train step (model + Pallas TPU attention under shard_map +
AdamW) compiles ahead of time for TPU pods (the 1B config on v5e-16:
tests/test_aot.py), and for several slices (mesh.dcn).

No TPU needed: libtpu compiles for abstract topologies. Skips without it.
"""

import os
import re

import pytest

pytest.importorskip("libtpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from jax.experimental import topologies  # noqa: E402

from configs import decoder_1b  # noqa: E402
from efficient_lm import aot  # noqa: E402
from efficient_lm import config as config_lib  # noqa: E402
from efficient_lm import sharding  # noqa: E402
from tests.helpers import override  # noqa: E402

pytestmark = pytest.mark.tpu_aot


def _topology(name):
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # libtpu present but unusable on this host
    pytest.skip(f"no compile-only TPU topology {name}: {e}")


def _topology_slices(name, num_slices):
  try:
    return aot.topology_devices(aot.parse_topology(name), num_slices)
  except aot.TopologyError as e:  # libtpu present but unusable on this host
    pytest.skip(str(e))


def _compile_train_step(cd, devices):
  cfg = config_lib.from_config_dict(cd, device_count=len(devices))
  _, lowered, compiled = aot.compile_train_step(cfg, devices)
  return lowered, compiled


def test_small_model_with_pallas_tpu_compiles_on_2x2_fsdp_tensor():
  devices = _topology("v5e:2x2").devices
  cd = override(
    decoder_1b.get_config(),
    **{
      "model.num_layers": 2,
      "model.embed_dim": 256,
      "model.num_heads": 4,
      "model.num_kv_heads": 2,
      "model.mlp_dim": 512,
      "model.vocab_size": 512,
      "model.attention.impl": "pallas_tpu",
      "model.attention.kind": "global_local",
      "model.attention.window": 128,
      "model.attention.num_global": 4,
      "data.seq_len": 512,
      "train.batch_size": 4,
      "mesh.data": 1,
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
    },
  )
  lowered, compiled = _compile_train_step(cd, devices)
  text = lowered.as_text()
  assert "tpu_custom_call" in text  # the Mosaic kernels, not XLA
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_train_step_compiles_for_two_slices_with_the_batch_split_across():
  """mesh.dcn=2 over 2 slices of v5e:2x2 (fsdp 2 x tensor 2 within each):
  each slice gets half the batch, each device a quarter (tensor replicates
  it), and parameters keep their one-slice shards, with no dcn in them."""
  devices = _topology_slices("v5e:2x2", 2)
  cd = override(
    decoder_1b.get_config(),
    **{
      "model.num_layers": 2,
      "model.embed_dim": 256,
      "model.num_heads": 4,
      "model.num_kv_heads": 2,
      "model.mlp_dim": 512,
      "model.vocab_size": 512,
      "model.attention.impl": "pallas_tpu",
      "data.seq_len": 512,
      "train.batch_size": 8,
      "mesh.dcn": 2,
      "mesh.data": -1,
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
    },
  )
  cfg = config_lib.from_config_dict(cd, device_count=len(devices))
  assert cfg.mesh.shape == (2, 1, 2, 1, 2)
  t, _, compiled = aot.compile_train_step(cfg, devices)
  rows = {
    d: idx[0]
    for d, idx in sharding.batch_sharding(t.mesh)
    .devices_indices_map((8, 512))
    .items()
  }
  for d, r in rows.items():
    assert r.stop - r.start == 2
    assert 4 * d.slice_index <= r.start < 4 * (d.slice_index + 1)
  # The compiled program's arguments (one device's shapes): batch rows 8/4
  # over dcn and fsdp; the embedding (V=512, D=256) split by tensor and
  # fsdp as on one slice, not over dcn.
  args = [
    line for line in compiled.as_text().splitlines() if " parameter(" in line
  ]

  def dims(arg):  # "[{'tensor'}, {'fsdp'}]" of sharding={mesh[...], ...}
    m = re.search(r"sharding=\{mesh\[[^\]]*\], (\[.*?\])\}", arg)
    return m.group(1) if m else "replicated"

  batch = [a for a in args if 'op_name="batch[' in a]
  assert len(batch) == 4, batch
  assert all(
    "s32[2,512]" in a and dims(a) == "[{'dcn', 'fsdp'}, {}]" for a in batch
  ), batch
  params = [a for a in args if "op_name=\"state[\\'params\\']" in a]
  assert len(params) > 5 and any("fsdp" in dims(a) for a in params)
  assert not [a for a in params if "dcn" in dims(a)]
  embed = [a for a in params if "table_VD" in a]
  assert len(embed) == 1 and "f32[256,128]" in embed[0], embed
