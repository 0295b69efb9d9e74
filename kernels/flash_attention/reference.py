"""Dense f32 reference attention and a chunked, memory-efficient XLA variant.

Every kernel is tested against `attention_reference`. Layout [B, T, H, D];
q heads are grouped onto kv heads (GQA) as q head h -> kv head h // G.
"""
import jax
import jax.numpy as jnp

from kernels import compat, masks
from kernels.flash_attention.tiles import round_up, soft_cap

_HI = jax.lax.Precision.HIGHEST


def _group(q_BTHD, num_kv_heads):
  b, t, h, d = q_BTHD.shape
  return q_BTHD.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def attention_reference(q_BTHD, k_BSKD, v_BSKE, mask_BTS, *, scale,
                        logits_soft_cap=None):
  """Materialised-mask attention with softmax in f32.

  Returns (out [B, T, H, E] in q.dtype, lse [B, H, T] f32). Rows with no
  visible key give out 0 and lse -inf, with finite (zero) gradients.
  """
  kv_heads = k_BSKD.shape[2]
  q_BTKGD = _group(q_BTHD, kv_heads).astype(jnp.float32)
  s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD,
                       k_BSKD.astype(jnp.float32), precision=_HI) * scale
  s_BKGTS = soft_cap(s_BKGTS, logits_soft_cap)[0]
  mask = mask_BTS[:, None, None, :, :]
  s_BKGTS = jnp.where(mask, s_BKGTS, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s_BKGTS, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s_BKGTS - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_BKGTE = jnp.einsum("bkgts,bske->bkgte", p / l_safe,
                       v_BSKE.astype(jnp.float32), precision=_HI)
  lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)[..., 0]
  b, k, g, t, e = o_BKGTE.shape
  out = o_BKGTE.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, e)
  return out.astype(q_BTHD.dtype), lse.reshape(b, k * g, t)


def attention_chunked(q_BTHD, k_BSKD, v_BSKE, q_pos, k_pos, q_seg, k_seg, *,
                      spec, scale, logits_soft_cap=None, chunk_size=512):
  """Online-softmax scan over kv chunks: memory O(T * chunk), not O(T^2).

  The scan body is rematerialised in the backward pass, so autodiff keeps
  only the per-chunk carries. Same contract as `attention_reference`.
  """
  b, tk, kv_heads, _ = k_BSKD.shape
  chunk_size = min(chunk_size, tk)
  pad = round_up(tk, chunk_size) - tk
  n = (tk + pad) // chunk_size
  k_sfx = masks.suffix_columns(spec, tk, tk + pad)
  if pad:
    padw = ((0, 0), (0, pad), (0, 0), (0, 0))
    k_BSKD = jnp.pad(k_BSKD, padw)
    v_BSKE = jnp.pad(v_BSKE, padw)
    k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)))
    k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)))  # segment 0: masked

  def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
    x = x.reshape(b, n, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  q_BTKGD = _group(q_BTHD, kv_heads).astype(jnp.float32)
  t = q_BTKGD.shape[1]
  g = q_BTKGD.shape[3]
  e = v_BSKE.shape[-1]
  xs = (split(k_BSKD), split(v_BSKE), split(k_pos), split(k_seg),
        jnp.asarray(k_sfx.reshape(n, chunk_size)))

  @jax.checkpoint
  def body(carry, x):
    m, l, acc = carry
    k_c, v_c, kp_c, ks_c, sfx_c = x
    s = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_c.astype(jnp.float32),
                   precision=_HI) * scale
    s = soft_cap(s, logits_soft_cap)[0]
    vis = masks.element_mask(spec, q_pos[:, :, None], kp_c[:, None, :],
                             q_seg[:, :, None], ks_c[:, None, :],
                             sfx_c[None, None, :])[:, None, None]
    s = jnp.where(vis, s, -jnp.inf)
    # The result is invariant to m, so no gradient needs to flow through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum(
      "bkgts,bske->bkgte", p, v_c.astype(jnp.float32), precision=_HI)
    return (m_new, l, acc), None

  init = compat.varying_like(
    (jnp.full((b, kv_heads, g, t), -jnp.inf, jnp.float32),
     jnp.zeros((b, kv_heads, g, t), jnp.float32),
     jnp.zeros((b, kv_heads, g, t, e), jnp.float32)),
    q_BTHD, *xs, q_pos, q_seg)
  (m, l, acc), _ = jax.lax.scan(body, init, xs)
  l_safe = jnp.where(l > 0, l, 1.0)
  o = acc / l_safe[..., None]
  lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0)
                  + jnp.log(l_safe), -jnp.inf)
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, e)
  return out.astype(q_BTHD.dtype), lse.reshape(b, kv_heads * g, t)
