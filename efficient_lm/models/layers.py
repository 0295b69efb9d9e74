"""Basic layers: RMSNorm, token embedding, RoPE, SwiGLU MLP.

Dimension letters: B batch, T query length, S key/value length, D model
width, H query heads, G kv heads, K head dim, E value head dim, F MLP width,
V vocabulary.
Parameters are float32 (`param_dtype`); compute happens in `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.sharding import BTD, BTF, constrain

# The dtypes a config names (model.dtype, model.param_dtype).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ModelState(nnx.Variable):
  """Non-trainable model state: variables a model updates in its forward
  pass without gradients (a load-balancing bias, a running statistic).
  The trainer keeps them in `state["model_state"]`, sharded by the same
  logical names as parameters, and checkpoints them."""


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normally-initialised parameter carrying its logical axis names."""
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = nnx.Param(
      jnp.ones((dim,), param_dtype), logical_axes=("norm",)
    )
    self.eps = eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    # Statistics in float32 whatever the compute dtype.
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...][None, None, :]).astype(x_BTD.dtype)


class Embed(nnx.Module):
  """Token embedding; `attend` gives tied output logits."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype):
    self.table_VD = param(
      rngs, (vocab, dim), ("vocab", "embed"), 0.02, param_dtype
    )

  def __call__(self, tokens_BT: jax.Array, dtype) -> jax.Array:
    x_BTD = jnp.take(self.table_VD[...], tokens_BT, axis=0).astype(dtype)
    return constrain(x_BTD, BTD)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    table = self.table_VD[...].astype(x_BTD.dtype)
    return jnp.einsum(
      "BTD,VD->BTV", x_BTD, table, preferred_element_type=jnp.float32
    )


def rope(x_BTHK: jax.Array, pos_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half layout) on explicit positions."""
  k = x_BTHK.shape[-1]
  freq_K2 = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angle_BTK2 = pos_BT.astype(jnp.float32)[:, :, None] * freq_K2[None, None]
  sin = jnp.sin(angle_BTK2)[:, :, None, :]
  cos = jnp.cos(angle_BTK2)[:, :, None, :]
  x = x_BTHK.astype(jnp.float32)
  x1, x2 = x[..., : k // 2], x[..., k // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


class SwiGLU(nnx.Module):
  def __init__(
    self, dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype, out_std: float
  ):
    self.gate_DF = param(
      rngs, (dim, hidden), ("embed", "mlp"), 0.02, param_dtype
    )
    self.up_DF = param(rngs, (dim, hidden), ("embed", "mlp"), 0.02, param_dtype)
    self.down_FD = param(
      rngs, (hidden, dim), ("mlp", "embed"), out_std, param_dtype
    )

  @staticmethod
  def flops(dim: int, hidden: int) -> float:
    """Matmul FLOPs per token: gate, up and down projections."""
    return 2.0 * 3 * dim * hidden

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = x_BTD.dtype
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate_DF[...].astype(dt))
    up = jnp.einsum("BTD,DF->BTF", x_BTD, self.up_DF[...].astype(dt))
    h_BTF = constrain(jax.nn.silu(gate) * up, BTF)
    out = jnp.einsum("BTF,FD->BTD", h_BTF, self.down_FD[...].astype(dt))
    return constrain(out, BTD)
