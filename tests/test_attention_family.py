"""Every attention variant, causal and bidirectional, through the module the
model builds (`block.make_attention`): the docs/testing.md harness.

Causal forms: outputs at positions <= t do not move when tokens after t
change (perturbation at block / window boundaries) and the Jacobian
d out[t] / d in[s] is zero for s > t. Bidirectional forms, fed to the same
checks, must fail them: that is what shows the checks can see a leak.
Packing: two documents in one row give the outputs of each run alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm.models import stack
from efficient_lm.models.attention import Tokens
from efficient_lm.models.block import make_attention
from tests.helpers import ATTENTION_VARIANTS, small_config

T = 24
VARIANTS = ATTENTION_VARIANTS
BOUNDARIES = (0, 3, 4, 7, 8, 15, 16, 22)


def _attn(name, causal):
  cfg = small_config(**VARIANTS[name]).model
  spec = stack.layer_plan(cfg, causal=causal)[0]
  return make_attention(cfg, spec, rngs=nnx.Rngs(0), out_std=0.02)


def _run(attn, x_BTD, pos_BT=None, seg_BT=None):
  b, t, _ = x_BTD.shape
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t)) if pos_BT is None else pos_BT
  seg_BT = jnp.ones((b, t), jnp.int32) if seg_BT is None else seg_BT
  return attn(Tokens(x_BTD, pos_BT, seg_BT))


def _leaks(attn, d):
  """Positions t where changing tokens after t moved an output <= t."""
  x = jax.random.normal(jax.random.key(0), (1, T, d))
  base = _run(attn, x)
  leaks = []
  for t in BOUNDARIES:
    other = x.at[:, t + 1 :].set(
      jax.random.normal(jax.random.key(t + 1), (1, T - t - 1, d))
    )
    moved = jnp.abs(_run(attn, other)[:, : t + 1] - base[:, : t + 1]).max()
    if moved > 1e-6:
      leaks.append(t)
  return leaks


def _future_jacobian(attn, d, t=T // 2):
  """max |d out[t] / d in[s]| over s > t."""
  x = jax.random.normal(jax.random.key(1), (1, T, d))
  jac = jax.jacfwd(lambda x: _run(attn, x)[0, t])(x)  # [D, 1, T, D]
  return float(jnp.abs(jac[:, 0, t + 1 :]).max())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causal_forms_do_not_see_the_future(name):
  attn = _attn(name, causal=True)
  d = small_config().model.embed_dim
  assert _leaks(attn, d) == []
  assert _future_jacobian(attn, d) == 0.0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_bidirectional_forms_fail_the_causality_check(name):
  attn = _attn(name, causal=False)
  d = small_config().model.embed_dim
  assert _leaks(attn, d), "a bidirectional layer passed the causality check"
  assert _future_jacobian(attn, d) > 0.0


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_equal_separate_runs(name, causal):
  attn = _attn(name, causal=causal)
  d = small_config().model.embed_dim
  cut = 10
  x = jax.random.normal(jax.random.key(2), (1, T, d))
  pos = jnp.concatenate([jnp.arange(cut), jnp.arange(T - cut)])[None]
  seg = jnp.concatenate(
    [jnp.ones(cut, jnp.int32), jnp.full(T - cut, 2, jnp.int32)]
  )[None]
  packed = _run(attn, x, pos, seg)
  first = _run(attn, x[:, :cut])
  second = _run(attn, x[:, cut:])
  np.testing.assert_allclose(packed[:, :cut], first, atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[:, cut:], second, atol=1e-5, rtol=0)


def test_window_covering_the_sequence_is_dense():
  """Degenerate settings reduce to dense, in both directions."""
  for causal in (True, False):
    dense = _attn("dense_gqa", causal)
    cfg = small_config(
      **{"model.attention.kind": "sliding_window", "model.attention.window": T}
    ).model
    spec = stack.layer_plan(cfg, causal=causal)[0]
    local = make_attention(cfg, spec, rngs=nnx.Rngs(0), out_std=0.02)
    x = jax.random.normal(jax.random.key(3), (2, T, cfg.embed_dim))
    np.testing.assert_allclose(
      _run(local, x), _run(dense, x), atol=1e-6, rtol=0
    )
    # One token short of the sequence is no longer dense (bidirectional:
    # the first and last tokens stop seeing each other).
    short = dataclasses.replace(
      spec, attention=dataclasses.replace(spec.attention, window=T - 1)
    )
    local = make_attention(cfg, short, rngs=nnx.Rngs(0), out_std=0.02)
    assert jnp.abs(_run(local, x) - _run(dense, x)).max() > 1e-4
