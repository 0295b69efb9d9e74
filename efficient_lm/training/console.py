"""What a run shows on stderr while it trains.

On a terminal: one tqdm bar (step, loss, last eval loss, tokens/s, ETA).
Anywhere else (`make train > log`, a batch job): a carriage-return bar
would become one huge line, so plain lines are printed instead, one per
logged step and one per evaluation.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from efficient_lm.training.metrics import human


class Progress:
  def __init__(
    self,
    total: int,
    initial: int,
    *,
    enabled: bool,
    stream: TextIO | None = None,
  ):
    self.total = total
    self.enabled = enabled
    self._stream = sys.stderr if stream is None else stream
    self._eval_loss: float | None = None
    self._bar = None
    if enabled and self._stream.isatty():
      from tqdm.auto import tqdm

      self._bar = tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=self._stream,
      )

  def advance(self) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def logged(
    self, step: int, loss: float, tokens_per_sec: float | None
  ) -> None:
    """A logged train step (the first one, then every `log_every`)."""
    if self._bar is not None:
      postfix = {"loss": f"{loss:.4f}"}
      if self._eval_loss is not None:
        postfix["eval"] = f"{self._eval_loss:.4f}"
      postfix["tok_s"] = human(tokens_per_sec or 0.0)
      self._bar.set_postfix(postfix)
    elif self.enabled:
      tput = (
        "" if tokens_per_sec is None else f", {human(tokens_per_sec)} tokens/s"
      )
      self._print(f"step {step}/{self.total}: loss {loss:.4f}{tput}")

  def evaluated(self, step: int, eval_loss: float) -> None:
    self._eval_loss = eval_loss
    if self._bar is None and self.enabled:
      self._print(f"step {step}/{self.total}: eval loss {eval_loss:.4f}")

  def _print(self, line: str) -> None:
    print(line, file=self._stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def already_complete(
  step: int, steps: int, workdir: str, checkpoints: str
) -> str:
  return (
    f"Run already complete at step {step} (train.steps={steps}): "
    f"results in {workdir} (config.json, runs.jsonl, metrics.jsonl, "
    f"tensorboard/), checkpoints in {checkpoints}. Raise "
    "--config.train.steps to train further."
  )


def no_good_checkpoint(
  latest: int | None, directory: str | os.PathLike[str]
) -> str:
  if latest is None:
    return (
      f"no checkpoint was saved before this (checkpoints go to {directory})"
    )
  return f"the last good checkpoint is step {latest} in {directory}"
