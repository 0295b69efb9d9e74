"""The train step's loss: padding is not counted, z-loss is added.

Tested through the trainer's jitted step and its metrics, with the expected
values computed here from the model's own logits.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_lm import sharding
from efficient_lm.training import loop
from tests.helpers import packed_batch, small_config

Z_LOSS = 1e-2


@pytest.fixture(scope="module")
def trainer():
  cfg = small_config(**{"train.z_loss": Z_LOSS})
  return loop.build_trainer(cfg, jax.devices()[:1])


def _step(t, batch):
  """Metrics of the first step, and the parameters it saw."""
  state = t.init_fn()
  params = jax.device_get(state["params"])
  _, metrics = t.train_step(state, sharding.host_to_global(t.mesh, batch))
  return jax.device_get(metrics), params


def _logits(t, params, batch):
  model = nnx.merge(t.graphdef, params)
  out = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  # The model may also return auxiliary outputs beside the logits.
  return out[0] if isinstance(out, tuple) else out


def _batch(t):
  c = t.cfg
  return packed_batch(c.train.batch_size, c.data.seq_len, c.model.vocab_size)


def test_padding_targets_do_not_count(trainer):
  batch = _batch(trainer)
  pad = batch["segment_ids"] == 0
  assert pad.sum() > 0
  other = dict(batch, targets=np.where(pad, 7, batch["targets"]))
  got, _ = _step(trainer, batch)
  moved, _ = _step(trainer, other)
  assert got["tokens"] == (~pad).sum()
  for k in ("loss", "total_loss", "tokens"):
    np.testing.assert_array_equal(moved[k], got[k], err_msg=k)


def _ce_terms(logits_BTV, batch):
  """Cross-entropy over the real tokens, in float64 -> (ce, lse [B, T],
  real [B, T])."""
  logits_BTV = np.asarray(logits_BTV, np.float64)
  top_BT = logits_BTV.max(axis=-1)
  lse_BT = top_BT + np.log(np.exp(logits_BTV - top_BT[..., None]).sum(-1))
  target_BT = np.take_along_axis(
    logits_BTV, batch["targets"][..., None], axis=-1
  )[..., 0]
  real = batch["segment_ids"] > 0
  return np.mean((lse_BT - target_BT)[real]), lse_BT, real


def _ce(logits_BTV, batch):
  return _ce_terms(logits_BTV, batch)[0]


def test_total_loss_is_ce_plus_z_loss(trainer):
  batch = _batch(trainer)
  metrics, params = _step(trainer, batch)
  ce, lse_BT, real = _ce_terms(_logits(trainer, params, batch), batch)
  z = np.mean(np.square(lse_BT)[real])
  # Same float32 model, eager here and jitted in the step: rounding only.
  np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["total_loss"], ce + Z_LOSS * z, rtol=1e-5)
  # The z term is large enough for the tolerance to see it.
  assert Z_LOSS * z > 1e3 * 1e-5 * ce


# Routed models (issue #25): evaluation must route causally, as generation
# does, never by training's (leaky) top-k over the row.
_SMALL = {"train.batch_size": 2, "data.seq_len": 16}
_ROUTED = {
  "mod_mlp": {
    **_SMALL,
    "model.routing.kind": "mod",
    "model.routing.predictor": "mlp",
  },
  "mor_expert": {
    **_SMALL,
    "model.routing.kind": "mor",
    "model.routing.sharing": "cycle",
    "model.routing.num_recursions": 2,
  },
}


@pytest.mark.parametrize("name", sorted(_ROUTED))
def test_eval_step_of_a_routed_model_routes_causally(name):
  t = loop.build_trainer(small_config(**_ROUTED[name]), jax.devices()[:1])
  state = t.init_fn()
  # Larger weights, sharper routers: decisions of both signs, and top-k
  # and causal routing give clearly different losses.
  sharp = ("w_D", "router_DN", "pred_out_F")
  params = jax.tree_util.tree_map_with_path(
    lambda path, v: (
      v * (80.0 if any(s in jax.tree_util.keystr(path) for s in sharp) else 4.0)
    ),
    jax.device_get(state["params"]),
  )
  batch = _batch(t)
  out = jax.device_get(
    t.eval_step(
      params, state["model_state"], sharding.host_to_global(t.mesh, batch)
    )
  )
  model = nnx.merge(t.graphdef, params, state["model_state"])
  # Both routings in one compilation.
  causal, top_k = jax.jit(
    lambda *a: tuple(model(*a, causal_routing=c)[0] for c in (True, False))
  )(batch["inputs"], batch["positions"], batch["segment_ids"])
  want = _ce(causal, batch)
  assert abs(_ce(top_k, batch) / want - 1) > 1e-3  # the routings differ
  np.testing.assert_allclose(out["nll_sum"] / out["tokens"], want, rtol=1e-5)
