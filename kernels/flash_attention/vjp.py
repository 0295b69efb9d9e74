"""custom_vjp wiring shared by every blockwise backend (FlashAttention-2).

The wrapper `flash_attention` takes the public [B, T, H, K] layout, moves
heads before length ([B, H, T, K]: each kernel tile is then a (rows, K)
slab), pads lengths to block multiples (padded rows and keys get segment 0,
so they are masked and the result is exact), builds the block metadata of
kernels/masks.py and calls a backend's kernels under one `jax.custom_vjp`.

Backend kernel contract (xla_chunked.py, pallas_tpu.py, pallas_gpu.py
must match it; the wrapper imports them lazily, and none imports this
module):

  flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, params)
      -> (o [B, H, T, E] in q.dtype, lse [B, H, T] float32)
  flash_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta,
            params)
      -> (dq like q, dk like k, dv like v)

  q [B, H, T, K], k [B, G, S, K], v [B, G, S, E]; query head h reads kv
  head h // (H // G). T, S are multiples of params.block_q /
  params.block_kv. Positions and segment ids int32 [B, T] (q), [B, S] (k, v);
  segment 0 = padding. `meta` is `masks.BlockMetadata` for (block_q,
  block_kv): the forward and dQ kernels walk
  meta.kv_index[b, qb, :kv_count[b, qb]], the dK/dV kernel walks
  meta.q_index[b, kb, :q_count[b, kb]]; FULL tiles skip the element mask,
  PARTIAL tiles apply `masks.element_mask` (key column c is a suffix column
  iff params.suffix_start <= c < params.kv_len).
  lse is -inf on rows that see no key; such rows only occur in PARTIAL or
  EMPTY tiles, so masking p to 0 there keeps everything finite.
  delta = rowsum(o * do) - dlse (f32 [B, H, T]): folding the lse
  cotangent into delta makes ds = p * (dp - delta) exact for both outputs.
  Rows with no visible key must give o = 0 and zero gradients.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

# Eager, unlike the backends: importing Pallas's TPU module (kernels.compat
# does) defines a JAX config state, and JAX keys every jit cache on all such
# states. Imported first inside a trace, it made every function compiled
# before it compile once more (a loaded run's generator, after another run
# was loaded with --quantize).
from kernels import compat  # noqa: F401
from kernels import masks
from kernels.flash_attention.tiles import pow2_tile, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (static). Backward sizes default to the forward ones."""

  block_q: int = 128
  block_kv: int = 128
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
      size = getattr(self, name)
      if size is not None and (not isinstance(size, int) or size <= 0):
        raise ValueError(
          f"BlockSizes.{name} must be a positive int, got {size!r}"
        )

  @property
  def bwd(self) -> tuple[int, int]:
    return (
      self.block_q_bwd or self.block_q,
      self.block_kv_bwd or self.block_kv,
    )


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static parameters every backend kernel receives."""

  spec: masks.MaskSpec
  scale: float
  logits_soft_cap: float | None
  block_q: int
  block_kv: int
  kv_len: int  # unpadded key length; columns >= kv_len are padding
  interpret: bool = False

  @property
  def suffix_start(self) -> int:
    return self.kv_len - self.spec.global_suffix


@dataclasses.dataclass(frozen=True)
class _Config:
  backend: str
  spec: masks.MaskSpec
  scale: float
  logits_soft_cap: float | None
  block_sizes: BlockSizes
  kv_len: int

  def params(self, block_q, block_kv):
    return KernelParams(
      self.spec,
      self.scale,
      self.logits_soft_cap,
      block_q,
      block_kv,
      self.kv_len,
      interpret=self.backend in _INTERPRETED,
    )


# Backends that run their Pallas kernels under the CPU interpreter.
_INTERPRETED = ("interpret", "interpret_gpu")
_GPU = ("pallas_gpu", "interpret_gpu")
# GPU tiles: 64-row query tiles let Hopper bf16 take the Mosaic GPU kernels
# and keep the Triton backward out of 128x128 register pressure.
GPU_BLOCK_SIZES = BlockSizes(64, 128, 64, 64)


def _kernels(backend):
  # Backends are imported here, not at the top: they must not import this
  # module back (no cycle), and pallas_gpu.py is optional.
  if backend == "xla_chunked":  # the same tile loops in plain XLA ops
    from kernels.flash_attention import xla_chunked as mod
  elif backend in ("pallas_tpu", "interpret"):
    from kernels.flash_attention import pallas_tpu as mod
  elif backend in _GPU:
    from kernels.flash_attention import pallas_gpu as mod  # lazy: optional
  else:
    raise ValueError(f"no blockwise kernels for backend {backend!r}")
  return mod.flash_fwd, mod.flash_bwd


def _meta(cfg, q_pos, k_pos, q_seg, k_seg, block_q, block_kv):
  return masks.block_metadata(
    cfg.spec,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    block_q=block_q,
    block_kv=block_kv,
    kv_len=cfg.kv_len,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_pos, k_pos, q_seg, k_seg):
  return _flash_fwd(cfg, q, k, v, q_pos, k_pos, q_seg, k_seg)[0]


def _flash_fwd(cfg, q, k, v, q_pos, k_pos, q_seg, k_seg):
  fwd, _ = _kernels(cfg.backend)
  bs = cfg.block_sizes
  meta = _meta(cfg, q_pos, k_pos, q_seg, k_seg, bs.block_q, bs.block_kv)
  o, lse = fwd(
    q,
    k,
    v,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    meta,
    cfg.params(bs.block_q, bs.block_kv),
  )
  return (o, lse), (q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse)


def _flash_bwd(cfg, res, cts):
  q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse = res
  do, dlse = cts
  _, bwd = _kernels(cfg.backend)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = delta - dlse.astype(jnp.float32)
  bq, bk = cfg.block_sizes.bwd
  meta = _meta(cfg, q_pos, k_pos, q_seg, k_seg, bq, bk)
  dq, dk, dv = bwd(
    q,
    k,
    v,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    meta,
    lse,
    do.astype(q.dtype),
    delta,
    cfg.params(bq, bk),
  )
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def fit_block_sizes(block_sizes, t, s, backend="pallas_tpu"):
  """Shrink tiles for short sequences, never above T: multiples of 8 on
  TPU; powers of two of at least 16 on GPU (Triton / Mosaic GPU tiles)."""

  def fit(block, n):
    if backend in _GPU:
      return min(block, pow2_tile(n))
    return min(block, round_up(n, 8))

  bq_b, bk_b = block_sizes.bwd
  return BlockSizes(
    fit(block_sizes.block_q, t),
    fit(block_sizes.block_kv, s),
    fit(bq_b, t),
    fit(bk_b, s),
  )


def flash_attention(
  q_BTHK,
  k_BSGK,
  v_BSGE,
  q_pos,
  k_pos,
  q_seg,
  k_seg,
  *,
  spec,
  scale,
  logits_soft_cap,
  block_sizes,
  backend,
):
  """Public layout in and out; returns (out [B,T,H,E], lse [B,H,T])."""
  t, s = q_BTHK.shape[1], k_BSGK.shape[1]
  default = GPU_BLOCK_SIZES if backend in _GPU else BlockSizes()
  bs = fit_block_sizes(block_sizes or default, t, s, backend)
  lq = math.lcm(bs.block_q, bs.bwd[0])
  lk = math.lcm(bs.block_kv, bs.bwd[1])
  pq, pk = round_up(t, lq) - t, round_up(s, lk) - s

  def prep(x, pad):  # [B, T, H, K] -> [B, H, T + pad, K]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x

  def pad2(x, pad):
    return jnp.pad(x, ((0, 0), (0, pad))) if pad else x  # zeros: padding

  cfg = _Config(backend, spec, scale, logits_soft_cap, bs, s)
  o, lse = _flash(
    cfg,
    prep(q_BTHK, pq),
    prep(k_BSGK, pk),
    prep(v_BSGE, pk),
    pad2(q_pos, pq),
    pad2(k_pos, pk),
    pad2(q_seg, pq),
    pad2(k_seg, pk),
  )
  return jnp.swapaxes(o[:, :, :t], 1, 2), lse[:, :, :t]
