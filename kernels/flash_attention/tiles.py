"""Tile arithmetic shared by the blockwise kernels and their wrappers.

One spelling of each helper for pallas_tpu.py, pallas_gpu.py,
pallas_mgpu.py, vjp.py and reference.py.
"""

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)  # exp(x) == exp2(x * LOG2E), for exp2 kernels

# dot_general dimension numbers of the three tile products.
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot(a, b, dims):
  """Tile product with an f32 accumulator, whatever the operand dtype."""
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pow2_tile(n: int) -> int:
  """Smallest power of two >= n and >= 16, the smallest Triton / Mosaic GPU
  tile side (they take power-of-two tensor sizes only)."""
  return max(16, 1 << (n - 1).bit_length())


def soft_cap(s, cap, unit=1.0):
  """(cap * tanh(s / cap) * unit, tanh(s / cap)) for scaled logits s.

  `unit` folds a change of units into the same multiply (LOG2E for kernels
  that use exp2). The tanh is returned because the backward pass needs the
  cap's derivative 1 - tanh^2; without a cap it is None and s * unit passes.
  """
  if cap is None:
    return (s if unit == 1.0 else s * unit), None
  t = jnp.tanh(s / cap)
  return t * (cap * unit), t
