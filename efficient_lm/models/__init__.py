"""Models: `build(model_cfg, rngs)` returns a Flax NNX module whose call is
`model(tokens_BT, positions_BT, segment_ids_BT) -> (logits_BTV, aux)`."""

from efficient_lm.models.layers import ModelState
from efficient_lm.models.transformer import build, layer_plan

__all__ = ["build", "layer_plan", "ModelState"]
