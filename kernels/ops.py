"""The one public attention entry point; dispatches to a backend.

impl:
  "xla"          dense f32 reference (materialised mask; the oracle of
                 kernels/flash_attention/reference.py); autodiff backward.
  "xla_chunked"  the blockwise kernels' tile loops in XLA ops
                 (kernels/flash_attention/xla_chunked.py): EMPTY tiles are
                 skipped, memory is linear in T and S; custom_vjp, so
                 reverse-mode autodiff only.
  "pallas_tpu"   Mosaic TPU kernels (kernels/flash_attention/pallas_tpu.py).
  "pallas_gpu"   Pallas GPU kernels (kernels/flash_attention/pallas_gpu.py),
                 imported lazily.
  "interpret"    the pallas_tpu kernels run by the Pallas interpreter (CPU).
  "interpret_gpu" the pallas_gpu (Triton-lowered) kernels, interpreted (CPU).
                 Inside jax.shard_map it needs check_vma=False: jax 0.11.2's
                 interpreter mixes unvarying grid ids with varying data.
  "cudnn"        jax.nn.dot_product_attention(implementation="cudnn"). cuDNN
                 applies causal / window on *indices*, so this is only right
                 when positions are aranges; it is never chosen by "auto"
                 and is explicit opt-in for callers that know that.
  "auto"         TPU -> pallas_tpu, GPU -> pallas_gpu, each falling back
                 to xla_chunked when it refuses the case (raises
                 NotImplementedError) or is absent; CPU -> xla while
                 T * S <= DENSE_MAX_PAIRS, else xla_chunked. Explicit
                 impls never fall back: they raise.

A spec with a block table (`MaskSpec.block_mask`) covers positions below
`masks.block_mask_coverage(spec)` only; past it the predicate would hide a
key silently, so concrete positions (not tracers) of real tokens (segment
!= 0) at or past it raise ValueError. Traced positions cannot be checked:
config refuses max_len < seq_len for training, and generation must hold its
positions to `block_mask_coverage` itself.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels import masks
from kernels.flash_attention import reference
from kernels.flash_attention import vjp

IMPLS = (
  "auto",
  "xla",
  "xla_chunked",
  "pallas_tpu",
  "pallas_gpu",
  "interpret",
  "interpret_gpu",
  "cudnn",
)


def _check_shapes(q, k, v, q_pos, k_pos, q_seg, k_seg):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"q must be [B, T, H, K], k, v [B, S, G, K]/[B, S, G, E]; got "
      f"{q.shape} {k.shape} {v.shape}"
    )
  b, t, h, kdim = q.shape
  if k.shape[:3] != v.shape[:3] or k.shape[0] != b:
    raise ValueError(f"k {k.shape} and v {v.shape} disagree (or with q)")
  if k.shape[3] != kdim:
    raise ValueError(f"q head dim {kdim} != k head dim {k.shape[3]}")
  g, s = k.shape[2], k.shape[1]
  if h % g:
    raise ValueError(f"query heads {h} not a multiple of kv heads {g}")
  for name, x, n in (
    ("q_pos", q_pos, t),
    ("k_pos", k_pos, s),
    ("q_segment_ids", q_seg, t),
    ("kv_segment_ids", k_seg, s),
  ):
    if x is not None and x.shape != (b, n):
      raise ValueError(f"{name} must be [{b}, {n}], got {x.shape}")


# "auto" on CPU: the dense reference while T * S is at most this, the tiled
# xla_chunked past it. The dense path keeps f32 [B, H, T, S] scores and
# probabilities for its backward pass, so its memory is quadratic; it stays
# for short lengths because it supports forward-mode autodiff (jax.jacfwd,
# which the causality tests use) and has no loop overhead. Measured fwd+bwd,
# causal, B=1, H=4, K=64, f32, 2 CPU cores: T = S = 512 dense 18 ms / 16 MiB
# temp vs tiled 15 ms / 3.5 MiB; at 1024, 308 ms / 65 MiB vs 52 ms / 7 MiB.
DENSE_MAX_PAIRS = 2**18


def _platform():
  return jax.default_backend()


def _candidates(impl, t, s):
  """Backends to try in order; only "auto" has fallbacks."""
  if impl != "auto":
    return (impl,)
  platform = _platform()
  if platform == "tpu":
    return ("pallas_tpu", "xla_chunked")
  if platform in ("gpu", "cuda", "rocm"):
    return ("pallas_gpu", "xla_chunked")
  return ("xla",) if t * s <= DENSE_MAX_PAIRS else ("xla_chunked",)


def _check_coverage(spec, q_pos, k_pos, q_seg, k_seg):
  """ValueError if a concrete position of a real token (segment != 0) is
  past the block table; tracers are not checked (see module docstring)."""
  coverage = masks.block_mask_coverage(spec)
  if coverage is None:
    return
  concrete = lambda x: not isinstance(x, jax.core.Tracer)
  # Suffix columns (TGlobal summaries) bypass the table, so skip them.
  n_keys = k_pos.shape[1] - spec.global_suffix
  for pos, seg, n in ((q_pos, q_seg, q_pos.shape[1]), (k_pos, k_seg, n_keys)):
    if not concrete(pos):
      continue
    pos = np.asarray(pos)[:, :n]
    if seg is not None and concrete(seg):
      pos = pos[np.asarray(seg)[:, :n] != 0]
    top = int(pos.max(initial=-1))
    if top >= coverage:
      raise ValueError(
        f"position {top} is past the block-sparse table, which covers "
        f"positions 0..{coverage - 1}; build it for a longer max_len"
      )


def _cudnn(q, k, v, spec, q_seg, k_seg, scale, cap, return_lse):
  """cuDNN flash attention for the cases it supports, else ValueError."""
  window = None
  if spec.window is not None:
    left, right = spec.window
    if right is None and spec.causal:
      right = 0
    if left is None or right is None:
      raise NotImplementedError("cudnn needs a bounded window")
    window = (left, right)
  if (
    return_lse
    or cap is not None
    or q_seg is not None
    or k_seg is not None
    or spec.chunk is not None
    or spec.block_mask is not None
    or spec.global_prefix
    or spec.global_suffix
    or q.shape[1] != k.shape[1]
  ):
    raise NotImplementedError(
      "cudnn handles causal / window masks without segments, soft cap, "
      "globals or lse only"
    )
  out = jax.nn.dot_product_attention(
    q,
    k,
    v,
    scale=scale,
    is_causal=spec.causal,
    local_window_size=window,
    implementation="cudnn",
  )
  return out, None


def _run(
  impl, q, k, v, q_pos, k_pos, q_seg, k_seg, spec, scale, cap, block_sizes
):
  if impl == "xla":
    dense = masks.dense_mask(spec, q_pos, k_pos, q_seg, k_seg)
    return reference.attention_reference(
      q, k, v, dense, scale=scale, logits_soft_cap=cap
    )
  # xla_chunked / pallas_tpu / pallas_gpu / interpret(_gpu): vjp.py's
  # custom_vjp around the backend's blockwise kernels.
  return vjp.flash_attention(
    q,
    k,
    v,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    spec=spec,
    scale=scale,
    logits_soft_cap=cap,
    block_sizes=block_sizes,
    backend=impl,
  )


def attention(
  q,
  k,
  v,
  *,
  mask: masks.MaskSpec,
  q_pos,
  k_pos,
  q_segment_ids=None,
  kv_segment_ids=None,
  scale=None,
  logits_soft_cap=None,
  impl="auto",
  block_sizes: vjp.BlockSizes | None = None,
  return_lse=False,
):
  """Attention of q [B, T, H, K] over k [B, S, G, K], v [B, S, G, E].

  H must be a multiple of G (GQA / MQA). Positions and segment ids are
  int32 [B, T] (q) and [B, S] (k, v); segment 0 is padding; None means one
  segment, no padding. `scale` defaults to 1/sqrt(K); the soft cap is
  cap * tanh(s / cap) on scaled logits. Returns out [B, T, H, E] in q.dtype,
  and with `return_lse` also lse [B, H, T] float32 (-inf on rows that see no
  key, whose output is 0).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(mask, masks.MaskSpec):
    raise TypeError(f"mask must be a MaskSpec, got {type(mask)}")
  _check_shapes(q, k, v, q_pos, k_pos, q_segment_ids, kv_segment_ids)
  _check_coverage(mask, q_pos, k_pos, q_segment_ids, kv_segment_ids)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  q_pos = q_pos.astype(jnp.int32)
  k_pos = k_pos.astype(jnp.int32)
  q_seg = (
    jnp.ones_like(q_pos)
    if q_segment_ids is None
    else q_segment_ids.astype(jnp.int32)
  )
  k_seg = (
    jnp.ones_like(k_pos)
    if kv_segment_ids is None
    else kv_segment_ids.astype(jnp.int32)
  )
  candidates = _candidates(impl, q.shape[1], k.shape[1])
  for i, name in enumerate(candidates):
    try:
      if name == "cudnn":
        out, lse = _cudnn(
          q,
          k,
          v,
          mask,
          q_segment_ids,
          kv_segment_ids,
          scale,
          logits_soft_cap,
          return_lse,
        )
      else:
        out, lse = _run(
          name,
          q,
          k,
          v,
          q_pos,
          k_pos,
          q_seg,
          k_seg,
          mask,
          scale,
          logits_soft_cap,
          block_sizes,
        )
      break
    except (ImportError, NotImplementedError):
      # The backend refuses this case (or is not installed): under "auto"
      # try the next one, otherwise the caller asked for it, so say no.
      if i == len(candidates) - 1:
        raise
  else:  # no break: `candidates` was empty (it never is)
    raise AssertionError(f"no backend for impl={impl!r}")
  return (out, lse) if return_lse else out
