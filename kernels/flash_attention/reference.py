"""Dense f32 reference attention and a chunked, memory-efficient XLA variant.

Every kernel is tested against `attention_reference`. Layout q [B, T, H, K],
k [B, S, G, K], v [B, S, G, E]; query heads are grouped onto kv heads (GQA)
as query head h -> kv head h // Q, where Q = H / G query heads share a kv
head.
"""
import jax
import jax.numpy as jnp

from kernels import compat, masks
from kernels.flash_attention.tiles import round_up, soft_cap

_HI = jax.lax.Precision.HIGHEST


def _group(q_BTHK, g):
  """[B, T, H, K] -> [B, T, G, Q, K]."""
  b, t, h, kdim = q_BTHK.shape
  return q_BTHK.reshape(b, t, g, h // g, kdim)


def attention_reference(q_BTHK, k_BSGK, v_BSGE, mask_BTS, *, scale,
                        logits_soft_cap=None):
  """Materialised-mask attention with softmax in f32.

  Returns (out [B, T, H, E] in q.dtype, lse [B, H, T] f32). Rows with no
  visible key give out 0 and lse -inf, with finite (zero) gradients.
  """
  q_BTGQK = _group(q_BTHK, k_BSGK.shape[2]).astype(jnp.float32)
  s_BGQTS = jnp.einsum("BTGQK,BSGK->BGQTS", q_BTGQK,
                       k_BSGK.astype(jnp.float32), precision=_HI) * scale
  s_BGQTS = soft_cap(s_BGQTS, logits_soft_cap)[0]
  mask = mask_BTS[:, None, None, :, :]
  s_BGQTS = jnp.where(mask, s_BGQTS, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s_BGQTS, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s_BGQTS - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_BGQTE = jnp.einsum("BGQTS,BSGE->BGQTE", p / l_safe,
                       v_BSGE.astype(jnp.float32), precision=_HI)
  lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)[..., 0]
  b, g, q, t, e = o_BGQTE.shape
  out = o_BGQTE.transpose(0, 3, 1, 2, 4).reshape(b, t, g * q, e)
  return out.astype(q_BTHK.dtype), lse.reshape(b, g * q, t)


def attention_chunked(q_BTHK, k_BSGK, v_BSGE, q_pos, k_pos, q_seg, k_seg, *,
                      spec, scale, logits_soft_cap=None, chunk_size=512):
  """Online-softmax scan over kv chunks: memory O(T * chunk), not O(T^2).

  The scan body is rematerialised in the backward pass, so autodiff keeps
  only the per-chunk carries. Same contract as `attention_reference`.
  """
  b, s, g, _ = k_BSGK.shape
  chunk_size = min(chunk_size, s)
  pad = round_up(s, chunk_size) - s
  n = (s + pad) // chunk_size
  k_sfx = masks.suffix_columns(spec, s, s + pad)
  if pad:
    padw = ((0, 0), (0, pad), (0, 0), (0, 0))
    k_BSGK = jnp.pad(k_BSGK, padw)
    v_BSGE = jnp.pad(v_BSGE, padw)
    k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)))
    k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)))  # segment 0: masked

  def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
    x = x.reshape(b, n, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  q_BTGQK = _group(q_BTHK, g).astype(jnp.float32)
  t, q = q_BTGQK.shape[1], q_BTGQK.shape[3]
  e = v_BSGE.shape[-1]
  xs = (split(k_BSGK), split(v_BSGE), split(k_pos), split(k_seg),
        jnp.asarray(k_sfx.reshape(n, chunk_size)))

  @jax.checkpoint
  def body(carry, x):
    m, l, acc = carry
    k_c, v_c, kp_c, ks_c, sfx_c = x
    s_BGQTS = jnp.einsum("BTGQK,BSGK->BGQTS", q_BTGQK,
                         k_c.astype(jnp.float32), precision=_HI) * scale
    s_BGQTS = soft_cap(s_BGQTS, logits_soft_cap)[0]
    vis = masks.element_mask(spec, q_pos[:, :, None], kp_c[:, None, :],
                             q_seg[:, :, None], ks_c[:, None, :],
                             sfx_c[None, None, :])[:, None, None]
    s_BGQTS = jnp.where(vis, s_BGQTS, -jnp.inf)
    # The result is invariant to m, so no gradient needs to flow through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s_BGQTS, axis=-1)))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    p = jnp.exp(s_BGQTS - m_safe[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum(
      "BGQTS,BSGE->BGQTE", p, v_c.astype(jnp.float32), precision=_HI)
    return (m_new, l, acc), None

  init = compat.varying_like(
    (jnp.full((b, g, q, t), -jnp.inf, jnp.float32),
     jnp.zeros((b, g, q, t), jnp.float32),
     jnp.zeros((b, g, q, t, e), jnp.float32)),
    q_BTHK, *xs, q_pos, q_seg)
  (m, l, acc), _ = jax.lax.scan(body, init, xs)
  l_safe = jnp.where(l > 0, l, 1.0)
  o = acc / l_safe[..., None]
  lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0)
                  + jnp.log(l_safe), -jnp.inf)
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, t, g * q, e)
  return out.astype(q_BTHK.dtype), lse.reshape(b, g * q, t)
