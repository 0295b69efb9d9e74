"""kernels.attention: every impl against the dense reference (METHODS §0.4).

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

F32_TOL, BF16_TOL = 1e-4, 2e-2


def numpy_attention(q, k, v, m, scale, cap=None):
  """float64 loops-free textbook attention, independent of kernels/."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) * scale
  if cap is not None:
    s = cap * np.tanh(s / cap)
  s = np.where(m[:, None], s, -np.inf)
  mx = s.max(-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0)
  p = np.exp(s - mx)
  l = p.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshe->bthe", p / np.where(l > 0, l, 1), v)
  lse = np.where(l > 0, mx + np.log(np.where(l > 0, l, 1)), -np.inf)[..., 0]
  return o, lse


def make_case(seed, *, b=2, tq=37, tk=37, hq=4, hkv=2, d=16, e=None,
              dtype=jnp.float32, packed=True, gathered=False):
  rng = np.random.default_rng(seed)
  e = e or d
  q = rng.normal(size=(b, tq, hq, d))
  k = rng.normal(size=(b, tk, hkv, d))
  v = rng.normal(size=(b, tk, hkv, e))
  if gathered:  # non-contiguous positions, as after MoD / MoR gathering
    q_pos = np.sort(rng.choice(2 * tq, (b, tq)), axis=1)
    k_pos = np.sort(rng.choice(2 * tk, (b, tk)), axis=1)
  else:
    q_pos = np.broadcast_to(np.arange(tq) + max(tk - tq, 0), (b, tq))
    k_pos = np.broadcast_to(np.arange(tk), (b, tk))
  if packed:  # two documents then padding, cut differently per row
    def segs(t):
      cut = rng.integers(1, t, size=(b, 2))
      cut.sort(axis=1)
      i = np.arange(t)[None]
      return np.where(i < cut[:, :1], 1, np.where(i < cut[:, 1:], 2, 0))
    q_seg, k_seg = segs(tq), segs(tk)
    if tq == tk:
      k_seg = q_seg
  else:
    q_seg = k_seg = None
  cast = lambda x: jnp.asarray(x, dtype)
  ints = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return dict(q=cast(q), k=cast(k), v=cast(v), q_pos=ints(q_pos),
              k_pos=ints(k_pos), q_segment_ids=ints(q_seg),
              kv_segment_ids=ints(k_seg))


def run(case, spec, impl, cap=None, block_sizes=None):
  return kernels.attention(
    case["q"], case["k"], case["v"], mask=spec, q_pos=case["q_pos"],
    k_pos=case["k_pos"], q_segment_ids=case["q_segment_ids"],
    kv_segment_ids=case["kv_segment_ids"], logits_soft_cap=cap, impl=impl,
    block_sizes=block_sizes, return_lse=True)


def grads(case, spec, impl, cap=None, block_sizes=None):
  """d/d(q, k, v) of a loss that uses both outputs (lse included)."""
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.normal(size=case["q"].shape[:3] + case["v"].shape[3:]),
                  jnp.float32)

  def loss(q, k, v):
    o, lse = run(dict(case, q=q, k=k, v=v), spec, impl, cap, block_sizes)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(o.astype(jnp.float32) * w) + 0.1 * jnp.sum(lse)

  return jax.grad(loss, argnums=(0, 1, 2))(case["q"], case["k"], case["v"])


def assert_close(got, want, tol, what=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  fin = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=what)
  np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=what)
  np.testing.assert_allclose(got[fin], want[fin], atol=tol, rtol=0,
                             err_msg=what)


SPECS = [
  MaskSpec(),
  MaskSpec(causal=True),
  MaskSpec(causal=True, window=(6, 0), global_prefix=3),
  MaskSpec(window=(4, 9)),
  MaskSpec(causal=True, chunk=8),
  MaskSpec(causal=True, window=(5, 0), global_suffix=5),
  MaskSpec(block_mask=((1, 0, 1), (1, 1, 0), (0, 1, 1)),
           block_mask_sizes=(16, 16)),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("gathered", [False, True])
def test_reference_matches_numpy(spec, gathered):
  case = make_case(0, gathered=gathered, e=8)
  o, lse = run(case, spec, "xla", cap=None)
  m = np.asarray(masks.dense_mask(spec, case["q_pos"], case["k_pos"],
                                  case["q_segment_ids"],
                                  case["kv_segment_ids"]))
  scale = 1 / np.sqrt(case["q"].shape[-1])
  o_np, lse_np = numpy_attention(case["q"], case["k"], case["v"], m, scale)
  assert_close(o, o_np, 1e-5, "out")
  assert_close(lse, lse_np.transpose(0, 1, 2), 1e-5, "lse")


def test_soft_cap_and_explicit_scale():
  case = make_case(1, packed=False)
  spec = MaskSpec(causal=True)
  o = kernels.attention(case["q"], case["k"], case["v"], mask=spec,
                        q_pos=case["q_pos"], k_pos=case["k_pos"],
                        scale=0.3, logits_soft_cap=2.0, impl="xla")
  m = np.asarray(masks.dense_mask(spec, case["q_pos"], case["k_pos"], None,
                                  None))
  o_np, _ = numpy_attention(case["q"], case["k"], case["v"], m, 0.3, 2.0)
  assert_close(o, o_np, 1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_xla_chunked_matches_reference(spec):
  case = make_case(2, tq=29, tk=45, e=8, gathered=True)
  bs = kernels.BlockSizes(block_kv=16)
  for a, b in zip(run(case, spec, "xla_chunked", 1.5, bs),
                  run(case, spec, "xla", 1.5)):
    assert_close(a, b, F32_TOL)
  for a, b in zip(grads(case, spec, "xla_chunked", 1.5, bs),
                  grads(case, spec, "xla", 1.5)):
    assert_close(a, b, F32_TOL)


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_fully_masked_rows(impl):
  """Padding rows and rows whose window sees nothing: 0, -inf, zero grads."""
  case = make_case(3, packed=True, gathered=True)
  spec = MaskSpec(causal=True, window=(0, 0))  # only an equal position
  o, lse = run(case, spec, impl)
  m = np.asarray(masks.dense_mask(spec, case["q_pos"], case["k_pos"],
                                  case["q_segment_ids"],
                                  case["kv_segment_ids"]))
  dead = ~m.any(-1)  # [B, Tq]
  assert dead.any() and not dead.all()
  np.testing.assert_array_equal(np.asarray(o)[dead], 0.0)
  assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[dead]))
  dq, dk, dv = grads(case, spec, impl)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_array_equal(np.asarray(dq)[dead], 0.0)


def test_shape_errors():
  case = make_case(0, hq=3, hkv=2, packed=False)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    run(case, MaskSpec(), "xla")
  with pytest.raises(ValueError, match="impl"):
    run(make_case(0), MaskSpec(), "nope")


def test_auto_on_cpu_is_xla_and_jits():
  case = make_case(4)
  spec = MaskSpec(causal=True)
  f = jax.jit(functools.partial(run, spec=spec, impl="auto"))
  for a, b in zip(f(case), run(case, spec, "xla")):
    assert_close(a, b, 1e-6)
