"""Runtime choices for CPU-only runs, made by entry points before JAX starts.

Whether a run is CPU-only is judged once, here, without starting JAX: an
explicit JAX_PLATFORMS, otherwise the accelerator device files.

`use_cpu_only_without_accelerator()`: with no JAX_PLATFORMS, jax tries
every backend it knows, TPU first; where libtpu is installed (the dev extra
installs it for the ahead-of-time TPU compile tests) a CPU-only machine
loads it, and it prints lines that look fatal (`Failed to find host
bounds`, `TPU_WORKER_HOSTNAMES`, a source location trace) before jax falls
back to the CPU. On a machine with no accelerator device, jax is told to
use the CPU alone.

`quiet_libtpu_for_compile_only()`: the ahead-of-time compile for a TPU
topology (aot.py) loads libtpu on purpose; on a host with no TPU it looks
for the TPU VM's metadata server, and prints `Failed to find host bounds`
and `E0000 ... unexpected worker hostname` lines when it finds none,
though compiling for an abstract topology never uses the host's own. Where
no accelerator is attached, the three variables it looks for are given
one-host values (a user's own values win); the topology libtpu describes
is the same (v5e:4x4, v5p:2x2x4 and two v5e:2x2 slices compared).

`keep_freed_host_memory()`: host malloc settings.

XLA's CPU runtime allocates an executable's temporaries as one block per
call (63 MB for the train step of configs/shakespeare_char.py, 187 MB for
configs/tiny.py) and frees it when the call ends. glibc serves a block over
32 MB, and a block over 64 MB asked for by a worker thread, with a fresh
mmap and gives it back with munmap, so every step the kernel faults in and
zeroes every page again: 15k page faults and ~28 ms of system time per
shakespeare step on 2 cores, more than half of the step. With one malloc
arena, no mmap and no trimming, the freed block stays in the heap and the
next step reuses the same pages.

Entry points call `keep_freed_host_memory()` before JAX starts its CPU
client: worker threads pick their malloc arena on their first allocation,
so it cannot wait to ask JAX which platform it got. It applies only to
CPU-only runs: GPU/TPU hosts keep glibc's defaults, where returning large
host buffers (checkpoint copies) to the system is the better trade.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = (
  (_M_ARENA_MAX, 1),  # worker threads share one heap
  (_M_MMAP_MAX, 0),  # large blocks from the heap too
  (_M_TRIM_THRESHOLD, 2**31 - 1),
)  # never shrink the heap
# Device files of the accelerators JAX can use: NVIDIA, AMD (ROCm), TPU
# (accel: v2-v4; vfio groups: v5e and later).
ACCELERATOR_DEVICE_FILES = (
  "/dev/nvidia[0-9]*",
  "/dev/kfd",
  "/dev/accel[0-9]*",
  "/dev/vfio/[0-9]*",
)


def cpu_only(environ=os.environ) -> bool:
  """Whether JAX will run on the CPU alone, judged without starting it."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return {p.strip() for p in platforms.lower().split(",")} == {"cpu"}
  return not any(glob.glob(p) for p in ACCELERATOR_DEVICE_FILES)


def use_cpu_only_without_accelerator() -> bool:
  """Restricts jax to the CPU when no accelerator is attached; True if so.

  An explicit JAX_PLATFORMS (or jax_platforms) is left alone.
  """
  import jax

  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return False
  if not cpu_only():
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


# What libtpu otherwise asks the TPU VM's metadata server for.
_LIBTPU_ONE_HOST = (
  ("TPU_SKIP_MDS_QUERY", "1"),
  ("TPU_WORKER_HOSTNAMES", "localhost"),
  ("TPU_HOST_BOUNDS", "1,1,1"),
)


def quiet_libtpu_for_compile_only(environ=os.environ) -> bool:
  """Before libtpu is loaded to compile only: one-host defaults for what
  it would look up, where no accelerator is attached; True if so."""
  if not cpu_only(environ):
    return False
  for key, value in _LIBTPU_ONE_HOST:
    environ.setdefault(key, value)
  return True


def keep_freed_host_memory() -> bool:
  """Makes glibc keep freed memory for reuse; True if it was applied.

  Call before the first JAX computation. Skipped off Linux/glibc, on hosts
  with an accelerator, and where the user set malloc tunables (theirs win).
  The process then never returns freed memory to the system: its resident
  size stays at its peak, which a training process reaches every step.
  """
  if (
    not sys.platform.startswith("linux")
    or not cpu_only()
    or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    or any(k.startswith("MALLOC_") for k in os.environ)
  ):
    return False
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version"):  # musl and others
    return False
  return all(libc.mallopt(p, v) == 1 for p, v in _SETTINGS)
