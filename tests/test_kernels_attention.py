"""kernels.attention: every impl against the dense reference (docs/testing.md).

Tolerances: f32 1e-4 absolute on outputs, lse and gradients (inputs are
O(1)); bf16 inputs 2e-2 (one bf16 rounding of the output dominates).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import masks
from kernels.masks import MaskSpec
from tests.helpers import assert_close

F32_TOL, BF16_TOL = 1e-4, 2e-2


def numpy_attention(q, k, v, m, scale, cap=None):
  """float64 loops-free textbook attention, independent of kernels/."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("BTHK,BSHK->BHTS", q, k) * scale
  if cap is not None:
    s = cap * np.tanh(s / cap)
  s = np.where(m[:, None], s, -np.inf)
  mx = s.max(-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0)
  p = np.exp(s - mx)
  l = p.sum(-1, keepdims=True)
  o = np.einsum("BHTS,BSHE->BTHE", p / np.where(l > 0, l, 1), v)
  lse = np.where(l > 0, mx + np.log(np.where(l > 0, l, 1)), -np.inf)[..., 0]
  return o, lse


def make_case(
  seed,
  *,
  b=2,
  t=37,
  s=37,
  h=4,
  g=2,
  kdim=16,
  e=None,
  dtype=jnp.float32,
  packed=True,
  gathered=False,
):
  rng = np.random.default_rng(seed)
  e = e or kdim
  q = rng.normal(size=(b, t, h, kdim))
  k = rng.normal(size=(b, s, g, kdim))
  v = rng.normal(size=(b, s, g, e))
  if gathered:  # non-contiguous positions, as after MoD / MoR gathering
    q_pos = np.sort(rng.choice(2 * t, (b, t)), axis=1)
    k_pos = np.sort(rng.choice(2 * s, (b, s)), axis=1)
  else:
    q_pos = np.broadcast_to(np.arange(t) + max(s - t, 0), (b, t))
    k_pos = np.broadcast_to(np.arange(s), (b, s))
  if packed:  # two documents then padding, cut differently per row

    def segs(n):
      cut = rng.integers(1, n, size=(b, 2))
      cut.sort(axis=1)
      i = np.arange(n)[None]
      return np.where(i < cut[:, :1], 1, np.where(i < cut[:, 1:], 2, 0))

    q_seg, k_seg = segs(t), segs(s)
    if t == s:
      k_seg = q_seg
  else:
    q_seg = k_seg = None
  cast = lambda x: jnp.asarray(x, dtype)
  ints = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return dict(
    q=cast(q),
    k=cast(k),
    v=cast(v),
    q_pos=ints(q_pos),
    k_pos=ints(k_pos),
    q_segment_ids=ints(q_seg),
    kv_segment_ids=ints(k_seg),
  )


def run(case, spec, impl, cap=None, block_sizes=None):
  return kernels.attention(
    case["q"],
    case["k"],
    case["v"],
    mask=spec,
    q_pos=case["q_pos"],
    k_pos=case["k_pos"],
    q_segment_ids=case["q_segment_ids"],
    kv_segment_ids=case["kv_segment_ids"],
    logits_soft_cap=cap,
    impl=impl,
    block_sizes=block_sizes,
    return_lse=True,
  )


def grads(case, spec, impl, cap=None, block_sizes=None):
  """d/d(q, k, v) of a loss that uses both outputs (lse included)."""
  rng = np.random.default_rng(7)
  w = jnp.asarray(
    rng.normal(size=case["q"].shape[:3] + case["v"].shape[3:]), jnp.float32
  )

  def loss(q, k, v):
    o, lse = run(dict(case, q=q, k=k, v=v), spec, impl, cap, block_sizes)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(o.astype(jnp.float32) * w) + 0.1 * jnp.sum(lse)

  return jax.grad(loss, argnums=(0, 1, 2))(case["q"], case["k"], case["v"])


SPECS = [
  MaskSpec(),
  MaskSpec(causal=True),
  MaskSpec(causal=True, window=(6, 0), global_prefix=3),
  MaskSpec(window=(4, 9)),
  MaskSpec(causal=True, chunk=8),
  MaskSpec(causal=True, window=(5, 0), global_suffix=5),
  # Covers positions < 96: make_case(gathered=True) draws up to 2 * S.
  MaskSpec(
    block_mask=(
      (1, 0, 1, 0, 1, 1),
      (1, 1, 0, 0, 0, 1),
      (0, 1, 1, 1, 0, 0),
      (1, 0, 0, 1, 1, 0),
      (0, 0, 1, 0, 1, 1),
      (1, 1, 1, 0, 0, 1),
    ),
    block_mask_sizes=(16, 16),
  ),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("gathered", [False, True])
def test_reference_matches_numpy(spec, gathered):
  case = make_case(0, gathered=gathered, e=8)
  o, lse = run(case, spec, "xla", cap=None)
  m = np.asarray(
    masks.dense_mask(
      spec,
      case["q_pos"],
      case["k_pos"],
      case["q_segment_ids"],
      case["kv_segment_ids"],
    )
  )
  scale = 1 / np.sqrt(case["q"].shape[-1])
  o_np, lse_np = numpy_attention(case["q"], case["k"], case["v"], m, scale)
  assert_close(o, o_np, 1e-5, "out")
  assert_close(lse, lse_np.transpose(0, 1, 2), 1e-5, "lse")


def test_soft_cap_and_explicit_scale():
  case = make_case(1, packed=False)
  spec = MaskSpec(causal=True)
  o = kernels.attention(
    case["q"],
    case["k"],
    case["v"],
    mask=spec,
    q_pos=case["q_pos"],
    k_pos=case["k_pos"],
    scale=0.3,
    logits_soft_cap=2.0,
    impl="xla",
  )
  m = np.asarray(
    masks.dense_mask(spec, case["q_pos"], case["k_pos"], None, None)
  )
  o_np, _ = numpy_attention(case["q"], case["k"], case["v"], m, 0.3, 2.0)
  assert_close(o, o_np, 1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_xla_chunked_matches_reference(spec):
  """Several query tiles and key tiles (29 x 45 is no multiple of them),
  other tiles in the backward pass, GQA, packed rows, gathered positions,
  soft cap."""
  case = make_case(2, t=29, s=45, e=8, gathered=True)
  bs = kernels.BlockSizes(8, 16, 16, 8)
  got = outputs_and_grads(case, spec, "xla_chunked", 1.5, bs)
  want = outputs_and_grads(case, spec, "xla", 1.5)
  for name, a, b in zip(
    ("out", "lse", "dq", "dk", "dv"), got, want, strict=True
  ):
    assert_close(a, b, F32_TOL, name)


@pytest.mark.parametrize("impl", ["xla_chunked", "interpret"])
def test_suffix_keys_at_positions_inside_the_sequence(impl):
  """TGlobal: summary keys appended after the regular keys, at block
  positions inside the sequence (not the latest ones), with a key length
  (40 + 5) that vjp.py's wrapper pads to 48 for the blockwise backends."""
  t, blk, n_sum = 40, 8, 5
  spec = MaskSpec(causal=True, window=(3, 0), global_suffix=n_sum)
  k_pos = np.concatenate([np.arange(t), (np.arange(n_sum) + 1) * blk])
  case = dict(
    make_case(8, t=t, s=t + n_sum, packed=False),
    q_pos=jnp.asarray(np.tile(np.arange(t), (2, 1)), jnp.int32),
    k_pos=jnp.asarray(np.tile(k_pos, (2, 1)), jnp.int32),
  )
  bs = kernels.BlockSizes(16, 16)
  for a, b in zip(
    run(case, spec, impl, None, bs), run(case, spec, "xla"), strict=True
  ):
    assert_close(a, b, F32_TOL)


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_fully_masked_rows(impl):
  """Padding rows and rows whose window sees nothing: 0, -inf, zero grads."""
  case = make_case(3, packed=True, gathered=True)
  spec = MaskSpec(causal=True, window=(0, 0))  # only an equal position
  o, lse = run(case, spec, impl)
  m = np.asarray(
    masks.dense_mask(
      spec,
      case["q_pos"],
      case["k_pos"],
      case["q_segment_ids"],
      case["kv_segment_ids"],
    )
  )
  dead = ~m.any(-1)  # [B, T]
  assert dead.any() and not dead.all()
  np.testing.assert_array_equal(np.asarray(o)[dead], 0.0)
  assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[dead]))
  dq, dk, dv = grads(case, spec, impl)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_array_equal(np.asarray(dq)[dead], 0.0)


def test_shape_errors():
  case = make_case(0, h=3, g=2, packed=False)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    run(case, MaskSpec(), "xla")
  with pytest.raises(ValueError, match="impl"):
    run(make_case(0), MaskSpec(), "nope")
  case = make_case(0, packed=False)
  with pytest.raises(
    ValueError,
    match=r"q must be \[B, T, H, K\], k, v "
    r"\[B, S, G, K\]/\[B, S, G, E\]; got \(37, 4, 16\)",
  ):
    run(dict(case, q=case["q"][0]), MaskSpec(), "xla")


def test_auto_on_cpu_is_xla_and_jits():
  case = make_case(4)
  spec = MaskSpec(causal=True)
  f = jax.jit(functools.partial(run, spec=spec, impl="auto"))
  for a, b in zip(f(case), run(case, spec, "xla"), strict=True):
    assert_close(a, b, 1e-6)


# A fresh interpreter imports what a run imports, compiles a function, then
# traces what a process may first trace later: the chunked attention (its
# backend module is imported lazily, inside the trace), the interpreter's
# kernels and a quantized model's code. None may define a JAX config state:
# JAX keys every jit cache on them all, so the function would compile again.
_LATE_TRACE_CHILD = r"""
import json
import jax, jax.numpy as jnp
from jax._src import config as jax_config
from efficient_lm import generate, runs  # noqa: F401
import kernels
from kernels.masks import MaskSpec
f = jax.jit(lambda x: x * 2)
f(jnp.ones(3))
before = set(jax_config.trace_context_names())
q = jax.ShapeDtypeStruct((1, 1024, 2, 8), jnp.float32)
pos = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
jax.jit(lambda q, p: kernels.attention(
  q, q, q, mask=MaskSpec(causal=True), q_pos=p, k_pos=p, impl="xla_chunked"
)).lower(q, pos)
from kernels.flash_attention import pallas_tpu  # noqa: F401
from efficient_lm.models import quantization  # noqa: F401
f(jnp.ones(3))
new = [n for n in jax_config.trace_context_names() if n not in before]
print("RESULT", json.dumps({"compiles": f._cache_size(), "new_states": new}))
"""


def test_late_imports_leave_compiled_functions_compiled():
  import json
  import subprocess
  import sys

  from tests.helpers import REPO, cli_env

  out = subprocess.run(
    [sys.executable, "-c", _LATE_TRACE_CHILD],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  got = json.loads(out.split("RESULT", 1)[1])
  assert got == {"compiles": 1, "new_states": []}, got


@pytest.mark.parametrize(
  "t,s,want",
  [
    (512, 512, "xla"),
    (513, 512, "xla_chunked"),
    (64, 4096, "xla"),
    (64, 4097, "xla_chunked"),
  ],
)
def test_auto_on_cpu_leaves_the_dense_path_at_long_lengths(t, s, want):
  """T * S <= ops.DENSE_MAX_PAIRS (2**18) stays dense; past it "auto"
  traces exactly the chunked path (compared as jaxprs, nothing runs)."""
  from kernels import ops

  assert ops.DENSE_MAX_PAIRS == 2**18
  q = jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, s, 2, 8), jnp.float32)
  qp = jax.ShapeDtypeStruct((1, t), jnp.int32)
  kp = jax.ShapeDtypeStruct((1, s), jnp.int32)

  def jaxpr(impl):
    return str(
      jax.make_jaxpr(
        lambda q, k, qp, kp: kernels.attention(
          q, k, k, mask=MaskSpec(causal=True), q_pos=qp, k_pos=kp, impl=impl
        )
      )(q, kv, qp, kp)
    )

  auto = jaxpr("auto")
  assert auto == jaxpr(want)
  assert ("while" in auto) == (want == "xla_chunked")


# ------------------------------------------------ interpret-mode kernel sweep


def _random_table(rows, cols, *, seed):
  bits = np.random.default_rng(seed).random((rows, cols)) < 0.4
  return tuple(tuple(bool(x) for x in row) for row in bits)


SWEEP_SPECS = {
  "full": MaskSpec(),
  "causal": MaskSpec(causal=True),
  "window": MaskSpec(window=(9, 4)),
  "causal_window": MaskSpec(causal=True, window=(12, 0)),
  "prefix": MaskSpec(causal=True, window=(6, 0), global_prefix=5),
  "chunk": MaskSpec(causal=True, chunk=24),
  "chunk_window": MaskSpec(chunk=20, window=(5, 5)),
  "suffix": MaskSpec(causal=True, window=(7, 0), global_suffix=6),
  # Random tables covering positions < 160: gathered cases draw positions
  # up to 2 * S (a position past a table is an error in kernels.attention).
  "blocks": MaskSpec(
    block_mask=_random_table(10, 7, seed=1), block_mask_sizes=(16, 24)
  ),
  "bigbird": MaskSpec(
    causal=True,
    window=(8, 0),
    global_prefix=4,
    block_mask=_random_table(5, 10, seed=2),
    block_mask_sizes=(32, 16),
  ),
}
LENGTHS = ((37, 37), (48, 48), (29, 53), (61, 23), (64, 80))
HEADS = ((1, 1), (4, 2), (8, 1))
DIMS = ((64, 64), (128, 128), (96, 96), (96, 64))  # (K, E): MLA-like last
BLOCKS = (
  kernels.BlockSizes(16, 16),
  kernels.BlockSizes(16, 32, 32, 16),
  kernels.BlockSizes(32, 16),
)


def sample_cases(n, seed):
  """Seeded sample of the product space; every mask kind appears."""
  rng = np.random.default_rng(seed)
  names = sorted(SWEEP_SPECS)
  cases = []
  for i in range(n):
    cases.append(
      dict(
        seed=i + 1000 * seed,
        spec=names[i % len(names)],
        dtype=("float32", "bfloat16")[int(rng.random() < 0.3)],
        lengths=LENGTHS[rng.integers(len(LENGTHS))],
        heads=HEADS[rng.integers(len(HEADS))],
        dims=DIMS[rng.integers(len(DIMS))],
        packed=bool(rng.random() < 0.6),
        gathered=bool(rng.random() < 0.4),
        cap=(None, 5.0)[int(rng.random() < 0.3)],
        blocks=int(rng.integers(len(BLOCKS))),
      )
    )
  return cases


def _case_id(c):
  return (
    f"{c['spec']}-{c['dtype'][0]}{c['dtype'][-2:]}-TS{c['lengths']}"
    f"-HG{c['heads']}-KE{c['dims']}-{'pk' if c['packed'] else 'np'}"
    f"{'-gth' if c['gathered'] else ''}"
    f"{'-cap' if c['cap'] else ''}-b{c['blocks']}"
  ).replace(" ", "")


def outputs_and_grads(case, spec, impl, cap=None, block_sizes=None):
  """(out, lse, dq, dk, dv) from one jitted value_and_grad."""
  rng = np.random.default_rng(7)
  w = jnp.asarray(
    rng.normal(size=case["q"].shape[:3] + case["v"].shape[3:]), jnp.float32
  )

  @jax.jit
  def f(q, k, v):
    def loss(q, k, v):
      o, lse = run(dict(case, q=q, k=k, v=v), spec, impl, cap, block_sizes)
      fin = jnp.where(jnp.isfinite(lse), lse, 0.0)
      return jnp.sum(o.astype(jnp.float32) * w) + 0.1 * jnp.sum(fin), (o, lse)

    (_, outs), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      q, k, v
    )
    return outs + g

  return f(case["q"], case["k"], case["v"])


def check_interpret_case(c):
  spec = SWEEP_SPECS[c["spec"]]
  (t, s), (h, g), (kdim, e) = c["lengths"], c["heads"], c["dims"]
  case = make_case(
    c["seed"],
    b=2,
    t=t,
    s=s,
    h=h,
    g=g,
    kdim=kdim,
    e=e,
    dtype=jnp.dtype(c["dtype"]),
    packed=c["packed"],
    gathered=c["gathered"],
  )
  bf16 = c["dtype"] == "bfloat16"
  got = outputs_and_grads(
    case, spec, "interpret", c["cap"], BLOCKS[c["blocks"]]
  )
  want = outputs_and_grads(case, spec, "xla", c["cap"])
  errs = {}
  for name, a, b in zip(
    ("out", "lse", "dq", "dk", "dv"), got, want, strict=True
  ):
    b32 = np.asarray(b, np.float32)
    fin = np.isfinite(b32)
    scale = max(1.0, float(np.max(np.abs(b32[fin]), initial=0)))
    tol = BF16_TOL * scale if bf16 and name != "lse" else F32_TOL
    assert_close(a, b, tol, name)
    errs[name] = float(
      np.max(np.abs(np.asarray(a, np.float32)[fin] - b32[fin]), initial=0)
    )
  return errs


DEFAULT_CASES = sample_cases(20, seed=0)
SLOW_CASES = sample_cases(120, seed=1)


@pytest.mark.parametrize("c", DEFAULT_CASES, ids=_case_id)
def test_interpret_matches_reference(c):
  check_interpret_case(c)


@pytest.mark.slow
@pytest.mark.parametrize("c", SLOW_CASES, ids=_case_id)
def test_interpret_matches_reference_sweep(c):
  check_interpret_case(c)


def test_interpret_fully_masked_rows():
  case = make_case(3, t=40, s=40, packed=True, gathered=True)
  spec = MaskSpec(causal=True, window=(0, 0))
  got = outputs_and_grads(
    case, spec, "interpret", None, kernels.BlockSizes(16, 16)
  )
  want = outputs_and_grads(case, spec, "xla")
  for name, a, b in zip(
    ("out", "lse", "dq", "dk", "dv"), got, want, strict=True
  ):
    if name != "lse":
      assert np.all(np.isfinite(np.asarray(a))), name
    assert_close(a, b, F32_TOL, name)


@pytest.mark.parametrize("impl", ["interpret", "xla_chunked"])
def test_empty_tiles_are_not_visited(impl):
  """NaN in the K/V of a kv block leaves every q block that skips it clean,
  and NaN in the Q/dO of a q block leaves the dK/dV of every kv block that
  skips it clean.

  A visited tile would leak NaN even with p = 0 (0 * NaN = NaN), so finite,
  unchanged rows prove the kernels never touched the poisoned block.
  """
  t, blk = 96, 16
  spec = MaskSpec(causal=True, window=(10, 0), global_prefix=3)
  case = make_case(5, b=1, t=t, s=t, h=2, g=1, kdim=16, packed=False)
  bs = kernels.BlockSizes(blk, blk)
  meta = masks.block_metadata(
    spec,
    case["q_pos"],
    case["k_pos"],
    jnp.ones((1, t), jnp.int32),
    jnp.ones((1, t), jnp.int32),
    block_q=blk,
    block_kv=blk,
  )
  kind = np.asarray(meta.kind)[0]
  assert (kind == masks.EMPTY).sum() > kind.size // 2

  w = jnp.asarray(np.random.default_rng(0).normal(size=case["q"].shape))

  @jax.jit
  def fwd_bwd(q, k, v, w):
    def loss(q, k, v):
      o = run(dict(case, q=q, k=k, v=v), spec, impl, None, bs)[0]
      return jnp.sum(o * w), o  # w = dO

    (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      q, k, v
    )
    return (o, *g)

  clean = fwd_bwd(case["q"], case["k"], case["v"], w)
  n = t // blk

  def poison(x, j):
    return x.at[:, j * blk : (j + 1) * blk].set(jnp.nan)

  def check(got, want, rows, what):
    got, want = np.asarray(got)[0, rows], np.asarray(want)[0, rows]
    assert np.all(np.isfinite(got)), what
    np.testing.assert_array_equal(got, want)

  skipped = [j for j in range(n) if (kind[:, j] == masks.EMPTY).any()]
  assert len(skipped) >= n - 1  # all but the global-prefix block
  for j in skipped:
    o, dq, _, _ = fwd_bwd(
      case["q"], poison(case["k"], j), poison(case["v"], j), w
    )
    skip = np.repeat(kind[:, j] == masks.EMPTY, blk)  # q rows skipping j
    for got, want in ((o, clean[0]), (dq, clean[1])):
      check(got, want, skip, f"kv block {j} was visited")
  for i in range(n):
    _, _, dk, dv = fwd_bwd(
      poison(case["q"], i), case["k"], case["v"], poison(w, i)
    )
    skip = np.repeat(kind[i] == masks.EMPTY, blk)  # kv rows skipping i
    for got, want in ((dk, clean[2]), (dv, clean[3])):
      check(got, want, skip, f"q block {i} was visited for dK/dV")


def test_interpret_under_checkpoint_jit_and_shard_map():
  mesh = jax.make_mesh((2,), ("data",))
  case = make_case(6, b=2, t=40, s=40, packed=True)
  spec = MaskSpec(causal=True, window=(9, 0))
  bs = kernels.BlockSizes(16, 16)
  P = jax.sharding.PartitionSpec

  def attn(impl, q, k, v, qp, kp, qs, ks):
    return kernels.attention(
      q,
      k,
      v,
      mask=spec,
      q_pos=qp,
      k_pos=kp,
      q_segment_ids=qs,
      kv_segment_ids=ks,
      impl=impl,
      block_sizes=bs,
    )

  def loss(impl, q, k, v):
    # check_vma=False: JAX's Pallas interpreter evaluates index maps on
    # unvarying program ids against varying data and trips the vma check
    # (jax 0.11.2). Mosaic lowering passes it: see test_kernels_tpu_aot.py.
    f = jax.shard_map(
      jax.checkpoint(functools.partial(attn, impl)),
      mesh=mesh,
      in_specs=(P("data"),) * 7,
      out_specs=P("data"),
      check_vma=False,
    )
    o = f(
      q,
      k,
      v,
      case["q_pos"],
      case["k_pos"],
      case["q_segment_ids"],
      case["kv_segment_ids"],
    )
    return jnp.sum(o * o)

  shard = jax.sharding.NamedSharding(mesh, P("data"))
  case = {n: jax.device_put(x, shard) for n, x in case.items()}
  args = (case["q"], case["k"], case["v"])
  with jax.set_mesh(mesh):
    got = jax.jit(
      jax.grad(functools.partial(loss, "interpret"), argnums=(0, 1, 2))
    )(*args)
    want = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(
      *args
    )
  for a, b in zip(got, want, strict=True):
    assert_close(a, b, F32_TOL)


def test_xla_paths_under_shard_map_with_vma_checks():
  """The XLA paths (the fallback of "auto") trace under shard_map with
  check_vma=True and match the unsharded result, gradients included."""
  mesh = jax.make_mesh((2,), ("data",))
  case = make_case(7, b=2, t=40, s=40, packed=True)
  spec = MaskSpec(causal=True, window=(9, 0))
  P = jax.sharding.PartitionSpec
  names = ("q", "k", "v", "q_pos", "k_pos", "q_segment_ids", "kv_segment_ids")

  def attn(impl, q, k, v, qp, kp, qs, ks):
    return kernels.attention(
      q,
      k,
      v,
      mask=spec,
      q_pos=qp,
      k_pos=kp,
      q_segment_ids=qs,
      kv_segment_ids=ks,
      impl=impl,
      block_sizes=kernels.BlockSizes(16, 16),
    )

  def loss(impl, sharded, q, k, v):
    f = functools.partial(attn, impl)
    if sharded:
      f = jax.shard_map(
        f,
        mesh=mesh,
        in_specs=(P("data"),) * 7,
        out_specs=P("data"),
        check_vma=True,
      )
    o = f(q, k, v, *(case[n] for n in names[3:]))
    return jnp.sum(o * o)

  args = tuple(case[n] for n in names[:3])
  want = jax.grad(functools.partial(loss, "xla", False), (0, 1, 2))(*args)
  shard = jax.sharding.NamedSharding(mesh, P("data"))
  case = {n: jax.device_put(x, shard) for n, x in case.items()}
  args = tuple(case[n] for n in names[:3])
  with jax.set_mesh(mesh):
    for impl in ("xla", "xla_chunked"):
      got = jax.jit(
        jax.grad(functools.partial(loss, impl, True), argnums=(0, 1, 2))
      )(*args)
      for a, b in zip(got, want, strict=True):
        assert_close(a, b, F32_TOL)


def test_auto_falls_back_when_a_kernel_refuses(monkeypatch):
  """On a (pretend) TPU, tile lists too big for SMEM -> xla_chunked."""
  from kernels import ops

  monkeypatch.setattr(ops, "_platform", lambda: "tpu")
  q = jax.ShapeDtypeStruct((1, 65536, 1, 128), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((1, 65536), jnp.int32)

  def f(impl):
    return lambda q, pos: kernels.attention(
      q, q, q, mask=MaskSpec(causal=True), q_pos=pos, k_pos=pos, impl=impl
    )

  jaxpr = str(jax.make_jaxpr(f("auto"))(q, pos))
  assert "pallas_call" not in jaxpr and "scan" in jaxpr
  with pytest.raises(NotImplementedError, match="SMEM"):
    jax.make_jaxpr(f("pallas_tpu"))(q, pos)
