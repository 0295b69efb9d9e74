"""A run's own recorded config (its config.json), to continue the run, e.g.
one that `python -m efficient_lm.convert import` wrote:

  python -m efficient_lm.train --config=configs/run.py:runs/llama \
      --workdir=runs/llama --config.data.path=my.txt --config.train.steps=500
"""

import json
import os

import ml_collections


def get_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))
