"""The causal decoder: embedding, the layer stack, final norm and head.

Pre-norm blocks (models/block.py); the layers come from the layer plan
(models/stack.py): `attention.pattern` gives each layer its attention
kind, `model.per_layer` its own shapes, mixture-of-depths its routed
blocks (models/mod.py); identical layers are stacked and run with one
scan. Mixture-of-recursions replaces the stack by shared layers applied
recursively (models/mor.py), with the same interface.
"""

from __future__ import annotations

from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import mor, stack
from efficient_lm.models.block import Block
from efficient_lm.models.lm import LanguageModel
from efficient_lm.models.mod import RoutedBlock


class Decoder(LanguageModel):
  """Causal decoder: tokens, positions, segment ids -> (logits, aux).

  `block` builds one layer from (cfg, spec, rngs), `routed_block` one
  routed layer (`spec.routed`, mixture-of-depths); tests substitute their
  own block types."""

  def __init__(
    self,
    cfg: ModelConfig,
    rngs: nnx.Rngs,
    *,
    block=Block,
    routed_block=RoutedBlock,
  ):
    self.init_embedding_and_head(cfg, rngs)
    self.stack: stack.Stack | mor.Recursions
    if cfg.routing.kind == "mor":
      self.stack = mor.Recursions(
        cfg, lambda spec, r: block(cfg, spec, r), rngs=rngs
      )
    else:
      self.stack = stack.Stack(
        self.layer_plan(cfg),
        lambda spec, r: (routed_block if spec.routed else block)(cfg, spec, r),
        rngs=rngs,
        scan=cfg.scan_layers,
        remat=cfg.remat,
      )

  @staticmethod
  def layer_plan(cfg: ModelConfig) -> tuple[stack.LayerSpec, ...]:
    return stack.layer_plan(cfg, causal=True)

  def __call__(
    self, tokens_BT, pos_BT, seg_BT, *, cache=None, causal_routing=False
  ):
    """`causal_routing`: routed layers (MoD / MoR) decide per token from
    its own router output (evaluation, generation) instead of top-k over
    the sequence (training); with it the model is strictly causal. With a
    `cache`: the generation step (routing always causal) -> (logits, aux,
    new cache)."""
    x_BTD = self.embed_tokens(tokens_BT)
    if cache is None:
      x_BTD, aux = self.stack(
        x_BTD, pos_BT, seg_BT, causal_routing=causal_routing
      )
      return self.logits(x_BTD), aux
    x_BTD, aux, cache = self.stack(x_BTD, pos_BT, seg_BT, cache=cache)
    return self.logits(x_BTD), aux, cache

  def routing_decisions(self, tokens_BT, pos_BT, seg_BT) -> dict:
    """{name: [B, T] bool} — which tokens each routed block / recursion
    step processes under the causal decision (efficient_lm.plot routing)."""
    x_BTD = self.embed_tokens(tokens_BT)
    out = self.stack.routing_decisions(x_BTD, pos_BT, seg_BT)
    if not out:
      raise ValueError(
        "this model has no routed layers (model.routing.kind='none')"
      )
    return out

  # -------------------------------------------------------------- generation

  def stacks(self) -> tuple[stack.Stack | mor.Recursions]:
    return (self.stack,)

  def init_cache(self, batch: int, max_len: int) -> dict:
    return self.stack.init_cache(batch, max_len, self.dtype)

  def cache_bytes_per_token(self) -> list[int]:
    return self.stack.cache_bytes_per_token(self.dtype)
