"""configs/tiny.py with mixture-of-depths (docs/routing.md): every other
block (layers 1 and 3 of 4) processes the top 12.5% of each sequence by
router score; evaluation and generation use the router's own causal
decision (logit > 0), taught top-k membership by a BCE aux loss."""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "tiny_mod"
  c.model.routing.kind = "mod"
  c.model.routing.every = 2
  c.model.routing.capacity = 0.125
  c.model.routing.predictor = "router_bce"
  c.model.routing.aux_loss_weight = 0.01
  return c
