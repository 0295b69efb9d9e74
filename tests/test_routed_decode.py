"""Decode that skips what routing skips (models/mod.py `skip_decode`,
models/mor.py `Recursions._step`).

For each cache strategy the routed models support (full, rolling window,
global prefix + window, MLA latent; MoR's recursion-wise and
recursive-sharing caches under both routers; neither routes tglobal):
prefill + decode with the skip equals today's masked decode (logits and
every cache row) and the recompute (the causal forward), at batch 1 and 2.
At batch 1 a block (MoD) or recursion step (MoR) runs only for the tokens
routing processes: a host counter inside the skipped branch counts its
executions (with the rows each run processes), so computing a skipped
token fails the test (XLA's cost analysis would count both branches of the
cond). Greedy generation with the cache equals it without.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm.generate import Generator
from efficient_lm.models import build
from efficient_lm.models.mod import RoutedBlock
from efficient_lm.models.mor import Recursions
from tests.helpers import ATTENTION_VARIANTS, small_config

MOD = {"model.routing.kind": "mod", "model.num_layers": 4}
MOR = {
  "model.routing.kind": "mor",
  "model.num_layers": 5,
  "model.routing.num_recursions": 3,
}
CASES = {
  "mod_full": MOD,
  "mod_window": {**MOD, **ATTENTION_VARIANTS["sliding_window"]},
  "mod_global_local": {**MOD, **ATTENTION_VARIANTS["global_local"]},
  "mod_mla_window": {**MOD, **ATTENTION_VARIANTS["mla_qlatent_window"]},
  "mor_expert_recursion_wise": MOR,
  "mor_expert_sharing": {**MOR, "model.routing.kv": "recursive_sharing"},
  "mor_token_recursion_wise": {
    **MOR,
    "model.routing.router": "token_choice",
  },
  "mor_token_sharing": {
    **MOR,
    "model.routing.router": "token_choice",
    "model.routing.kv": "recursive_sharing",
  },
  "mor_mla_window": {**MOR, **ATTENTION_VARIANTS["mla_qlatent_window"]},
}
T, P = 16, 6  # sequence, prompt


def _model(overrides):
  """Routers sharpened (logits of order one): decisions well away from
  ties, both outcomes occurring."""
  cfg = small_config(**overrides)
  model = build(cfg.model, nnx.Rngs(0))
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  flat = nnx.to_flat_state(params)
  for path, var in flat:
    if path[-1] in ("w_D", "router_DN"):
      var.set_value(var.get_value() * 50.0)
  return cfg, nnx.merge(gd, nnx.from_flat_state(flat), rest)


def _set_skip(model, on: bool):
  for _, m in nnx.iter_modules(model):
    if isinstance(m, (RoutedBlock, Recursions)):
      m.skip_decode = on


def _tokens(b, t=T):
  tok = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return tok, pos, jnp.ones((b, t), jnp.int32)


RUNS: list[int] = []  # one entry per execution of a counted branch


def _count(n):
  RUNS.append(int(n))


@pytest.fixture
def counted(monkeypatch):
  """Every decode-time (T = 1) run of a MoD block's attention + MLP, or
  of a MoR recursion step's shared layers, appends its processed-token
  count to RUNS when it executes."""
  delta, shared = RoutedBlock._delta, Recursions._shared

  def counted_delta(self, x_BTD, pos_BT, seg_BT, cache=None):
    if x_BTD.shape[1] == 1:
      jax.debug.callback(_count, jnp.sum(seg_BT != 0))
    return delta(self, x_BTD, pos_BT, seg_BT, cache)

  def counted_shared(self, x_BTD, pos_BT, seg_BT, step, rows, caches):
    if x_BTD.shape[1] == 1:
      jax.debug.callback(_count, jnp.sum(seg_BT != 0))
    return shared(self, x_BTD, pos_BT, seg_BT, step, rows, caches)

  monkeypatch.setattr(RoutedBlock, "_delta", counted_delta)
  monkeypatch.setattr(Recursions, "_shared", counted_shared)
  RUNS.clear()
  yield RUNS
  RUNS.clear()


def _decode(model, tok, pos, seg, cache):
  """Decode positions P.. one token at a time from `cache` (after the
  prompt) -> (logits [B, T - P, V], final cache, counted runs)."""
  gd, state = nnx.split(model)

  @jax.jit
  def step(state, tok, pos, seg, cache):
    logits, _, cache = nnx.merge(gd, state)(tok, pos, seg, cache=cache)
    return logits, cache

  RUNS.clear()
  outs = []
  for i in range(P, tok.shape[1]):
    sl = slice(i, i + 1)
    got, cache = step(state, tok[:, sl], pos[:, sl], seg[:, sl], cache)
    outs.append(got)
  jax.effects_barrier()
  return jnp.concatenate(outs, 1), cache, list(RUNS)


# The default suite keeps one case per guarded path (about 10 s of CPU
# each: five compilations); batch 2 elsewhere and the other cache layouts
# run with the slow tests.
FAST = {
  ("mod_full", 1),
  ("mod_full", 2),
  ("mod_window", 1),
  ("mor_expert_recursion_wise", 1),
  ("mor_token_sharing", 1),
}
PARAMS = [
  pytest.param(
    name,
    b,
    marks=[] if (name, b) in FAST else [pytest.mark.slow],
  )
  for name in sorted(CASES)
  for b in (1, 2)
]


@pytest.mark.parametrize("name,b", PARAMS)
def test_skipping_decode_equals_masked_decode_and_recompute(name, b, counted):
  cfg, model = _model(CASES[name])
  tok, pos, seg = _tokens(b)
  want, aux = jax.jit(lambda *a: model(*a, causal_routing=True))(tok, pos, seg)
  fractions = [v for k, v in aux.items() if k.endswith("fraction")]
  assert any(0 < float(f) < 1 for f in fractions)  # routing really splits

  cache = model.init_cache(b, T)
  prefill = jax.jit(lambda *a, cache: model(*a, cache=cache))
  logits, _, cache = prefill(tok[:, :P], pos[:, :P], seg[:, :P], cache=cache)
  np.testing.assert_allclose(logits, want[:, :P], atol=2e-5, rtol=0)

  _set_skip(model, False)
  masked, masked_cache, masked_runs = _decode(model, tok, pos, seg, cache)
  _set_skip(model, True)
  skipped, skipped_cache, skipped_runs = _decode(model, tok, pos, seg, cache)
  np.testing.assert_allclose(skipped, masked, atol=1e-6, rtol=0)
  np.testing.assert_allclose(skipped, want[:, P:], atol=2e-5, rtol=0)
  jax.tree.map(
    lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6, rtol=0),
    skipped_cache,
    masked_cache,
  )
  # Masked: every counted branch runs at every decode step, whatever it
  # processes (each run reports how many rows it processes).
  assert len(masked_runs) % (T - P) == 0
  processed = [n for n in masked_runs if n > 0]
  assert 0 < len(processed) < len(masked_runs)  # some branches idle
  # Skipping: a branch runs iff it processes some row
  # (batch 1: only for a token routing processes there).
  assert sorted(skipped_runs) == sorted(processed)


@pytest.mark.parametrize(
  "name",
  [
    "mod_full",
    pytest.param("mor_expert_recursion_wise", marks=pytest.mark.slow),
  ],
)
def test_greedy_tokens_with_cache_equal_recompute(name):
  cfg, model = _model(CASES[name])
  gd, state = nnx.split(model)
  gen = Generator(gd, state)
  prompt = [[5, 17, 101, 3]]
  got, _ = gen.generate(prompt, max_new_tokens=8)
  want, _ = gen.generate(prompt, max_new_tokens=8, use_cache=False)
  assert got == want and len(got[0]) == 8
