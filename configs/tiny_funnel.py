"""A small byte-level funnel encoder trained with masked-LM on the embedded
corpus (CPU, about two minutes on 2 cores):

  python -m efficient_lm.train --config=configs/tiny_funnel.py --workdir=runs/tiny_funnel

Compression after layer 2 of 4 (sequence 128 -> 64), one full-length
decoder layer after the upsampling. The unpooled baseline at the same size
is `--config.model.funnel.factor=1` (README: its MLM loss vs this one).
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "tiny_funnel"
  c.model.kind = "funnel_encoder"
  c.model.num_layers = 4
  c.model.funnel.stages = (2, 2)
  c.model.funnel.factor = 2
  c.model.funnel.decoder_layers = 1
  c.train.objective = "mlm"
  c.train.mlm_rate = 0.15
  c.train.steps = 200  # ~2 minutes on 2 CPU cores
  c.train.warmup_steps = 20
  return c
