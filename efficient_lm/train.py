"""Train a model from a config file.

  python -m efficient_lm.train --config=configs/tiny.py --workdir=runs/tiny \
      --config.model.num_layers=4
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from efficient_lm import cpu_runtime

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (checkpoints, metrics)."
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() first (multi-host TPU pods, multi-node "
  "GPU, several local CPU processes): every process runs the same command. "
  "On Cloud TPU / SLURM the cluster is auto-detected; elsewhere give the "
  "three flags below.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (--distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Process count (--distributed)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index (--distributed)."
)
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout",
  60,
  "--distributed: seconds without a heartbeat after which a process counts "
  "as lost; every other process then exits (status 1) within about this "
  "bound instead of waiting forever in a collective.",
)
_COMPILE_ONLY = flags.DEFINE_bool(
  "compile_only",
  False,
  "Compile the train step for --topology on this host (libtpu, no TPU) "
  "and print per-chip memory and FLOPs; no data, no workdir.",
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "TPU slice for --compile_only: v5e-16, v5p-32, v4-32, "
  "v6e-8, or a libtpu topology such as v5e:4x4 (default: the config's "
  "`topology`).",
)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save step at INFO; keep the console for progress.
    logging.set_verbosity(logging.WARNING)
  cpu_runtime.keep_freed_host_memory()  # before JAX starts its CPU client
  import jax

  cpu_runtime.use_cpu_only_without_accelerator()  # keeps libtpu's noise out
  from efficient_lm import multihost

  if _DISTRIBUTED.value:
    try:
      multihost.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        _HEARTBEAT.value,
      )
    except ValueError as e:
      sys.exit(f"error: {e}")
  from efficient_lm import config as config_lib
  from efficient_lm.data import DataError
  from efficient_lm.training import loop
  from efficient_lm.training.checkpoint import CheckpointError
  from efficient_lm.training.workdir import WorkdirBusy

  if _COMPILE_ONLY.value:
    from efficient_lm import aot

    try:
      aot.report(
        _CONFIG.value, _TOPOLOGY.value or _CONFIG.value.get("topology") or None
      )
    except (aot.TopologyError, config_lib.ConfigError) as e:
      sys.exit(f"error: {e}")
    return
  if _WORKDIR.value is None:
    sys.exit("error: --workdir is required (unless --compile_only)")
  from efficient_lm.training import memory

  try:
    if jax.default_backend() == "cpu":
      # A pod-sized config on a small host: say that it cannot fit here
      # before the mesh check says only that the devices are missing. (A
      # config that is bad apart from the mesh fails below, as usual.)
      try:
        unmeshed = config_lib.from_config_dict(_CONFIG.value)
      except config_lib.ConfigError:
        unmeshed = None
      problem = unmeshed and memory.config_problem(unmeshed)
      if problem:
        raise loop.TrainingError(problem)
    cfg = config_lib.from_config_dict(
      _CONFIG.value, device_count=jax.device_count()
    )
    if cfg.model.quantization:
      raise config_lib.ConfigError(
        f"model.quantization={cfg.model.quantization!r}: a quantized "
        "run's integer weights are not trained; train its float source "
        "(train.quantization=SCHEME trains it quantization-aware)"
      )
    if jax.process_index() == 0:
      print("resolved config:\n" + cfg.to_json(), flush=True)
    loop.run(cfg, _WORKDIR.value, overrides=_overrides(sys.argv))
  except (
    config_lib.ConfigError,
    DataError,
    CheckpointError,
    loop.TrainingError,
    WorkdirBusy,
  ) as e:
    # Bad input: one line naming the value, no traceback.
    sys.exit(f"error: {e}")
  except Exception as e:
    if jax.process_count() > 1:  # a peer may be gone: do not wait for it
      multihost.exit_after_failure(e, _HEARTBEAT.value)
    raise


def _overrides(argv) -> list[str]:
  """The command line's `--config.key=value` overrides."""
  return [a for a in argv[1:] if a.startswith("--config.")]


def _config_file_problem(argv) -> str | None:
  """Why the --config file cannot be loaded, checked before absl parses it.

  ml_collections defers a missing file to the first attribute access (which
  then names an internal object) and lets a SyntaxError escape as a
  traceback, so both are looked at here first.
  """
  path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      path = arg[len("--config=") :]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return None  # absl reports the missing required flag
  path = path.split(":", 1)[0]  # `file.py:arg` passes arg to get_config
  if not os.path.isfile(path):
    return f"config file {path!r} does not exist"
  with open(path, "rb") as f:
    source = f.read()
  try:
    compile(source, path, "exec")
  except SyntaxError as e:
    return _syntax_error(e)
  return None


def _syntax_error(e: SyntaxError) -> str:
  return f"config file {e.filename}, line {e.lineno}: {e.msg}"


def _plain(e: BaseException) -> str:
  """The message of `e` as text; ml_collections wraps a KeyError (whose str
  is a repr with escaped quotes and newlines) in its AttributeError."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  return " ".join(text.split())


def parse_flags(argv):
  """absl flag parsing with one-line errors for bad config overrides."""
  problem = _config_file_problem(argv)
  if problem:
    sys.exit(f"error: {problem}")
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections: override of a missing key
    key, _, hint = _plain(e).partition(" Did you mean")
    hint = f"; did you mean{hint}" if hint else ""
    overrides = _overrides(argv)
    culprits = [
      a for a in overrides if a.split("=", 1)[0].endswith("." + key.strip("'"))
    ]
    sys.exit(
      f"error: unknown config key {key} in "
      f"{' '.join(culprits or overrides)}{hint}"
    )
  except SyntaxError as e:  # raised while get_config() imports a module
    sys.exit(f"error: {_syntax_error(e)}")
  except (flags.Error, TypeError, ValueError, KeyError) as e:
    sys.exit(f"error: {type(e).__name__}: {_plain(e)}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
