"""Mixture-of-experts (models/moe.py): dropless = a dense reference that runs
every expert, one expert = the dense MLP, capacity drops in the documented
order, the balance loss by formula, the loss-free bias, causality and
generation of an MoE decoder, FLOPs, parameter counts, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import aot
from efficient_lm import config as config_lib
from efficient_lm.config import ConfigError, MoEConfig
from efficient_lm.models import build, flops
from efficient_lm.models.layers import ACTIVATIONS, SwiGLU
from efficient_lm.models.moe import MoE, capacity_slots
from tests.helpers import (
  override,
  prefill_then_decode,
  restored_state,
  small_config,
)

D, F = 16, 24


def _moe(**kw):
  cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **kw})
  return MoE(D, F, cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, out_std=0.02)


def _x(b=2, t=12, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


def _expert(moe, e, x_ND):
  """Expert e's gated MLP on every row, written out."""
  g = x_ND @ moe.gate_EDF[...][e]
  u = x_ND @ moe.up_EDF[...][e]
  return (ACTIVATIONS["silu"](g) * u) @ moe.down_EFD[...][e]


def _weights(moe, x_ND):
  """[N, E] combine weights: the top-k picks' affinities, normalised over
  the picks, zero elsewhere (the module's documented rule)."""
  z = x_ND @ moe.router_DE[...]
  s = jax.nn.sigmoid(z) if moe.router == "sigmoid" else jax.nn.softmax(z)
  _, idx = jax.lax.top_k(s, moe.top_k)
  mask = jax.nn.one_hot(idx, moe.num_experts).sum(1)
  w = s * mask
  return w / w.sum(-1, keepdims=True)


def _dense_reference(moe, x_BTD):
  """Every expert on every token, combined by the router weights."""
  b, t, _ = x_BTD.shape
  x = x_BTD.reshape(b * t, D)
  w = _weights(moe, x)
  y = sum(w[:, e : e + 1] * _expert(moe, e, x) for e in range(moe.num_experts))
  return y.reshape(b, t, D)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_dropless_equals_dense_reference_values_and_grads(router):
  moe = _moe(router=router, balancing="none")
  x = _x()
  gd, params = nnx.split(moe)
  cot = jax.random.normal(jax.random.key(7), x.shape)

  def ours(p, x):
    return jnp.sum(nnx.merge(gd, p)(x)[0] * cot)

  def ref(p, x):
    return jnp.sum(_dense_reference(nnx.merge(gd, p), x) * cot)

  np.testing.assert_allclose(
    nnx.merge(gd, params)(x)[0],
    _dense_reference(moe, x),
    atol=1e-6,
  )
  g_ours = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, x)
  g_ref = jax.grad(ref, argnums=(0, 1))(params, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_ours, g_ref
  )
  # The router gets a gradient through the weights.
  assert np.abs(g_ours[0]["router_DE"][...]).max() > 0


def test_one_expert_top1_equals_dense_swiglu():
  moe = _moe(num_experts=1, top_k=1, balancing="none")
  mlp = SwiGLU(D, F, rngs=nnx.Rngs(3), param_dtype=jnp.float32, out_std=0.02)
  moe.gate_EDF[...] = mlp.gate_DF[...][None]
  moe.up_EDF[...] = mlp.up_DF[...][None]
  moe.down_EFD[...] = mlp.down_FD[...][None]
  x = _x()
  np.testing.assert_allclose(moe(x)[0], mlp(x), atol=1e-6)


def test_moe_impl_tokamax_routes_the_grouped_matmuls_to_tokamax(
  monkeypatch,
):
  """The wiring, without importing tokamax (tens of seconds): a stand-in
  module's ragged_dot gets the three grouped matmuls of each call."""
  import sys
  import types

  calls = []

  def ragged_dot(*args, **kwargs):
    calls.append(1)
    return jax.lax.ragged_dot(*args, **kwargs)

  fake = types.ModuleType("tokamax")
  fake.ragged_dot = ragged_dot
  monkeypatch.setitem(sys.modules, "tokamax", fake)
  x = _x()

  def forward(impl):
    gd, params = nnx.split(_moe(impl=impl, balancing="none"))
    return jax.jit(lambda p, x: nnx.merge(gd, p)(x)[0])(params, x)

  y = forward("tokamax")
  assert len(calls) == 3
  np.testing.assert_array_equal(y, forward("xla"))
  assert len(calls) == 3  # impl='xla' does not call it


@pytest.mark.slow  # importing tokamax takes ~20 s on 2 loaded cores
def test_tokamax_impl_equals_xla_values_and_grads(monkeypatch):
  """model.moe.impl='tokamax' runs tokamax's ragged_dot (its XLA path on
  CPU) and gives the xla impl's values and gradients."""
  tokamax = pytest.importorskip("tokamax")
  calls = []
  real = tokamax.ragged_dot

  def counted(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(tokamax, "ragged_dot", counted)
  x = _x()
  cot = jax.random.normal(jax.random.key(7), x.shape)
  out = {}
  for impl in ("xla", "tokamax"):
    gd, params = nnx.split(_moe(impl=impl, balancing="none"))

    def loss(p, x):
      y = nnx.merge(gd, p)(x)[0]  # noqa: B023
      return jnp.sum(y * cot), y

    out[impl] = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  assert len(calls) >= 3  # gate, up and down went through tokamax
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
    out["tokamax"],
    out["xla"],
  )


def test_moe_impl_tokamax_without_the_package_is_one_line(monkeypatch):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name == "tokamax" else real(name, *a),
  )
  cd = config_lib.default_config_dict()
  override(
    cd,
    **{
      "model.moe.num_experts": 4,
      "model.moe.impl": "tokamax",
      "mesh.data": 1,
    },
  )
  with pytest.raises(ConfigError, match=r"model\.moe\.impl='tokamax'.*not"):
    config_lib.from_config_dict(cd)


def test_capacity_drops_exactly_the_assignments_past_capacity():
  moe = _moe(capacity_factor=0.5, balancing="none")
  x = _x(b=3, t=16)
  b, t, _ = x.shape
  c = capacity_slots(0.5, t, 2, 4)
  assert c == math.ceil(0.5 * t * 2 / 4)
  y, aux = moe(x)
  want = np.zeros((b, t, D), np.float32)
  dropped = 0
  for r in range(b):
    xr = x[r]
    w = np.asarray(_weights(moe, xr))
    s = np.asarray(jax.nn.softmax(xr @ moe.router_DE[...]))
    idx = np.asarray(jax.lax.top_k(s, 2)[1])
    used = [0] * 4
    outs = [np.asarray(_expert(moe, e, xr)) for e in range(4)]
    for i in range(t):  # documented order: position, then choice rank
      for j in range(2):
        e = idx[i, j]
        if used[e] < c:
          want[r, i] += w[i, e] * outs[e][i]
        else:
          dropped += 1
        used[e] += 1
  assert dropped > 0  # the test means something only if tokens drop
  np.testing.assert_allclose(y, want, atol=1e-6)
  np.testing.assert_allclose(aux["moe/dropped_fraction"], dropped / (b * t * 2))


def test_balance_loss_equals_formula():
  moe = _moe(num_experts=5, top_k=2, aux_loss_weight=0.3)
  x = _x(b=2, t=10)
  _, aux = moe(x)
  xn = x.reshape(-1, D)
  p = np.asarray(jax.nn.softmax(xn @ moe.router_DE[...]), np.float64)
  idx = np.argsort(-p, axis=1)[:, :2]
  n = xn.shape[0]
  f = np.array([(idx == e).sum() / (n * 2) for e in range(5)])
  want = 0.3 * 5 * np.sum(f * p.mean(0))
  np.testing.assert_allclose(aux["loss/moe_balance"], want, rtol=1e-5)
  np.testing.assert_allclose(aux["moe/load_max"], f.max() * 5, rtol=1e-6)


def test_loss_free_bias_moves_toward_balance():
  moe = _moe(balancing="loss_free", bias_rate=0.02, top_k=1)
  # Skew the router: expert 0 wins almost every token at first.
  moe.router_DE[...] = moe.router_DE[...].at[:, 0].add(0.05)
  x = _x(b=4, t=16) + 1.0
  _, first = moe(x)
  for _ in range(40):
    _, last = moe(x)
  bias = np.asarray(moe.bias_E[...])
  assert first["moe/load_max"] > 2.0, first["moe/load_max"]
  assert bias[0] < 0 < bias[1:].max()
  assert last["moe/load_max"] < first["moe/load_max"] - 1.0
  # Generation (train=False) leaves the bias alone.
  moe(x, train=False)
  np.testing.assert_array_equal(moe.bias_E[...], bias)


_DECODER = {
  "model.moe.num_experts": 4,
  "model.moe.top_k": 2,
  "model.moe.num_shared_experts": 1,
  "model.moe.expert_mlp_dim": 32,
  "model.num_layers": 3,
  "model.moe.first_dense": 1,
}


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_moe_decoder_is_causal_by_perturbation(capacity):
  cfg = small_config(**_DECODER, **{"model.moe.capacity_factor": capacity})
  model = build(cfg.model, nnx.Rngs(0))
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  fwd = jax.jit(lambda p, tok, pos, seg: nnx.merge(gd, p, rest)(tok, pos, seg))
  b, t = 2, 16
  tok = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos, seg = _positions(b, t), jnp.ones((b, t), jnp.int32)
  want, aux = fwd(params, tok, pos, seg)
  assert "loss/moe_balance" in aux
  for cut in (3, 8, 12):
    other = jax.random.randint(jax.random.key(cut), (b, t - cut - 1), 0, 300)
    got, _ = fwd(params, tok.at[:, cut + 1 :].set(other), pos, seg)
    np.testing.assert_allclose(got[:, : cut + 1], want[:, : cut + 1], atol=1e-6)
    assert np.abs(got[:, cut + 1 :] - want[:, cut + 1 :]).max() > 1e-4


def test_moe_prefill_then_decode_equals_forward():
  cfg = small_config(**_DECODER)
  model = build(cfg.model, nnx.Rngs(0))
  b, t, p = 2, 14, 8
  tok = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos, seg = _positions(b, t), jnp.ones((b, t), jnp.int32)
  gd, state = nnx.split(model)

  @jax.jit
  def step(tok, pos, seg, cache=None):
    return nnx.merge(gd, state)(tok, pos, seg, cache=cache)

  want, _ = step(tok, pos, seg)
  got, _ = prefill_then_decode(step, tok, pos, seg, model.init_cache(b, t), p)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_param_count_total_and_active():
  cfg = small_config(**_DECODER)
  abstract = nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0)))
  _, params, _ = nnx.split(abstract, nnx.Param, ...)
  counts = flops.param_count(params, cfg.model)
  # Two MoE layers of 4 experts of width 32, 2 active: each idles 2 experts.
  idle = 2 * 2 * 3 * cfg.model.embed_dim * 32
  assert counts["total"] - counts["active"] == idle
  # The run's summary line names them (a dense run's says nothing more).
  from efficient_lm.training.loop import format_summary

  summary = {
    "status": "completed",
    "final_step": 1,
    "start_step": 0,
    "train_loss": 1.0,
    "eval_loss": None,
    "tokens_per_sec": 1.0,
    "params": counts,
    "flops_per_token": 1.0,
    "flops_per_token_visible": 1.0,
    "workdir": "w",
    "checkpoints": "c",
    "latest_checkpoint": 1,
  }
  assert f"non-embedding, {counts['active']:,} active)" in format_summary(
    summary
  )
  dense = {**counts, "active": counts["total"]}
  assert "active" not in format_summary({**summary, "params": dense})


def test_flops_within_5_percent_of_xla_capacity_mode():
  # Capacity mode: every slot is a static batched matmul XLA counts as it
  # runs. (Dropless: XLA's CPU ragged_dot computes every group densely, E
  # times what a grouped kernel does, so its cost analysis is no oracle.)
  cfg = small_config(
    **{
      "model.embed_dim": 256,
      "model.mlp_dim": 512,
      "model.moe.num_experts": 4,
      "model.moe.top_k": 2,
      "model.moe.num_shared_experts": 1,
      "model.moe.capacity_factor": 1.5,  # E * C = 1.5 k T slots run
      "model.scan_layers": False,
      "data.seq_len": 128,
      "train.batch_size": 2,
    }
  )
  _, _, compiled = aot.compile_train_step(cfg, jax.devices()[:1])
  xla_flops = aot.xla_flops(compiled)
  b, s = cfg.train.batch_size, cfg.data.seq_len
  ours = flops.flops_per_token(cfg.model, s)["train"] * b * s
  assert abs(xla_flops / ours - 1) < 0.05, (xla_flops, ours)


def test_dropless_flops_count_top_k_experts():
  cfg = small_config(**_DECODER)
  dense = small_config(**{**_DECODER, "model.moe.num_experts": 0})
  f_moe = flops.flops_per_token(cfg.model, 32)
  f_dense = flops.flops_per_token(dense.model, 32)
  d = cfg.model.embed_dim
  # Layers 1, 2: the dense MLP (width 128) replaced by 2 routed + 1 shared
  # expert of width 32 and a D x 4 router.
  want = 2 * (3 * SwiGLU.flops(d, 32) - SwiGLU.flops(d, 128) + 2 * d * 4)
  np.testing.assert_allclose(f_moe["forward"] - f_dense["forward"], want)


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"model.moe.top_k": 5}, r"model\.moe\.top_k=5: expected 1 <= top_k"),
    (
      {"model.moe.capacity_factor": -1.0},
      r"model\.moe\.capacity_factor=-1\.0: expected >= 0",
    ),
    (
      {"model.routing.kind": "mod"},
      r"model\.routing\.kind='mod'.*not supported",
    ),
    (
      {"model.kind": "hourglass", "model.funnel.stages": (0, 2, 0)},
      r"model\.kind='hourglass'",
    ),
    ({"model.moe.first_dense": 5}, r"no layer is MoE"),
    ({"model.moe.impl": "pallas"}, r"model\.moe\.impl='pallas'"),
    (
      {"model.moe.num_experts": 6, "mesh.expert": 4},
      r"model\.moe\.num_experts=6 is not divisible by mesh\.expert=4",
    ),
  ],
)
def test_bad_moe_config_is_one_line(overrides, match):
  cd = config_lib.default_config_dict()
  override(cd, **{"model.moe.num_experts": 4, "mesh.data": 1, **overrides})
  with pytest.raises(ConfigError, match=match) as err:
    config_lib.from_config_dict(cd)
  assert "\n" not in str(err.value)


def _final_model_state(workdir):
  """The newest checkpoint's model_state of a CLI run (the loss-free
  biases)."""
  return restored_state(workdir)[1]["model_state"]


@pytest.mark.slow
def test_loss_free_moe_resume_after_kill_is_bit_identical(tmp_path):

  from tests.helpers import SMALL_FLAGS, kill_and_resume

  flags = [
    *SMALL_FLAGS,
    "--config.model.moe.num_experts=4",
    "--config.model.moe.top_k=2",
    "--config.model.moe.balancing=loss_free",
    "--config.model.moe.bias_rate=0.01",
  ]
  straight, crashed = kill_and_resume(tmp_path, flags=flags)
  bias_a, bias_b = _final_model_state(straight), _final_model_state(crashed)
  leaves = jax.tree.leaves(bias_a)
  assert leaves and any(np.abs(x).max() > 0 for x in leaves)  # it moved
  jax.tree.map(np.testing.assert_array_equal, bias_a, bias_b)


def test_upcycled_model_step0_logits_equal_the_dense_source():
  from efficient_lm.models.upcycle import upcycle

  dense_cfg = small_config(**{"model.num_layers": 3})
  moe_cfg = small_config(
    **{
      "model.num_layers": 3,
      "model.moe.num_experts": 4,
      "model.moe.top_k": 2,
      "model.moe.num_shared_experts": 1,
      "model.moe.first_dense": 1,
    }
  )
  dense = build(dense_cfg.model, nnx.Rngs(0))
  moe = build(moe_cfg.model, nnx.Rngs(1))
  gd, moe_params, rest = nnx.split(moe, nnx.Param, ...)
  dense_params = nnx.to_pure_dict(nnx.state(dense, nnx.Param))
  b, t = 2, 12
  tok = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos, seg = _positions(b, t), jnp.ones((b, t), jnp.int32)
  want, _ = dense(tok, pos, seg)

  def logits(noise):
    new = upcycle(
      dense_params, nnx.to_pure_dict(moe_params), moe_cfg.model, noise=noise
    )
    p = nnx.state(moe, nnx.Param)
    nnx.replace_by_pure_dict(p, new)
    return nnx.merge(gd, p, rest)(tok, pos, seg)[0]

  np.testing.assert_allclose(logits(0.0), want, atol=2e-5, rtol=0)
  # Noise breaks the experts' symmetry (and the equality).
  assert np.abs(logits(0.1) - want).max() > 1e-4


def test_tiny_moe_config_validates_and_is_sparse():
  from configs import tiny, tiny_moe

  cfg = config_lib.from_config_dict(
    override(tiny_moe.get_config(), **{"mesh.data": 1})
  )
  dense = config_lib.from_config_dict(
    override(tiny.get_config(), **{"mesh.data": 1})
  )
  abstract = nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0)))
  counts = flops.param_count(nnx.state(abstract, nnx.Param), cfg.model)
  assert counts["active"] < counts["total"]
  s = cfg.data.seq_len
  moe_f = flops.flops_per_token(cfg.model, s)["forward/mlp"]
  assert moe_f < flops.flops_per_token(dense.model, s)["forward/mlp"]


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_nonzero_loss_free_bias_picks_experts_but_is_not_in_the_weights(
  router,
):
  """Issue #25: with a nonzero loss-free bias the experts are the top-k of
  s + bias, and their weights the affinities s alone, normalised over the
  picks: the output against every expert run densely with those weights.
  The bias changes some tokens' picks (else the example is degenerate)."""
  moe = _moe(balancing="loss_free", router=router)
  bias = np.array([0.3, -0.2, 0.05, 0.0], np.float32) * (
    1.0 if router == "softmax" else 2.0
  )
  moe.bias_E[...] = jnp.asarray(bias)
  x = _x(b=2, t=12)
  got, _ = moe(x, train=False)
  xn = x.reshape(-1, D)
  z = xn @ moe.router_DE[...]
  s = jax.nn.sigmoid(z) if router == "sigmoid" else jax.nn.softmax(z)
  s = np.asarray(s, np.float64)
  picks = np.argsort(-(s + bias), axis=1)[:, :2]
  assert np.any(np.sort(picks, 1) != np.sort(np.argsort(-s, 1)[:, :2], 1))
  mask = np.zeros_like(s)
  np.put_along_axis(mask, picks, 1.0, axis=1)
  w = s * mask / (s * mask).sum(-1, keepdims=True)
  want = sum(
    w[:, e : e + 1] * np.asarray(_expert(moe, e, xn), np.float64)
    for e in range(4)
  )
  np.testing.assert_allclose(got.reshape(-1, D), want, atol=1e-5, rtol=1e-4)


def test_decoder_forward_moves_the_loss_free_bias():
  """Issue #25 (the resume test that saw this is slow): a training forward
  of the decoder (no cache) moves every MoE layer's bias, model state and
  not a parameter, by exactly +-bias_rate per entry."""
  u = 0.01
  cfg = small_config(
    **{
      **_DECODER,
      "model.num_layers": 2,  # one dense, one MoE layer
      "model.moe.balancing": "loss_free",
      "model.moe.bias_rate": u,
    }
  )
  gd, params, rest = nnx.split(build(cfg.model, nnx.Rngs(0)), nnx.Param, ...)
  assert not any("bias_E" in p for p, _ in nnx.to_flat_state(params))

  def biases(state):
    flat = nnx.to_flat_state(state)
    found = [v.get_value() for p, v in flat if p[-1] == "bias_E"]
    return np.concatenate([np.ravel(x) for x in found]) if found else None

  @jax.jit
  def forward(params, rest, tok, pos, seg):
    model = nnx.merge(gd, params, rest)
    model(tok, pos, seg)
    return nnx.state(model, nnx.Not(nnx.Param))

  b, t = 2, 12
  tok = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos, seg = _positions(b, t), jnp.ones((b, t), jnp.int32)
  before = biases(rest)
  assert before.shape == (4,) and np.all(before == 0)  # 4 experts
  after = biases(forward(params, rest, tok, pos, seg))
  np.testing.assert_allclose(np.abs(after), u, rtol=1e-6)


@pytest.mark.parametrize(
  "mesh,capacity",
  [
    ({"mesh.data": 2, "mesh.expert": 4}, 0.0),
    ({"mesh.expert": 4, "mesh.tensor": 2}, 0.0),
    pytest.param(
      {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
      0.0,
      marks=pytest.mark.slow,
    ),
    pytest.param(
      {"mesh.data": 2, "mesh.expert": 4}, 1.0, marks=pytest.mark.slow
    ),
  ],
)
def test_moe_train_step_on_a_mesh_matches_one_device(mesh, capacity):
  """Expert parallelism (experts split over mesh.expert, tokens exchanged by
  all-to-all in shard_map; capacity mode: GSPMD) and plain data / fsdp /
  tensor meshes on 8 devices equal one device: loss, grad norm, the
  parameters after two steps (so the gradients), the loss-free biases."""
  from efficient_lm.training import loop
  from tests.helpers import two_train_steps

  def run(mesh, devices):
    cfg = small_config(
      **{
        **_DECODER,
        "model.moe.num_experts": 8,
        "model.moe.capacity_factor": capacity,
        "model.moe.balancing": "loss_free",
        "model.moe.bias_rate": 0.01,
        "mesh.data": 1,
        **mesh,
      }
    )
    t = loop.build_trainer(cfg, devices)
    state, metrics = two_train_steps(t, t.init_fn())
    return t, jax.device_get(state), metrics

  _, ref, ref_m = run({}, jax.devices()[:1])
  t, got, got_m = run(mesh, jax.devices())
  np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(got_m["grad_norm"], ref_m["grad_norm"], rtol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
    got["params"],
    ref["params"],
  )
  jax.tree.map(
    np.testing.assert_array_equal, got["model_state"], ref["model_state"]
  )
  if "mesh.expert" in mesh:  # the experts really are split
    layer = t.abstract_state["params"]["stack"]["groups"]["segment_1"]
    spec = layer["layer_0"]["mlp"]["gate_EDF"].sharding.spec
    assert spec[1] == "expert", spec


def test_moe_v5p_config_fits_its_slice_and_counts():
  """configs/moe_v5p.py validates for v5p-32's 16 chips (32 experts over
  expert=8) and has the parameters its docstring and the README give."""
  from configs import moe_v5p

  cfg = config_lib.from_config_dict(moe_v5p.get_config(), device_count=16)
  assert cfg.mesh.shape == (1, 1, 2, 8, 1)
  m = cfg.model
  abstract = nnx.eval_shape(lambda: build(m, nnx.Rngs(0)))
  counts = flops.param_count(nnx.state(abstract, nnx.Param), m)
  d, v, e, f = m.embed_dim, m.vocab_size, m.moe.num_experts, 2048
  attn = 2 * d * m.num_heads * 128 + 2 * d * m.num_kv_heads * 128
  moe_layers = m.num_layers - 1
  total = (
    2 * v * d  # embedding, untied head
    + d  # final norm
    + m.num_layers * (attn + 2 * d)
    + 3 * d * m.mlp_dim  # the dense first layer
    + moe_layers * (d * e + (e + 1) * 3 * d * f)  # router, routed + shared
  )
  assert counts["total"] == total == 6_602_885_120
  idle = moe_layers * (e - m.moe.top_k) * 3 * d * f
  assert counts["active"] == total - idle == 940_574_720
