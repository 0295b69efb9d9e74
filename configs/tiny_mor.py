"""configs/tiny.py with mixture-of-recursions (docs/routing.md): 4 virtual
layers as middle_cycle with 2 recursions (first and last layers unique, one
shared middle layer applied twice: 3 unique layers), expert-choice routing
with the default capacities (1, 1/2), the BCE aux loss that teaches the
causal decision evaluation and generation use. CPU: ~1-2 minutes.

  python -m efficient_lm.train --config=configs/tiny_mor.py --workdir=runs/tiny_mor
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "tiny_mor"
  c.model.routing.kind = "mor"
  c.model.routing.num_recursions = 2
  c.model.routing.sharing = "middle_cycle"
  c.model.routing.router = "expert_choice"
  c.model.routing.kv = "recursion_wise"
  # The released expert-choice config's BCE weight (docs/routing.md).
  c.model.routing.aux_loss_weight = 0.001
  return c
