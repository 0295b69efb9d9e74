"""Block-sparse flash attention on Hopper: Pallas Mosaic GPU kernels.

Same contract and letters as pallas_gpu.py (vjp.py's `flash_fwd` /
`flash_bwd`, layout [B, H, T, K]). One warpgroup per program, 64-row tiles
for the wgmma M side, operands in swizzled SMEM fed by TMA, double-buffered
over the compacted block lists, so EMPTY tiles are never fetched; the
element predicate runs only on PARTIAL tiles (`lax.cond`).

A deliberately simple first version, not yet measured on hardware:
  - P and dS go through SMEM before their wgmma (FA3 keeps P in registers):
    the Mosaic GPU interpreter, our only test bed without a GPU, needs both
    wgmma operands in memory, and this keeps the tested path the compiled
    one.
  - No producer warpgroup, no 2-warpgroup ping-pong, no TMA multicast.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import masks
from kernels.flash_attention.tiles import LOG2E, soft_cap

_ACC = plgpu.Layout.WGMMA
_ROW = _ACC.reduce(1)  # one value per accumulator row
_COL = _ACC.reduce(0)  # one value per accumulator column


def unsupported(q, v, params, *, backward=False):
  """Why these kernels cannot take the case (None when they can)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"the wgmma path takes bf16 / f16, got {q.dtype}"
  bq, bk = params.block_q, params.block_kv
  # 64 rows per warpgroup MMA; the dK/dV tile puts kv rows on that side and
  # holds two f32 [bk, K] accumulators, so it stays at 64 too.
  if bq != 64 or bk % 64 or bk > 128 or (backward and bk != 64):
    return (
      f"tiles ({bq}, {bk}) unsupported: needs block_q 64 and block_kv "
      f"{'64' if backward else '64 or 128'}"
    )
  # Wider heads would need the accumulator split across warpgroups (and
  # more SMEM than double-buffered 128-row K/V tiles leave).
  for n in (q.shape[-1], v.shape[-1]):
    if n not in (64, 128):
      return f"head dims must be 64 or 128, got {n}"
  spec = params.spec
  if spec.block_mask is not None:
    return "block_mask tables are not wired into the Mosaic GPU kernels yet"
  if spec.chunk is not None and spec.chunk & (spec.chunk - 1):
    # masks.floordiv goes through an f32 floor, which Mosaic GPU does not
    # lower; powers of two use a shift.
    return f"chunk {spec.chunk} is not a power of two"
  return None


def _smem(shape, dtype):
  """A swizzled SMEM buffer usable as a wgmma / TMA operand."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(shape[-1] * itemsize * 8)
  return plgpu.SMEM(
    shape,
    dtype,
    transforms=(
      plgpu.TilingTransform((8, swizzle // itemsize)),
      plgpu.SwizzleTransform(swizzle),
    ),
  )


def _matmul(a, b, shape):
  """a @ b with both operands in SMEM, f32 result in registers."""

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _vec(ref, layout):
  # Per-tile rows of positions etc. come straight from GMEM; they are tiny,
  # and the optimized (SMEM-only) load path does not apply.
  return plgpu.load(ref, layout=layout, optimized=False)


def _zeros(shape, layout=_ACC, value=0.0):
  return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def _logits2(s, params):
  """Scaled (soft-capped) logits in log2 units, and tanh for the vjp."""
  return soft_cap(s * params.scale, params.logits_soft_cap, LOG2E)


def _masked(s, params, kind, q_vecs, k_vecs, k_start, q_axis):
  """-inf where the element predicate fails; PARTIAL tiles only.

  q_axis says which tile axis holds queries (1 for the transposed dK/dV
  tiles); the position / segment vectors come in the matching layouts.
  """
  shape = s.shape
  k_axis = 1 - q_axis
  spec = params.spec

  def partial_tile(s):
    bcast = lambda x, axis: lax.broadcast_in_dim(x, shape, [axis])
    sfx = False
    if spec.global_suffix:
      col = k_start + plgpu.broadcasted_iota(
        jnp.int32, shape, k_axis, layout=_ACC
      )
      sfx = (col >= params.suffix_start) & (col < params.kv_len)
    vis = masks.element_mask(
      spec,
      bcast(q_vecs[0], q_axis),
      bcast(k_vecs[0], k_axis),
      bcast(q_vecs[1], q_axis),
      bcast(k_vecs[1], k_axis),
      sfx,
    )
    return jnp.where(vis, s, -jnp.inf)

  return lax.cond(kind == masks.PARTIAL, partial_tile, lambda s: s, s)


def _pipeline(steps, fetch, step, carry):
  """for j < steps: step(j, slot, carry), with fetch(j + 1) in flight.

  Two slots. The one warpgroup has waited on every wgmma reading slot s
  (by reading its accumulator) before it refills s, so no consumed
  barriers are needed.
  """

  @pl.when(steps > 0)
  def _():
    fetch(0, 0)

  def body(j, carry):
    slot = lax.rem(j, 2)

    @pl.when(j + 1 < steps)
    def _():
      fetch(j + 1, 1 - slot)

    return step(j, slot, carry)

  return lax.fori_loop(0, steps, body, carry)


# ------------------------------------------------------------------ kernels


def _kv_fetcher(
  index_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, b, qi, g, bk
):
  """fetch(j, slot): async copy of the j-th listed kv block into `slot`
  (shared by the forward and dQ kernels, which walk the same list)."""

  def fetch(j, slot):
    kv = pl.ds(index_ref[b, qi, j] * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[b, g, kv], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, g, kv], v_smem.at[slot], v_bar.at[slot])

  return fetch


def _fwd_kernel(
  count_ref,
  index_ref,
  kind_ref,
  q_pos_ref,
  q_seg_ref,
  k_pos_ref,
  k_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  q_smem,
  k_smem,
  v_smem,
  p_smem,
  o_smem,
  lse_smem,
  q_bar,
  k_bar,
  v_bar,
  *,
  params,
  group,
):
  bq, bk = params.block_q, params.block_kv
  e = v_smem.shape[-1]
  b, h, qi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("t")
  g = lax.div(h, jnp.array(group, h.dtype))
  rows = pl.ds(qi * bq, bq)
  plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, q_bar.at[0])
  q_vecs = (
    _vec(q_pos_ref.at[b, rows], _ROW),
    _vec(q_seg_ref.at[b, rows], _ROW),
  )

  fetch = _kv_fetcher(
    index_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, b, qi, g, bk
  )

  def step(j, slot, carry):
    acc, m, l = carry
    k_start = index_ref[b, qi, j] * bk
    kv = pl.ds(k_start, bk)
    k_vecs = (_vec(k_pos_ref.at[b, kv], _COL), _vec(k_seg_ref.at[b, kv], _COL))
    plgpu.barrier_wait(k_bar.at[slot])
    s, _ = _logits2(_matmul(q_smem, k_smem.at[slot].T, (bq, bk)), params)
    s = _masked(s, params, kind_ref[b, qi, j], q_vecs, k_vecs, k_start, 0)
    m_new = jnp.maximum(m, s.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no -inf - -inf
    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, (bq, bk), [0]))
    alpha = jnp.exp2(m - m_safe)
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()  # generic-proxy writes before the async wgmma read
    plgpu.barrier_wait(v_bar.at[slot])
    pv = _matmul(p_smem, v_smem.at[slot], (bq, e))
    acc = acc * lax.broadcast_in_dim(alpha, (bq, e), [0]) + pv
    return acc, m_new, l * alpha + p.sum(axis=1)

  plgpu.barrier_wait(q_bar.at[0])
  init = (_zeros((bq, e)), _zeros((bq,), _ROW, -jnp.inf), _zeros((bq,), _ROW))
  acc, m, l = _pipeline(count_ref[b, qi], fetch, step, init)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o_smem[...] = (acc / lax.broadcast_in_dim(l_safe, (bq, e), [0])).astype(
    o_smem.dtype
  )
  lse_smem[...] = jnp.where(seen, (m + jnp.log2(l_safe)) / LOG2E, -jnp.inf)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, rows])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, rows])
  plgpu.wait_smem_to_gmem(0)


def _dq_kernel(
  count_ref,
  index_ref,
  kind_ref,
  q_pos_ref,
  q_seg_ref,
  k_pos_ref,
  k_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  q_smem,
  do_smem,
  k_smem,
  v_smem,
  ds_smem,
  q_bar,
  k_bar,
  v_bar,
  *,
  params,
  group,
):
  bq, bk = params.block_q, params.block_kv
  kdim = q_smem.shape[-1]
  b, h, qi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("t")
  g = lax.div(h, jnp.array(group, h.dtype))
  rows = pl.ds(qi * bq, bq)
  plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, q_bar.at[0])
  plgpu.copy_gmem_to_smem(do_ref.at[b, h, rows], do_smem, q_bar.at[1])
  q_vecs = (
    _vec(q_pos_ref.at[b, rows], _ROW),
    _vec(q_seg_ref.at[b, rows], _ROW),
  )
  lse = _vec(lse_ref.at[b, h, rows], _ROW)
  # Rows that see nothing: lse -inf, every s -inf, so 0 keeps p at 0.
  lse2 = jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E)
  delta = _vec(delta_ref.at[b, h, rows], _ROW)

  fetch = _kv_fetcher(
    index_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, b, qi, g, bk
  )

  def step(j, slot, dq):
    k_start = index_ref[b, qi, j] * bk
    kv = pl.ds(k_start, bk)
    k_vecs = (_vec(k_pos_ref.at[b, kv], _COL), _vec(k_seg_ref.at[b, kv], _COL))
    plgpu.barrier_wait(k_bar.at[slot])
    s, t = _logits2(_matmul(q_smem, k_smem.at[slot].T, (bq, bk)), params)
    s = _masked(s, params, kind_ref[b, qi, j], q_vecs, k_vecs, k_start, 0)
    p = jnp.exp2(s - lax.broadcast_in_dim(lse2, (bq, bk), [0]))
    plgpu.barrier_wait(v_bar.at[slot])
    dp = _matmul(do_smem, v_smem.at[slot].T, (bq, bk))
    ds = p * (dp - lax.broadcast_in_dim(delta, (bq, bk), [0]))
    ds = ds if t is None else ds * (1.0 - t * t)
    ds_smem[...] = ds.astype(ds_smem.dtype)
    plgpu.commit_smem()
    return dq + _matmul(ds_smem, k_smem.at[slot], (bq, kdim))

  plgpu.barrier_wait(q_bar.at[0])
  plgpu.barrier_wait(q_bar.at[1])
  dq = _pipeline(count_ref[b, qi], fetch, step, _zeros((bq, kdim)))
  q_smem[...] = (dq * params.scale).astype(q_smem.dtype)  # q is done
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, h, rows])
  plgpu.wait_smem_to_gmem(0)


def _dkdv_kernel(
  count_ref,
  index_ref,
  kind_ref,
  q_pos_ref,
  q_seg_ref,
  k_pos_ref,
  k_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  k_smem,
  v_smem,
  q_smem,
  do_smem,
  p_smem,
  ds_smem,
  k_bar,
  q_bar,
  do_bar,
  *,
  params,
  group,
):
  """Transposed tiles [kv rows, q cols], so kv rows sit on the MMA M side."""
  bq, bk = params.block_q, params.block_kv
  kdim, e = k_smem.shape[-1], v_smem.shape[-1]
  b, g, ki = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("t")
  cols = pl.ds(ki * bk, bk)
  plgpu.copy_gmem_to_smem(k_ref.at[b, g, cols], k_smem, k_bar.at[0])
  plgpu.copy_gmem_to_smem(v_ref.at[b, g, cols], v_smem, k_bar.at[1])
  k_vecs = (
    _vec(k_pos_ref.at[b, cols], _ROW),
    _vec(k_seg_ref.at[b, cols], _ROW),
  )
  count = count_ref[b, ki]
  c = jnp.maximum(count, 1)

  def locate(n):  # flat step -> (query head, q block start)
    h = g * group + lax.div(n, c)
    return h, index_ref[b, ki, lax.rem(n, c)] * bq

  def fetch(n, slot):
    h, q_start = locate(n)
    rows = pl.ds(q_start, bq)
    plgpu.copy_gmem_to_smem(
      q_ref.at[b, h, rows], q_smem.at[slot], q_bar.at[slot]
    )
    plgpu.copy_gmem_to_smem(
      do_ref.at[b, h, rows], do_smem.at[slot], do_bar.at[slot]
    )

  def step(n, slot, carry):
    dk, dv = carry
    h, q_start = locate(n)
    rows = pl.ds(q_start, bq)
    q_vecs = (
      _vec(q_pos_ref.at[b, rows], _COL),
      _vec(q_seg_ref.at[b, rows], _COL),
    )
    lse = _vec(lse_ref.at[b, h, rows], _COL)
    lse2 = jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E)
    delta = _vec(delta_ref.at[b, h, rows], _COL)
    plgpu.barrier_wait(q_bar.at[slot])
    s, t = _logits2(_matmul(k_smem, q_smem.at[slot].T, (bk, bq)), params)
    kind = kind_ref[b, ki, lax.rem(n, c)]
    s = _masked(s, params, kind, q_vecs, k_vecs, ki * bk, 1)
    p = jnp.exp2(s - lax.broadcast_in_dim(lse2, (bk, bq), [1]))
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.barrier_wait(do_bar.at[slot])
    dp = _matmul(v_smem, do_smem.at[slot].T, (bk, bq))
    ds = p * (dp - lax.broadcast_in_dim(delta, (bk, bq), [1]))
    ds = ds if t is None else ds * (1.0 - t * t)
    ds_smem[...] = ds.astype(ds_smem.dtype)
    plgpu.commit_smem()
    dv = dv + _matmul(p_smem, do_smem.at[slot], (bk, e))
    dk = dk + _matmul(ds_smem, q_smem.at[slot], (bk, kdim))
    return dk, dv

  plgpu.barrier_wait(k_bar.at[0])
  plgpu.barrier_wait(k_bar.at[1])
  dk, dv = _pipeline(
    count * group, fetch, step, (_zeros((bk, kdim)), _zeros((bk, e)))
  )
  k_smem[...] = (dk * params.scale).astype(k_smem.dtype)  # k, v are done
  v_smem[...] = dv.astype(v_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, g, cols])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, g, cols])
  plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------- wrappers


def _launch(body, grid, out_type, scratch, params, group):
  interpret = params.interpret  # tests may pass InterpretGPUParams directly
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  return plgpu.kernel(
    functools.partial(body, params=params, group=group),
    out_type=out_type,
    scratch_types=scratch,
    grid=grid,
    grid_names=("t", "h", "b"),
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(approx_math=True),
  )


def flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, meta, params):
  """(o [B, H, T, E] in q.dtype, lse [B, H, T] f32); see vjp.py."""
  b, h, t, kdim = q.shape
  g, e = v.shape[1], v.shape[3]
  bq, bk = params.block_q, params.block_kv
  scratch = [
    _smem((bq, kdim), q.dtype),
    _smem((2, bk, kdim), q.dtype),
    _smem((2, bk, e), q.dtype),
    _smem((bq, bk), q.dtype),
    _smem((bq, e), q.dtype),
    plgpu.SMEM((bq,), jnp.float32),
    plgpu.Barrier(num_barriers=1),
    plgpu.Barrier(num_barriers=2),
    plgpu.Barrier(num_barriers=2),
  ]
  out_type = [
    jax.ShapeDtypeStruct((b, h, t, e), q.dtype),
    jax.ShapeDtypeStruct((b, h, t), jnp.float32),
  ]
  kernel = _launch(
    _fwd_kernel, (t // bq, h, b), out_type, scratch, params, h // g
  )
  return tuple(
    kernel(
      meta.kv_count,
      meta.kv_index,
      meta.kv_kind,
      q_pos,
      q_seg,
      k_pos,
      k_seg,
      q,
      k,
      v,
    )
  )


def flash_bwd(
  q, k, v, q_pos, k_pos, q_seg, k_seg, meta, lse, do, delta, params
):
  """(dq, dk, dv) like (q, k, v); delta = rowsum(o * do) - dlse."""
  b, h, t, kdim = q.shape
  g, s, e = v.shape[1], v.shape[2], v.shape[3]
  bq, bk = params.block_q, params.block_kv
  group = h // g
  seqs = (q_pos, q_seg, k_pos, k_seg, q, k, v, do, lse, delta)
  dq = _launch(
    _dq_kernel,
    (t // bq, h, b),
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    [
      _smem((bq, kdim), q.dtype),
      _smem((bq, e), q.dtype),
      _smem((2, bk, kdim), q.dtype),
      _smem((2, bk, e), q.dtype),
      _smem((bq, bk), q.dtype),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
    ],
    params,
    group,
  )(meta.kv_count, meta.kv_index, meta.kv_kind, *seqs)
  dk, dv = _launch(
    _dkdv_kernel,
    (s // bk, g, b),
    [
      jax.ShapeDtypeStruct(k.shape, k.dtype),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
    ],
    [
      _smem((bk, kdim), k.dtype),
      _smem((bk, e), v.dtype),
      _smem((2, bq, kdim), q.dtype),
      _smem((2, bq, e), q.dtype),
      _smem((bk, bq), q.dtype),
      _smem((bk, bq), q.dtype),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
    ],
    params,
    group,
  )(meta.q_count, meta.q_index, meta.q_kind, *seqs)
  return dq, dk, dv
