"""Models: `build(model_cfg, rngs)` returns a Flax NNX module whose call is
`model(tokens_BT, positions_BT, segment_ids_BT) -> (logits_BTV, aux)`, or
with `cache=` (generation) -> (logits_BTV, aux, new cache).

The house, one concept a file: `layers` (norms, RoPE, MLP, embedding),
`attention` / `mla` / `tglobal` (the attention modules), `cache`
(generation caches), `visibility` (which keys a query sees), `stack` (the
layer plan and scans), `block` (the pre-norm block and its factories),
`routing` (the toolkit MoD, MoR and mixture-of-experts share), `mod`,
`mor`, `lm` (embedding and head, shared by every kind), the kinds
`decoder`, `funnel` (encoder), `hourglass`, and `flops`.

`KINDS` is the registry: model.kind -> class; each class gives its own
layer plan (`layer_plan(cfg)`).
"""

from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models import cache, stack
from efficient_lm.models.attention import Attention
from efficient_lm.models.decoder import Decoder
from efficient_lm.models.funnel import FunnelEncoder
from efficient_lm.models.hourglass import Hourglass
from efficient_lm.models.layers import ModelState
from efficient_lm.models.mla import MLAttention
from efficient_lm.models.stack import LayerSpec

KINDS = {
  "decoder": Decoder,
  "funnel_encoder": FunnelEncoder,
  "hourglass": Hourglass,
}


def _kind(cfg: ModelConfig):
  if cfg.kind not in KINDS:
    raise ValueError(
      f"model.kind={cfg.kind!r} is not supported; expected one of "
      f"{', '.join(KINDS)}"
    )
  return KINDS[cfg.kind]


def build(cfg: ModelConfig, rngs):
  """The model of `cfg.kind`, parameters initialised from `rngs`."""
  return _kind(cfg)(cfg, rngs)


def layer_plan(cfg: ModelConfig) -> tuple[LayerSpec, ...]:
  """The layer plan of the model `build(cfg)` makes (shapes, FLOPs)."""
  return _kind(cfg).layer_plan(cfg)


def set_kv_cache_dtype(model: nnx.Module, kind: str) -> nnx.Module:
  """Has every attention module of `model` store its K/V rows as `kind`
  (cache.KV_CACHE_DTYPES; one-line ValueError otherwise), in place: their
  `init_cache` then allocates that storage and every forward, with or
  without a cache, reads K/V through it (models/cache.py). A generation
  setting, not saved with the run; `nnx.split` the model afterwards."""
  cache.check_kv_cache_dtype(kind)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (Attention, MLAttention)):  # TGlobal: Attention
      node.kv_cache_dtype = kind
  return model


def unroll_layers(model: nnx.Module) -> nnx.Module:
  """Holds every layer stack of `model` apart (`stack.Stack.unroll`: each
  layer its own arrays, on CPU views of the stacked memory), in place:
  the same model, its calls and caches one per layer. For generation
  (generate.Generator); `nnx.split` the model afterwards."""
  stacks = [n for _, n in nnx.iter_graph(model) if isinstance(n, stack.Stack)]
  for s in stacks:
    s.unroll()
  return model


__all__ = [
  "KINDS",
  "LayerSpec",
  "ModelState",
  "build",
  "layer_plan",
  "set_kv_cache_dtype",
  "unroll_layers",
]
