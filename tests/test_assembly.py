"""The model-assembly contracts: (logits, aux), aux losses in the objective
and in metrics.jsonl, non-trainable model state in the train state and in
checkpoints. A test-only block counts its calls (models.ModelState) and
reports an auxiliary loss."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import models, sharding
from efficient_lm.models.block import Block
from efficient_lm.models.decoder import Decoder
from efficient_lm.training import losses, loop, step as step_lib
from tests.helpers import (
  crash_and_resume,
  packed_batch,
  restore_latest,
  sigterm_handler_restored,
  small_config,
)


class CountingBlock(Block):
  """A decoder block that counts its calls (non-trainable state) and adds
  `weight * mean(x_out^2)` as the auxiliary loss `loss/act_l2`."""

  weight = 0.5

  def __init__(self, cfg, spec, rngs):
    super().__init__(cfg, spec, rngs)
    self.calls = models.ModelState(jnp.zeros((), jnp.int32), logical_axes=())

  def __call__(self, x_BTD, pos_BT, seg_BT):
    x_BTD, aux = super().__call__(x_BTD, pos_BT, seg_BT)
    self.calls[...] = self.calls[...] + 1
    return x_BTD, {
      **aux,
      "loss/act_l2": self.weight * jnp.mean(jnp.square(x_BTD)),
      "count/calls": self.calls[...],
    }


def counting_decoder(cfg, rngs):
  return Decoder(cfg, rngs, block=CountingBlock)


def _batch(cfg, seed=0):
  return packed_batch(
    cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, seed
  )


def test_aux_losses_enter_the_loss_and_the_gradient():
  cfg = small_config(**{"train.batch_size": 2})
  model = counting_decoder(cfg.model, nnx.Rngs(params=0))
  graphdef, params, model_state = jax.tree.map(
    lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x,
    nnx.split(model, nnx.Param, models.ModelState),
    is_leaf=lambda x: isinstance(x, nnx.State),
  )
  batch = jax.tree.map(jnp.asarray, _batch(cfg))
  objective = losses.make_objective("next_token", z_loss=0.0)

  def grads(weight):
    CountingBlock.weight = weight
    try:
      (loss, (metrics, aux, _)), g = jax.value_and_grad(
        lambda p: step_lib.loss_fn(graphdef, p, model_state, batch, objective),
        has_aux=True,
      )(params)
    finally:
      CountingBlock.weight = 0.5
    return loss, {**metrics, **aux}, g

  loss0, m0, g0 = grads(0.0)
  loss1, m1, g1 = grads(1.0)
  # The aux loss is summed over the two layers and added to the CE.
  assert m1["loss/act_l2"] > 0
  np.testing.assert_allclose(loss1, m1["ce"] + m1["loss/act_l2"], rtol=1e-6)
  np.testing.assert_allclose(loss0, m0["ce"], rtol=1e-6)
  np.testing.assert_allclose(m0["ce"], m1["ce"], rtol=1e-6)
  diff = max(
    float(jnp.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True)
  )
  assert diff > 1e-4, diff
  # Diagnostics are averaged over layers (each layer has been called once).
  assert float(m1["count/calls"]) == 1.0


def test_model_state_is_trained_state_and_logged(tmp_path):
  """Through the real loop: the counters live in state["model_state"],
  are sharded like params, advance once per step (not in eval), and the
  aux entries reach metrics.jsonl averaged over each logging window."""
  cfg = small_config(
    **{
      "train.steps": 6,
      "train.log_every": 2,
      "train.eval_every": 3,
      "train.eval_batches": 1,
      "train.batch_size": 8,
      "mesh.data": 8,
      "checkpoint.every_steps": 3,
    }
  )
  t = loop.build_trainer(cfg, build_model=counting_decoder)
  counts = t.abstract_state["model_state"]["stack"]["groups"]["segment_0"][
    "layer_0"
  ]["calls"]
  assert counts.shape == (2,)  # one per layer
  assert counts.sharding.spec == sharding.logical_to_spec(("layers",))

  # The loop installs its SIGTERM handler and puts ours back (issue #25).
  with sigterm_handler_restored() as hook:
    loop.run(cfg, str(tmp_path), build_model=counting_decoder, hooks=(hook,))
  rows = [
    json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))
  ]
  train = {r["step"]: r for r in rows if "loss" in r}
  evals = {r["step"]: r for r in rows if "eval_loss" in r}
  # Window of steps 1-2 saw counters 1 and 2; steps 3-4 saw 3 and 4.
  assert train[2]["count/calls"] == 1.5
  assert train[4]["count/calls"] == 3.5
  assert train[2]["loss/act_l2"] > 0
  assert evals[3]["eval_count/calls"] == 4.0  # state after 3 steps, +1
  assert evals[3]["eval_loss/act_l2"] > 0


@pytest.mark.parametrize("log_every", [1, 3])
def test_each_row_averages_the_steps_since_the_previous_row(
  tmp_path, log_every
):
  """Issue #23: a first step that is also a logging step ends its window,
  so with log_every=1 every row holds that step's own aux values. The
  counter is the step number: a row's value is the mean of its steps."""
  cfg = small_config(
    **{
      "train.steps": 4,
      "train.log_every": log_every,
      "train.eval_every": 100,
      "train.batch_size": 8,
      "mesh.data": 8,
    }
  )
  loop.run(cfg, str(tmp_path), build_model=counting_decoder)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
  # log_every=3: the first step alone, then steps 1-3 (the first step
  # does not end a window it does not close), then step 4 (the last).
  want = {1: {1: 1, 2: 2, 3: 3, 4: 4}, 3: {1: 1, 3: 2, 4: 4}}[log_every]
  assert {s: r["count/calls"] for s, r in rows.items()} == want


# Wall-clock entries of a row: they differ between any two runs, and the
# first row of a run or a resume has none (its step includes compilation).
_TIMING = {
  "step_time",
  "tokens_per_sec",
  "gflops_per_sec",
  "gflops_per_sec_visible",
  "mfu",
}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  out = {
    (r["step"], "loss" in r): {k: v for k, v in r.items() if k not in _TIMING}
    for r in rows
  }
  assert len(out) == len(rows), "a row logged twice"
  return out


def test_model_state_survives_a_crash_and_resume(tmp_path):
  """A run that dies after step 4 (checkpoint at 3) and is resumed ends
  with the same params and model state as an uninterrupted run, and logs
  the same rows: every key of metrics.jsonl but the timings (issue #23:
  the aux window after a resume held one step too many)."""
  cfg = small_config(
    **{
      "train.steps": 6,
      "train.log_every": 1,
      "train.eval_every": 100,
      "mesh.data": 8,
      "checkpoint.every_steps": 3,
      "checkpoint.async_save": False,
    }
  )

  whole, broken, summary = crash_and_resume(
    cfg, tmp_path, crash_at=4, build_model=counting_decoder
  )
  assert summary["start_step"] == 3
  whole_rows, resumed_rows = _rows(whole), _rows(broken)
  assert resumed_rows == whole_rows
  assert [whole_rows[s, True]["count/calls"] for s in range(1, 7)] == [
    1,
    2,
    3,
    4,
    5,
    6,
  ]

  t = loop.build_trainer(cfg, build_model=counting_decoder)
  finals = []
  for workdir in (whole, broken):
    step, state, _ = restore_latest(workdir, t.abstract_state)
    assert step == 6
    finals.append(state)
  calls = finals[0]["model_state"]["stack"]["groups"]["segment_0"]["layer_0"][
    "calls"
  ]
  np.testing.assert_array_equal(calls, [6, 6])
  jax.tree.map(
    np.testing.assert_array_equal,
    finals[0]["model_state"],
    finals[1]["model_state"],
  )
  jax.tree.map(
    np.testing.assert_array_equal, finals[0]["params"], finals[1]["params"]
  )
