"""Train a model from a config file.

  python -m efficient_lm.train --config=configs/tiny.py --workdir=runs/tiny \
      --config.model.num_layers=4
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from efficient_lm import cpu_runtime

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py).",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (checkpoints, metrics).")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False,
  "Call jax.distributed.initialize() first (multi-host TPU pods, multi-node "
  "GPU, several local CPU processes): every process runs the same command. "
  "On Cloud TPU / SLURM the cluster is auto-detected; elsewhere give the "
  "three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (--distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Process count (--distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (--distributed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save step at INFO; keep the console for progress.
    logging.set_verbosity(logging.WARNING)
  cpu_runtime.keep_freed_host_memory()   # before JAX starts its CPU client
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from efficient_lm import config as config_lib
  from efficient_lm.data import DataError
  from efficient_lm.training import loop
  from efficient_lm.training.checkpoint import CheckpointError
  try:
    cfg = config_lib.from_config_dict(_CONFIG.value,
                                      device_count=jax.device_count())
    if jax.process_index() == 0:
      print("resolved config:\n" + cfg.to_json(), flush=True)
    loop.run(cfg, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, CheckpointError,
          loop.TrainingError) as e:
    # Bad input: one line naming the value, no traceback.
    sys.exit(f"error: {e}")


def parse_flags(argv):
  """absl flag parsing with one-line errors for bad config overrides."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections: override of a missing key
    sys.exit(f"error: unknown config key {e} in the overrides "
             f"({' '.join(a for a in argv[1:] if a.startswith('--config.'))})")
  except (flags.Error, TypeError, ValueError, KeyError) as e:
    sys.exit(f"error: {type(e).__name__}: {e}".replace("\n", " "))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
