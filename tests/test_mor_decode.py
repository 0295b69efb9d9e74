"""Mixture-of-recursions (models/mor.py) against docs/routing.md:
causality and decoding.

Causality by perturbation with causal routing (and top-k shown not causal);
the routing decisions plotted; prefill + decode = forward for both KV
strategies; compacted attention = dense attention with keys masked; a
token not processed left bitwise unchanged in the forward and in cached
steps. Routing itself: test_mor_routing.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm.models import routing
from efficient_lm.models.attention import Tokens
from tests.helpers import (
  prefill_then_decode,
  untouched_in_forward_and_decode,
)
from tests.mor_common import T, _inputs, _model


# --------------------------------------------------- causality, generation

_KINDS = {
  "expert_recursion_wise": {},
  "expert_sharing": {"model.routing.kv": "recursive_sharing"},
  "token_recursion_wise": {"model.routing.router": "token_choice"},
  "token_sharing": {
    "model.routing.router": "token_choice",
    "model.routing.kv": "recursive_sharing",
  },
}


def _leaks(model, causal_routing, t_list=(2, 5, 8, 11)):
  tokens, pos, seg = _inputs(b=1)
  base, _ = model(tokens, pos, seg, causal_routing=causal_routing)
  out = []
  for t in t_list:
    other = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 17) % 300)
    got, _ = model(other, pos, seg, causal_routing=causal_routing)
    if jnp.abs(got[:, : t + 1] - base[:, : t + 1]).max() > 1e-6:
      out.append(t)
  return out


@pytest.mark.parametrize("name", sorted(_KINDS))
def test_causal_routing_is_causal(name):
  _, model = _model(
    {"model.num_layers": 5, "model.routing.num_recursions": 3, **_KINDS[name]},
    router_scale=50.0,
  )
  assert _leaks(model, True) == []


@pytest.mark.parametrize(
  "name", ["expert_recursion_wise", "token_recursion_wise"]
)
def test_routing_decisions_are_the_causal_steps(name):
  """What `efficient_lm.plot routing` draws: nested per-step masks whose
  means are the forward's `routing/mor_step{r}_fraction`."""
  _, model = _model(
    {"model.num_layers": 5, "model.routing.num_recursions": 3, **_KINDS[name]},
    router_scale=50.0,
  )
  tokens, pos, seg = _inputs()
  _, aux = model(tokens, pos, seg, causal_routing=True)
  got = model.routing_decisions(tokens, pos, seg)
  assert list(got) == [f"recursion step {r}" for r in (1, 2, 3)]
  prev = np.ones(tokens.shape, bool)
  for r, mask in enumerate(got.values()):
    mask = np.asarray(mask)
    assert not np.any(mask & ~prev)
    np.testing.assert_allclose(
      mask.mean(), aux[f"routing/mor_step{r + 1}_fraction"]
    )
    prev = mask


def test_top_k_routing_is_not_causal():
  """Training's top-k: a future token can take an earlier one's place."""
  _, model = _model(
    {"model.num_layers": 5, "model.routing.num_recursions": 3},
    router_scale=50.0,
  )
  assert _leaks(model, False)


@pytest.mark.parametrize("name", sorted(_KINDS))
def test_prefill_then_decode_equals_causal_forward(name):
  cfg, model = _model(
    {"model.num_layers": 5, "model.routing.num_recursions": 3, **_KINDS[name]},
    router_scale=50.0,
  )
  b, t, p = 2, T, 9
  tokens, pos, seg = _inputs(b, t)
  want, aux = model(tokens, pos, seg, causal_routing=True)
  # Routing really splits the tokens at a later step.
  assert 0 < float(aux["routing/mor_step3_fraction"]) < 1
  got, cache = prefill_then_decode(
    model, tokens, pos, seg, model.init_cache(b, t), p
  )
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # Cache rows: step r of recursion_wise holds |S_r| tokens; sharing holds
  # every token once.
  steps = cache.get("steps") or [cache["shared"]]
  for r, layers in enumerate(steps):
    rows = int((np.asarray(layers[0]["seg"]) != 0).sum())
    frac = float(aux[f"routing/mor_step{r + 1}_fraction"])
    assert rows == round(frac * b * t), (r, rows, frac)


def test_compacted_attention_equals_dense_attention_with_keys_masked():
  """At a step, attention among the gathered tokens (their positions and
  segments) = full-length attention with unselected tokens' keys (and
  queries) masked, read at the selected rows; values and gradients."""
  cfg, model = _model({"model.routing.capacities": (1.0, 0.5)})
  attn = model.stack.shared[0].attn
  b, d = 2, cfg.model.embed_dim
  x = jax.random.normal(jax.random.key(5), (b, T, d))
  _, pos, seg = _inputs(b)
  seg = seg.at[1, :6].set(2)  # two documents
  z = jax.random.normal(jax.random.key(6), (b, T))
  idx, ok, chosen = routing.top_k_selection(z, seg != 0, (seg != 0).sum(1), 0.5)

  def compact(x):
    return attn(
      Tokens(
        routing.gather(x, idx),
        routing.gather(pos, idx),
        jnp.where(ok, routing.gather(seg, idx), 0),
      )
    )

  def dense(x):
    out = attn(Tokens(x, pos, jnp.where(chosen, seg, 0)))
    return routing.gather(out, idx)

  np.testing.assert_allclose(compact(x), dense(x), atol=1e-6, rtol=0)
  w = jax.random.normal(jax.random.key(8), (b, idx.shape[1], d))
  gc = jax.grad(lambda x: jnp.sum(compact(x) * w))(x)
  gd = jax.grad(lambda x: jnp.sum(dense(x) * w))(x)
  np.testing.assert_allclose(gc, gd, atol=1e-6, rtol=0)
  # Masking does something: plain dense attention differs.
  plain = routing.gather(attn(Tokens(x, pos, seg)), idx)
  assert jnp.abs(plain - compact(x)).max() > 1e-3


def test_causal_routing_leaves_skipped_tokens_bitwise_in_forward_and_step():
  """Issue #25, the property itself (forward and cached steps share the
  routing code): with real shared blocks, a token that expert-choice step
  1 does not process (z_1 <= 0 at capacity < 1, decided here by hand)
  keeps its input bitwise through the recursions, in the causal forward
  and in prefill + decode; every other token changes."""
  cfg, model = _model(
    {
      "model.routing.sharing": "cycle",
      "model.num_layers": 2,
      "model.routing.num_recursions": 2,
      "model.routing.capacities": (0.5, 0.5),
    },
    router_scale=50.0,
  )
  rec = model.stack
  b, t, p = 2, 12, 5
  x = jax.random.normal(jax.random.key(5), (b, t, cfg.model.embed_dim))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  w = np.asarray(rec.router_DN[...], np.float64)
  skipped = (np.asarray(x, np.float64) @ w[:, 0]) <= 0
  assert 0 < skipped.sum() < skipped.size
  fwd, stepped = untouched_in_forward_and_decode(rec, x, pos, seg, skipped, p)
  np.testing.assert_allclose(stepped, fwd, atol=2e-5, rtol=0)
