"""The whole train step (model + Pallas TPU attention under shard_map +
AdamW) compiles ahead of time for TPU pods (the 1B config on v5e-16:
tests/test_aot.py).

No TPU needed: libtpu compiles for abstract topologies. Skips without it.
"""

import os

import pytest

pytest.importorskip("libtpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from jax.experimental import topologies  # noqa: E402

from configs import decoder_1b  # noqa: E402
from efficient_lm import aot  # noqa: E402
from efficient_lm import config as config_lib  # noqa: E402
from tests.helpers import override  # noqa: E402

pytestmark = pytest.mark.tpu_aot


def _topology(name):
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # libtpu present but unusable on this host
    pytest.skip(f"no compile-only TPU topology {name}: {e}")


def _compile_train_step(cd, devices):
  cfg = config_lib.from_config_dict(cd, device_count=len(devices))
  _, lowered, compiled = aot.compile_train_step(cfg, devices)
  return lowered, compiled


def test_small_model_with_pallas_tpu_compiles_on_2x2_fsdp_tensor():
  devices = _topology("v5e:2x2").devices
  cd = override(decoder_1b.get_config(), **{
    "model.num_layers": 2, "model.embed_dim": 256, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.mlp_dim": 512, "model.vocab_size": 512,
    "model.attention.impl": "pallas_tpu", "model.attention.kind":
    "global_local", "model.attention.window": 128,
    "model.attention.num_global": 4, "data.seq_len": 512,
    "train.batch_size": 4, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
  lowered, compiled = _compile_train_step(cd, devices)
  text = lowered.as_text()
  assert "tpu_custom_call" in text       # the Mosaic kernels, not XLA
  assert compiled.memory_analysis().temp_size_in_bytes > 0

