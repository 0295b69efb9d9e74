"""CPU-only malloc settings: when they apply, and that they stop the kernel
from faulting in a large XLA temporary again on every call."""

import json
import statistics
import subprocess
import sys

import pytest

from efficient_lm import cpu_runtime
from tests.helpers import REPO, cli_env

# Like XLA's CPU runtime: a worker thread allocates a block over glibc's
# mmap limits (100 MB), writes it and frees it, 10 times; prints this
# process's page faults for each round.
_THREAD_CHILD = r"""
import ctypes, json, resource, sys, threading
from efficient_lm import cpu_runtime
applied = sys.argv[1] == "keep" and cpu_runtime.keep_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 100 << 20, []
def rounds():
  for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print("RESULT", json.dumps({"applied": applied, "pages": size / 4096,
                            "faults": faults[1:]}))
"""

# The real thing: a jitted function whose temporary (a 6144^2 float32 dot
# output fed to a second dot, 151 MB) is over both limits; page faults in
# each of 10 calls after 5 warm-up calls (the heap grows to its steady size
# over a few calls).
_XLA_CHILD = r"""
import json, resource, sys
from efficient_lm import cpu_runtime
applied = sys.argv[1] == "keep" and cpu_runtime.keep_freed_host_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x_ND: (x_ND @ x_ND.T) @ x_ND)
x_ND = jnp.ones((6144, 8), jnp.float32)
temp = f.lower(x_ND).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(15):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x_ND).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("RESULT", json.dumps({"applied": applied, "pages": temp / 4096,
                            "faults": faults[5:]}))
"""


def _run(child, mode):
  """`child` in a fresh process (malloc settings are process-wide)."""
  out = subprocess.run(
    [sys.executable, "-c", child, mode],
    cwd=REPO,
    env=cli_env(drop=("MALLOC_", "GLIBC_TUNABLES")),
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  return json.loads(out.split("RESULT ", 1)[1])


linux_only = pytest.mark.skipif(
  not sys.platform.startswith("linux"), reason="glibc malloc settings"
)


@linux_only
def test_thread_reuses_a_freed_large_block():
  default, kept = _run(_THREAD_CHILD, "default"), _run(_THREAD_CHILD, "keep")
  # glibc's default maps and unmaps the block: every round faults it in...
  assert min(default["faults"]) > 0.9 * default["pages"], default
  # ... kept in one heap, never trimmed, later rounds find it resident.
  assert kept["applied"], kept
  assert max(kept["faults"]) < 0.01 * kept["pages"], kept


@linux_only
def test_xla_temporary_is_reused_not_faulted_in_each_call():
  default, kept = _run(_XLA_CHILD, "default"), _run(_XLA_CHILD, "keep")
  assert default["pages"] > 64 * 2**20 / 4096  # over both mmap limits
  assert min(default["faults"]) > 0.5 * default["pages"], default
  # Most calls reuse pages of earlier calls (the heap may still grow once).
  assert kept["applied"], kept
  assert statistics.median(kept["faults"]) < 0.02 * kept["pages"], kept


def test_cpu_only_follows_jax_platforms_then_device_files(
  tmp_path, monkeypatch
):
  assert cpu_runtime.cpu_only({"JAX_PLATFORMS": "cpu"})
  assert cpu_runtime.cpu_only({"JAX_PLATFORMS": " CPU "})
  assert not cpu_runtime.cpu_only({"JAX_PLATFORMS": "cuda"})
  assert not cpu_runtime.cpu_only({"JAX_PLATFORMS": "cpu,tpu"})
  # Unset: an accelerator's device file means "not CPU-only".
  monkeypatch.setattr(
    cpu_runtime, "ACCELERATOR_DEVICE_FILES", (str(tmp_path / "nvidia[0-9]*"),)
  )
  assert cpu_runtime.cpu_only({})
  (tmp_path / "nvidia0").touch()
  assert not cpu_runtime.cpu_only({})
