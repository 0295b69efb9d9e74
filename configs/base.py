"""Base experiment config: every key, with the defaults of the dataclasses
in efficient_lm/config/schema.py (the one place they are written down, with
their meaning). Other configs start here and change only what differs."""

import ml_collections

from efficient_lm import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.default_config_dict()
  c.name = "base"
  return c
