"""ConfigDict -> frozen, validated dataclasses.

This is the only module that reads an ml_collections ConfigDict. Everything
downstream receives the (frozen) dataclass it needs. Validation runs here,
before anything is compiled, and every error is one line naming the values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import ml_collections

from efficient_lm.config.errors import ConfigError, _positive
from efficient_lm.config.schema import Config
from efficient_lm.config.validation import _mesh_product, validate


def default_config_dict(cls: type = Config) -> ml_collections.ConfigDict:
  """The dataclass defaults as a ConfigDict (configs/base.py starts here).

  Optional fields become typed placeholders so that command-line overrides
  (`--config.model.head_dim=64`) still parse with the right type.
  """
  hints = typing.get_type_hints(cls)
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    value = getattr(cls(), f.name)
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      out[f.name] = default_config_dict(tp)
    elif value is None:
      inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
      out[f.name] = ml_collections.config_dict.placeholder(inner)
    else:
      out[f.name] = value
  return out


def _check_value(path: str, value: Any, tp: Any) -> Any:
  """Checks `value` against annotation `tp`; returns the (coerced) value."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors: list[ConfigError] = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _check_value(path, value, arg)
      except ConfigError as e:
        errors.append(e)
    raise (
      errors[0]
      if len(errors) == 1
      else ConfigError(f"{path}={value!r}: expected one of {args}")
    )
  if origin is Literal:
    allowed = typing.get_args(tp)
    if value not in allowed:
      raise ConfigError(
        f"{path}={value!r}: expected one of {', '.join(map(repr, allowed))}"
      )
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}={value!r}: expected a bool")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(
        f"{path}={value!r}: expected an int, got {type(value).__name__}"
      )
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(
        f"{path}={value!r}: expected a float, got {type(value).__name__}"
      )
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(
        f"{path}={value!r}: expected a str, got {type(value).__name__}"
      )
    return value
  if origin is tuple:
    return _check_tuple(path, value, typing.get_args(tp))
  if dataclasses.is_dataclass(tp):
    return _to_dataclass(path, value, tp)
  raise TypeError(f"unsupported annotation {tp} at {path}")


def _check_tuple(path: str, value: Any, args: tuple[Any, ...]) -> tuple:
  """tuple[X, ...] or tuple[X, Y]: lists are accepted (config.json holds
  JSON arrays) and every element is checked."""
  if isinstance(value, str) or not isinstance(value, (tuple, list)):
    raise ConfigError(
      f"{path}={value!r}: expected a tuple, got {type(value).__name__}"
    )
  if len(args) == 2 and args[1] is Ellipsis:
    types_ = (args[0],) * len(value)
  else:
    types_ = args
    if len(value) != len(args):
      raise ConfigError(
        f"{path}={tuple(value)!r}: expected {len(args)} elements, got "
        f"{len(value)}"
      )
  return tuple(
    _check_value(f"{path}[{i}]", v, tp)
    for i, (v, tp) in enumerate(zip(value, types_, strict=True))
  )


def _to_dataclass(path: str, value: Any, cls: type) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if not isinstance(value, dict):
    raise ConfigError(f"{path}={value!r}: expected a section (dict)")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(value) - fields)
  if unknown:
    where = f"{path}." if path else ""
    raise ConfigError(
      f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
      f"known keys of {path or 'the config'}: {', '.join(sorted(fields))}"
    )
  kwargs = {}
  for name, v in value.items():
    kwargs[name] = _check_value(
      f"{path}.{name}" if path else name, v, hints[name]
    )
  return cls(**kwargs)


def from_config_dict(
  cd: ml_collections.ConfigDict | dict, *, device_count: int | None = None
) -> Config:
  """Converts and validates. `device_count` enables the mesh-size check."""
  cfg = _to_dataclass("", cd, Config)
  mesh = cfg.mesh
  _positive("mesh.dcn", mesh.dcn)  # before it divides the device count
  if device_count is not None and mesh.data == -1:
    rest = mesh.dcn * mesh.fsdp * mesh.expert * mesh.tensor
    if rest <= 0 or device_count % rest:
      raise ConfigError(
        f"{_mesh_product(mesh, ('dcn', 'fsdp', 'expert', 'tensor'))} does "
        "not divide "
        f"the {device_count} available devices"
      )
    cfg = dataclasses.replace(
      cfg, mesh=dataclasses.replace(mesh, data=device_count // rest)
    )
  validate(cfg, device_count=device_count)
  return cfg
