"""Basic layers: RMSNorm, token embedding, RoPE, gated (SwiGLU / GeGLU) MLP.

Dimension letters: B batch, T query length, S key/value length, D model
width, H query heads, G kv heads, K head dim, E value head dim, F MLP width,
V vocabulary.
Parameters are float32 (`param_dtype`); compute happens in `dtype`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import ModelConfig
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
  """RMSNorm over the last axis (any leading axes: [B, T, D], per-head
  [B, T, H, K]). `plus_one` (Gemma, model.norm_plus_one): the param `scale`
  stores w, initialised to 0, and x is scaled by (1 + w); otherwise by
  `scale`, initialised to 1. The math runs in float32 whatever the compute
  dtype, and the result is cast back (as Gemma's (x * w).to(dtype))."""

  def __init__(self, dim: int, *, eps: float, param_dtype, plus_one=False):
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype), logical_axes=("norm",))
    self.eps = eps
    self.plus_one = plus_one

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    # Statistics in float32 whatever the compute dtype.
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    scale = (
      self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    )
    if self.plus_one:
      scale = 1.0 + scale
    return (x * scale).astype(x_BTD.dtype)


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


@dataclasses.dataclass(frozen=True)
class Rope:
  """A layer's RoPE frequencies: base `theta` and the scaling rule of
  model.rope_scaling (config/schema.py; Hugging Face's
  modeling_rope_utils): "none"; "linear": inverse frequencies / factor;
  "llama3": Llama 3.1's piecewise rule over the wavelengths 2 pi / f."""

  theta: float
  scaling: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192

  def inv_freq(self, k: int) -> jax.Array:
    """The K/2 inverse frequencies (float32) of a head of dim k."""
    freq = self.theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    if self.scaling == "linear":
      return freq / self.factor
    if self.scaling == "llama3":
      low_wavelen = self.original_max_len / self.low_freq_factor
      high_wavelen = self.original_max_len / self.high_freq_factor
      wavelen = 2 * math.pi / freq
      # Long wavelengths (low frequencies) are divided by the factor,
      # short ones kept, the band between interpolated smoothly.
      scaled = jnp.where(wavelen > low_wavelen, freq / self.factor, freq)
      smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
        self.high_freq_factor - self.low_freq_factor
      )
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      return jnp.where(medium, smoothed, scaled)
    if self.scaling != "none":
      raise ValueError(f"rope scaling {self.scaling!r} is not supported")
    return freq


def layer_rope(cfg: ModelConfig, kind: str) -> Rope:
  """The RoPE of a layer of attention kind `kind`: 'sliding_window' layers
  on model.rope_local_theta (unscaled) when it is set, every other layer
  on rope_theta with model.rope_scaling."""
  if kind == "sliding_window" and cfg.rope_local_theta is not None:
    return Rope(cfg.rope_local_theta)
  return Rope(
    cfg.rope_theta,
    scaling=cfg.rope_scaling,
    factor=cfg.rope_scaling_factor,
    low_freq_factor=cfg.rope_low_freq_factor,
    high_freq_factor=cfg.rope_high_freq_factor,
    original_max_len=cfg.rope_original_max_len,
  )


def rope(
  x_BTHK: jax.Array, pos_BT: jax.Array, theta: float | Rope
) -> jax.Array:
  """Rotary embedding (rotate-half layout) on explicit positions; `theta`
  is the base, or a `Rope` with its scaling."""
  k = x_BTHK.shape[-1]
  freq_K2 = (theta if isinstance(theta, Rope) else Rope(theta)).inv_freq(k)
  angle_BTK2 = pos_BT.astype(jnp.float32)[:, :, None] * freq_K2[None, None]
  sin = jnp.sin(angle_BTK2)[:, :, None, :]
  cos = jnp.cos(angle_BTK2)[:, :, None, :]
  x = x_BTHK.astype(jnp.float32)
  x1, x2 = x[..., : k // 2], x[..., k // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


# Gate activations of the gated MLP (model.mlp_activation): SwiGLU's SiLU,
# GeGLU's tanh-approximate GELU (Hugging Face's gelu_pytorch_tanh).
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class SwiGLU(nnx.Module):
  """The gated MLP: down(act(x gate) * (x up)); `activation` "silu"
  (SwiGLU) or "gelu_tanh" (GeGLU); same params either way."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    rngs: nnx.Rngs,
    param_dtype,
    out_std: float,
    activation: str = "silu",
  ):
    self.gate_DF = param(
      rngs, (dim, hidden), ("embed", "mlp"), 0.02, param_dtype
    )
    self.up_DF = param(rngs, (dim, hidden), ("embed", "mlp"), 0.02, param_dtype)
    self.down_FD = param(
      rngs, (hidden, dim), ("mlp", "embed"), out_std, param_dtype
    )
    self.activation = activation

  @staticmethod
  def flops(dim: int, hidden: int) -> float:
    """Matmul FLOPs per token: gate, up and down projections."""
    return 2.0 * 3 * dim * hidden

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = x_BTD.dtype
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, jnp.asarray(self.gate_DF[...], dt))
    up = jnp.einsum("BTD,DF->BTF", x_BTD, jnp.asarray(self.up_DF[...], dt))
    h_BTF = constrain(ACTIVATIONS[self.activation](gate) * up, BTF)
    out = jnp.einsum("BTF,FD->BTD", h_BTF, jnp.asarray(self.down_FD[...], dt))
    return constrain(out, BTD)
