"""Weight decay by parameter kind; the schedule and the learning rate logged."""

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_lm import models, sharding
from efficient_lm.training import loop, optim
from tests.helpers import packed_batch, small_config


def _is_var(x):
  return isinstance(x, nnx.Variable)


def _kinds(cfg):
  """'norm' / 'embedding' / 'matrix' per parameter, read from its logical
  axes, as a tree shaped like the params dict."""
  model = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(params=0)))
  _, params = nnx.split(model, nnx.Param)

  def kind(axes):
    return (
      "norm" if "norm" in axes else "embedding" if "vocab" in axes else "matrix"
    )

  kinds = jax.tree.map(
    lambda v: v.replace(kind(v.get_metadata()["logical_axes"])),
    params,
    is_leaf=_is_var,
  )
  return params, nnx.to_pure_dict(kinds)


def _cfg(scan, **overrides):
  # Untied head: a second parameter with a 'vocab' axis.
  return small_config(
    **{"model.scan_layers": scan, "model.tie_embeddings": False, **overrides}
  )


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_decay_mask_by_parameter_kind(scan, decay_embeddings):
  params, kinds = _kinds(_cfg(scan))
  mask = optim.decay_mask(params, decay_embeddings=decay_embeddings)
  want = {"norm": False, "embedding": decay_embeddings, "matrix": True}
  got = jax.tree.leaves(
    jax.tree.map(lambda k, m: (k, m, want[k]), kinds, mask),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  assert {k for k, _, _ in got} == {"norm", "embedding", "matrix"}
  assert [(k, m) for k, m, w in got if m != w] == []
  # The stacked [layers, D] norm scales (scanned or not: the stack is
  # always stacked) are norms whatever their rank.
  layer = ("stack", "groups", "segment_0", "layer_0", "attn_norm", "scale")
  scale, decayed = params, mask
  for key in layer:
    scale, decayed = scale[key], decayed[key]
  assert scale.ndim == 2 and decayed is False


def _one_step(cfg):
  t = loop.build_trainer(cfg, jax.devices()[:1])
  batch = sharding.host_to_global(
    t.mesh,
    packed_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size),
  )
  state = t.init_fn()
  init = jax.device_get(state["params"])
  state, metrics = t.train_step(state, batch)
  return init, jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_weight_decay_is_applied_by_parameter_kind(scan):
  """Same first step with and without decay: AdamW's decoupled decay moves a
  decayed parameter by exactly -lr * wd * p, and nothing else at all."""
  lr, wd = 1e-2, 0.5
  common = {"train.warmup_steps": 0, "train.learning_rate": lr}
  init, plain, m = _one_step(
    _cfg(scan, **common, **{"train.weight_decay": 0.0})
  )
  _, decayed, _ = _one_step(_cfg(scan, **common, **{"train.weight_decay": wd}))
  assert m["learning_rate"] == pytest.approx(lr, rel=1e-6)
  _, kinds = _kinds(_cfg(scan))

  def check(kind, p0, a, b):
    if kind == "norm":
      np.testing.assert_array_equal(b, a, err_msg=kind)
    else:
      # atol: float32 rounding of p itself (|p| < 0.1, ulp < 1e-8).
      np.testing.assert_allclose(
        b - a, -lr * wd * p0, rtol=1e-3, atol=2e-8, err_msg=kind
      )

  jax.tree.map(check, kinds, init, plain, decayed)


def test_schedule_values_at_chosen_steps():
  cfg = small_config(
    **{
      "train.learning_rate": 1e-3,
      "train.end_learning_rate": 1e-4,
      "train.warmup_steps": 4,
      "train.steps": 20,
    }
  ).train
  s = optim.schedule(cfg)
  # Linear warmup from 0 to the peak at step 4, then a cosine to the end
  # value at step 20: halfway (step 12) is the mean of peak and end.
  for step, want in [
    (0, 0.0),
    (1, 2.5e-4),
    (2, 5e-4),
    (4, 1e-3),
    (12, 5.5e-4),
    (20, 1e-4),
  ]:
    assert float(s(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step


def test_logged_learning_rate_is_the_one_applied():
  """Steps 1 and 2 log lr 0 and lr/2 (warmup 2); with b1 = b2 = 0 Adam's
  first moves are lr * g / (|g| + eps), so the largest move is the lr."""
  lr = 1e-3
  cfg = small_config(
    **{
      "train.learning_rate": lr,
      "train.warmup_steps": 2,
      "train.weight_decay": 0.0,
      "train.grad_clip": 0.0,
      "train.b1": 0.0,
      "train.b2": 0.0,
    }
  )
  t = loop.build_trainer(cfg, jax.devices()[:1])
  batch = sharding.host_to_global(
    t.mesh,
    packed_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size),
  )
  state = t.init_fn()
  params = [jax.device_get(state["params"])]
  logged = []
  for _ in range(2):
    state, m = t.train_step(state, batch)
    params.append(jax.device_get(state["params"]))
    logged.append(float(m["learning_rate"]))
  assert logged == pytest.approx([0.0, lr / 2], rel=1e-6, abs=1e-12)
  jax.tree.map(np.testing.assert_array_equal, params[1], params[0])
  moved = max(
    float(np.max(np.abs(b - a)))
    for a, b in zip(
      jax.tree.leaves(params[1]), jax.tree.leaves(params[2]), strict=True
    )
  )
  assert moved == pytest.approx(lr / 2, rel=1e-3)
