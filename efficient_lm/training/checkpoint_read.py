"""`read_latest`: a finished run's newest good step, strictly read-only.

The counterpart of `Checkpointer.restore_latest` (training/checkpoint.py)
for using a run (evaluation, generation): it skips a bad step instead of
setting it aside, and writes nothing.
"""

import json
import sys
from collections.abc import Callable
from typing import Any

from etils import epath
import orbax.checkpoint as ocp

from efficient_lm.training import fingerprints
from efficient_lm.training.checkpoint_layout import (
  COMMIT_RECORD,
  CheckpointError,
  check_fits,
  commit_problem,
  step_numbers,
)
from efficient_lm.training.fingerprints import flat
from efficient_lm.training.read_noise import contain_failed_read_noise, one_line


def read_latest(
  directory: epath.PathLike, abstract_for: Callable[[dict[str, Any]], Any]
) -> tuple[int, dict[str, Any], Any]:
  """`(step, config, state)` of the newest usable step, strictly read-only.

  `abstract_for(config)` maps a step's saved config to the tree to restore:
  some of the state's top-level entries (say params and model_state, not
  the optimizer state) as `jax.ShapeDtypeStruct`s with shardings. A step
  that is uncommitted, unreadable or fails its fingerprints is skipped with
  one line on stderr and left exactly as it is: unlike `restore_latest`,
  nothing in `directory` is renamed, locked or written, so a run still
  training there is undisturbed. One process (no cross-host agreement).
  CheckpointError if no step is usable, or if a good step does not fit
  `abstract_for`'s tree (the model code changed since it was saved).
  """
  directory = epath.Path(directory)
  steps = step_numbers(directory)
  # Before the first read: a bad step's noise can fire before its read
  # fails (from its metadata read, too).
  contain_failed_read_noise()
  for step in steps:
    config, state, problem = _read_step(directory, step, abstract_for)
    if problem is None:
      assert config is not None  # _read_step: (config, state, None)
      return step, config, state
    print(
      f"checkpoint: step {step} in {directory} is unusable ({problem}); "
      "left as it is, trying the previous one",
      file=sys.stderr,
      flush=True,
    )
  raise CheckpointError(
    f"no usable checkpoint in {directory}: "
    + (f"all {len(steps)} are partial or corrupt" if steps else "none saved")
  )


def _read_step(
  directory: epath.Path,
  step: int,
  abstract_for: Callable[[dict[str, Any]], Any],
) -> tuple[dict[str, Any] | None, Any, str | None]:
  """(config, state, None), or (None, None, problem) for a bad step."""
  step_dir = directory / str(step)
  problem = commit_problem(step_dir)
  if problem:
    return None, None, problem
  try:
    with ocp.Checkpointer(ocp.handlers.JsonCheckpointHandler()) as c:
      config = dict(c.restore(step_dir / "config"))
    handler = ocp.handlers.PyTreeCheckpointHandler()
    try:
      meta = handler.metadata(step_dir / "state")
    finally:
      handler.close()
  except Exception as e:  # orbax raises bare Exception/KeyError/IO errors
    return None, None, f"unreadable config or metadata ({one_line(e)})"
  abstract = abstract_for(config)
  stored = {
    k: v
    for k, v in flat(getattr(meta, "tree", meta)).items()
    if k.split(".", 1)[0] in abstract
  }
  check_fits(step, directory, stored, flat(abstract))
  args = ocp.args.PyTreeRestore(
    item=abstract,
    partial_restore=True,
    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
  )
  try:
    with ocp.PyTreeCheckpointer() as c:
      state = c.restore(step_dir / "state", args=args)
  except Exception as e:  # tensorstore read errors are bare `Exception`s
    return None, None, one_line(e)
  record = json.loads((step_dir / COMMIT_RECORD).read_text())
  bad_key = fingerprints.first_difference(
    (record.get("custom_metadata") or {}).get("fingerprint"),
    fingerprints.of(state),
  )
  if bad_key is not None:
    return None, None, f"array {bad_key!r} does not match its fingerprint"
  return config, state, None
