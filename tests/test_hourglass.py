"""Hourglass (causal funnel decoder, docs/funnel.md).

Properties: factor 1 is the plain decoder of the same layers; the model is
causal at every t (perturbation, every group boundary included, and the
Jacobian) while the no-shift variant leaks; packed documents do not leak
into each other and one packed at a multiple of the factor equals its own
run; slots match a brute-force pooling; prefill + decode equals the forward
for prompts at and off group boundaries; cached greedy generation equals
recomputation; FLOPs match XLA's count; config errors are one line.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import aot
from efficient_lm import config as config_lib
from efficient_lm.models import build, flops, hourglass
from efficient_lm.models.decoder import Decoder
from tests.helpers import (
  greedy_cache_equals_recompute,
  override,
  packed_batch,
  small_config,
)

K = 4  # pooling factor
T = 16
BASE = {
  "model.kind": "hourglass",
  "model.num_layers": 3,
  "model.funnel.stages": (1, 1, 1),
  "model.funnel.factor": K,
  "data.seq_len": T,
}
# The attention family through `attention.pattern`: the shortened layer is
# a sliding window of 9 positions (3 slots).
WINDOWED = {
  **BASE,
  "model.attention.pattern": "dense,sliding_window,sliding_window",
  "model.attention.window": 9,
}


def _cfg(**overrides):
  return small_config(**{**BASE, **overrides})


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@pytest.fixture(scope="module")
def models():
  """The model and its no-shift variant (same seed, same parameters)."""
  cfg = _cfg()
  model = build(cfg.model, nnx.Rngs(0))
  leaky = hourglass.Hourglass(cfg.model, nnx.Rngs(0), shift=False)
  return model, leaky


def _hidden_fn(model):
  """Jitted embedded input x [1, T, D] -> last hidden [1, T, D]."""
  gd, state = nnx.split(model)

  @jax.jit
  def f(state, x):
    m = nnx.merge(gd, state)
    return m.hidden(
      x, _positions(1, x.shape[1]), jnp.ones(x.shape[:2], jnp.int32)
    )[0]

  return lambda x: f(state, x)


def _leaks(model):
  """Every t where replacing inputs after t moved an output <= t."""
  f = _hidden_fn(model)
  d = model.embed_dim
  x = jax.random.normal(jax.random.key(0), (1, T, d))
  base = f(x)
  leaks = []
  for t in range(T - 1):
    other = x.at[:, t + 1 :].set(
      jax.random.normal(jax.random.key(t + 1), (1, T - t - 1, d))
    )
    if jnp.abs(f(other)[:, : t + 1] - base[:, : t + 1]).max() > 1e-6:
      leaks.append(t)
  return leaks


def _future_jacobian(model):
  """max over t, s > t of |d (w . out[t]) / d in[s]| for a random w (one
  backward pass per t instead of one per output element)."""
  f = _hidden_fn(model)
  x = jax.random.normal(jax.random.key(1), (1, T, model.embed_dim))
  w = jax.random.normal(jax.random.key(2), (model.embed_dim,))
  jac = jax.jacrev(lambda x: f(x)[0] @ w)(x)[:, 0]  # [T, T, D]
  norm_TT = jnp.abs(jac).max(axis=2)
  return float(jnp.triu(norm_TT, k=1).max())


def test_causal_at_every_position_and_group_boundary(models):
  model, _ = models
  assert _leaks(model) == []
  assert _future_jacobian(model) == 0.0


def test_the_no_shift_variant_leaks(models):
  """Without the k - 1 shift, index jk sees jk+1..jk+k-1: every t that is
  not the last of its group leaks (the check can see the classic bug)."""
  _, leaky = models
  assert _leaks(leaky) == [t for t in range(T - 1) if t % K != K - 1]
  assert _future_jacobian(leaky) > 0.0


def test_factor_1_is_the_plain_decoder():
  """The valley adds the shortened layers' update, so with factor 1 the
  model is the decoder of the same four layers (parameters copied)."""
  cfg = _cfg(
    **{
      "model.num_layers": 4,
      "model.funnel.stages": (1, 2, 1),
      "model.funnel.factor": 1,
      "model.tie_embeddings": False,
    }
  )
  hg = build(cfg.model, nnx.Rngs(0))
  dec = Decoder(cfg.model, nnx.Rngs(1))
  layers = [
    nnx.state(s.groups["segment_0"]["layer_0"], nnx.Param)
    for s in (hg.pre, hg.short, hg.post)
  ]
  nnx.update(
    dec.stack.groups["segment_0"]["layer_0"],
    jax.tree.map(lambda *a: jnp.concatenate(a), *layers),
  )
  for name in ("embed", "final_norm"):
    nnx.update(getattr(dec, name), nnx.state(getattr(hg, name)))
  dec.head_DV[...] = hg.head_DV[...]
  batch = packed_batch(2, T, 300, seed=3)
  args = [jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids")]
  want, _ = jax.jit(dec)(*args)
  got, _ = jax.jit(hg)(*args)
  assert jnp.abs(want).max() > 0
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_packed_documents_do_not_leak(models):
  """Two documents and padding in one row. At an offset off the group grid
  the second document's first group would mix both; changing the first
  document must not move the second's outputs (nor the reverse). At an
  offset on the grid each document equals its own run."""
  model, _ = models
  f = jax.jit(lambda tok, pos, seg: model(tok, pos, seg)[0])
  tok = jax.random.randint(jax.random.key(5), (1, T), 0, 300)
  other = jax.random.randint(jax.random.key(6), (1, T), 0, 300)
  for cut in (6, 8):
    end = T - 2
    pos = np.zeros((1, T), np.int32)
    seg = np.zeros((1, T), np.int32)
    pos[0, :cut], pos[0, cut:end] = np.arange(cut), np.arange(end - cut)
    seg[0, :cut], seg[0, cut:end] = 1, 2
    base = f(tok, pos, seg)
    first = tok.at[:, :cut].set(other[:, :cut])
    np.testing.assert_array_equal(
      f(first, pos, seg)[:, cut:end], base[:, cut:end]
    )
    second = tok.at[:, cut:].set(other[:, cut:])
    np.testing.assert_array_equal(f(second, pos, seg)[:, :cut], base[:, :cut])
    alone_first = f(tok[:, :cut], pos[:, :cut], seg[:, :cut])
    np.testing.assert_allclose(base[:, :cut], alone_first, atol=2e-5, rtol=0)
    if cut % K == 0:
      n = end - cut
      alone = f(tok[:, cut:end], pos[:, cut:end], np.ones((1, n), np.int32))
      np.testing.assert_allclose(base[:, cut:end], alone, atol=2e-5, rtol=0)


def _brute_shorten(h, pos, seg, k, shift):
  b, t, d = h.shape
  n = -(-t // k)
  s = k - 1 if shift else 0
  x = np.zeros((b, n, d), np.float64)
  p = np.zeros((b, n), np.int64)
  g = np.zeros((b, n), np.int64)
  for r in range(b):
    for j in range(n):
      last = j * k + k - 1 - s  # the slot's last input index
      p[r, j], g[r, j] = (pos[r, last], seg[r, last]) if last < t else (0, 0)
      for i in range(last - k + 1, last + 1):
        if 0 <= i < t and seg[r, i] == g[r, j]:
          x[r, j] += h[r, i] / k
  return x, p, g


@pytest.mark.parametrize(
  "t,k,shift",
  [(16, 4, True), (15, 4, True), (18, 3, True), (16, 4, False), (8, 1, True)],
)
def test_slots_and_upsampling_match_brute_force(t, k, shift):
  batch = packed_batch(3, t, 10, seed=t + k)
  pos, seg = batch["positions"], batch["segment_ids"]
  h = np.random.default_rng(0).normal(size=(3, t, 5)).astype(np.float32)
  got = hourglass.shorten(
    jnp.asarray(h), jnp.asarray(pos), jnp.asarray(seg), k, shift=shift
  )
  want_x, want_pos, want_seg = _brute_shorten(h, pos, seg, k, shift)
  np.testing.assert_array_equal(got.pos_BT, want_pos)
  np.testing.assert_array_equal(got.seg_BT, want_seg)
  np.testing.assert_allclose(got.x_BTD, want_x, atol=1e-6, rtol=0)
  d = np.random.default_rng(1).normal(size=want_x.shape).astype(np.float32)
  up = hourglass.upsample(jnp.asarray(d), got.seg_BT, jnp.asarray(seg), k)
  want_up = np.zeros_like(h)
  for r in range(3):
    for i in range(t):
      if want_seg[r, i // k] == seg[r, i]:
        want_up[r, i] = d[r, i // k]
  np.testing.assert_array_equal(up, want_up)


def _stepper(model):
  gd, state = nnx.split(model)

  @jax.jit
  def step(state, tok, pos, seg, cache):
    return nnx.merge(gd, state)(tok, pos, seg, cache=cache)[::2]

  return lambda *a: step(state, *a)


@pytest.mark.parametrize(
  "overrides,prompts",
  [
    (BASE, (1, K - 1, K, K + 1)),  # off and on group boundaries
    (WINDOWED, (K + 1,)),
  ],
  ids=["dense", "windowed"],
)
def test_prefill_then_decode_equals_forward(overrides, prompts):
  cfg = small_config(**overrides)
  model = build(cfg.model, nnx.Rngs(2))
  b, t = 2, 14  # not a multiple of K
  tok = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos, seg = _positions(b, t), jnp.ones((b, t), jnp.int32)
  want, _ = jax.jit(model)(tok, pos, seg)
  step = _stepper(model)
  for p in prompts:
    logits, cache = step(
      tok[:, :p], pos[:, :p], seg[:, :p], model.init_cache(b, t)
    )
    outs = [logits]
    for i in range(p, t):
      logits, cache = step(
        tok[:, i : i + 1], pos[:, i : i + 1], seg[:, i : i + 1], cache
      )
      outs.append(logits)
    np.testing.assert_allclose(
      jnp.concatenate(outs, 1),
      want,
      atol=2e-5,
      rtol=0,
      err_msg=f"prompt of {p}",
    )


def test_shortened_layers_cache_one_row_per_group(models):
  model, _ = models
  max_len, p = 14, 9
  cache = model.init_cache(1, max_len)
  slots = lambda c: c["segment_0"][0]["pos"].shape[-1]
  assert slots(cache["pre"]) == max_len
  assert slots(cache["short"]) == -(-max_len // K)
  tok = jnp.arange(p, dtype=jnp.int32)[None]
  _, cache = _stepper(model)(
    tok, _positions(1, p), jnp.ones((1, p), jnp.int32), cache
  )
  rows = cache["short"]["segment_0"][0]
  np.testing.assert_array_equal(rows["pos"][0, 0], [0, 4, 8, 0])
  np.testing.assert_array_equal(rows["seg"][0, 0], [1, 1, 1, 0])
  per_token = model.cache_bytes_per_token()
  assert per_token[1] * K == per_token[0]


def test_greedy_with_cache_equals_recompute():
  """Rows of different lengths complete their groups at different steps."""
  model = build(_cfg().model, nnx.Rngs(0))
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  model = nnx.merge(gd, jax.tree.map(lambda p: p * 6.0, params), rest)
  greedy_cache_equals_recompute(model, [list(range(40, 47)), [7, 3, 9]], 13)


def test_flops_per_token_within_5_percent_of_xla():
  # Unrolled layers (XLA counts a scan body once). Factor 2 over 2 of 4
  # layers: 2 + 2/2 = 3 full-length layer equivalents.
  cfg = small_config(
    **{
      **BASE,
      "model.num_layers": 4,
      "model.funnel.stages": (1, 2, 1),
      "model.funnel.factor": 2,
      "model.embed_dim": 256,
      "model.mlp_dim": 768,
      "model.scan_layers": False,
      "data.seq_len": 128,
      "train.batch_size": 4,
    }
  )
  _, _, compiled = aot.compile_train_step(cfg, jax.devices()[:1])
  b, s = cfg.train.batch_size, cfg.data.seq_len
  ours = flops.flops_per_token(cfg.model, s)
  xla = aot.xla_flops(compiled)
  assert abs(xla / (ours["train"] * b * s) - 1) < 0.05, (xla, ours)
  plain = flops.flops_per_token(
    small_config(
      **{"model.num_layers": 4, "model.embed_dim": 256, "model.mlp_dim": 768}
    ).model,
    s,
  )
  layers = plain["forward/mlp"] + plain["forward/attention_proj"]
  hg_layers = ours["forward/mlp"] + ours["forward/attention_proj"]
  assert hg_layers == pytest.approx(layers * 3 / 4)


def test_pooled_visible_keys_count_slots_in_positions():
  """A window of 9 positions over slots 4 apart sees 3 slots; dense sees
  every earlier slot."""
  cfg = small_config(**WINDOWED).model
  plan = hourglass.layer_plan(cfg)
  assert [s.stage for s in plan] == [0, 1, 0]
  np.testing.assert_array_equal(
    flops._pooled_visible_keys(plan[1], 32, K), np.minimum(np.arange(8) + 1, 3)
  )
  dense = hourglass.layer_plan(_cfg().model)[1]
  np.testing.assert_array_equal(
    flops._pooled_visible_keys(dense, 32, K), np.arange(8) + 1
  )


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      {"model.funnel.stages": (2, 1)},
      r"model.funnel.stages=\(2, 1\): hourglass expects 3",
    ),
    (
      {"model.funnel.stages": (1, 1, 2)},
      r"model.funnel.stages=\(1, 1, 2\) sum to 4, not model.num_layers=3",
    ),
    ({"model.funnel.stages": (2, 0, 1)}, "at least one shortened layer"),
    ({"model.funnel.factor": 0}, "model.funnel.factor=0: expected >= 1"),
    (
      {"data.seq_len": 18},
      "data.seq_len=18 is not divisible by model.funnel.factor=4",
    ),
    (
      {
        "model.attention.pattern": "sliding_window,tglobal,sliding_window",
        "model.attention.window": 4,
      },
      "layer 1 is shortened and tglobal",
    ),
  ],
)
def test_config_errors_are_one_line(overrides, message):
  cd = override(_config_dict(), **{**BASE, **overrides})
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.from_config_dict(cd)
  assert "\n" not in str(e.value)


def _config_dict():
  from configs import base

  cd = base.get_config()
  cd.model.num_layers, cd.model.num_heads, cd.model.num_kv_heads = 3, 4, 2
  cd.mesh.data = 1
  return cd
