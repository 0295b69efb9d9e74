"""configs/tiny.py as an hourglass (docs/funnel.md): the same 4 layers
and width, the middle two run on slots of 2 tokens (stages 1 + 2 + 1,
factor 2), so they cost half per token. A few minutes on 2 CPU cores."""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "tiny_hourglass"
  c.model.kind = "hourglass"
  c.model.funnel.stages = (1, 2, 1)
  c.model.funnel.factor = 2
  return c
