"""The embedding and the output head, shared by every model kind.

`LanguageModel` is the base of the decoder, the funnel encoder and the
hourglass: token embedding (`embed`), final RMSNorm (`final_norm`) and
either tied output logits (the embedding table) or an untied head
(`head_DV`), and the generation queries that read the layer stacks.

A model call is `model(tokens_BT, positions_BT, segment_ids_BT) ->
(logits_BTV, aux)`: float32 logits and a flat dict of float32 scalars,
`loss/<name>` entries added to the training loss by the objective and other
entries logged as diagnostics. With `cache=` (from `init_cache`) it is the
generation step over T new tokens and returns (logits, aux, new cache);
prefill is that call on an empty cache.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import ModelConfig
from efficient_lm.models.layers import DTYPES, Embed, RMSNorm, param
from efficient_lm.sharding import BTV, constrain


class LanguageModel(nnx.Module):
  """Embedding, final norm and head; subclasses add their layers and
  list them in `stacks()` for the generation queries."""

  def init_embedding_and_head(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.dtype = DTYPES[cfg.dtype]
    self.embed = Embed(
      cfg.vocab_size, cfg.embed_dim, rngs=rngs, param_dtype=pdt
    )
    self.final_norm = RMSNorm(
      cfg.embed_dim,
      eps=cfg.norm_eps,
      param_dtype=pdt,
      plus_one=cfg.norm_plus_one,
    )
    # Gemma: embeddings times sqrt(D), the factor in the compute dtype.
    self.embed_scale = math.sqrt(cfg.embed_dim) if cfg.embed_scale else None
    self.final_logits_soft_cap = cfg.final_logits_soft_cap
    self.head_DV = (
      None
      if cfg.tie_embeddings
      else param(
        rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), 0.02, pdt
      )
    )

  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = self.embed(tokens_BT, self.dtype)
    if self.embed_scale is not None:
      x_BTD = x_BTD * jnp.asarray(self.embed_scale, self.dtype)
    return x_BTD

  def logits(self, x_BTD: jax.Array) -> jax.Array:
    """The final norm, then the tied embedding (`head_DV` None) or the
    untied head: float32 logits [B, T, V], soft-capped (cap * tanh(logits
    / cap)) under model.final_logits_soft_cap."""
    x_BTD = self.final_norm(x_BTD)
    if self.head_DV is None:
      logits = self.embed.attend(x_BTD)
    else:
      logits = jnp.einsum(
        "BTD,DV->BTV",
        x_BTD,
        self.head_DV[...].astype(x_BTD.dtype),
        preferred_element_type=jnp.float32,
      )
    if self.final_logits_soft_cap is not None:
      cap = self.final_logits_soft_cap
      logits = cap * jnp.tanh(logits / cap)
    return constrain(logits, BTV)

  # -------------------------------------------------------------- generation

  def stacks(self) -> tuple[Any, ...]:
    """The layer stacks generation reads (caches, limits)."""
    raise NotImplementedError

  def max_positions(self) -> int | None:
    """Positions a sequence may reach (block-sparse tables); None: any."""
    limits = [s.max_positions() for s in self.stacks()]
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None

  def init_cache(self, batch: int, max_len: int) -> dict:
    """Empty generation caches for `batch` rows of up to `max_len`
    positions (models/cache.py)."""
    raise NotImplementedError

  def cache_bytes_per_token(self) -> list[int]:
    """Each layer's cache bytes per cached token (the modules' formulas)."""
    raise NotImplementedError
