"""Orbax checkpoints: sharded train state, data-iterator state and config.

`Checkpointer` saves one directory per step through orbax's
CheckpointManager (async, keeps the last K, atomic; the layout and the
commit check are in training/checkpoint_layout.py) and restores the newest
good one. A step directory that turns out unusable at restore time is
renamed to `<step>.corrupt` (or `.corrupt-1`, ...), which orbax's step glob
ignores, so nothing saved is ever deleted and the step number can be saved
again. `read_latest` (training/checkpoint_read.py, re-exported here) is the
read-only counterpart for using a finished run (evaluation, generation): it
skips bad steps instead and writes nothing. No pickle: arrays go through
tensorstore, everything else is JSON.
"""

import json
import sys
from collections.abc import Mapping
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from efficient_lm.training import fingerprints
from efficient_lm.training.checkpoint_layout import (
  CheckpointError,
  check_fits,
  commit_problem,
  is_committed,
  step_numbers,
  without_absent_opt_state,
)
from efficient_lm.training.checkpoint_read import read_latest
from efficient_lm.training.fingerprints import flat
from efficient_lm.training.read_noise import contain_failed_read_noise, one_line
from efficient_lm.training.workdir import config_changes, describe_changes

__all__ = [
  "CheckpointError",
  "Checkpointer",
  "commit_problem",
  "is_committed",
  "read_latest",
  "step_numbers",
]

# Model keys that choose how the same parameters are computed, not what they
# are: a resume may change them.
_RUNTIME_MODEL_KEYS = ("model.attention.impl", "model.moe.impl", "model.remat")


class Checkpointer:
  """Saves and restores `(state, data_state, config)` every `every_steps`.

  Every process calls every method (orbax synchronizes the hosts); the only
  host-0 work here is renaming a bad step directory, behind a barrier.
  """

  def __init__(
    self,
    directory: epath.PathLike,
    *,
    every_steps: int,
    keep: int | None,
    async_save: bool = True,
  ):
    if every_steps < 1:
      raise ValueError(f"every_steps must be >= 1, got {every_steps}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None (all), got {keep}")
    self.directory = epath.Path(directory)
    self.every_steps = every_steps
    self._barriers = 0
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("state", "config"):
      registry.add(
        item, ocp.args.StandardSave if item == "state" else ocp.args.JsonSave
      )
      registry.add(
        item,
        ocp.args.StandardRestore if item == "state" else ocp.args.JsonRestore,
      )
    # Each process writes its own file (orbax's JSON handler otherwise
    # writes from host 0 only), read back by _read_data_state.
    self._data_file = f"process_{jax.process_index()}.json"
    data_handler = ocp.handlers.JsonCheckpointHandler(
      self._data_file,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=None
      ),
    )
    registry.add("data", ocp.args.JsonSave, data_handler)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=async_save,
    )
    self._mgr = ocp.CheckpointManager(
      self.directory, options=options, handler_registry=registry
    )

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(
    self,
    step: int,
    state: Any,
    *,
    data_state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    force: bool = False,
  ) -> bool:
    """Starts saving; True if a save was started.

    With async saves this returns once the arrays are copied to host memory,
    so the caller may donate `state` to the next step right away.
    """
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    if step in self._mgr.all_steps():
      return False  # e.g. a SIGTERM save right after the periodic one
    # Fail here, not in the background writer thread, on non-JSON input.
    data_state = _checked_json("data_state", data_state)
    config = _checked_json("config", config)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config),
    )
    return self._mgr.save(
      step,
      args=args,
      force=True,
      custom_metadata={"fingerprint": fingerprints.of(state)},
    )

  def restore_latest(
    self, abstract_state: Any, *, config: Mapping[str, Any] | None = None
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """`(step, state, data_state)` from the newest good checkpoint, or None.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings;
    the restored arrays get those shardings. With `config` (this run's, as
    a dict), the config saved in the checkpoint must describe the same
    model (CheckpointError naming the first differing `model.` key); other
    changes, such as a longer schedule, are allowed and listed in one line.
    """
    self.wait()  # an in-flight save of ours is not a partial checkpoint
    self._mgr.reload()
    steps = step_numbers(self.directory)
    # Before the first read: a bad step's noise can fire before its read
    # fails (from its metadata read, too).
    contain_failed_read_noise()
    for step in steps:
      state, data_state, problem = self._try_restore(
        step, abstract_state, config
      )
      problem = _agree(problem)
      if problem is None:
        assert data_state is not None  # _try_restore: (state, data, None)
        return step, state, data_state
      self._set_aside(step, problem)
    if steps:
      raise CheckpointError(
        f"no usable checkpoint in {self.directory}: all {len(steps)} were "
        f"partial or corrupt and were renamed to <step>.corrupt"
      )
    set_aside = [p.name for p in self._listdir() if ".corrupt" in p.name]
    if set_aside:
      print(
        f"checkpoint: no checkpoint in {self.directory} (starting fresh); "
        f"earlier bad ones are kept as {', '.join(sorted(set_aside))}",
        file=sys.stderr,
        flush=True,
      )
    return None

  def latest_step(self) -> int | None:
    """Newest step saved or being saved (restore may pick an older one)."""
    return self._mgr.latest_step()

  def saved_config(self, step: int | None = None) -> dict[str, Any] | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    args = ocp.args.Composite(config=ocp.args.JsonRestore())
    try:
      return dict(self._mgr.restore(step, args=args)["config"])
    except Exception as e:  # orbax raises bare Exception/KeyError/IO errors
      raise CheckpointError(
        f"cannot read the config of checkpoint {step} in "
        f"{self.directory}: {one_line(e)}"
      ) from e

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _listdir(self) -> list[epath.Path]:
    return list(self.directory.iterdir()) if self.directory.exists() else []

  def _try_restore(
    self, step: int, abstract_state: Any, config: Mapping[str, Any] | None
  ) -> tuple[Any, dict[str, Any] | None, str | None]:
    """Restores `step`; (None, None, problem) if the checkpoint is broken.

    Raises CheckpointError if the checkpoint is fine but does not fit
    `abstract_state` or `config`: that is a config change, not corruption.
    With several processes a problem may show on one host only (its own
    data file, its shards): the hosts agree after the local checks and
    after the read, so that either all or none enter the next collective
    (orbax's restore barrier, the fingerprint sums over sharded arrays).
    """
    data_state, changes, problem, abstract_state = self._check_step(
      step, abstract_state, config
    )
    problem = _agree(problem)
    if problem:
      return None, None, problem
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    try:
      restored = self._mgr.restore(step, args=args)
    except Exception as e:  # tensorstore read errors are bare `Exception`s
      restored, problem = None, one_line(e)
    problem = _agree(problem)
    if problem:
      return None, None, problem
    assert restored is not None  # a failed read set `problem`
    expected = self._mgr.metadata(step).custom_metadata or {}
    bad_key = fingerprints.first_difference(
      expected.get("fingerprint"), fingerprints.of(restored["state"])
    )
    if bad_key is not None:
      return None, None, f"array {bad_key!r} does not match its fingerprint"
    if changes and jax.process_index() == 0:
      print(
        f"checkpoint: resuming step {step} with a changed config: "
        f"{describe_changes(changes)}",
        file=sys.stderr,
        flush=True,
      )
    return restored["state"], data_state, None

  def _check_step(
    self, step: int, abstract_state: Any, config: Mapping[str, Any] | None
  ) -> tuple[dict[str, Any] | None, dict[str, Any], str | None, Any]:
    """`(data_state, config changes, problem, the tree to restore)` from
    this host's reads of `step`'s small files, with no collective."""
    step_dir = self.directory / str(step)
    problem = commit_problem(step_dir)
    if problem:
      return None, {}, problem, abstract_state
    changes = {}
    if config is not None:
      try:  # read directly: orbax's restore would be a barrier
        saved = json.loads((step_dir / "config" / "metadata").read_text())
      except (OSError, ValueError) as e:
        return None, {}, f"unreadable config ({one_line(e)})", abstract_state
      changes = config_changes(saved, config)
      model = [
        k
        for k in changes
        if k.startswith("model.") and k not in _RUNTIME_MODEL_KEYS
      ]
      if model:
        old, new = changes[model[0]]
        raise CheckpointError(
          f"checkpoint {step} in {self.directory} holds another model: "
          f"{model[0]}={old!r} there, {new!r} in this run's config (use "
          "another --workdir, or the checkpoint's model config)"
        )
    try:
      meta = self._mgr.item_metadata(step)["state"]
    except Exception as e:  # corrupt metadata surfaces as any error type
      return (
        None,
        {},
        f"unreadable state metadata ({one_line(e)})",
        abstract_state,
      )
    if meta is None:
      return None, {}, "state metadata missing", abstract_state
    stored = flat(getattr(meta, "tree", meta))
    abstract_state = without_absent_opt_state(abstract_state, stored)
    check_fits(step, self.directory, stored, flat(abstract_state))
    try:
      data_state = _read_data_state(step_dir / "data", self._data_file)
    except (OSError, ValueError) as e:
      return (
        None,
        {},
        f"unreadable data-iterator state ({one_line(e)})",
        abstract_state,
      )
    if data_state is None:
      return None, {}, f"data/{self._data_file} missing", abstract_state
    return data_state, changes, None, abstract_state

  def _set_aside(self, step: int, problem: str) -> None:
    dst, k = self.directory / f"{step}.corrupt", 0
    while dst.exists():  # the same step number went bad before
      k += 1
      dst = self.directory / f"{step}.corrupt-{k}"
    self._barrier(f"set_aside_{step}")  # every host has picked `dst`
    if ocp.multihost.is_primary_host(0):
      (self.directory / str(step)).rename(dst)
    self._barrier(f"set_aside_{step}_done")
    print(
      f"checkpoint: step {step} in {self.directory} is unusable "
      f"({problem}); renamed it to {dst.name}, trying the previous one",
      file=sys.stderr,
      flush=True,
    )
    self._mgr.reload()

  def _barrier(self, name: str) -> None:
    self._barriers += 1  # orbax wants a fresh barrier name every time
    ocp.multihost.sync_global_processes(
      f"efficient_lm_checkpoint_{name}_{self._barriers}"
    )


def _read_data_state(data_dir: epath.Path, own: str) -> dict[str, Any] | None:
  """This process's data-iterator state, saved as `own` in `data_dir`.

  Every process makes the same packing decisions and keeps only its rows
  (data/packing.py), so all processes save the same state and it does not
  depend on the process count: a run saved by N processes resumes on M. A
  process with no file of its own (M > N) reads process 0's. None if the
  step holds no data state at all.
  """
  for name in (own, "process_0.json"):
    path = data_dir / name
    if path.exists():
      state = json.loads(path.read_text())
      if not isinstance(state, dict):
        raise ValueError(f"{name} holds {type(state).__name__}, not a dict")
      return state
  return None


def _checked_json(name: str, obj: Mapping[str, Any] | None) -> dict[str, Any]:
  obj = {} if obj is None else dict(obj)
  try:
    json.dumps(obj)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be JSON-serializable: {e}") from e
  return obj


def _agree(problem: str | None) -> str | None:
  """A checkpoint is bad if any process found it bad, so all hosts agree."""
  if jax.process_count() == 1:
    return problem
  bad = multihost_utils.process_allgather(np.int32(problem is not None))
  if problem is None and np.any(bad):
    problem = "another process could not read it"
  return problem
