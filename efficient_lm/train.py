"""Train a model from a config file.

  python -m efficient_lm.train --config=configs/tiny.py --workdir=runs/tiny \
      --config.model.num_layers=4
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py).",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
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


if __name__ == "__main__":
  app.run(main)
