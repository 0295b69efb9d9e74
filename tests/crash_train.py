"""`python -m efficient_lm.train` that SIGKILLs itself after a given step.

Used by the resume test to simulate a preempted/killed process (no clean
exit, no final save). Usage: python tests/crash_train.py --crash_at=N
<the usual train flags>. The kill waits until the checkpoint directory of
`--crash_after_checkpoint` is committed (its orbax commit record is
written, on a local disk and on gs:// alike), so the test is deterministic
even though saves are asynchronous.
"""

import os
import signal
import sys
import time

from absl import app, flags
from etils import epath

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_lm import train  # noqa: E402  (defines the train flags)
from efficient_lm.training import checkpoint, loop  # noqa: E402

_CRASH_AT = flags.DEFINE_integer("crash_at", None, "kill after this step")
_AFTER = flags.DEFINE_integer("crash_after_checkpoint", None,
                              "wait for this committed checkpoint first")


def _install_hook():
  real_run = loop.run

  def run(cfg, workdir, *, hooks=(), **kwargs):
    ckpt_dir = epath.Path(workdir) / "checkpoints"

    def crash(step):
      if step != _CRASH_AT.value:
        return
      deadline = time.time() + 60
      while (_AFTER.value is not None and time.time() < deadline and
             not checkpoint.is_committed(ckpt_dir / str(_AFTER.value))):
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)

    return real_run(cfg, workdir, hooks=(*hooks, crash), **kwargs)

  loop.run = run


if __name__ == "__main__":
  _install_hook()
  app.run(train.main, flags_parser=train.parse_flags)
