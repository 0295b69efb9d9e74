"""Mixture-of-recursions (models/mor.py) against docs/routing.md: routing.

Degenerate settings reduce to plain models (one recursion = vanilla; full
capacity with gate 1 = the weight-tied model, gradients summed over uses);
selection invariants; the combine rules and token-choice bookkeeping on
hand examples with a probe block; routers receiving gradient; the
loss-free bias as model state; one-line config errors; token-choice
gathered per depth = masked, and its overflow policy by hand.
Causality and decoding: test_mor_decode.py; sharding and FLOPs:
test_mor_flops.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import config as config_lib
from efficient_lm.models import build, flops, mor, routing
from efficient_lm.training import loop
from tests.helpers import (
  packed_batch,
  restore_latest,
  small_config,
)
from tests.mor_common import T, _cfg, _inputs, _model, _pure, _unique_blocks


# ---------------------------------------------------------------- schemes


@pytest.mark.parametrize(
  "sharing,layers,n",
  [
    ("cycle", 6, 2),
    ("cycle", 6, 3),
    ("sequence", 6, 2),
    ("sequence", 6, 3),
    ("middle_cycle", 8, 2),
    ("middle_cycle", 8, 3),
    ("middle_sequence", 8, 2),
    ("middle_sequence", 8, 3),
  ],
)
def test_layer_maps_follow_the_schemes(sharing, layers, n):
  """§1.1: cycle l mod D, sequence l // N_r, middle_*: first/last unique."""
  got = mor.layer_map(sharing, layers, n)
  m = layers - 2 if sharing.startswith("middle_") else layers
  d = m // n
  inner = [(i % d) if sharing.endswith("cycle") else (i // n) for i in range(m)]
  if sharing.startswith("middle_"):
    want = [0] + [1 + u for u in inner] + [d + 1]
  else:
    want = inner
  assert list(got) == want
  assert len(set(got)) == layers - m + d  # unique layers
  # A hand example of each kind (4 virtual middle layers, 2 recursions).
  assert mor.layer_map("cycle", 4, 2) == (0, 1, 0, 1)
  assert mor.layer_map("sequence", 4, 2) == (0, 0, 1, 1)
  assert mor.layer_map("middle_cycle", 6, 2) == (0, 1, 2, 1, 2, 3)
  assert mor.layer_map("middle_sequence", 6, 2) == (0, 1, 1, 2, 2, 3)


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      {"model.num_layers": 5},
      r"num_layers=5 does not fit .*middle_cycle.*"
      r"num_recursions=2",
    ),
    (
      {"model.routing.sharing": "cycle", "model.num_layers": 3},
      r"num_layers=3 does not fit .*'cycle'.*num_recursions=2",
    ),
    ({"model.routing.num_recursions": 0}, r"num_recursions=0"),
    ({"model.routing.sharing": "sequence"}, r"sharing='sequence'"),
    ({"model.routing.capacities": (1.0,)}, r"capacities=\(1.0,\) has 1"),
    ({"model.routing.capacities": (0.5, 1.0)}, r"non-increasing"),
    ({"model.routing.capacities": (1.0, 0.0)}, r"in \(0, 1\]"),
    (
      {
        "model.routing.kv": "recursive_sharing",
        "model.routing.capacities": (0.5, 0.5),
      },
      r"capacities\[0\] = 1",
    ),
    ({"model.routing.alpha": 0.0}, r"alpha=0.0"),
    (
      {
        "model.routing.router": "token_choice",
        "model.routing.token_choice_capacities": (1.0, 0.5, 0.5),
      },
      r"^model.routing.token_choice_capacities=\(1.0, 0.5, 0.5\) has 3",
    ),
    (
      {"model.routing.token_choice_capacities": (1.0, 0.5)},
      r"^model.routing.token_choice_capacities=.* with "
      r"router='expert_choice': expected router='token_choice'",
    ),
    (
      {
        "model.routing.router": "token_choice",
        "model.routing.kv": "recursive_sharing",
        "model.routing.token_choice_capacities": (0.5, 0.5),
      },
      r"token_choice_capacities\[0\] = 1",
    ),
    (  # issue #23: the README says MoR composes with every kind but this
      {
        "model.attention.pattern": "sliding_window,tglobal",
        "model.attention.window": 4,
        "model.attention.tglobal_block": 4,
        "model.routing.sharing": "cycle",
        "model.routing.num_recursions": 2,
      },
      r"^model.routing.kind='mor' with tglobal attention is not supported",
    ),
    ({"model.routing.aux_loss_weight": -1.0}, r"aux_loss_weight=-1.0"),
    (
      {
        "model.attention.pattern": "dense,sliding_window",
        "model.attention.window": 4,
        "model.routing.sharing": "cycle",
        "model.routing.num_recursions": 4,
      },
      r"shares parameters .* one kind",
    ),
  ],
)
def test_config_errors_are_one_line(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    _cfg(**overrides)
  assert "\n" not in str(e.value)


# --------------------------------------------- degenerate equivalences, tying


def _untied_twin(cfg, model):
  """A plain decoder whose layer l holds a copy of unique layer map(l)."""
  r = cfg.model.routing
  plain = build(
    small_config(**{"model.num_layers": cfg.model.num_layers}).model,
    nnx.Rngs(5),
  )
  mapping = mor.layer_map(r.sharing, cfg.model.num_layers, r.num_recursions)
  blocks = [_pure(b) for b in _unique_blocks(model.stack)]
  state = nnx.state(plain, nnx.Param)
  d = nnx.to_pure_dict(state)
  d["embed"] = _pure(model.embed)
  d["final_norm"] = _pure(model.final_norm)
  d["stack"]["groups"]["segment_0"]["layer_0"] = jax.tree.map(
    lambda *ls: jnp.stack(ls), *[blocks[u] for u in mapping]
  )
  nnx.replace_by_pure_dict(state, d)
  nnx.update(plain, state)
  return plain, mapping


def _grads(model, f):
  gd, p, rest = nnx.split(model, nnx.Param, ...)
  g = jax.grad(lambda p: f(nnx.merge(gd, p, rest)))(p)
  return nnx.to_pure_dict(g)


@pytest.mark.parametrize(
  "sharing,layers,n",
  [
    ("cycle", 2, 1),  # one recursion: the vanilla model
    ("cycle", 4, 2),
    ("middle_cycle", 4, 2),
    pytest.param("middle_cycle", 5, 3, marks=pytest.mark.slow),
  ],
)
def test_full_capacity_unit_gate_is_the_weight_tied_model(sharing, layers, n):
  """Capacity 1 at every step, gate 1 (alpha 2, zero router: 2 sigmoid(0)),
  residual_delta: logits equal the plain decoder whose layers are copies of
  the shared ones; each shared weight's gradient is the sum over its uses;
  unique parameters counted once, effective ones per use."""
  cfg, model = _model(
    {
      "model.routing.sharing": sharing,
      "model.num_layers": layers,
      "model.routing.num_recursions": n,
      "model.routing.capacities": (1.0,) * n,
      "model.routing.alpha": 2.0,
      "model.routing.update_rule": "residual_delta",
    },
    router_scale=0.0,
  )
  plain, mapping = _untied_twin(cfg, model)
  tokens, pos, seg = _inputs()
  seg = seg.at[1, 12:].set(0)  # padding too
  want, _ = plain(tokens, pos, seg)
  got, aux = model(tokens, pos, seg)
  real = np.asarray(seg) != 0  # padding is never routed: no claim
  np.testing.assert_allclose(
    np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0
  )
  for r in range(n):
    assert float(aux[f"routing/mor_step{r + 1}_fraction"]) == 1.0

  w = jax.random.normal(jax.random.key(7), want.shape) * seg[..., None]
  gm = _grads(model, lambda m: jnp.sum(m(tokens, pos, seg)[0] * w))
  gp = _grads(plain, lambda m: jnp.sum(m(tokens, pos, seg)[0] * w))
  per_layer = gp["stack"]["groups"]["segment_0"]["layer_0"]
  rec = model.stack
  names = (
    (["first"] if rec.first is not None else [])
    + [("shared", j) for j in range(len(rec.shared))]
    + (["last"] if rec.last is not None else [])
  )
  for u, name in enumerate(names):
    got_g = (
      gm["stack"][name]
      if isinstance(name, str)
      else gm["stack"][name[0]][name[1]]
    )
    uses = [i for i, v in enumerate(mapping) if v == u]
    want_g = jax.tree.map(
      lambda a, uses=uses: sum(a[i] for i in uses), per_layer
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
      got_g,
      want_g,
    )
  # Router: gradient through g, even at full capacity.
  assert float(jnp.abs(gm["stack"]["router_DN"]).max()) > 0

  counts = flops.param_count(nnx.state(model, nnx.Param), cfg.model)
  plain_counts = flops.param_count(nnx.state(plain, nnx.Param))
  per = jax.tree.reduce(lambda s, a: s + a.size, _pure(rec.shared[0]), 0)
  router = cfg.model.embed_dim * n
  shared_layers = len(rec.shared)
  assert counts["non_embedding"] == (
    plain_counts["non_embedding"] - (layers - len(names)) * per + router
  )
  assert counts["effective_non_embedding"] == (
    counts["non_embedding"] + (n - 1) * shared_layers * per
  )
  assert counts["effective_non_embedding"] == (
    plain_counts["non_embedding"] + router
  )


# ------------------------------------------------------- selection, combine


def test_top_k_selection_invariants():
  """|S_r| = min(max(1, floor(c n)), |S_{r-1}|) over non-padding tokens,
  nested, ascending, never padding."""
  b, t = 4, 20
  z = jax.random.normal(jax.random.key(0), (b, 3, t))
  seg = np.ones((b, t), np.int32)
  seg[1, 13:] = 0
  seg[2, :] = 0  # an all-padding row
  seg[3, 5:9] = 0
  valid = jnp.asarray(seg != 0)
  n_valid = valid.sum(1)
  active = valid
  for r, c in enumerate((1.0, 2 / 3, 1 / 3)):
    idx, ok, chosen = routing.top_k_selection(z[:, r], active, n_valid, c)
    k = np.minimum(
      np.maximum(1, np.floor(c * np.asarray(n_valid) + 1e-6)),
      np.asarray(active.sum(1)),
    )
    np.testing.assert_array_equal(np.asarray(chosen).sum(1), k)
    np.testing.assert_array_equal(np.asarray(ok).sum(1), k)
    assert not np.any(np.asarray(chosen) & ~np.asarray(active))  # nested
    for row in range(b):
      sel = np.asarray(idx[row])[np.asarray(ok[row])]
      assert np.all(np.diff(sel) > 0)  # ascending
      np.testing.assert_array_equal(np.flatnonzero(chosen[row]), sel)
      # The k highest candidates.
      cand = np.flatnonzero(active[row])
      best = cand[np.argsort(-np.asarray(z[row, r])[cand], kind="stable")]
      np.testing.assert_array_equal(np.sort(best[: int(k[row])]), sel)
    active = chosen
  assert routing.capacity_tokens(2 / 3, 6, minimum=1) == 4


def test_unselected_tokens_are_bitwise_unchanged():
  cfg, model = _model(
    {
      "model.routing.sharing": "cycle",
      "model.num_layers": 2,
      "model.routing.num_recursions": 1,
      "model.routing.capacities": (0.5,),
    }
  )
  rec = model.stack
  x = jax.random.normal(jax.random.key(3), (2, T, cfg.model.embed_dim))
  _, pos, seg = _inputs()
  seg = seg.at[0, 10:].set(0)
  out, _, _, _ = rec._expert_choice(x, pos, seg, False)
  z = jnp.einsum("BTD,D->BT", x, rec.router_DN[:, 0])
  _, _, chosen = routing.top_k_selection(z, seg != 0, (seg != 0).sum(1), 0.5)
  chosen = np.asarray(chosen)
  np.testing.assert_array_equal(
    np.asarray(out)[~chosen], np.asarray(x)[~chosen]
  )
  assert np.all(np.abs(np.asarray(out - x)).max(-1)[chosen] > 0)
  np.testing.assert_array_equal(chosen.sum(1), [5, 8])


class Times3(nnx.Module):
  """Probe block: Blocks(H) = 3 H; counts the non-padding tokens it runs."""

  def __init__(self, shape):
    self.calls = nnx.Variable(jnp.zeros(shape, jnp.int32))

  def __call__(self, x, pos, seg):
    if seg.shape == self.calls.shape:  # full-length (masked) steps
      self.calls[...] = self.calls[...] + (seg != 0)
    return 3.0 * x, {}


def _probe_recursions(n, t=1, block=None, **routing):
  """Recursions over n cycled steps of a probe block (Times3 by default)."""
  cfg = small_config(
    **{
      "model.embed_dim": 2,
      "model.num_heads": 1,
      "model.num_kv_heads": 1,
      "model.routing.kind": "mor",
      "model.routing.sharing": "cycle",
      "model.num_layers": n,
      "model.routing.num_recursions": n,
      **{f"model.routing.{k}": v for k, v in routing.items()},
    }
  )
  block = block or (lambda: Times3((1, t)))
  return mor.Recursions(cfg.model, lambda spec, r: block(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("update", ["paper", "residual_delta"])
def test_combine_rules_on_a_hand_example(update):
  """d = 2; expert-choice, one step, zero router: g = 0.1 sigmoid(0) =
  0.05; paper H + g 3H, residual_delta H + g (3H - H). Token-choice: zero
  router ties -> depth 1, g = 1/2: H1 + g 3H1 or H1 + g (3H1 - H1); a
  router that prefers depth 2: continuing tokens are ungated."""
  h = jnp.array([[[1.0, -2.0]]])
  pos = jnp.zeros((1, 1), jnp.int32)
  seg = jnp.ones((1, 1), jnp.int32)
  rec = _probe_recursions(1, update_rule=update, capacities=(1.0,))
  rec.router_DN[...] = jnp.zeros_like(rec.router_DN[...])
  got, _ = rec(h, pos, seg)
  g = 0.1 * 0.5
  want = h + g * 3 * h if update == "paper" else h + g * 2 * h
  np.testing.assert_allclose(got, want, rtol=1e-6)

  rec = _probe_recursions(2, update_rule=update, router="token_choice")
  rec.router_DN[...] = jnp.zeros_like(rec.router_DN[...])
  got, _ = rec(h, pos, seg)
  want = h + 0.5 * 3 * h if update == "paper" else h + 0.5 * 2 * h
  np.testing.assert_allclose(got, want, rtol=1e-6)
  rec.router_DN[...] = jnp.array([[0.0, 1.0], [0.0, 0.0]])  # z = (0, 1)
  got, _ = rec(h, pos, seg)
  p2 = float(jax.nn.softmax(jnp.array([0.0, 1.0]))[1])
  want = h + p2 * 9 * h if update == "paper" else h + p2 * (9 * h - h)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
  "routing", [{"capacities": (1.0, 0.5)}, {"router": "token_choice"}]
)
def test_routers_receive_gradient(routing):
  """The LM loss reaches every router column through the gates (no aux
  loss: weights 0)."""
  t = 8
  rec = _probe_recursions(
    2, t, aux_loss_weight=0.0, balancing_weight=0.0, **routing
  )
  rec.router_DN[...] = jnp.array([[1.0, -1.0], [0.5, 2.0]])
  x = jax.random.normal(jax.random.key(9), (1, t, 2))
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32)
  gd, p, rest = jax.tree.map(
    lambda v: nnx.to_pure_dict(v) if isinstance(v, nnx.State) else v,
    nnx.split(rec, nnx.Param, ...),
    is_leaf=lambda v: isinstance(v, nnx.State),
  )

  def loss(p, rest):
    out, aux = nnx.merge(gd, p, rest)(x, pos, seg)
    return jnp.sum(out**2) + sum(
      v for k, v in aux.items() if k.startswith("loss/")
    )

  g = np.asarray(jax.grad(loss)(p, rest)["router_DN"])
  assert np.all(np.abs(g).max(0) > 1e-6), g


def test_bce_targets_are_the_top_k_and_the_value_is_by_hand():
  cfg, model = _model(
    {
      "model.routing.sharing": "cycle",
      "model.num_layers": 2,
      "model.routing.num_recursions": 1,
      "model.routing.capacities": (0.25,),
      "model.routing.aux_loss_weight": 0.5,
      "model.routing.router_z_loss": 0.1,
    },
    router_scale=30.0,
  )
  tokens, pos, seg = _inputs()
  seg = seg.at[1, 9:].set(0)
  _, aux = model(tokens, pos, seg)
  x = np.asarray(model.embed(tokens, jnp.float32), np.float64)
  z = x @ np.asarray(model.stack.router_DN[...], np.float64)[:, 0]
  bce, zz, n = 0.0, 0.0, 0
  for b in range(2):
    valid = np.flatnonzero(np.asarray(seg[b]))
    k = max(1, int(np.floor(0.25 * len(valid))))
    top = set(valid[np.argsort(-z[b, valid])[:k]].tolist())
    for t in valid:
      y = float(t in top)
      bce += np.logaddexp(0, z[b, t]) - y * z[b, t]
      zz += z[b, t] ** 2
      n += 1
  np.testing.assert_allclose(aux["loss/mor_bce"], 0.5 * bce / n, rtol=1e-5)
  np.testing.assert_allclose(aux["loss/router_z"], 0.1 * zz / n, rtol=1e-5)


def test_token_choice_counts_balance_loss_and_loss_free_bias():
  """Each token is processed exactly i_t times; L_bal = N_r sum f_j P_j;
  the loss-free bias moves by +-u towards the mean load in training and
  not with causal routing."""
  n, t = 3, 12
  rec = _probe_recursions(n, t, router="token_choice", balancing_weight=0.5)
  x = jax.random.normal(jax.random.key(4), (1, t, 2)) * 3
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32).at[0, -2:].set(0)
  rec.router_DN[...] = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
  _, aux = rec(x, pos, seg)
  z = np.asarray(x[0]) @ np.asarray(rec.router_DN[...])
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  depth = p.argmax(-1)
  valid = np.asarray(seg[0]) != 0
  calls = sum(np.asarray(b.calls[...][0]) for b in rec.shared)
  # One shared layer (cycle, n layers, n recursions: D = 1).
  np.testing.assert_array_equal(calls, np.where(valid, depth + 1, 0))
  assert len(set(depth[valid])) > 1
  f = np.array([np.mean(depth[valid] == j) for j in range(n)]) * n
  pj = p[valid].mean(0)
  np.testing.assert_allclose(
    aux["loss/mor_balance"], 0.5 * np.sum(f * pj), rtol=1e-5
  )

  rec = _probe_recursions(
    n, t, router="token_choice", balancing="loss_free", bias_rate=0.01
  )
  rec.router_DN[...] = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
  rec(x, pos, seg, causal_routing=True)
  np.testing.assert_array_equal(rec.bias_N[...], np.zeros(n))
  _, aux = rec(x, pos, seg)
  assert "loss/mor_balance" not in aux
  load = np.array([np.mean(depth[valid] == j) for j in range(n)])
  np.testing.assert_allclose(
    rec.bias_N[...], 0.01 * np.sign(load.mean() - load), rtol=1e-6
  )
  assert np.all(np.asarray(rec.bias_N[...]) != 0)


def _loss_free_cfg(u, **overrides):
  return _cfg(
    **{
      "model.routing.router": "token_choice",
      "model.routing.balancing": "loss_free",
      "model.routing.bias_rate": u,
      **overrides,
    }
  )


def test_loss_free_bias_is_model_state_moved_by_the_train_step():
  """The bias lives in state["model_state"] (not params: no gradient, no
  optimizer) and each train step moves it by exactly +-u."""
  u = 0.01
  t = loop.build_trainer(
    _loss_free_cfg(
      u, **{"model.routing.sharing": "cycle", "model.num_layers": 2}
    ),
    jax.devices()[:1],
  )
  assert "bias_N" not in t.abstract_state["params"]["stack"]
  state = t.init_fn()
  batch = packed_batch(8, 32, 384)
  seen = []
  for _ in range(2):
    state, _ = t.train_step(state, batch)
    seen.append(np.asarray(state["model_state"]["stack"]["bias_N"]))
  # Two depths: each step moves them by +-u in opposite directions.
  np.testing.assert_allclose(np.abs(seen[0]), [u, u], rtol=1e-6)
  np.testing.assert_allclose(seen[0][0], -seen[0][1], rtol=1e-6)
  step2 = np.abs(seen[1] - seen[0])
  np.testing.assert_allclose(step2, [u, u], rtol=1e-5)


@pytest.mark.slow
def test_loss_free_bias_is_model_state_trained_and_checkpointed(tmp_path):
  """The bias lives in state["model_state"] (not params: no gradient, no
  optimizer), moves by exactly +-u per training step and is restored from
  the checkpoint."""
  u = 0.01
  cfg = _loss_free_cfg(
    u,
    **{
      "train.steps": 3,
      "train.eval_every": 100,
      "mesh.data": 8,
      "checkpoint.every_steps": 3,
      "checkpoint.async_save": False,
    },
  )
  t = loop.build_trainer(cfg)
  assert t.abstract_state["model_state"]["stack"]["bias_N"].shape == (2,)
  assert "bias_N" not in t.abstract_state["params"]["stack"]
  loop.run(cfg, str(tmp_path))
  step, state, _ = restore_latest(tmp_path, t.abstract_state)
  assert step == 3
  bias = np.asarray(state["model_state"]["stack"]["bias_N"])
  # Two depths: each step moves them by +-u in opposite directions.
  np.testing.assert_allclose(bias[0], -bias[1], atol=1e-7)
  assert round(abs(float(bias[0])) / u, 4) in (1.0, 3.0), bias


# ------------------------------------ hand examples at N_r >= 2 (issue #25)


def _softplus(z):
  return np.logaddexp(0.0, z)


def _expert_choice_by_hand(x, seg, w, caps, alpha, update, causal):
  """Expert-choice recursions with the probe block (Blocks(H) = 3H) in
  float64: per step the active set, the BCE over that set only, the gated
  update on the chosen tokens. -> (H, {"bce", "z", "agree"} summed over
  steps (z: mean z^2 over the active set; agree: the fraction of the active
  set whose causal decision equals top-k membership), chosen sets)."""
  h = np.asarray(x, np.float64)
  valid = np.asarray(seg) != 0
  n_valid = valid.sum(1)
  active = valid
  sums, sets = {"bce": 0.0, "z": 0.0, "agree": 0.0}, []
  for r, c in enumerate(caps):
    z = h @ w[:, r]
    top = np.zeros_like(valid)
    for b in range(h.shape[0]):
      cand = np.flatnonzero(active[b])
      k = min(max(1, int(np.floor(c * n_valid[b] + 1e-6))), len(cand))
      top[b, cand[np.argsort(-z[b, cand], kind="stable")[:k]]] = True
    per = _softplus(z) - top * z
    sums["bce"] += per[active].mean()
    sums["z"] += np.square(z)[active].mean()
    decided = active & ((z > 0) | (c >= 1.0))
    sums["agree"] += (decided == top)[active].mean()
    chosen = decided if causal else top
    g = (alpha / (1 + np.exp(-z)))[..., None]
    new = h + g * 3 * h if update == "paper" else h + g * (3 * h - h)
    h = np.where(chosen[..., None], new, h)
    sets.append(chosen)
    active = chosen
  return h, sums, sets


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("update", ["paper", "residual_delta"])
def test_expert_choice_two_steps_by_hand(update, causal):
  """Issue #25: N_r = 2 with capacities below one, so step 2's active set
  is not the valid tokens: the output (gated updates on the chosen tokens,
  the others bitwise unchanged) and `loss/mor_bce` (step r's BCE over the
  tokens active at r only) against a float64 hand computation, in training
  (top-k) and with causal routing (continue iff active and z_r > 0); the
  router z-loss and the causal agreement summed over steps likewise."""
  t = 10
  rec = _probe_recursions(
    2,
    t,
    capacities=(0.6, 0.5),
    update_rule=update,
    aux_loss_weight=0.5,
    router_z_loss=0.1,
  )
  w = np.array([[1.0, -0.7], [0.4, 1.3]])
  rec.router_DN[...] = jnp.asarray(w, jnp.float32)
  x = jax.random.normal(jax.random.key(11), (2, t, 2))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  seg = jnp.ones((2, t), jnp.int32).at[1, 7:].set(0)
  got, aux = rec(x, pos, seg, causal_routing=causal)
  want, sums, sets = _expert_choice_by_hand(
    x, seg, w, (0.6, 0.5), rec.alpha, update, causal
  )
  valid = np.asarray(seg) != 0
  # The example means something: step 2 sees a strict, nonempty subset.
  assert 0 < sets[0].sum() < valid.sum() and 0 < sets[1].sum()
  assert sets[1].sum() < sets[0].sum()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  untouched = ~sets[0]
  np.testing.assert_array_equal(
    np.asarray(got)[untouched], np.asarray(x)[untouched]
  )
  np.testing.assert_allclose(aux["loss/mor_bce"], 0.5 * sums["bce"], rtol=1e-5)
  np.testing.assert_allclose(aux["loss/router_z"], 0.1 * sums["z"], rtol=1e-5)
  if causal:
    assert 0 < sums["agree"] < 2
    np.testing.assert_allclose(
      aux["routing/mor_agreement"], sums["agree"] / 2, rtol=1e-5
    )
  for r in range(2):
    np.testing.assert_allclose(
      aux[f"routing/mor_step{r + 1}_fraction"],
      sets[r].sum() / valid.sum(),
      rtol=1e-6,
    )


@pytest.mark.parametrize("update", ["paper", "residual_delta"])
def test_token_choice_with_a_nonzero_loss_free_bias_by_hand(update):
  """Issue #25: the loss-free bias picks the depth (argmax(p + bias)) but
  is not part of the gate (g = p_i): a nonzero bias that changes some
  tokens' depth, output by hand with the probe block (a token of depth i
  ends at H1 + g * 3^i H1, or H1 + g * (3^i H1 - H1)); the bias then moves
  by u * sign(mean load - load) of those depths."""
  n, t = 3, 12
  rec = _probe_recursions(
    n,
    t,
    router="token_choice",
    balancing="loss_free",
    bias_rate=0.01,
    update_rule=update,
    router_z_loss=0.1,
  )
  w = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
  rec.router_DN[...] = jnp.asarray(w, jnp.float32)
  bias = np.array([0.0, 0.3, -0.15])
  rec.bias_N[...] = jnp.asarray(bias, jnp.float32)
  x = jax.random.normal(jax.random.key(4), (1, t, 2)) * 3
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32).at[0, -2:].set(0)
  got, aux = rec(x, pos, seg)
  h = np.asarray(x[0], np.float64)
  z = h @ w
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  depth = (p + bias).argmax(-1)
  valid = np.asarray(seg[0]) != 0
  assert np.any(depth[valid] != p[valid].argmax(-1))  # the bias matters
  g = p[np.arange(t), depth][:, None]
  y = 3.0 ** (depth + 1)[:, None] * h
  want = h + g * y if update == "paper" else h + g * (y - h)
  want = np.where(valid[:, None], want, h)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
  lse = np.log(np.exp(z).sum(-1))  # router z-loss: mean lse^2, valid only
  np.testing.assert_allclose(
    aux["loss/router_z"], 0.1 * np.square(lse)[valid].mean(), rtol=1e-5
  )
  load = np.array([np.mean(depth[valid] == j) for j in range(n)])
  np.testing.assert_allclose(
    rec.bias_N[...], bias + 0.01 * np.sign(load.mean() - load), atol=1e-7
  )


# Issue #25: every router and KV kind in the default suite; the XLA FLOPs
# checks of token-choice and recursive sharing are slow, these identities
# are not.


# ------------------- token-choice gathered per depth (issue #26 item 1)


def _tc_setup(kv):
  """Token-choice, 2 recursions of one shared layer, packed rows with
  padding; the router scaled so depths spread. -> (rec, x, pos, seg,
  depth [B, T] 0-based as the router picks it)."""
  cfg, model = _model(
    {
      "model.routing.router": "token_choice",
      "model.routing.sharing": "cycle",
      "model.num_layers": 2,
      "model.routing.num_recursions": 2,
      "model.routing.kv": kv,
    },
    router_scale=30.0,
  )
  rec = model.stack
  b, t = 2, T
  x = jax.random.normal(jax.random.key(3), (b, t, cfg.model.embed_dim))
  seg = jnp.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * 13 + [0] * 3])
  seg = seg.astype(jnp.int32)
  pos = jnp.array([list(range(9)) + list(range(7)), list(range(16))])
  pos = pos.astype(jnp.int32)
  depth = np.asarray(rec._logits(x)).argmax(-1)
  return rec, x, pos, seg, depth


@pytest.mark.parametrize(
  "kv",
  ["recursion_wise", pytest.param("recursive_sharing", marks=pytest.mark.slow)],
)
def test_token_choice_gathered_equals_masked(kv):
  """Capacities just large enough that nothing overflows (C_r = the most
  tokens any row has at depth >= r): the gathered steps (only C_r < T rows
  through the shared layer) give the masked full-length steps' output and
  gradients (parameters and input), same parameters."""
  rec, x, pos, seg, depth = _tc_setup(kv)
  valid = np.asarray(seg) != 0
  counts = [int(((depth >= r) & valid).sum(1).max()) for r in range(2)]
  # Padding: recursion-wise step 1 is gathered too (recursive sharing's
  # step 1 computes every token's keys: capacity 1).
  caps = tuple(c / T for c in counts)
  if kv == "recursive_sharing":
    caps = (1.0, *caps[1:])
  assert 0 < counts[1] < counts[0] < T, counts
  slots = rec._token_choice_slots(T, False)
  assert slots == (T, T)
  cot = jax.random.normal(jax.random.key(9), x.shape)

  def loss(rec, x):
    y, aux = rec(x, pos, seg)
    return jnp.sum(y * cot) + aux["loss/mor_balance"], y

  outs = []
  for c in [(1.0,) * 2, caps]:
    rec.token_choice_capacities = c
    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))
    (g_rec, g_x), y = grad(rec, x)
    outs.append((y, nnx.to_pure_dict(nnx.state(g_rec, nnx.Param)), g_x))
  assert rec._token_choice_slots(T, False) == (
    T if kv == "recursive_sharing" else counts[0],
    *counts[1:],
  )
  (y0, gp0, gx0), (y1, gp1, gx1) = outs
  tol = {"rtol": 1e-5, "atol": 1e-5}
  np.testing.assert_allclose(y1, y0, **tol)
  np.testing.assert_allclose(gx1, gx0, **tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), gp1, gp0)
  assert np.abs(np.asarray(jax.tree.leaves(gp0["router_DN"])[0])).max() > 0


class Recorder(nnx.Module):
  """Probe block: Blocks(H) = 3 H; logs the (position, segment) pairs of
  the non-padding rows of each call, in call order."""

  def __init__(self, log):
    self.log = log

  def __call__(self, x, pos, seg):
    p, s = np.asarray(pos)[0], np.asarray(seg)[0]
    self.log.append((x.shape[1], [int(i) for i in p[s != 0]]))
    return 3.0 * x, {}


@pytest.mark.parametrize("update", ["paper", "residual_delta"])
def test_token_choice_overflow_exits_the_tokens_the_policy_names(update):
  """T = 8, depths (by hand through the router) 3,1,3,2,3,3,2,1 (1-based),
  capacities (1, 1/2, 1/4): C = 8, 4, 2 slots. Step 2 takes the first 4
  tokens of depth >= 2 by position (0, 2, 3, 4): 5 and 6 exit after step 1;
  step 3 the first 2 of those still running with depth 3 (0, 2): 4 exits
  after step 2. Each step's block sees only its C_r slots, and every token
  ends at H1 + g 3^L H1 (or H1 + g (3^L H1 - H1)), L its steps run."""
  t, log = 8, []
  rec = _probe_recursions(
    3,
    block=lambda: Recorder(log),
    router="token_choice",
    update_rule=update,
    token_choice_capacities=(1.0, 0.5, 0.25),
  )
  rec.router_DN[...] = jnp.eye(2, 3, dtype=jnp.float32) * 4.0
  chosen = np.array([2, 0, 2, 1, 2, 2, 1, 0])  # 0-based depths
  # h . W = 4 h[:2] padded with z_3 = 0: pick each depth by the signs.
  table = {0: [1.0, -1.0], 1: [-1.0, 1.0], 2: [-1.0, -1.0]}
  h = (
    np.array([table[d] for d in chosen])[None]
    * (1 + np.arange(t))[None, :, None]
    / 8
  )
  x = jnp.asarray(h, jnp.float32)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32)
  assert (np.asarray(rec._logits(x))[0].argmax(-1) == chosen).all()
  got, aux = rec(x, pos, seg)
  assert log == [(8, list(range(8))), (4, [0, 2, 3, 4]), (2, [0, 2])]
  steps = np.array([3, 1, 3, 2, 2, 1, 1, 1])  # steps each token ran
  z = h[0] @ np.asarray(rec.router_DN[...], np.float64)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  g = p[np.arange(t), chosen][:, None]
  y = 3.0 ** steps[:, None] * h[0]
  want = h[0] + g * y if update == "paper" else h[0] + g * (y - h[0])
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["routing/mor_overflow_fraction"], 3 / 8)
  np.testing.assert_allclose(aux["routing/mor_step2_fraction"], 4 / 8)
  np.testing.assert_allclose(aux["routing/mor_step3_fraction"], 2 / 8)
  # Causal routing (evaluation, generation) bounds nothing: every token
  # runs its chosen depth, each step at full length.
  log.clear()
  got, _ = rec(x, pos, seg, causal_routing=True)
  assert [n for n, _ in log] == [8, 8, 8]
  y = 3.0 ** (chosen + 1)[:, None] * h[0]
  want = h[0] + g * y if update == "paper" else h[0] + g * (y - h[0])
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
