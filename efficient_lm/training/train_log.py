"""What the training loop logs: step rows, timing, the summary's numbers.

The loop hands each step's device metrics to `TrainLog.push` right after
dispatching the step, and the previous step's are read then, one step
late, so the device never idles on the host. Rows go to metrics.jsonl
(training/metrics.MetricWriter) and the console (training/console.py):

- the first step of a run (or of a resume), at once: the loss before
  training has moved much;
- every `log_every` steps and the last step: that step's loss, grad norm
  and learning rate, the model's aux entries averaged over the steps since
  the previous such row, and the step time and throughput of those steps.
  The first step's row ends a window only where it falls on one of these
  steps (log_every=1: every row holds its own step's values).

The first step read includes compilation: it starts the clocks and is not
timed itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax

from efficient_lm.training import console
from efficient_lm.training import metrics as metrics_lib


class TrainingError(RuntimeError):
  """The run cannot continue (e.g. the loss became NaN)."""


class StepTimer:
  """Wall time of the steps read after the first."""

  def __init__(self):
    self.t_first: float | None = None
    self.steps_after_first = 0
    self._t0 = self._now = 0.0
    self._steps = 0

  def tick(self) -> None:
    """One step's metrics were read."""
    self._now = time.perf_counter()
    if self.t_first is None:  # the first step includes compilation
      self.t_first = self._t0 = self._now
    else:
      self.steps_after_first += 1
      self._steps += 1

  def window(self) -> tuple[float, int]:
    """(seconds, steps) since the previous window ended, up to the last
    tick; the next window starts there."""
    out = (self._now - self._t0, self._steps)
    self._t0, self._steps = self._now, 0
    return out

  def overall(self) -> tuple[float, int]:
    """(seconds since the first step was read, steps timed since)."""
    if self.t_first is None:
      return 0.0, 0
    return time.perf_counter() - self.t_first, self.steps_after_first


class TrainLog:
  """Reads the steps' metrics (one step late) and writes their rows.

  `throughput(tokens=, seconds=)` gives a row's throughput entries
  (metrics.throughput with the run's FLOPs and devices filled in);
  `checkpoint_note()` says where the last good checkpoint is, for the error
  on a non-finite step.
  """

  def __init__(
    self,
    writer: metrics_lib.MetricWriter,
    progress: console.Progress,
    *,
    start: int,
    steps: int,
    log_every: int,
    tokens_per_step: int,
    throughput: Callable[..., dict[str, float]],
    checkpoint_note: Callable[[], str],
  ):
    self.writer, self.progress = writer, progress
    self.start, self.steps, self.log_every = start, steps, log_every
    self.tokens_per_step = tokens_per_step
    self._throughput = throughput
    self._checkpoint_note = checkpoint_note
    self.timer = StepTimer()
    self._aux = metrics_lib.WindowMean()  # model aux: mean over the window
    self._pending: tuple[int, Any] | None = None  # not yet read
    self.last: dict[str, float] = {}

  def push(self, step: int, metrics: Any) -> None:
    """Step `step` was dispatched: reads the step before it."""
    if self._pending is not None:
      self._read(*self._pending)
    self._pending = (step, metrics)
    self.progress.advance()

  def flush(self) -> None:
    """Reads the step not yet read (before an evaluation or a save: never
    evaluate or save a state whose update was not finite)."""
    if self._pending is not None:
      self._read(*self._pending)
      self._pending = None

  def evaluated(self, step: int, eval_metrics: dict[str, float]) -> None:
    self.last["eval_loss"] = eval_metrics["eval_loss"]
    self.writer.write(step, eval_metrics)
    self.progress.evaluated(step, self.last["eval_loss"])

  def sync(self) -> None:
    self.writer.sync()

  def _read(self, step: int, metrics: Any) -> None:
    m = jax.device_get(metrics)
    aux = {k: float(v) for k, v in m.pop("aux").items()}
    host = {k: float(v) for k, v in m.items()}
    if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
      raise TrainingError(
        f"loss={host['loss']} grad_norm={host['grad_norm']} at step {step}: "
        f"stopping; {self._checkpoint_note()}"
      )
    self.timer.tick()
    self.last.update(host, step=step)
    self._aux.add(aux)
    ends_window = step % self.log_every == 0 or step == self.steps
    if step == self.start + 1:  # the loss before training has moved much
      if ends_window:  # the next row averages the steps after this one
        self._aux.pop()
      self.writer.write(step, {**host, **aux})
      self.progress.logged(step, host["loss"], None)
    elif ends_window:
      elapsed, n = self.timer.window()
      tput = (
        self._throughput(tokens=self.tokens_per_step * n, seconds=elapsed)
        if n
        else {}
      )
      record = {
        **host,
        **self._aux.pop(),
        "step_time": elapsed / max(n, 1),
        **tput,
      }
      self.writer.write(step, record)
      self.progress.logged(step, host["loss"], tput.get("tokens_per_sec"))

  def summary(self) -> dict[str, Any]:
    """The run's final step, losses and overall tokens/s (None if fewer
    than two steps were read)."""
    seconds, timed = self.timer.overall()
    return {
      "final_step": int(self.last.get("step", self.start)),
      "train_loss": self.last.get("loss"),
      "eval_loss": self.last.get("eval_loss"),
      "tokens_per_sec": (
        self.tokens_per_step * timed / seconds if timed else None
      ),
    }
