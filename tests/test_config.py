"""Config conversion and validation: one-line errors naming the values."""

import pytest

from configs import base, decoder_1b, shakespeare_char, tiny
from efficient_lm import config as config_lib
from efficient_lm.config import ConfigError
from tests.helpers import override


def _cd(**overrides):
  return override(base.get_config(), **overrides)


@pytest.mark.parametrize("module", [base, tiny, shakespeare_char, decoder_1b])
def test_every_shipped_config_converts(module):
  cd = module.get_config()
  if cd.data.source != "default":
    cd.data.path = "some/path.txt"     # given on the command line
  cfg = config_lib.from_config_dict(cd)
  assert cfg.to_dict()["model"]["num_layers"] == cd.model.num_layers


@pytest.mark.parametrize("overrides,device_count,message", [
  ({"model.num_heads": 6, "model.num_kv_heads": 4}, None,
   "model.num_heads=6 is not divisible by model.num_kv_heads=4"),
  ({"train.batch_size": 12, "mesh.data": 8}, None,
   "train.batch_size=12 is not divisible by the data-parallel size "
   "mesh.data*mesh.fsdp=8*1=8"),
  ({"mesh.data": 2, "mesh.fsdp": 2}, 8,
   "mesh data*fsdp*tensor=2*2*1=4 does not match the 8 available devices"),
  ({"mesh.fsdp": 3}, 8,
   "mesh.fsdp*mesh.tensor=3*1 does not divide the 8 available devices"),
  ({"model.num_kv_heads": 2, "mesh.tensor": 4, "mesh.data": 1}, None,
   "model.num_kv_heads=2 is not divisible by mesh.tensor=4"),
  ({"model.embed_dim": 102}, None,
   "model.embed_dim=102 is not divisible by model.num_heads=4"),
  ({"model.attention.kind": "sliding_window"}, None,
   "model.attention.window=0"),
  ({"model.remat": "sometimes"}, None, "model.remat='sometimes'"),
  ({"data.source": "text"}, None, "data.path is empty"),
  ({"train.steps": 0}, None, "train.steps=0: expected a positive value"),
  ({"data.eval_fraction": 1.5}, None, "data.eval_fraction=1.5"),
  ({"data.eval_fraction": 1.0}, None, "data.eval_fraction=1.0"),
  ({"data.eval_fraction": -0.1}, None, "data.eval_fraction=-0.1"),
  ({"mesh.data": 0}, None, "mesh.data=0: expected a positive size or -1"),
  ({"mesh.data": -2}, None, "mesh.data=-2: expected a positive size or -1"),
  ({"mesh.fsdp": 0}, 8,
   "mesh.fsdp*mesh.tensor=0*1 does not divide the 8 available devices"),
  ({"model.head_dim": 33}, None, "head_dim=33 must be even for RoPE"),
  ({"model.embed_dim": 132}, None, "head_dim=33 must be even for RoPE"),
  ({"model.attention.kind": "global_local"}, None,
   "model.attention.window=0: attention.kind='global_local'"),
  ({"model.attention.kind": "global_local", "model.attention.window": 8},
   None, "model.attention.num_global=0: kind 'global_local'"),
  ({"mesh.tensor": 2, "model.mlp_dim": 513}, None,
   "model.mlp_dim=513 is not divisible by mesh.tensor=2"),
  ({"mesh.tensor": 2, "model.vocab_size": 385}, None,
   "model.vocab_size=385 is not divisible by mesh.tensor=2"),
  ({"mesh.fsdp": 3, "train.batch_size": 24}, None,
   "model.embed_dim=128 is not divisible by mesh.fsdp=3"),
])
def test_validation_errors_name_the_values(overrides, device_count, message):
  with pytest.raises(ConfigError) as e:
    config_lib.from_config_dict(_cd(**overrides), device_count=device_count)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


POSITIVE = [
  "model.num_layers", "model.embed_dim", "model.num_heads",
  "model.num_kv_heads", "model.mlp_dim", "model.vocab_size", "data.seq_len",
  "train.steps", "train.batch_size", "train.log_every", "train.eval_every",
  "checkpoint.every_steps", "checkpoint.keep", "mesh.fsdp", "mesh.tensor"]


@pytest.mark.parametrize("path", POSITIVE)
def test_sizes_must_be_positive(path):
  with pytest.raises(ConfigError, match=f"^{path}=0: expected a positive"):
    config_lib.from_config_dict(_cd(**{path: 0}))


def test_explicit_head_dim_lifts_the_embed_dim_rule():
  # 130 / 4 heads is not whole, but an explicit (even) head_dim is fine.
  cfg = config_lib.from_config_dict(
    _cd(**{"model.embed_dim": 130, "model.head_dim": 32}))
  assert cfg.model.resolved_head_dim == 32


def test_unknown_keys_and_wrong_types():
  cd = base.get_config().to_dict()
  cd["model"]["num_layerz"] = 3
  with pytest.raises(ConfigError, match="unknown config key.*model.num_layerz"):
    config_lib.from_config_dict(cd)
  cd = base.get_config().to_dict()
  cd["train"]["steps"] = "100"
  with pytest.raises(ConfigError, match="train.steps='100': expected an int"):
    config_lib.from_config_dict(cd)
  cd = base.get_config().to_dict()
  cd["train"]["learning_rate"] = True
  with pytest.raises(ConfigError, match="expected a float"):
    config_lib.from_config_dict(cd)


def test_data_minus_one_takes_remaining_devices():
  cfg = config_lib.from_config_dict(_cd(**{"mesh.tensor": 2}), device_count=8)
  assert cfg.mesh.shape == (4, 1, 2)
  assert cfg.model.resolved_head_dim == 32
