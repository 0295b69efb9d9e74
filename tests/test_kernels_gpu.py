"""Pallas GPU flash attention (kernels/flash_attention/pallas_gpu.py).

On a CPU-only machine the kernels run in the Pallas interpreter and are
compared with the dense f32 reference; they are also lowered for `cuda`
with `jax.export` against an abstract H100, forward and backward. On a GPU
the same comparisons run the compiled kernels.

Tolerances: f32 1e-4 absolute on out, lse, dq, dk, dv (O(1) inputs); bf16
inputs 3e-2 against the f32 reference on the same bf16 values.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import masks
from kernels.flash_attention import pallas_gpu
from kernels.flash_attention import pallas_mgpu
from kernels.flash_attention import reference
from kernels.flash_attention import vjp
from kernels.masks import MaskSpec
from tests.helpers import assert_close

INTERPRET = jax.default_backend() != "gpu"
# We use the Triton lowering knowingly (see pallas_gpu.py's docstring).
pytestmark = pytest.mark.filterwarnings(
  "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)
F32_TOL, BF16_TOL = 1e-4, 3e-2

SPECS = {
  "full": MaskSpec(),
  "causal": MaskSpec(causal=True),
  "window": MaskSpec(causal=True, window=(40, 0)),
  "bidir_window": MaskSpec(window=(24, 17)),
  "global_local": MaskSpec(causal=True, window=(32, 0), global_prefix=20),
  "chunk_suffix": MaskSpec(causal=True, chunk=48, global_suffix=12),
  "chunk32_suffix": MaskSpec(causal=True, chunk=32, global_suffix=12),
  "bigbird": MaskSpec(
    causal=True,
    window=(16, 0),
    global_prefix=8,
    block_mask=((1, 0, 0), (1, 1, 0), (0, 1, 1)),
    block_mask_sizes=(48, 40),
  ),
}
HEADS = [(1, 1), (4, 2), (8, 1)]
DIMS = [(64, 64), (128, 128), (96, 96), (64, 128)]  # (K, E)


def _segments(rng, b, t):
  """Packed rows: up to three documents, positions restart in each, then
  padding (segment 0) at the end."""
  seg = np.zeros((b, t), np.int32)
  pos = np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), 3, replace=False))
    bounds = [0, *cuts]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
      seg[r, lo:hi] = i + 1
      pos[r, lo:hi] = np.arange(hi - lo)
  return seg, pos


def make_inputs(seed, *, b, t, s, h, g, kdim, e, packed, dtype=jnp.float32):
  """[B, H, T, K] kernel-layout inputs, positions, segments, cotangents."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  x = dict(
    q=normal(b, h, t, kdim),
    k=normal(b, g, s, kdim),
    v=normal(b, g, s, e),
    do=normal(b, h, t, e),
    dlse=jnp.asarray(rng.normal(size=(b, h, t)), jnp.float32),
  )
  if packed and t == s:
    seg, pos = _segments(rng, b, t)
    x.update(q_seg=seg, k_seg=seg, q_pos=pos, k_pos=pos)
  else:  # queries are the last t of s positions (prefill / cross lengths)
    x.update(
      q_pos=np.broadcast_to(np.arange(t) + s - t, (b, t)),
      k_pos=np.broadcast_to(np.arange(s), (b, s)),
      q_seg=np.ones((b, t)),
      k_seg=np.ones((b, s)),
    )
    if packed:  # still pad the tails
      x["q_seg"][:, t - t // 8 :] = 0
      x["k_seg"][:, s - s // 8 :] = 0
  for n in ("q_pos", "k_pos", "q_seg", "k_seg"):
    x[n] = jnp.asarray(x[n], jnp.int32)
  return x


BACKENDS = {"triton": pallas_gpu, "mosaic": pallas_mgpu}


def kernel_run(x, spec, *, bq, bk, cap=None, backend="triton"):
  """Forward then backward through the backend contract of vjp.py.

  "mosaic" calls pallas_mgpu directly: on CPU that is the Mosaic GPU
  interpreter, whose wgmma is exact in f32, so f32 cases check the kernels'
  logic tightly although the hardware path takes bf16 / f16 only."""
  params = vjp.KernelParams(
    spec,
    x["q"].shape[-1] ** -0.5,
    cap,
    bq,
    bk,
    x["k"].shape[2],
    interpret=INTERPRET,
  )
  return _kernel_run(x, params, backend)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _kernel_run(x, params, backend):
  mod = BACKENDS[backend]
  seqs = (x["q_pos"], x["k_pos"], x["q_seg"], x["k_seg"])
  meta = masks.block_metadata(
    params.spec,
    *seqs,
    block_q=params.block_q,
    block_kv=params.block_kv,
    kv_len=params.kv_len,
  )
  o, lse = mod.flash_fwd(x["q"], x["k"], x["v"], *seqs, meta, params)
  dlse = jnp.where(jnp.isfinite(lse), x["dlse"], 0.0)
  delta = jnp.sum(o.astype(jnp.float32) * x["do"].astype(jnp.float32), -1)
  grads = mod.flash_bwd(
    x["q"], x["k"], x["v"], *seqs, meta, lse, x["do"], delta - dlse, params
  )
  return (o, lse, *grads), meta


@functools.partial(jax.jit, static_argnames=("spec", "cap"))
def reference_run(x, spec, *, cap=None):
  """Dense reference in the same layout, differentiated by autodiff."""
  sw = lambda a: jnp.swapaxes(a, 1, 2)
  up = lambda a: a.astype(jnp.float32)
  mask = masks.dense_mask(spec, x["q_pos"], x["k_pos"], x["q_seg"], x["k_seg"])
  scale = x["q"].shape[-1] ** -0.5

  def f(q, k, v):
    o, lse = reference.attention_reference(
      sw(q), sw(k), sw(v), mask, scale=scale, logits_soft_cap=cap
    )
    return sw(o), lse

  (o, lse), pullback = jax.vjp(f, up(x["q"]), up(x["k"]), up(x["v"]))
  dlse = jnp.where(jnp.isfinite(lse), x["dlse"], 0.0)
  return (o, lse, *pullback((up(x["do"]), dlse)))


NAMES = ("out", "lse", "dq", "dk", "dv")


def check_case(
  seed,
  spec_name,
  *,
  b=1,
  t=128,
  s=128,
  heads=(4, 2),
  dims=(64, 64),
  packed=True,
  cap=None,
  bq=32,
  bk=32,
  dtype=jnp.float32,
  backend="triton",
):
  spec = SPECS[spec_name]
  x = make_inputs(
    seed,
    b=b,
    t=t,
    s=s,
    h=heads[0],
    g=heads[1],
    kdim=dims[0],
    e=dims[1],
    packed=packed,
    dtype=dtype,
  )
  got, meta = kernel_run(x, spec, bq=bq, bk=bk, cap=cap, backend=backend)
  want = reference_run(x, spec, cap=cap)
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  for name, g, w in zip(NAMES, got, want, strict=True):
    assert g.dtype == (jnp.float32 if name == "lse" else dtype), name
    assert_close(g, w, tol, f"{spec_name} {name}")
  return meta


def _sample(n, seed):
  """A seeded sample over masks, shapes, heads, dims, packing, soft cap."""
  rng = np.random.default_rng(seed)
  names = list(SPECS)
  lengths = [(128, 128), (64, 192), (96, 160), (160, 96)]
  cases = []
  for i in range(n):
    t, s = lengths[rng.integers(len(lengths))]
    cases.append(
      dict(
        seed=i,
        spec_name=names[i % len(names)],
        t=t,
        s=s,
        heads=HEADS[rng.integers(len(HEADS))],
        dims=DIMS[rng.integers(len(DIMS))],
        packed=bool(rng.integers(2)),
        b=1 + int(rng.integers(2)),
        cap=None if rng.integers(3) else 20.0,
        bq=[16, 32][rng.integers(2)],
        bk=[16, 32][rng.integers(2)],
      )
    )
  return cases


def _id(c):
  return (
    f"{c['spec_name']}-t{c['t']}s{c['s']}-h{c['heads'][0]}"
    f"g{c['heads'][1]}-k{c['dims'][0]}e{c['dims'][1]}"
    f"{'-packed' if c['packed'] else ''}"
    f"{'-cap' if c['cap'] else ''}-b{c['bq']}x{c['bk']}"
  )


@pytest.mark.parametrize("case", _sample(12, 0), ids=_id)
def test_matches_reference(case):
  check_case(**case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _sample(120, 1), ids=_id)
def test_matches_reference_sweep(case):
  check_case(**case)


@pytest.mark.parametrize(
  "spec_name", ["causal", pytest.param("global_local", marks=pytest.mark.slow)]
)
def test_bf16(spec_name):
  check_case(
    3, spec_name, heads=(4, 2), dims=(64, 64), bq=32, bk=32, dtype=jnp.bfloat16
  )


MOSAIC_CASES = [
  dict(seed=20, spec_name="causal", heads=(2, 1)),
  dict(seed=21, spec_name="global_local", heads=(4, 2), cap=20.0),
  dict(
    seed=22,
    spec_name="chunk32_suffix",
    t=128,
    s=192,
    dims=(64, 128),
    packed=False,
  ),
  dict(
    seed=23,
    spec_name="bidir_window",
    t=192,
    s=128,
    heads=(1, 1),
    dims=(128, 64),
    packed=False,
    bk=128,
  ),
]


def _mosaic_id(c):
  return f"{c['spec_name']}-s{c.get('seed')}"


@pytest.mark.parametrize("case", MOSAIC_CASES, ids=_mosaic_id)
def test_mosaic_matches_reference_f32(case):
  """The Mosaic GPU kernels' logic, exactly: the interpreter's wgmma is
  exact f32 (on hardware f32 would be tf32, so sm90 dispatch takes bf16 /
  f16 only)."""
  if not INTERPRET:
    pytest.skip("f32 wgmma is tf32 on hardware")
  check_case(**dict(dict(bq=64, bk=64), **case), backend="mosaic")


@pytest.mark.parametrize(
  "case",
  [
    MOSAIC_CASES[1],
    *(pytest.param(c, marks=pytest.mark.slow) for c in MOSAIC_CASES[::2]),
  ],
  ids=_mosaic_id,
)
def test_mosaic_bf16(case):
  check_case(
    **dict(dict(bq=64, bk=64), **case), backend="mosaic", dtype=jnp.bfloat16
  )


def test_padding_rows_are_zero_with_finite_grads():
  """Segment-0 rows see nothing: out 0, lse -inf, zero finite grads."""
  x = make_inputs(5, b=2, t=128, s=128, h=2, g=1, kdim=64, e=64, packed=True)
  o, lse, dq, dk, dv = kernel_run(x, SPECS["causal"], bq=32, bk=32)[0]
  pad = np.asarray(x["q_seg"] == 0)[:, None, :]
  assert pad.any()
  assert np.all(np.asarray(o)[np.broadcast_to(pad, o.shape[:3])] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[np.broadcast_to(pad, lse.shape)]))
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(dq)[np.broadcast_to(pad, dq.shape[:3])] == 0)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_empty_tiles_are_not_visited(backend):
  """K/V rows that only EMPTY tiles cover are NaN: any visit would spread
  the NaN (0 * NaN), so finite, reference-exact results prove the skip."""
  if backend == "mosaic" and not INTERPRET:
    pytest.skip("f32 Mosaic kernels run only in the interpreter")
  spec = MaskSpec(causal=True, window=(40, 0))
  bq = bk = 32 if backend == "triton" else 64
  x = make_inputs(6, b=1, t=64, s=512, h=2, g=1, kdim=64, e=64, packed=False)
  seqs = (x["q_pos"], x["k_pos"], x["q_seg"], x["k_seg"])
  meta = masks.block_metadata(spec, *seqs, block_q=bq, block_kv=bk)
  dead = np.all(np.asarray(meta.kind[0]) == masks.EMPTY, axis=0)  # [NK]
  assert dead.sum() >= 6, dead
  rows = jnp.asarray(np.repeat(dead, bk))[None, None, :, None]
  poisoned = dict(
    x, k=jnp.where(rows, jnp.nan, x["k"]), v=jnp.where(rows, jnp.nan, x["v"])
  )
  got = kernel_run(poisoned, spec, bq=bq, bk=bk, backend=backend)[0]
  want = reference_run(x, spec)
  for name, g, w in zip(NAMES, got, want, strict=True):
    if name in ("dk", "dv"):  # poisoned rows get exactly zero gradient
      assert np.all(np.asarray(g)[:, :, np.repeat(dead, bk)] == 0)
      g, w = (a[:, :, ~np.repeat(dead, bk)] for a in (g, w))
    assert_close(g, w, F32_TOL, name)


def test_custom_vjp_end_to_end():
  """jax.grad through vjp.flash_attention (public layout, lengths that are
  not block multiples, GQA, E != K) equals the reference's gradients.

  On CPU the GPU kernels run interpreted (backend "interpret_gpu"), so the
  shared custom_vjp is exercised here."""
  backend = "interpret_gpu" if INTERPRET else "pallas_gpu"
  spec = SPECS["global_local"]
  x = make_inputs(9, b=2, t=100, s=100, h=4, g=2, kdim=64, e=32, packed=True)
  sw = lambda a: jnp.swapaxes(a, 1, 2)
  q, k, v = sw(x["q"]), sw(x["k"]), sw(x["v"])
  w = sw(x["do"])
  mask = masks.dense_mask(spec, x["q_pos"], x["k_pos"], x["q_seg"], x["k_seg"])

  def loss(impl, q, k, v):
    if impl == "ref":
      o, lse = reference.attention_reference(q, k, v, mask, scale=0.125)
    else:
      o, lse = vjp.flash_attention(
        q,
        k,
        v,
        x["q_pos"],
        x["k_pos"],
        x["q_seg"],
        x["k_seg"],
        spec=spec,
        scale=0.125,
        logits_soft_cap=None,
        backend=backend,
        block_sizes=vjp.BlockSizes(32, 32, 16, 32),
      )
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(o * w) + 0.1 * jnp.sum(lse * x["dlse"])

  grad = lambda impl: jax.jit(
    jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2))
  )(q, k, v)
  got, want = grad("gpu"), grad("ref")
  for name, g, w_ in zip(("dq", "dk", "dv"), got, want, strict=True):
    assert_close(g, w_, F32_TOL, name)


def test_refuses_unsupported_cases():
  """NotImplementedError (so kernels.attention can fall back), not junk."""
  x = make_inputs(0, b=1, t=96, s=96, h=1, g=1, kdim=64, e=64, packed=False)
  with pytest.raises(NotImplementedError, match="powers of two"):
    kernel_run(x, SPECS["causal"], bq=48, bk=32)


# ------------------------------------------------------------- cuda lowering


def _export_cuda(f, *args, device_kind="NVIDIA H100 80GB HBM3"):
  """jax.export for cuda on an abstract GPU: the lowering picks kernels by
  compute capability, which the abstract mesh's device kind supplies."""
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType

  dev = AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
  # Neither kernel custom call has a serialization-stability guarantee; we
  # lower to inspect, not to ship the artifact.
  checks = [
    jax.export.DisabledSafetyCheck.custom_call(name)
    for name in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")
  ]
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
      jax.jit(f), platforms=["cuda"], disabled_checks=checks
    )(*args)


def _lower_fwd_bwd(
  spec_name,
  cap,
  *,
  dtype=jnp.bfloat16,
  bq=128,
  bk=64,
  kdim=128,
  device_kind="NVIDIA H100 80GB HBM3",
):
  spec = SPECS[spec_name]
  b, h, g, t = 2, 8, 2, 1024
  params = vjp.KernelParams(spec, kdim**-0.5, cap, bq, bk, t)

  def fwd_bwd(q, k, v, pos, seg, do):
    meta = masks.block_metadata(
      spec, pos, pos, seg, seg, block_q=bq, block_kv=bk
    )
    o, lse = pallas_gpu.flash_fwd(q, k, v, pos, pos, seg, seg, meta, params)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1)
    return o, pallas_gpu.flash_bwd(
      q, k, v, pos, pos, seg, seg, meta, lse, do, delta, params
    )

  sds = jax.ShapeDtypeStruct
  exp = _export_cuda(
    fwd_bwd,
    sds((b, h, t, kdim), dtype),
    sds((b, g, t, kdim), dtype),
    sds((b, g, t, kdim), dtype),
    sds((b, t), jnp.int32),
    sds((b, t), jnp.int32),
    sds((b, h, t, kdim), dtype),
    device_kind=device_kind,
  )
  assert exp.platforms == ("cuda",)
  text = exp.mlir_module()
  return (
    text.count("__gpu$xla.gpu.triton"),
    text.count("stablehlo.custom_call @mosaic_gpu"),
    text,
  )


@pytest.mark.parametrize(
  "spec_name,cap",
  [
    ("causal", None),
    ("global_local", 30.0),
    ("chunk_suffix", None),
    ("bigbird", None),
  ],
)
def test_triton_lowers_for_cuda(spec_name, cap):
  triton, mosaic, text = _lower_fwd_bwd(spec_name, cap)
  assert (triton, mosaic) == (3, 0)  # fwd, dK/dV, dQ
  for name in ("flash_fwd_gpu", "flash_dkdv_gpu", "flash_dq_gpu"):
    assert name in text


@pytest.mark.parametrize(
  "spec_name,cap",
  [("causal", None), ("global_local", 30.0), ("chunk32_suffix", None)],
)
def test_mosaic_lowers_for_cuda(spec_name, cap):
  """bf16 with block_q 64 on sm90 takes the Mosaic GPU kernels."""
  assert _lower_fwd_bwd(spec_name, cap, bq=64, bk=64)[:2] == (0, 3)


def test_gpu_dispatch():
  """Mosaic GPU only where wgmma exists and the case fits it."""
  # f32: Triton (exact f32 dots); bf16 on an A100: Triton; a forward tile
  # the Mosaic kernels take with a backward tile they do not: mixed.
  assert _lower_fwd_bwd("causal", None, dtype=jnp.float32, bq=64, bk=64)[
    :2
  ] == (3, 0)
  assert _lower_fwd_bwd(
    "causal", None, bq=64, bk=64, device_kind="NVIDIA A100-SXM4-80GB"
  )[:2] == (3, 0)
  assert _lower_fwd_bwd("causal", None, bq=64, bk=128)[:2] == (2, 1)
  assert _lower_fwd_bwd("causal", None, bq=64, bk=64, kdim=96)[:2] == (3, 0)
  # Chunks that are not powers of two need an f32 floor Mosaic GPU lacks.
  assert _lower_fwd_bwd("chunk_suffix", None, bq=64, bk=64)[:2] == (3, 0)


@pytest.mark.parametrize(
  "block_sizes,want",
  [
    (None, (0, 3)),  # GPU default tiles (vjp.GPU_BLOCK_SIZES): Mosaic GPU
    (vjp.BlockSizes(128, 128), (3, 0)),  # 128 x 128 tiles: Triton
  ],
)
def test_public_entry_lowers_for_cuda(block_sizes, want):
  """jax.grad through kernels.attention(impl="pallas_gpu") (padding to
  tiles, metadata, the shared custom_vjp) lowers for cuda with our kernels,
  not the xla_chunked fallback."""
  import kernels

  spec = SPECS["global_local"]
  b, t, h, g, kdim = 1, 1000, 4, 2, 128

  def loss(q, k, v, pos):
    o = kernels.attention(
      q,
      k,
      v,
      mask=spec,
      q_pos=pos,
      k_pos=pos,
      impl="pallas_gpu",
      block_sizes=block_sizes,
    )
    return jnp.sum(o.astype(jnp.float32))

  sds = jax.ShapeDtypeStruct
  exp = _export_cuda(
    jax.grad(loss, argnums=(0, 1, 2)),
    sds((b, t, h, kdim), jnp.bfloat16),
    sds((b, t, g, kdim), jnp.bfloat16),
    sds((b, t, g, kdim), jnp.bfloat16),
    sds((b, t), jnp.int32),
  )
  text = exp.mlir_module()
  got = (
    text.count("__gpu$xla.gpu.triton"),
    text.count("stablehlo.custom_call @mosaic_gpu"),
  )
  assert got == want
