"""Several processes, one program: connect them, and stop promptly when one
of them is lost.

Every process runs the same command; `jax.distributed.initialize` connects
it to the coordinator (process 0), which also watches heartbeats. A process
that stops sending them for `heartbeat_timeout` seconds (killed, crashed,
its host gone) is declared dead and every survivor is stopped, so no host
waits forever in a collective that can no longer complete:

* a survivor whose step fails (on CPU a collective fails as soon as its peer
  closes the connection) asks the coordinator which processes are alive,
  names the lost ones in one line and exits with status 1;
* a survivor stuck in a collective (TPU and GPU collectives wait) is ended
  by the runtime itself when the coordinator declares the peer dead; its
  log line names the task ("tasks are unhealthy ...: 1").

Either way a survivor exits non-zero within `heartbeat_timeout` plus a few
seconds of the loss. A lost coordinator (process 0) is seen by the others
as failed heartbeats, with the same bound.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

import jax

from efficient_lm.training.read_noise import one_line

DEFAULT_HEARTBEAT_TIMEOUT_S = 60


def initialize(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> None:
  """jax.distributed.initialize with our failure bound.

  The three addresses may be None on Cloud TPU and SLURM, where JAX
  detects the cluster. The shutdown barrier (every process waits for the
  others at exit) gets the same bound: processes that stop together (the
  end of the run, a preemption) arrive within seconds of each other.
  """
  if heartbeat_timeout_s < 1:
    raise ValueError(
      f"--heartbeat_timeout={heartbeat_timeout_s}: expected "
      "a positive number of seconds"
    )
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=heartbeat_timeout_s,
    shutdown_timeout_seconds=heartbeat_timeout_s,
  )


def live_processes(timeout_s: float) -> list[int] | None:
  """The processes the coordinator counts alive, or None if it cannot say
  within `timeout_s`: it is unreachable, or every process is alive and the
  others have not asked (the question is a barrier among the living, which
  a dead process leaves once its heartbeats are missed)."""
  from jax._src import distributed  # the client has no public accessor

  client = distributed.global_state.client
  if client is None:
    return None
  answer: dict[str, list[int]] = {}

  def ask():
    try:
      answer["live"] = sorted(
        client.get_live_nodes(list(range(jax.process_count())))
      )
    except Exception:  # the coordinator itself is gone
      pass

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return answer.get("live")


def lost_processes_line(
  live: list[int] | None, n: int, me: int, heartbeat_timeout_s: int
) -> str | None:
  """The one line naming the processes of 0..n-1 missing from `live` (the
  coordinator's answer), or None when it gave none or none is lost."""
  if live is None:
    return None
  lost = [p for p in range(n) if p not in live]
  if not lost:
    return None
  return (
    f"error: lost process{'es' if len(lost) > 1 else ''} "
    f"{', '.join(map(str, lost))} of {n} (no heartbeat for "
    f"{heartbeat_timeout_s} s: killed, crashed or its host gone); "
    f"stopping process {me}"
  )


def exit_after_failure(error: BaseException, heartbeat_timeout_s: int):
  """Ends this process (status 1) after a failure in a multi-process run,
  without waiting at the shutdown barrier for peers that may be gone.

  A lost peer gets one line naming it; otherwise (this process's own
  failure, or no answer) the traceback is printed as a single-process run
  would.
  """
  me, n = jax.process_index(), jax.process_count()
  print(
    f"error: process {me} of {n} stopped: {one_line(error)}; asking the "
    f"coordinator which processes are alive (up to "
    f"{heartbeat_timeout_s} s)",
    file=sys.stderr,
    flush=True,
  )
  wait_s = heartbeat_timeout_s + 5
  live = live_processes(wait_s)
  line = lost_processes_line(live, n, me, heartbeat_timeout_s)
  if line is not None:
    print(line, file=sys.stderr, flush=True)
  else:
    traceback.print_exception(error, file=sys.stderr)
    if live is None:
      print(
        f"error: the coordinator did not say within {wait_s} s which "
        "processes are alive: process 0 is lost, or all are alive and "
        f"the failure above is process {me}'s own",
        file=sys.stderr,
        flush=True,
      )
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(1)  # the shutdown barrier would wait for the lost peers
