"""`python -m efficient_lm.train` that signals itself after a given step.

Used by the resume test to simulate a killed process (no clean exit, no
final save), and by the multi-process tests to kill or preempt (SIGTERM)
one process of several. Usage, from the repository root:
python -m tests.crash_train --crash_at=N
[--crash_signal=TERM] [--crash_process=I] <the usual train flags>. The
signal waits until the checkpoint directory of `--crash_after_checkpoint`
is committed (its orbax commit record is written, on a local disk and on
gs:// alike), so the test is deterministic even though saves are
asynchronous.
"""

import os
import signal
import time

from absl import app, flags
from etils import epath

from efficient_lm import train  # defines the train flags
from efficient_lm.training import checkpoint, loop

_CRASH_AT = flags.DEFINE_integer("crash_at", None, "kill after this step")
_AFTER = flags.DEFINE_integer(
  "crash_after_checkpoint", None, "wait for this committed checkpoint first"
)
_SIGNAL = flags.DEFINE_enum(
  "crash_signal", "KILL", ["KILL", "TERM"], "the signal sent"
)
_PROCESS = flags.DEFINE_integer(
  "crash_process", None, "only this process index signals itself"
)


def _install_hook():
  real_run = loop.run

  def run(cfg, workdir, *, hooks=(), **kwargs):
    ckpt_dir = epath.Path(workdir) / "checkpoints"

    def crash(step):
      import jax

      if step != _CRASH_AT.value or _PROCESS.value not in (
        None,
        jax.process_index(),
      ):
        return
      deadline = time.time() + 60
      while (
        _AFTER.value is not None
        and time.time() < deadline
        and not checkpoint.is_committed(ckpt_dir / str(_AFTER.value))
      ):
        time.sleep(0.05)
      os.kill(os.getpid(), getattr(signal, "SIG" + _SIGNAL.value))

    return real_run(cfg, workdir, hooks=(*hooks, crash), **kwargs)

  loop.run = run


if __name__ == "__main__":
  _install_hook()
  app.run(train.main, flags_parser=train.parse_flags)
