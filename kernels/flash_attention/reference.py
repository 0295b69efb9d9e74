"""Dense f32 reference attention: the oracle every backend is tested against.

Layout q [B, T, H, K], k [B, S, G, K], v [B, S, G, E]; query heads are
grouped onto kv heads (GQA) as query head h -> kv head h // Q, where
Q = H / G query heads share a kv head. The mask is materialised ([B, T, S],
from `masks.dense_mask`) and the backward pass is plain autodiff, so memory
is quadratic in length; the tiled backends (xla_chunked.py, pallas_*.py)
must equal it. It imports no backend and nothing of vjp.py.
"""

import jax
import jax.numpy as jnp

from kernels.flash_attention.tiles import soft_cap

_HI = jax.lax.Precision.HIGHEST


def _group(q_BTHK, g):
  """[B, T, H, K] -> [B, T, G, Q, K]."""
  b, t, h, kdim = q_BTHK.shape
  return q_BTHK.reshape(b, t, g, h // g, kdim)


def attention_reference(
  q_BTHK, k_BSGK, v_BSGE, mask_BTS, *, scale, logits_soft_cap=None
):
  """Materialised-mask attention with softmax in f32.

  Returns (out [B, T, H, E] in q.dtype, lse [B, H, T] f32). Rows with no
  visible key give out 0 and lse -inf, with finite (zero) gradients.
  """
  q_BTGQK = _group(q_BTHK, k_BSGK.shape[2]).astype(jnp.float32)
  s_BGQTS = (
    jnp.einsum(
      "BTGQK,BSGK->BGQTS", q_BTGQK, k_BSGK.astype(jnp.float32), precision=_HI
    )
    * scale
  )
  s_BGQTS = soft_cap(s_BGQTS, logits_soft_cap)[0]
  mask = mask_BTS[:, None, None, :, :]
  s_BGQTS = jnp.where(mask, s_BGQTS, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s_BGQTS, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s_BGQTS - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_BGQTE = jnp.einsum(
    "BGQTS,BSGE->BGQTE", p / l_safe, v_BSGE.astype(jnp.float32), precision=_HI
  )
  lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)[..., 0]
  b, g, q, t, e = o_BGQTE.shape
  out = o_BGQTE.transpose(0, 3, 1, 2, 4).reshape(b, t, g * q, e)
  return out.astype(q_BTHK.dtype), lse.reshape(b, g * q, t)
