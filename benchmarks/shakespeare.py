"""Train configs/shakespeare_char.py on a text file; print val loss + tokens/s.

  python -m benchmarks.shakespeare --data=../shared/data/tinyshakespeare.txt

Reference (nanoGPT README, CPU "baby GPT", same shape and schedule): val loss
1.88 at 2000 iterations ("about 3 minutes" on the author's CPU). nanoGPT
estimates val loss on 20 random batches; we print the loss on the same
number of fixed batches the trainer logs, and on the whole val split.
"""

import argparse
import json
import os
import tempfile
import time

NANOGPT_VAL_LOSS = 1.88


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True, help="tinyshakespeare.txt")
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--workdir", default=None)
  args = ap.parse_args()

  from efficient_lm import cpu_runtime

  cpu_runtime.keep_freed_host_memory()  # before JAX starts its CPU client
  import jax
  from configs import shakespeare_char
  from efficient_lm import config as config_lib
  from efficient_lm.training import loop
  from efficient_lm.training.checkpoint import Checkpointer

  cd = shakespeare_char.get_config()
  cd.data.path = os.path.abspath(args.data)
  cd.train.steps = args.steps
  cfg = config_lib.from_config_dict(cd, device_count=jax.device_count())
  workdir = args.workdir or tempfile.mkdtemp(prefix="shakespeare_")
  t0 = time.perf_counter()
  summary = loop.run(cfg, workdir)
  wall = time.perf_counter() - t0

  # Whole val split with the final parameters.
  tok = loop.make_tokenizer(cfg)
  t = loop.build_trainer(cfg)
  ckpt = Checkpointer(
    os.path.join(workdir, "checkpoints"),
    every_steps=1,
    keep=None,
    async_save=False,
  )
  _, state, _ = ckpt.restore_latest(t.abstract_state)
  ckpt.close()
  it = loop.make_iterator(t, tok, "eval")
  n_batches = it.num_pieces // cfg.train.batch_size  # no wrap-around
  full_val = loop.evaluate(t, it, it.get_state(), state, n_batches)["eval_loss"]

  result = {
    "steps": summary["final_step"],
    "val_loss_logged": summary["eval_loss"],
    "val_loss_full_split": full_val,
    "val_batches_full": n_batches,
    "train_loss": summary["train_loss"],
    "tokens_per_sec": summary["tokens_per_sec"],
    "wall_seconds": wall,
    "nanogpt_val_loss": NANOGPT_VAL_LOSS,
    "ratio_val_loss_vs_nanogpt": summary["eval_loss"] / NANOGPT_VAL_LOSS,
    "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
