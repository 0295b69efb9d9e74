"""Shared by the mixture-of-recursions tests (test_mor_routing.py,
test_mor_decode.py, test_mor_flops.py): a tiny MoR config and model, and
inputs."""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.models import build
from tests.helpers import small_config

T = 16


def _cfg(**overrides):
  return small_config(
    **{"model.routing.kind": "mor", "model.num_layers": 4, **overrides}
  )


def _model(overrides, router_scale=1.0):
  cfg = _cfg(**overrides)
  model = build(cfg.model, nnx.Rngs(0))
  rt = model.stack.router_DN
  rt[...] = rt[...] * router_scale
  return cfg, model


def _inputs(b=2, t=T, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, 300)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return tokens, pos, jnp.ones((b, t), jnp.int32)


def _pure(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _unique_blocks(rec):
  ends = [rec.first] if rec.first is not None else []
  return ends[:1] + list(rec.shared) + ([rec.last] if ends else [])
