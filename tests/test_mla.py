"""Multi-head latent attention (docs/attention.md): the naive form against a
dense per-head reference written here, positions, causality, the V2-Lite
parameter shapes, FLOPs, and tensor parallelism."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import sharding
from efficient_lm.config import AttentionConfig, MeshConfig
from efficient_lm.models import flops
from efficient_lm.models.attention import Tokens
from efficient_lm.models.mla import MLADims, MLAttention, resolve_dims
from tests.helpers import small_config

D, H, HEAD_DIM, THETA, EPS = 32, 4, 8, 10_000.0, 1e-6
# Every width different (N + R != E, C != D) so that a swapped dimension
# cannot go unnoticed; and a query latent.
MIXED = dict(
  kv_lora_rank=24,
  q_lora_rank=20,
  rope_head_dim=6,
  nope_head_dim=10,
  v_head_dim=12,
)


def _mla(
  causal=True,
  seed=0,
  embed_dim=D,
  num_heads=H,
  head_dim=HEAD_DIM,
  cfg=None,
  **attn,
):
  cfg = cfg or AttentionConfig(projection="mla", **attn)
  model = nnx.eval_shape(
    lambda: MLAttention(
      embed_dim=embed_dim,
      num_heads=num_heads,
      num_kv_heads=1,
      head_dim=head_dim,
      rope_theta=THETA,
      cfg=cfg,
      causal=causal,
      rngs=nnx.Rngs(params=0),
      param_dtype=jnp.float32,
      out_std=0.02,
      norm_eps=EPS,
    )
  )
  # Unit-scale weights (the 0.02 init makes attention nearly uniform,
  # which would hide a wrong score), norm scales away from 1. numpy draws:
  # compiling jax.random's sampler costs seconds per shape on CPU.
  rng = np.random.default_rng(seed)
  nnx.update(
    model,
    jax.tree.map(
      lambda a: jnp.asarray(
        1.0 + 0.2 * rng.standard_normal(a.shape)
        if a.ndim == 1
        else rng.standard_normal(a.shape) / math.sqrt(a.shape[0]),
        jnp.float32,
      ),
      _params(model),
    ),
  )
  return model


def _jitted(model):
  """model(q, kv) as one jitted function (eager dispatch is slow)."""
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, q, kv: nnx.merge(graphdef, s)(q, kv))
  return lambda q, kv=None: f(state, q, kv)


def _close(got, want, tol):
  """Tree-wise allclose with atol = tol x the leaf's largest entry (float32
  rounding scales with it; gradients here reach ~50)."""

  def check(a, b):
    np.testing.assert_allclose(
      a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max()))
    )

  jax.tree.map(check, got, want)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _normal(shape, seed):
  return jnp.asarray(
    np.random.default_rng(seed).standard_normal(shape), jnp.float32
  )


def _tokens(b, t, seed=0, embed_dim=D):
  x = _normal((b, t, embed_dim), seed)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return Tokens(x, pos, jnp.ones((b, t), jnp.int32))


def _packed(b=2, t=16, seed=0):
  """Two documents and trailing padding (segment 0) in every row."""
  tok = _tokens(b, t, seed)
  pos = np.zeros((b, t), np.int32)
  seg = np.zeros((b, t), np.int32)
  pos[:, :6], pos[:, 6:13] = np.arange(6), np.arange(7)
  seg[:, :6], seg[:, 6:13] = 1, 2
  return Tokens(tok.x_BTD, jnp.asarray(pos), jnp.asarray(seg))


# ---------------------------------------------------------------- reference


def _rope_ref(x, pos_BT):
  """Rotate-half RoPE as a complex rotation of (x_i, x_{i+R/2}) pairs."""
  r = x.shape[-1]
  inv = THETA ** (-2.0 * np.arange(r // 2) / r)
  angle = pos_BT[..., None].astype(jnp.float32) * inv[None, None, :]
  if x.ndim == 4:
    angle = angle[:, :, None, :]
  z = (x[..., : r // 2] + 1j * x[..., r // 2 :]) * jnp.exp(1j * angle)
  return jnp.concatenate([z.real, z.imag], axis=-1).astype(x.dtype)


def _rms(x, scale):
  return (
    x
    / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS)
    * scale[None, None, :]
  )


def _visible(q, kv, causal, window):
  qp, kp = q.pos_BT[:, :, None], kv.pos_BT[:, None, :]
  vis = (q.seg_BT[:, :, None] == kv.seg_BT[:, None, :]) & (
    q.seg_BT[:, :, None] != 0
  )
  if causal:
    vis &= kp <= qp
  if window:
    vis &= kp >= qp - (window - 1)
    if not causal:
      vis &= kp <= qp + (window - 1)
  return vis


def _reference(p, q, kv, dims: MLADims, causal, window=0):
  """MLA written head by head with explicit keys and values (no latent
  tricks, no kernels): docs/attention.md's equations."""
  c_dim, q_dim, r, n, e = dims
  x, y = q.x_BTD, kv.x_BTD
  if q_dim:
    q_all = jnp.einsum(
      "btq,qhk->bthk", _rms(x @ p["dq_DQ"], p["q_norm"]["scale"]), p["uq_QHK"]
    )
  else:
    q_all = jnp.einsum("btd,dhk->bthk", x, p["q_DHK"])
  q_nope, q_rope = q_all[..., :n], _rope_ref(q_all[..., n:], q.pos_BT)
  c = _rms(y @ p["dkv_DC"], p["kv_norm"]["scale"])
  k_rope = _rope_ref(y @ p["kr_DR"], kv.pos_BT)
  vis = _visible(q, kv, causal, window)
  out = 0.0
  for h in range(p["o_HED"].shape[0]):
    q_h = jnp.concatenate([q_nope[:, :, h], q_rope[:, :, h]], axis=-1)
    k_h = jnp.concatenate([c @ p["uk_CHN"][:, h], k_rope], axis=-1)
    v_h = c @ p["uv_CHE"][:, h]
    s = jnp.einsum("btk,bsk->bts", q_h, k_h) / math.sqrt(n + r)
    s = jnp.where(vis, s, -1e9)
    w = jnp.exp(s - s.max(-1, keepdims=True)) * vis
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)  # empty row: 0
    out = out + jnp.einsum("bts,bse->bte", w, v_h) @ p["o_HED"][h]
  return out


_CASES = [
  ("defaults_causal", {}, True),
  ("mixed_dims_causal", MIXED, True),
  ("mixed_dims_bidirectional", MIXED, False),
  ("sliding_window", {"kind": "sliding_window", "window": 4, **MIXED}, True),
]


@pytest.mark.parametrize("name,attn,causal", _CASES, ids=[c[0] for c in _CASES])
def test_naive_matches_dense_reference_values_and_grads(name, attn, causal):
  model = _mla(causal=causal, **attn)
  dims, window = model.dims, attn.get("window", 0)
  q = _packed()
  graphdef = nnx.graphdef(model)
  w = _normal(q.x_BTD.shape, 9)

  def module(params, x):
    return nnx.merge(graphdef, params)(q._replace(x_BTD=x))

  def reference(params, x):
    y = q._replace(x_BTD=x)
    return _reference(params, y, y, dims, causal, window)

  @jax.jit
  def out_and_grads(params):
    """Outputs, and d(sum(out * w)) by params and x, of one function."""
    return {
      name: (lambda o, vjp: (o, vjp(w)))(*jax.vjp(f, params, q.x_BTD))
      for name, f in (("module", module), ("reference", reference))
    }

  res = out_and_grads(_params(model))
  (got, g_model), (want, g_ref) = res["module"], res["reference"]
  assert float(jnp.abs(want).mean()) > 0.1  # not a near-zero output
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _close(g_model, g_ref, 1e-5)


def test_separate_queries_and_keys_match_reference():
  """Queries from one sequence over another's keys (the call's `kv`)."""
  model = _mla(**MIXED)
  kv = _tokens(2, 12, seed=1)
  q = Tokens(_tokens(2, 5, seed=2).x_BTD, kv.pos_BT[:, 7:], kv.seg_BT[:, 7:])
  np.testing.assert_allclose(
    _jitted(model)(q, kv),
    _reference(_params(model), q, kv, model.dims, True),
    atol=1e-5,
    rtol=1e-5,
  )


@pytest.mark.parametrize(
  "attn", [MIXED, {"kind": "sliding_window", "window": 3}]
)
def test_position_shift_invariance(attn):
  """RoPE is only on the decoupled part and only relative positions
  matter: the same constant added to every position changes nothing, but
  moving the keys relative to the queries does."""
  model = _jitted(_mla(**attn))
  q = _tokens(2, 10)
  base = model(q)
  shifted = model(q._replace(pos_BT=q.pos_BT + 1000))
  np.testing.assert_allclose(shifted, base, atol=2e-5, rtol=1e-5)
  kv = q._replace(pos_BT=q.pos_BT - 2)  # keys 2 earlier, all visible
  assert not np.allclose(model(q, kv), base, atol=1e-3)


@pytest.mark.parametrize(
  "attn", [MIXED, {"kind": "sliding_window", "window": 4}]
)
def test_causality_by_perturbation(attn):
  model = _jitted(_mla(**attn))
  q = _tokens(1, 16)
  base = model(q)
  for t in (0, 3, 4, 9, 14):
    other = _normal(q.x_BTD.shape, t + 50)
    x = q.x_BTD.at[:, t + 1 :].set(other[:, t + 1 :])
    out = model(q._replace(x_BTD=x))
    np.testing.assert_allclose(
      out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0
    )
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-4)


def test_causality_by_jacobian():
  model = _mla(**MIXED)
  q = _tokens(1, 8)
  jac = jax.jit(jax.jacfwd(lambda x: model(q._replace(x_BTD=x)).sum(-1)[0]))(
    q.x_BTD
  )[:, 0]
  # jac: [T_out, T_in, D]
  influence = np.abs(np.asarray(jac)).sum(-1)
  assert np.all(influence[np.triu_indices(8, k=1)] == 0.0)
  assert np.all(influence[np.tril_indices(8)] > 0)


def test_v2_lite_shapes_and_param_count():
  """DeepSeek-V2-Lite's attention (d 2048, 16 heads, no query latent,
  d_c 512, d_R 64, nope 128, v 128): from the ratio defaults and
  spelled out, shape-checked without allocating; the count from the
  parameter tree equals the hand formula."""
  explicit = dict(
    kv_lora_rank=512, rope_head_dim=64, nope_head_dim=128, v_head_dim=128
  )
  d, h = 2048, 16
  assert resolve_dims(AttentionConfig(projection="mla"), 128) == MLADims(
    512, 0, 64, 128, 128
  )
  for attn in ({}, explicit):
    model = nnx.eval_shape(
      lambda: MLAttention(
        embed_dim=d,
        num_heads=h,
        num_kv_heads=16,
        head_dim=128,
        rope_theta=THETA,
        cfg=AttentionConfig(projection="mla", **attn),
        causal=True,
        rngs=nnx.Rngs(params=0),
        param_dtype=jnp.float32,
        out_std=0.02,
        norm_eps=EPS,
      )
    )
    params = nnx.state(model, nnx.Param)
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(params))
    assert shapes == {
      "q_DHK": (d, h, 192),
      "dkv_DC": (d, 512),
      "kv_norm": {"scale": (512,)},
      "kr_DR": (d, 64),
      "uk_CHN": (512, h, 128),
      "uv_CHE": (512, h, 128),
      "o_HED": (h, 128, d),
    }
    # HF's DeepSeek-V2-Lite: q_proj 2048x3072, kv_a_proj_with_mqa
    # 2048x576, kv_a_layernorm 512, kv_b_proj 512x4096, o_proj 2048x2048.
    total = d * h * 192 + d * (512 + 64) + 512 + 512 * h * 256 + h * 128 * d
    assert flops.param_count(params) == {"total": total, "non_embedding": total}
    assert total == 13_763_072
    out = nnx.eval_shape(
      lambda m: m(
        Tokens(
          jnp.zeros((2, 16, d)),
          jnp.zeros((2, 16), jnp.int32),
          jnp.ones((2, 16), jnp.int32),
        )
      ),
      model,
    )
    assert out.shape == (2, 16, d)


def test_query_latent_shapes():
  model = _mla(**MIXED)
  shapes = jax.tree.map(lambda a: a.shape, _params(model))
  c, q, r, n, e = (
    MIXED[k]
    for k in (
      "kv_lora_rank",
      "q_lora_rank",
      "rope_head_dim",
      "nope_head_dim",
      "v_head_dim",
    )
  )
  assert shapes["dq_DQ"] == (D, q) and shapes["q_norm"] == {"scale": (q,)}
  assert shapes["uq_QHK"] == (q, H, n + r) and "q_DHK" not in shapes
  assert shapes["uk_CHN"] == (c, H, n) and shapes["uv_CHE"] == (c, H, e)
  assert shapes["o_HED"] == (H, e, D) and shapes["kr_DR"] == (D, r)


def test_odd_derived_rope_dim_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"rope_head_dim=3 \(from head_dim=6"):
    resolve_dims(AttentionConfig(projection="mla"), 6)


@pytest.mark.parametrize("q_lora_rank", [0, 96])
def test_flops_match_xla_cost_analysis(q_lora_rank):
  """flops_per_token's MLA projection and score/value terms (one layer,
  dense tile) are what XLA counts for the module's forward, within 5%
  (the rest: norms, RoPE, softmax)."""
  cfg = small_config(
    **{
      "model.num_layers": 1,
      "model.embed_dim": 256,
      "model.num_heads": 4,
      "model.num_kv_heads": 4,
      "model.attention.projection": "mla",
      "model.attention.q_lora_rank": q_lora_rank,
      "model.attention.v_head_dim": 48,
    }
  )
  m, t, b = cfg.model, 128, 2
  model = _mla(
    embed_dim=m.embed_dim,
    num_heads=m.num_heads,
    head_dim=m.resolved_head_dim,
    cfg=m.attention,
  )
  q = _tokens(b, t, embed_dim=m.embed_dim)
  graphdef, params = nnx.split(model)
  compiled = (
    jax.jit(lambda p, q: nnx.merge(graphdef, p)(q)).lower(params, q).compile()
  )
  cost = compiled.cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  ours = flops.flops_per_token(m, t)
  ours = (
    (ours["forward/attention_proj"] + ours["forward/attention_dense_tile"])
    * b
    * t
  )
  assert abs(xla / ours - 1) < 0.05, (xla, ours)


def test_tensor_parallel_equals_single_device():
  """Mesh data 2 x fsdp 2 x tensor 2 on 8 CPU devices: heads sharded over
  `tensor`, latents replicated, attention shard-mapped; same values and
  gradients as one device."""
  model = _mla(**MIXED)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model), nnx.Param)
  params = _params(model)
  q = _packed(b=4)
  w = _normal(q.x_BTD.shape, 3)

  def loss(p, x):
    return jnp.sum(nnx.merge(graphdef, p)(q._replace(x_BTD=x)) * w)

  want = jax.value_and_grad(loss, argnums=(0, 1))(params, q.x_BTD)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  param_sh = sharding.state_shardings(mesh, abstract)
  x_sh = jax.NamedSharding(mesh, sharding.logical_to_spec(sharding.BTD))
  fn = jax.jit(
    sharding.under_mesh(mesh, jax.value_and_grad(loss, argnums=(0, 1))),
    in_shardings=(param_sh, x_sh),
  )
  params, x = jax.device_put(params, param_sh), jax.device_put(q.x_BTD, x_sh)
  lowered = fn.lower(params, x)
  assert "sdy.manual_computation" in lowered.as_text()
  got = lowered.compile()(params, x)
  _close(got, want, 1e-6)
  P = jax.sharding.PartitionSpec
  assert param_sh["uk_CHN"].spec == P(None, "tensor", None)
  assert param_sh["dkv_DC"].spec == P("fsdp", None)
  assert param_sh["uq_QHK"].spec == P(None, "tensor", None)


# --------------------------------------------------------------- generation


def _stepper(model):
  """model(x, cache=c) as one jitted function."""
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, cache=c))
  return lambda x, cache: f(state, x, cache)


def _rows(tok: Tokens, start, stop):
  return Tokens(*(a[:, start:stop] for a in tok))


_STEP_CASES = [
  ("defaults", {}),
  ("mixed_dims", MIXED),
  # Window 4 < prompt 6: the rolling cache drops rows during the prefill
  # and keeps rolling while decoding.
  ("sliding_window", {"kind": "sliding_window", "window": 4, **MIXED}),
  (
    "global_local",
    {"kind": "global_local", "window": 3, "num_global": 2, **MIXED},
  ),
]


@pytest.mark.parametrize(
  "name,attn", _STEP_CASES, ids=[c[0] for c in _STEP_CASES]
)
def test_absorbed_step_equals_naive_forward(name, attn):
  """Prefill (6 tokens on an empty cache), then decode one token at a time
  and finally 3 at once: the absorbed form over cached latents gives the
  naive forward's outputs (fp32, atol 1e-5)."""
  model = _mla(**attn)
  seq = _tokens(2, 14, seed=4)
  want = _jitted(model)(seq)
  step = _stepper(model)
  cache = model.init_cache(2, 14, jnp.float32)
  for start, stop in (
    (0, 6),
    (6, 7),
    (7, 8),
    (8, 9),
    (9, 10),
    (10, 11),
    (11, 14),
  ):
    got, cache = step(_rows(seq, start, stop), cache)
    np.testing.assert_allclose(
      got, want[:, start:stop], atol=1e-5, rtol=1e-5, err_msg=f"{start}:{stop}"
    )


def test_step_with_ragged_prompts():
  """Row 1's prompt is 2 tokens shorter (trailing padding, segment 0): its
  padding is not cached and its decode continues at its own position."""
  model = _mla(**MIXED)
  seq = _tokens(2, 8, seed=5)
  want = _jitted(model)(seq)
  step = _stepper(model)
  cache = model.init_cache(2, 8, jnp.float32)
  prompt = _rows(seq, 0, 5)
  prompt = prompt._replace(seg_BT=prompt.seg_BT.at[1, 3:].set(0))
  got, cache = step(prompt, cache)
  np.testing.assert_allclose(got[0], want[0, :5], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[1, :3], want[1, :3], atol=1e-5, rtol=1e-5)
  # Next token: row 0 at position 5, row 1 at position 3.
  nxt = Tokens(
    jnp.stack([seq.x_BTD[0, 5:6], seq.x_BTD[1, 3:4]]),
    jnp.array([[5], [3]], jnp.int32),
    jnp.ones((2, 1), jnp.int32),
  )
  got, _ = step(nxt, cache)
  np.testing.assert_allclose(got[0], want[0, 5:6], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1, 3:4], atol=1e-5, rtol=1e-5)


def test_cache_holds_only_the_latent_and_rope_key():
  """A cache row is C + R numbers (plus pos/seg), no per-head K or V; the
  step returns a cache of the same structure; cache_bytes_per_token is the
  row's size."""
  model = _mla(**MIXED)
  c, r = MIXED["kv_lora_rank"], MIXED["rope_head_dim"]
  cache = model.init_cache(3, 10, jnp.bfloat16)
  shapes = {k: (v.shape, v.dtype) for k, v in cache.items()}
  assert shapes == {
    "c": ((3, 10, c), jnp.bfloat16),
    "kr": ((3, 10, r), jnp.bfloat16),
    "pos": ((3, 10), jnp.int32),
    "seg": ((3, 10), jnp.int32),
  }
  assert model.cache_bytes_per_token(jnp.bfloat16) == (c + r) * 2
  row_bytes = sum(cache[k].nbytes for k in ("c", "kr")) // (3 * 10)
  assert model.cache_bytes_per_token(jnp.bfloat16) == row_bytes
  _, after = jax.eval_shape(
    lambda x, c: model(x, cache=c), _tokens(3, 4), cache
  )
  assert jax.tree.map(lambda a: (a.shape, a.dtype), after) == shapes
  # A sliding-window layer keeps a rolling buffer of `window` rows.
  local = _mla(kind="sliding_window", window=4, **MIXED)
  assert local.init_cache(3, 10, jnp.float32)["c"].shape == (3, 4, c)


def test_tensor_parallel_step_equals_single_device():
  """Under tensor=2 the absorbed step's single latent key/value head is
  replicated while the query heads are split: prefill and a decode step
  equal the single-device ones."""
  model = _mla(**MIXED)
  graphdef, state = nnx.split(model)
  abstract = nnx.state(nnx.eval_shape(lambda: model), nnx.Param)
  seq = _tokens(4, 7, seed=6)

  def run(s, seq, cache):
    m = nnx.merge(graphdef, s)
    y0, cache = m(_rows(seq, 0, 6), cache=cache)
    y1, cache = m(_rows(seq, 6, 7), cache=cache)
    return jnp.concatenate([y0, y1], axis=1), cache

  cache = model.init_cache(4, 7, jnp.float32)
  want = jax.jit(run)(state, seq, cache)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  param_sh = sharding.state_shardings(mesh, abstract)
  params = jax.device_put(_params(model), param_sh)
  lowered = jax.jit(sharding.under_mesh(mesh, run)).lower(params, seq, cache)
  assert "sdy.manual_computation" in lowered.as_text()
  got = lowered.compile()(params, seq, cache)
  _close(got, want, 1e-6)
