"""A checkpoint step on disk: its directory layout and the checks on it.

One directory per step, written by orbax's CheckpointManager (async, keeps
the last K, atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames
it when every item is on disk)::

  <dir>/<step>/state/                 the state pytree (OCDBT + zarr, sharded)
  <dir>/<step>/data/process_<i>.json  data-iterator state of process i
  <dir>/<step>/config/metadata        the resolved config (JSON)
  <dir>/<step>/_CHECKPOINT_METADATA   orbax's commit record; its
                                      custom_metadata holds our fingerprints

Shared by the restoring `Checkpointer` (training/checkpoint.py) and the
read-only `read_latest` (training/checkpoint_read.py): is a step committed,
which steps exist, and does a stored tree fit the one a caller wants.
"""

import json
import re
from typing import Any

from etils import epath
import numpy as np

_ITEMS = ("state", "data", "config")
# Orbax's default step naming (no prefix, no padding); tmp and set-aside
# directories never match it.
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")
COMMIT_RECORD = "_CHECKPOINT_METADATA"


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not fit the requested state."""


def commit_problem(step_dir: epath.PathLike) -> str | None:
  """Why `step_dir` is not a finished save, or None if it looks finished.

  On a local disk orbax only renames a step into place after committing it,
  but on object stores (commit-file mode) and after a manual copy a
  `<step>` directory can exist half-written, so we check orbax's own commit
  record and that every item directory is present.
  """
  step_dir = epath.Path(step_dir)
  try:
    record = json.loads((step_dir / COMMIT_RECORD).read_text())
  except FileNotFoundError:
    return f"no {COMMIT_RECORD}, the save never finished"
  except (OSError, ValueError) as e:
    return f"unreadable {COMMIT_RECORD} ({e})"
  if not isinstance(record, dict) or not record.get("commit_timestamp_nsecs"):
    return f"{COMMIT_RECORD} has no commit time, the save never finished"
  missing = [item for item in _ITEMS if not (step_dir / item).is_dir()]
  if missing:
    return f"missing item director{'y' if len(missing) == 1 else 'ies'} " + (
      ", ".join(missing)
    )
  return None


def is_committed(step_dir: epath.PathLike) -> bool:
  return commit_problem(step_dir) is None


def step_numbers(directory: epath.PathLike) -> list[int]:
  """Every `<step>` directory, newest first, committed or not.

  Not orbax's `all_steps()`: that hides half-written steps in commit-file
  mode, and those must be moved aside before the step is saved again.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  return sorted(
    (
      int(p.name)
      for p in directory.iterdir()
      if _STEP_NAME.match(p.name) and p.is_dir()
    ),
    reverse=True,
  )


def without_absent_opt_state(abstract: Any, stored: dict[str, Any]) -> Any:
  """`abstract` without its "opt_state" when the stored tree (flat keys)
  has none: a weights-only step 0, as runs.write_run saves it (a fresh
  optimizer state is optimizer.init(params), which the training loop
  recomputes on resume, bit for bit; writing it would triple the memory of
  an import). Any other tree is returned as it is."""
  if not isinstance(abstract, dict) or "opt_state" not in abstract:
    return abstract
  if any(k.split(".", 1)[0] == "opt_state" for k in stored):
    return abstract
  return {k: v for k, v in abstract.items() if k != "opt_state"}


def _describe(x: Any) -> str:
  dtype = getattr(x, "dtype", None)
  shape = tuple(getattr(x, "shape", ()))
  return f"{shape} {np.dtype(dtype).name}" if dtype is not None else str(shape)


def _params_first(keys) -> list[str]:
  # A model change shows in a parameter first, not in its optimizer moments.
  return sorted(keys, key=lambda k: not k.startswith("params."))


def check_fits(
  step: int,
  directory: epath.Path,
  stored: dict[str, Any],
  wanted: dict[str, Any],
) -> None:
  mismatch = _mismatch(stored, wanted)
  if mismatch:
    raise CheckpointError(
      f"checkpoint {step} in {directory} does not fit the model: {mismatch}"
    )


def _mismatch(stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
  for key in _params_first(wanted):
    want = wanted[key]
    if key not in stored:
      return f"key {key!r}: checkpoint has no such entry, model wants " + (
        _describe(want)
      )
    have = stored[key]
    same_dtype = (
      getattr(have, "dtype", None) is None
      or getattr(want, "dtype", None) is None
      or np.dtype(have.dtype) == np.dtype(want.dtype)
    )
    if tuple(have.shape) != tuple(want.shape) or not same_dtype:
      return (
        f"key {key!r}: checkpoint has {_describe(have)}, model wants "
        f"{_describe(want)}"
      )
  for key in _params_first(stored):
    have = stored[key]
    if key not in wanted:
      return (
        f"key {key!r}: checkpoint has {_describe(have)}, model has no "
        "such entry"
      )
  return None
