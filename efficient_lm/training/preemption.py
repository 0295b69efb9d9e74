"""SIGTERM (a preemption notice) -> one step at which every process saves.

One process: a Python SIGTERM handler sets a flag that the loop checks
between steps.

Several processes: the SIGTERM reaches one host (or some), but all must save
the same step and stop, or the checkpoint is torn and the hosts that go on
hang in their next collective. `jax.distributed.initialize` starts JAX's
preemption sync manager, which catches SIGTERM in C++, tells the
coordinator, and agrees on a step (the largest step any host has reached,
plus one) at which `reached_preemption_sync_point(step)` turns True on every
host. A Python handler would replace the runtime's, so none is installed
then. The protocol wants the call at every step, from the same start step on
every host, which the loop does.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


def _runtime_syncs_preemption() -> bool:
  """True when JAX's preemption sync manager is running (several processes
  and `jax_enable_preemption_service`, the default)."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed  # no public accessor for the manager

  return distributed.global_state.preemption_sync_manager is not None


class Preemption:
  """`with Preemption() as p: ... if p.reached(step): save, stop`."""

  def __init__(self):
    self._flag = False
    self._previous = None
    self._sync = _runtime_syncs_preemption()

  def __enter__(self) -> Preemption:
    if not self._sync:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker)
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop; call once per step, in order.

    Latches: once True (on every host at the same step), stays True.
    """
    if self._sync and not self._flag:
      self._flag = multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
