"""The configuration: schema (schema.py), ConfigDict conversion (convert.py)
and validation (validation.py, validation_model.py).

`from efficient_lm.config import X` and `config_lib.X` keep working for
every name the package had as one module.
"""

from efficient_lm.config.convert import (
  _to_dataclass as _to_dataclass,  # tests/test_config.py calls it directly
)
from efficient_lm.config.convert import default_config_dict, from_config_dict
from efficient_lm.config.errors import ConfigError
from efficient_lm.config.schema import (
  ATTENTION_KINDS,
  AttentionConfig,
  AttentionKind,
  CheckpointConfig,
  Config,
  DataConfig,
  FunnelConfig,
  MeshConfig,
  ModelConfig,
  PerLayerConfig,
  MoEConfig,
  RoutingConfig,
  TrainConfig,
)
from efficient_lm.config.validation import validate

__all__ = [
  "ATTENTION_KINDS",
  "AttentionConfig",
  "AttentionKind",
  "CheckpointConfig",
  "Config",
  "ConfigError",
  "DataConfig",
  "FunnelConfig",
  "MeshConfig",
  "ModelConfig",
  "PerLayerConfig",
  "MoEConfig",
  "RoutingConfig",
  "TrainConfig",
  "default_config_dict",
  "from_config_dict",
  "validate",
]
