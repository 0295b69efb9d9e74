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
    cd.data.path = "some/path.txt"  # given on the command line
  cfg = config_lib.from_config_dict(cd)
  assert cfg.to_dict()["model"]["num_layers"] == cd.model.num_layers


@pytest.mark.parametrize(
  "overrides,device_count,message",
  [
    (
      {"model.num_heads": 6, "model.num_kv_heads": 4},
      None,
      "model.num_heads=6 is not divisible by model.num_kv_heads=4",
    ),
    (
      {"train.batch_size": 12, "mesh.data": 8},
      None,
      "train.batch_size=12 is not divisible by the data-parallel size "
      "mesh.data*mesh.fsdp=8*1=8",
    ),
    (
      {"mesh.data": 2, "mesh.fsdp": 2},
      8,
      "mesh data*fsdp*tensor=2*2*1=4 does not match the 8 available devices",
    ),
    (
      {"mesh.fsdp": 3},
      8,
      "mesh.fsdp*mesh.tensor=3*1 does not divide the 8 available devices",
    ),
    (
      {"model.num_kv_heads": 2, "mesh.tensor": 4, "mesh.data": 1},
      None,
      "model.num_kv_heads=2 is not divisible by mesh.tensor=4",
    ),
    (
      {"model.embed_dim": 102},
      None,
      "model.embed_dim=102 is not divisible by model.num_heads=4",
    ),
    (
      {"model.attention.kind": "sliding_window"},
      None,
      "model.attention.window=0",
    ),
    ({"model.remat": "sometimes"}, None, "model.remat='sometimes'"),
    ({"data.source": "text"}, None, "data.path is empty"),
    ({"train.steps": 0}, None, "train.steps=0: expected a positive value"),
    ({"data.eval_fraction": 1.5}, None, "data.eval_fraction=1.5"),
    ({"data.eval_fraction": 1.0}, None, "data.eval_fraction=1.0"),
    ({"data.eval_fraction": -0.1}, None, "data.eval_fraction=-0.1"),
    ({"mesh.data": 0}, None, "mesh.data=0: expected a positive size or -1"),
    ({"mesh.data": -2}, None, "mesh.data=-2: expected a positive size or -1"),
    (
      {"mesh.fsdp": 0},
      8,
      "mesh.fsdp*mesh.tensor=0*1 does not divide the 8 available devices",
    ),
    ({"model.head_dim": 33}, None, "head_dim=33 must be even for RoPE"),
    ({"model.embed_dim": 132}, None, "head_dim=33 must be even for RoPE"),
    (
      {"model.attention.kind": "global_local"},
      None,
      "model.attention.window=0: attention.kind='global_local'",
    ),
    (
      {"model.attention.kind": "global_local", "model.attention.window": 8},
      None,
      "model.attention.num_global=0: attention.kind='global_local' uses",
    ),
    (
      {"mesh.tensor": 2, "model.mlp_dim": 513},
      None,
      "model.mlp_dim=513 is not divisible by mesh.tensor=2",
    ),
    (
      {"mesh.tensor": 2, "model.vocab_size": 385},
      None,
      "model.vocab_size=385 is not divisible by mesh.tensor=2",
    ),
    (
      {"mesh.fsdp": 3, "train.batch_size": 24},
      None,
      "model.embed_dim=128 is not divisible by mesh.fsdp=3",
    ),
  ],
)
def test_validation_errors_name_the_values(overrides, device_count, message):
  with pytest.raises(ConfigError) as e:
    config_lib.from_config_dict(_cd(**overrides), device_count=device_count)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


POSITIVE = [
  "model.num_layers",
  "model.embed_dim",
  "model.num_heads",
  "model.num_kv_heads",
  "model.mlp_dim",
  "model.vocab_size",
  "data.seq_len",
  "train.steps",
  "train.batch_size",
  "train.log_every",
  "train.eval_every",
  "checkpoint.every_steps",
  "checkpoint.keep",
  "mesh.dcn",
  "mesh.fsdp",
  "mesh.tensor",
]


@pytest.mark.parametrize("path", POSITIVE)
def test_sizes_must_be_positive(path):
  with pytest.raises(ConfigError, match=f"^{path}=0: expected a positive"):
    config_lib.from_config_dict(_cd(**{path: 0}))


def test_explicit_head_dim_lifts_the_embed_dim_rule():
  # 130 / 4 heads is not whole, but an explicit (even) head_dim is fine.
  cfg = config_lib.from_config_dict(
    _cd(**{"model.embed_dim": 130, "model.head_dim": 32})
  )
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
  assert cfg.mesh.shape == (1, 4, 1, 1, 2)
  assert cfg.model.resolved_head_dim == 32
  # Slices are taken first: 16 devices in 2 slices, tensor 2 -> data 4.
  cfg = config_lib.from_config_dict(
    _cd(**{"mesh.dcn": 2, "mesh.tensor": 2}), device_count=16
  )
  assert cfg.mesh.shape == (2, 4, 1, 1, 2) and cfg.mesh.size == 16


@pytest.mark.parametrize(
  "overrides,device_count,message",
  [
    ({"mesh.dcn": 0}, None, "mesh.dcn=0: expected a positive value"),
    ({"mesh.dcn": -2}, 8, "mesh.dcn=-2: expected a positive value"),
    (
      {"mesh.dcn": 3},
      8,
      "mesh.dcn*mesh.fsdp*mesh.tensor=3*1*1 does not divide the 8 available "
      "devices",
    ),
    (
      {"mesh.dcn": 2, "mesh.data": 2, "mesh.fsdp": 4},
      8,
      "mesh dcn*data*fsdp*tensor=2*2*4*1=16 does not match the 8 available "
      "devices",
    ),
    # The batch is split over dcn*data*fsdp: 12 rows over 2*2*2=8 shards.
    (
      {"mesh.dcn": 2, "mesh.data": 2, "mesh.fsdp": 2, "train.batch_size": 12},
      8,
      "train.batch_size=12 is not divisible by the data-parallel size "
      "mesh.dcn*mesh.data*mesh.fsdp=2*2*2=8",
    ),
  ],
)
def test_dcn_errors_are_one_line_naming_the_value(
  overrides, device_count, message
):
  with pytest.raises(ConfigError) as e:
    config_lib.from_config_dict(_cd(**overrides), device_count=device_count)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_dcn_is_a_config_key_with_default_one():
  """configs/base.py is generated from the dataclass defaults, so the key
  exists for `--config.mesh.dcn=2` overrides."""
  assert base.get_config().mesh.dcn == 1
  cfg = config_lib.from_config_dict(_cd(**{"mesh.dcn": 2}), device_count=8)
  assert cfg.mesh.shape == (2, 4, 1, 1, 1)


@pytest.mark.parametrize("block", [128, 256])
def test_a_causal_tglobal_block_of_the_whole_row_is_refused(block):
  """Issue #23: a decoder token sees the summaries of the complete blocks
  before its own, so with tglobal_block >= data.seq_len (128) it sees none
  and the layer trains as a sliding window; half a row is fine."""
  tglobal = {
    "model.attention.kind": "tglobal",
    "model.attention.window": 8,
    "data.seq_len": 128,
  }
  with pytest.raises(ConfigError) as e:
    config_lib.from_config_dict(
      _cd(**tglobal, **{"model.attention.tglobal_block": block})
    )
  assert str(e.value).startswith(
    f"model.attention.tglobal_block={block} >= data.seq_len=128: a token "
  )
  assert "\n" not in str(e.value)
  config_lib.from_config_dict(
    _cd(**tglobal, **{"model.attention.tglobal_block": 64})
  )


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      {
        "model.num_layers": 6,
        "model.attention.pattern": "sliding_window,sliding_window,sliding_window,dense",
        "model.attention.window": 4,
      },
      "model.attention.pattern='sliding_window,sliding_window,sliding_window,"
      "dense' has 4 kinds, which does not divide model.num_layers=6",
    ),
    (
      {"model.num_layers": 4, "model.attention.pattern": "sliding_window,dens"},
      "model.attention.pattern='sliding_window,dens': unknown kind 'dens'",
    ),
    (
      {
        "model.num_layers": 4,
        "model.attention.pattern": "dense,sliding_window",
      },
      "model.attention.window=0: attention.pattern='dense,sliding_window' "
      "needs a positive window",
    ),
    (
      {
        "model.num_layers": 2,
        "model.attention.pattern": "global_local,dense",
        "model.attention.window": 4,
      },
      "model.attention.num_global=0: attention.pattern='global_local,dense'",
    ),
  ],
)
def test_pattern_errors_are_one_line(overrides, message):
  with pytest.raises(ConfigError) as e:
    config_lib.from_config_dict(_cd(**overrides))
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_a_valid_pattern_converts():
  cfg = config_lib.from_config_dict(
    _cd(
      **{
        "model.num_layers": 8,
        "model.attention.window": 4,
        "model.attention.pattern": "sliding_window, sliding_window,sliding_window,dense",
      }
    )
  )
  assert cfg.model.attention.pattern_kinds == (
    "sliding_window",
    "sliding_window",
    "sliding_window",
    "dense",
  )


def test_config_json_round_trips():
  """config.json (and the config saved in checkpoints) converts back to
  the same frozen config."""
  import json

  cfg = config_lib.from_config_dict(
    _cd(
      **{
        "model.num_layers": 4,
        "model.attention.window": 4,
        "model.attention.pattern": "sliding_window,dense",
        "model.head_dim": 32,
      }
    )
  )
  again = config_lib.from_config_dict(json.loads(cfg.to_json()))
  assert again == cfg


def _tuple_section(value):
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Section:
    stages: tuple[int, ...] = (2, 2)
    pair: tuple[int, str] = (1, "a")

  # The private converter is the one from_config_dict uses for every field.
  return config_lib._to_dataclass("model.funnel", value, Section)


def test_tuple_fields_from_file_command_line_and_json(tmp_path):
  import sys
  from absl import flags
  from ml_collections import config_flags

  # A config file's tuple, and JSON's list (config.json), both convert.
  assert _tuple_section({"stages": (12, 24)}).stages == (12, 24)
  assert _tuple_section({"stages": [12, 24], "pair": [3, "b"]}).pair == (3, "b")
  # The command line: ml_collections parses `--config.stages=(4,5,6)` for
  # a tuple-valued default; the result converts like a file's value.
  path = tmp_path / "tuple_config.py"
  path.write_text(
    "import ml_collections\n"
    "def get_config():\n"
    "  return ml_collections.ConfigDict({'stages': (2, 2)})\n"
  )
  fv = flags.FlagValues()
  argv = ["prog", f"--config={path}", "--config.stages=(4,5,6)"]
  old, sys.argv = sys.argv, argv  # ml_collections reads sys.argv
  try:
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(argv)
  finally:
    sys.argv = old
  assert _tuple_section(fv.config).stages == (4, 5, 6)


@pytest.mark.parametrize(
  "value,message",
  [
    (
      {"stages": (12, "24")},
      "model.funnel.stages[1]='24': expected an int, got str",
    ),
    ({"stages": 12}, "model.funnel.stages=12: expected a tuple, got int"),
    ({"stages": "12,24"}, "model.funnel.stages='12,24': expected a tuple"),
    (
      {"pair": (1, "a", 2)},
      "model.funnel.pair=(1, 'a', 2): expected 2 elements, got 3",
    ),
  ],
)
def test_bad_tuple_values_are_one_line(value, message):
  with pytest.raises(ConfigError) as e:
    _tuple_section(value)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_a_wrong_type_for_an_optional_key_is_one_config_error():
  """An Optional[int] key given a string (a hand-edited config.json) is a
  ConfigError naming it, not a TypeError from raising the message."""
  cd = base.get_config().to_dict()
  cd["model"]["head_dim"] = "x"
  with pytest.raises(ConfigError, match=r"model.head_dim='x': expected an int"):
    config_lib.from_config_dict(cd)
