"""Quantization schemes by name: the grammar `model.quantization`,
`train.quantization` and the `--quantize` / `--scheme` flags share
(models/quantization.py turns a scheme into qwix rules).

  int8_weights       int8 weights, one scale per output channel
  int4_weights[:G]   int4 weights, one scale per output channel and group of
                     G (default 128) along the contracted axis (sub-channel)
  int8_dynamic       int8 weights (per channel) and int8 activations, their
                     scales computed per token at run time (dynamic range)
  fp8                float8_e4m3fn weights and activations, scaled as
                     int8_dynamic
"""

from __future__ import annotations

import dataclasses

from efficient_lm.config.errors import ConfigError

SCHEMES = ("int8_weights", "int4_weights", "int8_dynamic", "fp8")
DEFAULT_GROUP = 128


@dataclasses.dataclass(frozen=True)
class Scheme:
  name: str
  group: int | None = None  # int4_weights' group size

  def __str__(self) -> str:
    return self.name if self.group is None else f"{self.name}:{self.group}"


def parse_scheme(text: str, what: str = "quantization") -> Scheme:
  """`text` (`name` or `int4_weights:G`) -> Scheme; ConfigError naming
  `what` and the value otherwise."""
  name, colon, group = text.partition(":")
  if name not in SCHEMES:
    raise ConfigError(
      f"{what}={text!r}: unknown scheme; expected one of "
      f"{', '.join(SCHEMES)} (int4_weights:GROUP sets the group size)"
    )
  if name != "int4_weights":
    if colon:
      raise ConfigError(
        f"{what}={text!r}: only int4_weights takes a group size (:GROUP)"
      )
    return Scheme(name)
  if not colon:
    return Scheme(name, DEFAULT_GROUP)
  if not group.isdigit() or int(group) < 1:
    raise ConfigError(
      f"{what}={text!r}: the group size after ':' must be a positive integer"
    )
  return Scheme(name, int(group))
