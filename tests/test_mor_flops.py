"""Mixture-of-recursions (models/mor.py) against docs/routing.md:
sharding and FLOPs.

A sharded train step = one device; FLOPs against XLA (expert choice and
token-choice capacities) and against the unrolled dense model. Routing
itself: test_mor_routing.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm.models import build, flops
from efficient_lm.training import loop
from tests.helpers import (
  small_config,
  two_train_steps,
)
from tests.mor_common import _cfg


# ---------------------------------------------------- sharding and FLOPs


def _mor_sharded_cfg(**mesh):
  # One shared layer applied twice (capacities 1, 1/2): the smallest
  # compile that still gathers, routes and scatters.
  return _cfg(
    **{"model.routing.sharing": "cycle", "model.num_layers": 2, **mesh}
  )


def _two_steps(cfg, devices=None):
  def build_model(mcfg, rngs):
    model = build(mcfg, rngs)
    # Clear router margins: reduction order must not flip a top-k choice.
    model.stack.router_DN[...] = model.stack.router_DN[...] * 100
    return model

  t = loop.build_trainer(cfg, devices, build_model=build_model)
  state, metrics = two_train_steps(t, t.init_fn())
  return jax.device_get(state["params"]), metrics


@pytest.fixture(scope="module")
def one_device():
  return _two_steps(_mor_sharded_cfg(**{"mesh.data": 1}), jax.devices()[:1])


@pytest.mark.parametrize(
  "mesh_shape",
  [
    pytest.param((8, 1, 1), marks=pytest.mark.slow),
    (2, 2, 2),
    pytest.param((1, 4, 2), marks=pytest.mark.slow),
  ],
)
def test_sharded_train_step_matches_one_device(one_device, mesh_shape):
  ref_params, ref_metrics = one_device
  d, f, tp = mesh_shape
  params, metrics = _two_steps(
    _mor_sharded_cfg(**{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": tp})
  )
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  for key in ("loss/mor_bce", "routing/mor_step2_fraction"):
    np.testing.assert_allclose(
      metrics["aux"][key], ref_metrics["aux"][key], rtol=1e-5
    )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params
  )


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    pytest.param(
      {
        "model.routing.router": "token_choice",
        "model.routing.kv": "recursive_sharing",
      },
      marks=pytest.mark.slow,
    ),
    pytest.param(
      {
        "model.num_layers": 5,
        "model.routing.num_recursions": 3,
        "model.routing.kv": "recursive_sharing",
      },
      marks=pytest.mark.slow,
    ),
  ],
)
def test_flops_per_token_within_5_percent_of_xla(overrides):
  """Capacity-aware FLOPs: the compiled step (MoR is unrolled) of
  expert-choice at capacities (1, 1/2) costs what flops.py says; a model
  counted at full depth would be ~25% off."""
  from efficient_lm import aot

  cfg = _cfg(
    **{
      "model.embed_dim": 256,
      "model.mlp_dim": 768,
      "data.seq_len": 128,
      "train.batch_size": 4,
      **overrides,
    }
  )
  _, _, compiled = aot.compile_train_step(cfg, jax.devices()[:1])
  xla = aot.xla_flops(compiled)
  ours = flops.flops_per_token(cfg.model, 128)["train"] * 4 * 128
  assert abs(xla / ours - 1) < 0.05, (xla, ours)


@pytest.mark.parametrize(
  "overrides,sharing_kv",
  [
    ({"model.routing.router": "token_choice"}, False),
    ({"model.routing.capacities": (1.0, 1.0, 1.0)}, False),
    (
      {
        "model.routing.router": "token_choice",
        "model.routing.kv": "recursive_sharing",
      },
      True,
    ),
  ],
)
def test_flops_against_the_unrolled_dense_model(overrides, sharing_kv):
  """Token-choice (every step masked over all T) and expert-choice at
  capacity 1 cost the dense model of the same L virtual layers, plus the
  [D, N_r] router; recursive sharing does not project K and V again at
  steps 2..N_r (2 D * 2 G K per token, per shared layer and step)."""
  cfg = _cfg(
    **{"model.num_layers": 5, "model.routing.num_recursions": 3, **overrides}
  )
  dense = small_config(**{"model.num_layers": 5})
  t = 64
  got = flops.flops_per_token(cfg.model, t)
  want = flops.flops_per_token(dense.model, t)
  m = cfg.model
  d, depth = m.embed_dim, 1  # middle_cycle: (5 - 2) / 3 shared layers
  kv = 2.0 * d * 2 * m.num_kv_heads * m.resolved_head_dim
  saved = (3 - 1) * depth * kv if sharing_kv else 0.0
  for k in ("mlp", "attention_dense_tile", "attention_visible", "lm_head"):
    assert got[f"forward/{k}"] == pytest.approx(want[f"forward/{k}"]), k
  assert got["forward/attention_proj"] == pytest.approx(
    want["forward/attention_proj"] - saved
  )
  assert got["forward/router"] == 2.0 * d * 3


def test_token_choice_capacity_flops_match_xla_and_fall():
  """The forward at token-choice capacities (1, 1/2) (middle_cycle: first
  and last layers unique, one shared layer applied twice) costs what
  flops.py says within 5% of XLA's count, and less than at (1, 1), in
  both counts. Forward only, abstract parameters, compiled twice."""
  from efficient_lm import aot

  b, t, xla, ours = 2, 128, [], []
  for caps in [(1.0, 1.0), (1.0, 0.5)]:
    cfg = _cfg(
      **{
        "model.embed_dim": 256,
        "model.mlp_dim": 768,
        "model.routing.router": "token_choice",
        "model.routing.token_choice_capacities": caps,
        "model.scan_layers": False,
        "data.seq_len": t,
      }
    ).model
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))

    def forward(state, tokens, pos, seg):
      return nnx.merge(graphdef, state)(tokens, pos, seg)[0]

    ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
    compiled = jax.jit(forward).lower(state, ints, ints, ints).compile()
    xla.append(aot.xla_flops(compiled))
    ours.append(flops.flops_per_token(cfg, t)["forward"] * b * t)
    assert abs(xla[-1] / ours[-1] - 1) < 0.05, (caps, xla[-1], ours[-1])
  assert ours[1] < 0.9 * ours[0] and xla[1] < 0.9 * xla[0], (ours, xla)
