"""ConfigError and the one check every part of the package uses."""

from __future__ import annotations


class ConfigError(ValueError):
  """A bad configuration value; the message names the value and expectation."""


def _positive(path: str, value: int | float) -> None:
  if value <= 0:
    raise ConfigError(f"{path}={value}: expected a positive value")
