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


def test_evaluate_batches_combines_per_token_sums_and_averages_aux():
  """Issue #25 (the loop's own runs evaluate one or two batches, where a
  mean of batch means or an unaveraged aux can pass): three batches of
  different fill through a stand-in eval step. eval_loss and eval_kl are
  totals over total tokens; aux entries the mean over batches."""
  rows = [(6.0, 3.0, 1.5, 0.2), (2.0, 1.0, 0.2, 0.5), (9.0, 6.0, 0.3, 0.8)]
  batches = [
    {k: np.float32(v) for k, v in zip(("nll", "n", "kl", "f"), r, strict=True)}
    for r in rows
  ]

  def eval_step(params, model_state, batch):
    del params, model_state
    return {
      "nll_sum": batch["nll"],
      "tokens": batch["n"],
      "sums": {"kl": batch["kl"]},
      "aux": {"routing/f": batch["f"]},
    }

  state = {"params": None, "model_state": None}
  got = loop.evaluate_batches(eval_step, None, state, iter(batches))
  assert got == pytest.approx(
    {"eval_loss": 17 / 10, "eval_kl": 2.0 / 10, "eval_routing/f": 0.5}
  )


def test_preemption_sets_its_flag_on_sigterm_and_restores_the_handler():
  """Issue #25, our part of the SIGTERM path in one process: no stop until
  the signal, then stop at every later check; the previous handler back
  after the block."""
  import os
  import signal

  from efficient_lm.training.preemption import Preemption

  def sentinel(signum, frame):
    del signum, frame

  previous = signal.signal(signal.SIGTERM, sentinel)
  try:
    with Preemption() as p:
      assert signal.getsignal(signal.SIGTERM) is not sentinel
      assert not p.reached(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert p.reached(2) and p.reached(3)
    assert signal.getsignal(signal.SIGTERM) is sentinel
  finally:
    signal.signal(signal.SIGTERM, previous)
