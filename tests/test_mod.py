"""Mixture-of-depths (docs/routing.md): degenerate settings reduce to the
plain block, top-k picks exactly k non-padding tokens, gathered attention
equals dense attention with keys masked to the selected set at their own
positions, the routers learn, causal routing is causal (and top-k is not),
prefill + decode equals the forward with a cache of processed tokens only,
a sharded step equals one device, FLOPs match XLA, config errors are one
line."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import aot, config as config_lib
from efficient_lm.models import build, flops, routing, stack
from efficient_lm.models.attention import Tokens
from efficient_lm.models.block import Block
from efficient_lm.models.mod import RoutedBlock
from efficient_lm.training import loop
from tests.helpers import (
  ATTENTION_VARIANTS,
  packed_batch,
  prefill_then_decode,
  untouched_in_forward_and_decode,
  small_config,
  two_train_steps,
)

MOD = {"model.routing.kind": "mod", "model.num_layers": 4}
T = 24


def _cfg(**overrides):
  return small_config(**{**MOD, **overrides})


def _sharpen_routers(model, factor):
  """Router (and predictor) weights times `factor`: logits of order one,
  so decisions are well away from ties and both outcomes occur."""
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  flat = nnx.to_flat_state(params)
  for path, var in flat:
    if "router" in path and path[-1] in ("w_D", "pred_out_F"):
      var.set_value(var.get_value() * factor)
  return nnx.merge(gd, nnx.from_flat_state(flat), rest)


def _block(capacity=0.5, predictor="router_bce", seed=0):
  """A lone routed block (capacity set directly: 0 is allowed here)."""
  m = _cfg(**{"model.routing.predictor": predictor}).model
  m = dataclasses.replace(
    m, routing=dataclasses.replace(m.routing, capacity=capacity)
  )
  spec = stack.layer_plan(m)[1]
  assert spec.routed
  return m, RoutedBlock(m, spec, nnx.Rngs(seed))


def _inputs(b=2, t=T, d=64, seed=0, padded=False):
  x = jax.random.normal(jax.random.key(seed), (b, t, d))
  pos = jnp.concatenate([jnp.arange(t // 2), jnp.arange(t - t // 2)])
  pos = jnp.broadcast_to(pos, (b, t)).astype(jnp.int32)
  seg = jnp.broadcast_to(
    jnp.where(jnp.arange(t) < t // 2, 1, 2), (b, t)
  ).astype(jnp.int32)
  if padded:  # row 0 ends in 5 padding tokens, row 1 has 4 real ones
    seg = seg.at[0, -5:].set(0).at[1, 4:].set(0)
  return x, pos, seg


def _grads(fn, block, x, split=False):
  """Gradients of sum(fn(block, x) * w) w.r.t. (params, x); w fixed. With
  `split`, fn returns [2, ...] (two functions stacked): one jit, both
  functions' gradients."""
  gd, params, rest = nnx.split(block, nnx.Param, ...)
  w = jax.random.normal(jax.random.key(9), x.shape)

  def loss(p, x, i=None):
    out = fn(nnx.merge(gd, p, rest), x)
    return jnp.sum((out if i is None else out[i]) * w)

  grad = jax.grad(loss, argnums=(0, 1))
  if split:
    return jax.jit(lambda p, x: (grad(p, x, 0), grad(p, x, 1)))(params, x)
  return jax.jit(grad)(params, x)


# ---------------------------------------------------------------- block


def test_capacity_one_with_unit_gate_is_the_dense_block():
  """k = T and sigmoid(r) == 1 exactly (bias 30 in float32): the routed
  block is the dense block, values and gradients."""
  _, blk = _block(capacity=1.0)
  blk.router.w_D.set_value(jnp.zeros_like(blk.router.w_D.get_value()))
  blk.router.b.set_value(jnp.full((), 30.0))
  assert float(jax.nn.sigmoid(jnp.float32(30.0))) == 1.0
  x, pos, seg = _inputs()

  def routed(b, x):
    return b(x, pos, seg)[0]

  def dense(b, x):
    return Block.__call__(b, x, pos, seg)[0]

  both = jax.jit(lambda x: (routed(blk, x), dense(blk, x)))
  np.testing.assert_allclose(*both(x), atol=1e-6, rtol=0)
  (gp_r, gx_r), (gp_d, gx_d) = _grads(
    lambda b, x: jnp.stack([routed(b, x), dense(b, x)]), blk, x, split=True
  )
  np.testing.assert_allclose(gx_r, gx_d, atol=1e-5, rtol=0)
  for (path, a), (_, b) in zip(
    nnx.to_flat_state(gp_r), nnx.to_flat_state(gp_d), strict=True
  ):
    if "router" not in path:
      np.testing.assert_allclose(
        a.get_value(), b.get_value(), atol=1e-5, rtol=0, err_msg=str(path)
      )


@pytest.mark.parametrize("capacity", [0.0, 0.04])  # k = floor(c * 24) = 0
def test_capacity_zero_is_the_identity(capacity):
  _, blk = _block(capacity=capacity)
  x, pos, seg = _inputs()
  out, aux = blk(x, pos, seg)
  np.testing.assert_array_equal(out, x)
  assert float(aux["routing/mod_fraction"]) == 0.0


def test_top_k_picks_exactly_k_sorted_non_padding_tokens():
  rng = np.random.default_rng(0)
  b, t, k = 4, 20, 6
  score = rng.normal(size=(b, t)).astype(np.float32)
  seg = np.ones((b, t), np.int32)
  seg[1, 15:] = 0  # 15 real tokens
  seg[2, :] = 0
  seg[2, [3, 9, 11]] = 1  # fewer real tokens than k
  seg[3, 2:8] = 0  # padding in the middle
  idx, ok = map(
    np.asarray, routing.top_k(jnp.asarray(score), jnp.asarray(seg), k)
  )
  assert idx.shape == (b, k)
  for r in range(b):
    assert np.all(np.diff(idx[r]) > 0)  # sorted, unique
    real = np.flatnonzero(seg[r])
    want = real[np.argsort(-score[r, real])[:k]]
    np.testing.assert_array_equal(idx[r][ok[r]], np.sort(want))
    assert ok[r].sum() == min(k, len(real))
    assert np.all(seg[r, idx[r][~ok[r]]] == 0)
  assert routing.capacity_tokens(0.29, 100) == 29
  assert routing.capacity_tokens(0.125, 128) == 16
  assert routing.capacity_tokens(0.125, 7) == 0


@pytest.mark.parametrize("predictor", ["router_bce", "mlp"])
def test_unselected_tokens_pass_bitwise_and_selected_ones_change(predictor):
  m, blk = _block(capacity=0.25, predictor=predictor)
  blk.router_z_loss = 0.1
  x, pos, seg = _inputs(padded=True)
  r, _ = blk.router(x)
  k = routing.capacity_tokens(m.routing.capacity, T)
  idx, ok = routing.top_k(r, seg, k)
  member = np.asarray(routing.membership(idx, ok, T))
  out, aux = jax.jit(lambda x: blk(x, pos, seg))(x)
  out, x = np.asarray(out), np.asarray(x)
  np.testing.assert_array_equal(out[~member], x[~member])
  assert np.all(np.abs(out[member] - x[member]).max(-1) > 0)
  assert member.sum(1).tolist() == [k, 4]  # row 1: fewer real than k
  assert not member[np.asarray(seg) == 0].any()  # padding never
  real = np.asarray(seg) != 0
  assert float(aux["routing/mod_fraction"]) == pytest.approx(
    member.sum() / real.sum()
  )
  # BCE of the decision logit (the router's r, or the mlp predictor's z,
  # by hand) against top-k membership by r, real tokens only.
  _, z = _decision_by_hand(blk, x)
  per = np.logaddexp(0, z) - member * z
  np.testing.assert_allclose(
    aux["loss/mod_bce"], m.routing.aux_loss_weight * per[real].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    aux["routing/mod_agreement"], ((z > 0) == member)[real].mean(), rtol=1e-6
  )
  # Router z-loss: mean r^2 over real tokens (r, not the predictor's z).
  r_hand, _ = _decision_by_hand(blk, x)
  np.testing.assert_allclose(
    aux["loss/router_z"], 0.1 * np.square(r_hand)[real].mean(), rtol=1e-5
  )
  if predictor == "mlp":  # the two logits differ, so the test can tell
    assert np.mean((z > 0) != (np.asarray(r) > 0)) > 0.2


def _masked_dense_reference(blk, x, pos, seg):
  """Every token through the dense block's modules, keys masked to the
  top-k set (at original positions), update sigmoid(r) * Δ on it."""
  r, _ = blk.router(x)
  idx, ok = routing.top_k(
    r, seg, routing.capacity_tokens(blk.capacity, x.shape[1])
  )
  member = routing.membership(idx, ok, x.shape[1])
  h = blk.attn_norm(x)
  a = blk.attn(
    Tokens(h, pos, seg), kv=Tokens(h, pos, jnp.where(member, seg, 0))
  )
  delta = a + blk.mlp(blk.mlp_norm(x + a))
  new = x + jax.nn.sigmoid(r)[..., None] * delta
  return jnp.where(member[..., None], new, x), member


# The mlp predictor changes only the decision logit (checked by the causal
# and gradient tests); its gathered / cached runs are the slow cases.
_PREDICTORS = ["router_bce", pytest.param("mlp", marks=pytest.mark.slow)]


@pytest.mark.parametrize("predictor", _PREDICTORS)
def test_gathered_block_equals_dense_attention_masked_to_the_selection(
  predictor,
):
  _, blk = _block(capacity=0.4, predictor=predictor)
  blk = _sharpen_routers(blk, 50.0)
  x, pos, seg = _inputs(padded=True)
  want, member = jax.jit(lambda x: _masked_dense_reference(blk, x, pos, seg))(x)
  member = np.asarray(member)
  # The selection is not a prefix of either segment or of the row.
  assert not all(np.all(np.diff(row.astype(int)) <= 0) for row in member)
  got, _ = jax.jit(lambda x: blk(x, pos, seg))(x)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)

  def ref(b, x):
    return _masked_dense_reference(b, x, pos, seg)[0]

  def routed(b, x):
    return b(x, pos, seg)[0]

  (gp, gx), (rp, rx) = _grads(routed, blk, x), _grads(ref, blk, x)
  np.testing.assert_allclose(gx, rx, atol=2e-5, rtol=0)
  for (path, a), (_, b) in zip(
    nnx.to_flat_state(gp), nnx.to_flat_state(rp), strict=True
  ):
    np.testing.assert_allclose(
      a.get_value(), b.get_value(), atol=2e-5, rtol=0, err_msg=str(path)
    )


# ---------------------------------------------------------------- model


def _model(predictor="router_bce", sharpen=20.0, **overrides):
  cfg = _cfg(**{"model.routing.predictor": predictor, **overrides})
  model = build(cfg.model, nnx.Rngs(0))
  return cfg, _sharpen_routers(model, sharpen)


def _tokens(b=2, t=T, seed=1):
  tok = jax.random.randint(jax.random.key(seed), (b, t), 0, 300)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return tok, pos, jnp.ones((b, t), jnp.int32)


def test_layer_plan_routes_every_nth_block():
  for every, want in [(2, [1, 3]), (1, [0, 1, 2, 3]), (4, [3]), (3, [2])]:
    plan = stack.layer_plan(_cfg(**{"model.routing.every": every}).model)
    assert [i for i, s in enumerate(plan) if s.routed] == want
  assert not any(s.routed for s in stack.layer_plan(small_config().model))

  # Only routed layers carry a router; metrics name those layers.
  def shapes():
    model = build(_cfg().model, nnx.Rngs(0))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), model(*_tokens())

  params, (_, aux) = jax.eval_shape(shapes)
  layers = params["stack"]["groups"]["segment_0"]
  assert "router" in layers["layer_1"] and "router" not in layers["layer_0"]
  assert {k for k in aux if "layer" in k} == {
    "routing/mod_layer1_fraction",
    "routing/mod_layer3_fraction",
  }


@pytest.mark.parametrize("predictor", ["router_bce", "mlp"])
def test_routers_learn_and_the_predictor_does_not_touch_the_trunk(predictor):
  cfg, model = _model(predictor, **{"model.num_layers": 2})
  b = packed_batch(2, T, cfg.model.vocab_size)
  gd, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(p):
    logits, aux = nnx.merge(gd, p, rest)(
      jnp.asarray(b["inputs"]),
      jnp.asarray(b["positions"]),
      jnp.asarray(b["segment_ids"]),
    )
    return jnp.mean(logits**2), aux["loss/mod_bce"]

  def flat(g):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}

  g_main, g_bce = map(
    flat,
    jax.jit(
      lambda p: (
        jax.grad(lambda p: losses(p)[0])(p),
        jax.grad(lambda p: losses(p)[1])(p),
      )
    )(params),
  )
  router_w = [p for p in g_main if p[-1] == "w_D"]
  # The router learns from the main loss through the gate sigmoid(r).
  assert router_w and all(np.abs(g_main[p]).max() > 0 for p in router_w)
  pred = [p for p in g_bce if "pred" in p[-1]]
  if predictor == "mlp":
    assert pred and all(np.abs(g_bce[p]).max() > 0 for p in pred)
    for p, g in g_bce.items():  # stop_gradient: nothing else moves
      if p not in pred:
        assert np.abs(g).max() == 0, p
  else:
    assert not pred
    assert all(np.abs(g_bce[p]).max() > 0 for p in router_w)
    assert np.abs(g_bce[("embed", "table_VD")]).max() > 0


def _leaks(model, causal_routing, t_len=T):
  tok, pos, seg = _tokens(1, t_len)
  fwd = jax.jit(
    lambda tok: model(tok, pos, seg, causal_routing=causal_routing)[0]
  )
  base = fwd(tok)
  leaks = []
  for t in (3, 8, 12, 17, 20):
    other = tok.at[:, t + 1 :].set(
      jax.random.randint(jax.random.key(t), (1, t_len - t - 1), 0, 300)
    )
    out = fwd(other)
    if jnp.abs(out[:, : t + 1] - base[:, : t + 1]).max() > 1e-6:
      leaks.append(t)
  return leaks


@pytest.mark.parametrize("predictor", ["router_bce", "mlp"])
def test_causal_routing_is_causal_and_top_k_is_not(predictor):
  _, model = _model(predictor, **{"model.num_layers": 2})
  assert _leaks(model, causal_routing=True) == []
  # Top-k over the row: later tokens' scores move earlier tokens in or
  # out of the selection. The same check sees that leak.
  assert _leaks(model, causal_routing=False)


@pytest.mark.parametrize("predictor", _PREDICTORS)
def test_prefill_decode_equals_forward_and_caches_hold_processed_tokens(
  predictor,
):
  cfg, model = _model(predictor)
  b, t, p = 2, 14, 6
  tok, pos, seg = _tokens(b, t)
  want, aux = jax.jit(lambda *a: model(*a, causal_routing=True))(tok, pos, seg)
  got, cache = prefill_then_decode(
    jax.jit(model), tok, pos, seg, model.init_cache(b, t), p
  )
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # Cache rows per layer (segment_0 = pattern (dense, routed) x 2 repeats):
  # a routed layer holds exactly the positions its decision processed.
  decisions = jax.jit(model.routing_decisions)(tok, pos, seg)
  assert sorted(decisions) == ["layer 1", "layer 3"]
  for layer in range(cfg.model.num_layers):
    rows = cache["segment_0"][layer % 2]
    cached = np.asarray(rows["seg"][layer // 2] != 0)  # [B, slots]
    slot_pos = np.asarray(rows["pos"][layer // 2])
    if layer % 2 == 0:
      assert cached.sum() == b * t
      continue
    done = np.asarray(decisions[f"layer {layer}"])
    frac = float(aux[f"routing/mod_layer{layer}_fraction"])
    assert 0 < frac < 1 and done.mean() == pytest.approx(frac)
    for row in range(b):
      np.testing.assert_array_equal(
        np.sort(slot_pos[row][cached[row]]), np.flatnonzero(done[row])
      )


# ------------------------------------------------------------- training

# As tests/test_sharding.py: float32, differences only from reduction
# order. Routers are sharpened (logits of order one) so the top-k cannot
# flip on rounding noise.
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _two_steps(cfg, devices=None):
  t = loop.build_trainer(cfg, devices)
  state = t.init_fn()
  state["params"] = jax.tree_util.tree_map_with_path(
    lambda path, v: v * 50.0 if "w_D" in jax.tree_util.keystr(path) else v,
    state["params"],
  )
  state, metrics = two_train_steps(t, state)
  return jax.device_get(state["params"]), metrics


def _mesh_cfg(d=1, f=1, tp=1):
  """Two layers (dense, routed): the smallest model with both kinds."""
  return _cfg(
    **{
      "model.num_layers": 2,
      "data.seq_len": 16,
      "mesh.data": d,
      "mesh.fsdp": f,
      "mesh.tensor": tp,
    }
  )


@pytest.fixture(scope="module")
def one_device_steps():
  return _two_steps(_mesh_cfg(), jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_train_step_sharded_equals_one_device(one_device_steps, mesh_shape):
  ref_params, ref = one_device_steps
  d, f, tp = mesh_shape
  params, got = _two_steps(_mesh_cfg(d, f, tp))
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
  assert ref["aux"]["loss/mod_bce"] > 0
  for k, v in ref["aux"].items():
    np.testing.assert_allclose(got["aux"][k], v, rtol=1e-5, err_msg=k)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params
  )


@pytest.mark.parametrize(
  "extra",
  [
    {},
    pytest.param(
      {
        "model.routing.predictor": "mlp",
        "model.routing.every": 1,
        "model.routing.capacity": 0.5,
      },
      marks=pytest.mark.slow,
    ),
  ],
)
def test_flops_per_token_within_5_percent_of_xla(extra):
  # Unrolled layers (XLA counts a while-loop body once); see test_flops.py.
  cfg = _cfg(
    **{
      "model.embed_dim": 256,
      "model.mlp_dim": 768,
      "model.num_kv_heads": 4,
      "model.scan_layers": False,
      "data.seq_len": 128,
      "train.batch_size": 4,
      "mesh.data": 1,
      **extra,
    }
  )
  _, _, compiled = aot.compile_train_step(cfg, jax.devices()[:1])
  b, s = cfg.train.batch_size, cfg.data.seq_len
  ours = flops.flops_per_token(cfg.model, s)["train"] * b * s
  assert abs(aot.xla_flops(compiled) / ours - 1) < 0.05
  dense = flops.flops_per_token(
    _cfg(
      **{
        "model.embed_dim": 256,
        "model.mlp_dim": 768,
        "model.routing.kind": "none",
      }
    ).model,
    s,
  )
  assert ours < 0.9 * dense["train"] * b * s


# --------------------------------------------------------------- config


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"model.routing.capacity": 0.0}, "capacity=0.0: expected 0 < capacity"),
    ({"model.routing.capacity": 1.5}, "capacity=1.5: expected 0 < capacity"),
    ({"model.routing.every": 0}, "every=0: expected 1 <= every"),
    ({"model.routing.every": 5}, "every=5: .*num_layers=4"),
    ({"model.routing.capacity": 0.01}, "selects no token of data.seq_len=32"),
    ({"model.routing.aux_loss_weight": -1.0}, "aux_loss_weight=-1.0"),
    ({"model.routing.router_z_loss": -0.1}, "router_z_loss=-0.1"),
    ({"model.attention.kind": "tglobal"}, "tglobal"),
    (
      {"model.kind": "hourglass", "model.funnel.stages": (1, 2, 1)},
      "model.kind='hourglass'",
    ),
  ],
)
def test_config_errors_are_one_line(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    _cfg(**overrides)
  assert "\n" not in str(e.value)


# ------------------------------------------- composition (docs/attention.md)

_COMPOSED = {k: v for k, v in ATTENTION_VARIANTS.items() if k != "tglobal"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_COMPOSED))
def test_every_attention_kind_routes_at_positions_and_decodes(name):
  """Windows, global prefixes, BigBird tables and MLA inside a routed
  block: gathered == dense masked to the selection (a window in position,
  not in rank), prefill + decode == forward, causal routing causal."""
  ov = _COMPOSED[name]
  m = _cfg(**ov).model
  m = dataclasses.replace(
    m, routing=dataclasses.replace(m.routing, capacity=0.4)
  )
  blk = _sharpen_routers(
    RoutedBlock(m, stack.layer_plan(m)[1], nnx.Rngs(0)), 50.0
  )
  x, pos, seg = _inputs(padded=True)
  want, _ = jax.jit(lambda x: _masked_dense_reference(blk, x, pos, seg))(x)
  got, _ = jax.jit(lambda x: blk(x, pos, seg))(x)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)

  cfg, model = _model(**ov)
  b, t, p = 2, 14, 6
  tok, pos, seg = _tokens(b, t)
  want, _ = jax.jit(lambda *a: model(*a, causal_routing=True))(tok, pos, seg)
  got, cache = prefill_then_decode(
    jax.jit(model), tok, pos, seg, model.init_cache(b, t), p
  )
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert _leaks(model, causal_routing=True) == []


# ------------------------------------------- causal routing, the property


def _decision_by_hand(blk, x):
  """The causal decision logit z and the gate logit r, in numpy from the
  router's parameters (not through the module): r = w.x + b; z = r
  ("router_bce") or silu(x W + b_F).w_out + b_out ("mlp")."""
  rt = blk.router
  x = np.asarray(x, np.float64)
  r = x @ np.asarray(rt.w_D[...], np.float64) + float(rt.b[...])
  if not rt.use_predictor:
    return r, r
  h = x @ np.asarray(rt.pred_in_DF[...], np.float64)
  h = h + np.asarray(rt.pred_b_F[...], np.float64)
  h = h / (1 + np.exp(-h))
  z = h @ np.asarray(rt.pred_out_F[...], np.float64) + float(rt.pred_b[...])
  return r, z


@pytest.mark.parametrize("predictor", ["router_bce", "mlp"])
def test_causal_routing_leaves_unprocessed_tokens_bitwise_in_forward_and_step(
  predictor,
):
  """Issue #25: the property itself, not forward == step (they share
  `_update`). A token whose decision (z > 0, z the predictor's for "mlp",
  computed here by hand) is False leaves the block bitwise equal to its
  input, in the causal forward and in cached steps; a processed token
  becomes x + sigmoid(r) * delta, delta the dense block with keys masked
  to the processed tokens. Router and predictor disagree on some tokens,
  so a step deciding by the wrong logit is seen."""
  _, blk = _block(predictor=predictor)
  blk.router.w_D.set_value(blk.router.w_D.get_value() * 20.0)
  blk.router.b.set_value(jnp.full((), 0.3))
  if predictor == "mlp":
    blk.router.pred_out_F.set_value(blk.router.pred_out_F.get_value() * 400.0)
    blk.router.pred_b.set_value(jnp.full((), -0.2))
  b, t, p = 2, 12, 5
  x, pos, seg = _inputs(b=b, t=t, seed=4)
  seg = seg.at[1, -2:].set(0)  # padding is never processed
  r, z = _decision_by_hand(blk, x)
  done = (z > 0) & (np.asarray(seg) != 0)
  assert 0 < done.sum() < done.size
  if predictor == "mlp":
    assert np.any((r > 0) != (z > 0))
  # What `efficient_lm.plot routing` draws is that decision.
  np.testing.assert_array_equal(blk.decision(x, seg), done)
  # The reference: dense modules, keys masked to the processed tokens.
  h = blk.attn_norm(x)
  seg_kv = jnp.where(done, seg, 0)
  a = blk.attn(Tokens(h, pos, seg_kv), kv=Tokens(h, pos, seg_kv))
  delta = a + blk.mlp(blk.mlp_norm(x + a))
  want = np.where(
    done[..., None], x + jax.nn.sigmoid(jnp.asarray(r))[..., None] * delta, x
  )

  outs = untouched_in_forward_and_decode(blk, x, pos, seg, ~done, p)
  for got in outs:
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
