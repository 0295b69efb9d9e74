"""The training loop's evaluation and its saves around a NaN."""

import jax
import numpy as np
import pytest

from efficient_lm.training import loop
from efficient_lm.training.checkpoint import Checkpointer
from tests.helpers import sigterm_handler_restored, small_config


def test_evaluate_is_repeatable_and_reads_num_batches():
  cfg = small_config(**{"train.eval_batches": 3})
  t = loop.build_trainer(cfg, jax.devices()[:1])
  it = loop.make_iterator(t, loop.make_tokenizer(cfg), "eval")
  start = it.get_state()
  state = t.init_fn()
  first = loop.evaluate(t, it, start, state, 2)
  # Exactly `num_batches` batches read (not train.eval_batches) ...
  after = it.get_state()
  it.set_state(start)
  next(it), next(it)
  assert after == it.get_state()
  # ... and the same ones each time, wherever the iterator was left.
  assert loop.evaluate(t, it, start, state, 2) == first
  assert loop.evaluate(t, it, start, state, 1) != first


def test_nan_never_reaches_a_checkpoint(tmp_path):
  """Saving every step, the run stops at the first non-finite step and its
  latest checkpoint holds finite parameters; the SIGTERM handler the loop
  installed is removed when it raises."""
  cfg = small_config(
    **{
      "train.learning_rate": 1e12,
      "train.grad_clip": 0.0,
      "train.steps": 60,
      "checkpoint.every_steps": 1,
      "checkpoint.async_save": False,
      "train.eval_every": 1000,
      "mesh.data": 8,
    }
  )
  # The loop's SIGTERM handler is put back on this exit too (issue #25).
  with (
    sigterm_handler_restored() as hook,
    pytest.raises(loop.TrainingError, match="last good checkpoint"),
  ):
    loop.run(cfg, str(tmp_path), hooks=(hook,))
  t = loop.build_trainer(cfg)
  with Checkpointer(
    tmp_path / "checkpoints", every_steps=1, keep=None, async_save=False
  ) as ckpt:
    step, state, _ = ckpt.restore_latest(t.abstract_state)
  assert step >= 1
  for leaf in jax.tree.leaves(jax.device_get(state["params"])):
    assert np.isfinite(leaf).all(), step
