"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; one
persistent compilation cache per pytest session."""

import os
import shutil
import tempfile

_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
# The tests' arrays are tiny: XLA's CPU compile, not the run, is most of their
# time, and LLVM's optimization passes most of that. Level 0 (XLA's default
# is 3) cuts a file's CPU time by 15-38% (README, Tests); the HLO passes
# (fusion, sharding) are unchanged. An outer XLA_FLAGS that sets the level
# wins.
if "--xla_backend_optimization_level" not in _XLA_FLAGS:
  _XLA_FLAGS += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
  _XLA_FLAGS + " --xla_force_host_platform_device_count=8"
).strip()
# libtpu is installed for ahead-of-time TPU compilation tests only; the
# runtime backend in tests is always the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# JAX's persistent compilation cache, shared by the tests of one session: a
# computation compiled again (a CLI subprocess training the same config, a new
# closure or trainer, a scanned model called eagerly, whose scan is compiled at
# every call) loads the executable instead. The directory is made by xdist's
# controller (or the only process), handed to xdist workers and to every
# subprocess a test starts through the environment, and removed at the end: new
# and empty each session, so an executable from an earlier run (older code,
# older jax) never stands in for a compile. No lock (jax locks only under a size
# limit, whose eviction pass rereads the directory at every write): an entry
# read while another process writes it is cut short, fails zlib's check, and jax
# warns and compiles afresh.
_CACHE_DIR = "EFFICIENT_LM_TEST_COMPILATION_CACHE"


def _cache_settings():
  return {
    "jax_compilation_cache_dir": os.environ[_CACHE_DIR],
    # Every compile, however fast or small (the default skips those under
    # 1 s: most of the CPU compiles here).
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
  }


def pytest_addoption(parser):
  parser.addoption(
    "--no-compilation-cache",
    action="store_true",
    help="compile every jitted function afresh (no JAX persistent cache "
    "shared between the tests and subprocesses of this session)",
  )


def pytest_configure(config):
  if config.getoption("no_compilation_cache"):
    os.environ.pop(_CACHE_DIR, None)  # not an outer session's either
    return
  if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, or no xdist
    os.environ[_CACHE_DIR] = tempfile.mkdtemp(prefix="efficient_lm_jax_")
    config.add_cleanup(
      lambda: shutil.rmtree(os.environ.pop(_CACHE_DIR), ignore_errors=True)
    )
  for name, value in _cache_settings().items():
    jax.config.update(name, value)
    # Read by jax when a subprocess (python -m efficient_lm.train ...)
    # imports it; helpers.cli_env copies this environment.
    os.environ[name.upper()] = str(value)


def _use_cache(on):
  jax.config.update("jax_enable_compilation_cache", on)
  compilation_cache.reset_cache()  # jax decides again at the next compile


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """tpu_aot tests (and their subprocesses) compile without the cache: a
  compile-only TPU client cannot load an executable back, so jax would
  write each one and, on a second compile, warn and compile again."""
  if _CACHE_DIR not in os.environ or not item.get_closest_marker("tpu_aot"):
    yield
    return
  saved = {k.upper(): os.environ.pop(k.upper()) for k in _cache_settings()}
  _use_cache(False)
  try:
    yield
  finally:
    _use_cache(True)
    os.environ.update(saved)
