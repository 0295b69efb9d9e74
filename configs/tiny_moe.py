"""configs/tiny.py with mixture-of-experts MLPs (models/moe.py): 8 experts
of width 96, top-2, one shared expert, the first layer dense, dropless
routing with a softmax router and the Switch / GShard balance loss. Active
MLP width per token 3 x 96 = 288 (tiny's dense MLP: 384); total expert
parameters 9 x 96 per layer. CPU: a few minutes.

  python -m efficient_lm.train --config=configs/tiny_moe.py --workdir=runs/tiny_moe
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "tiny_moe"
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 2
  c.model.moe.num_shared_experts = 1
  c.model.moe.expert_mlp_dim = 96
  c.model.moe.first_dense = 1
  c.model.moe.router = "softmax"
  c.model.moe.capacity_factor = 0.0  # dropless
  c.model.moe.balancing = "aux_loss"
  c.model.moe.aux_loss_weight = 0.01
  c.model.moe.router_z_loss = 0.001
  return c
