"""Decoder properties: causality, packing, scan/remat/jit equivalence, the
layer plan's patterns, and what each residual path contributes."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import models
from efficient_lm.models import stack
from efficient_lm.models.attention import Tokens
from efficient_lm.models.block import Block
from tests.helpers import small_config


def _model(**overrides):
  cfg = small_config(**overrides)
  return cfg, models.build(cfg.model, nnx.Rngs(params=1))


def _logits(model, *args):
  logits, aux = model(*args)
  assert aux == {}  # the plain decoder reports no aux entries
  return logits


def _inputs(b, t, vocab, seed=0):
  tok = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return tok, pos, jnp.ones((b, t), jnp.int32)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


_KINDS = [
  ("dense", {}),
  ("sliding_window", {"model.attention.window": 5}),
  (
    "global_local",
    {"model.attention.window": 4, "model.attention.num_global": 3},
  ),
  (
    "pattern",
    {
      "model.attention.pattern": "sliding_window,dense",
      "model.attention.window": 3,
      "model.num_layers": 4,
    },
  ),
]


@pytest.mark.parametrize("kind,extra", _KINDS, ids=[k for k, _ in _KINDS])
def test_causality_perturbation(kind, extra):
  if kind != "pattern":
    extra = {"model.attention.kind": kind, **extra}
  cfg, model = _model(**extra)
  t_len = 24
  tok, pos, seg = _inputs(2, t_len, cfg.model.vocab_size)
  base = _logits(model, tok, pos, seg)
  for t in (0, 3, 7, 8, 15, 22):
    other = jax.random.randint(
      jax.random.key(t + 100), tok.shape, 0, cfg.model.vocab_size
    )
    perturbed = tok.at[:, t + 1 :].set(other[:, t + 1 :])
    out = _logits(model, perturbed, pos, seg)
    np.testing.assert_allclose(
      out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0
    )
    # The perturbation is real: later logits do change.
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-4)


def test_causality_jacobian():
  """d logits[t] / d embedding[s] == 0 for s > t (through the whole net)."""
  cfg, model = _model(**{"model.num_layers": 1})
  t_len = 8
  tok, pos, seg = _inputs(1, t_len, cfg.model.vocab_size)
  emb = jnp.take(model.embed.table_VD[...], tok, axis=0)

  def f(e):
    x, _ = model.stack(e, pos, seg)
    return model.final_norm(x).sum(-1)[0]  # [T]

  jac = jax.jacfwd(f)(emb)[:, 0]  # [T_out, T_in, D]
  influence = np.abs(np.asarray(jac)).sum(-1)
  assert np.all(influence[np.triu_indices(t_len, k=1)] == 0.0)
  assert np.all(np.diag(influence) > 0)


@pytest.mark.parametrize(
  "extra",
  [
    {},
    # The window edge (4 tokens) falls inside both packed documents, and the
    # second document's global prefix sits in the middle of the row: masks
    # and RoPE must come from positions, not array indices.
    {
      "model.attention.kind": "global_local",
      "model.attention.window": 4,
      "model.attention.num_global": 2,
    },
    {"model.attention.kind": "sliding_window", "model.attention.window": 6},
  ],
  ids=["dense", "global_local", "sliding_window"],
)
def test_packing_equals_separate_documents(extra):
  cfg, model = _model(**extra)
  len_a, len_b, t_len = 11, 14, 32
  tok, _, _ = _inputs(1, t_len, cfg.model.vocab_size, seed=3)
  pos = np.zeros((1, t_len), np.int32)
  seg = np.zeros((1, t_len), np.int32)
  pos[0, :len_a] = np.arange(len_a)
  pos[0, len_a : len_a + len_b] = np.arange(len_b)
  seg[0, :len_a], seg[0, len_a : len_a + len_b] = 1, 2
  packed = _logits(model, tok, jnp.asarray(pos), jnp.asarray(seg))

  def alone(start, n):
    return _logits(
      model,
      tok[:, start : start + n],
      jnp.arange(n, dtype=jnp.int32)[None],
      jnp.ones((1, n), jnp.int32),
    )

  np.testing.assert_allclose(packed[:, :len_a], alone(0, len_a), atol=1e-5)
  np.testing.assert_allclose(
    packed[:, len_a : len_a + len_b], alone(len_a, len_b), atol=1e-5
  )
  # Padding rows are defined (zeros from attention, finite logits).
  assert np.isfinite(np.asarray(packed)).all()


def test_sliding_window_edge():
  """Window 4 = the token and the 3 before it: in one layer, logit t moves
  with token t-3 and not with token t-4."""
  cfg, model = _model(
    **{
      "model.num_layers": 1,
      "model.attention.kind": "sliding_window",
      "model.attention.window": 4,
    }
  )
  tok, pos, seg = _inputs(1, 16, cfg.model.vocab_size)
  base = _logits(model, tok, pos, seg)
  t = 10
  for back, moves in ((4, False), (3, True)):
    changed = tok.at[0, t - back].set(
      (tok[0, t - back] + 1) % cfg.model.vocab_size
    )
    out = _logits(model, changed, pos, seg)
    assert np.allclose(out[0, t], base[0, t], atol=1e-6) != moves, back


@pytest.mark.parametrize("num_layers", [4, 12])
def test_scan_is_a_compile_switch(num_layers):
  """Same seed -> same parameters scanned or unrolled, same logits; 12
  layers catch a string ordering of layer names (layer_10 < layer_2)."""
  over = {"model.num_layers": num_layers}
  cfg, scanned = _model(**over, **{"model.scan_layers": True})
  _, unrolled = _model(**over, **{"model.scan_layers": False})
  jax.tree.map(
    np.testing.assert_array_equal, _params(scanned), _params(unrolled)
  )
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)
  np.testing.assert_allclose(
    _logits(unrolled, tok, pos, seg), _logits(scanned, tok, pos, seg), atol=1e-5
  )


def _reference_forward(cfg, model, kinds, tok, pos, seg):
  """Runs the layers one by one, in order, layer l with attention kind
  kinds[l % len(kinds)], using the model's stacked parameters."""
  plan = stack.layer_plan(cfg.model)
  segment = model.stack.segments[0]
  stacks = _params(model)["stack"]["groups"]["segment_0"]
  x = model.embed(tok, jnp.float32)
  for layer in range(cfg.model.num_layers):
    j, r = layer % len(segment.pattern), layer // len(segment.pattern)
    spec = dataclasses.replace(
      plan[layer],
      attention=dataclasses.replace(
        plan[layer].attention, kind=kinds[layer % len(kinds)]
      ),
    )
    block = Block(cfg.model, spec, nnx.Rngs(params=0))
    nnx.update(block, jax.tree.map(lambda a: a[r], stacks[f"layer_{j}"]))
    x, _ = block(x, pos, seg)
  return model.embed.attend(model.final_norm(x))


def test_pattern_layers_use_their_own_masks():
  cfg, model = _model(
    **{
      "model.num_layers": 4,
      "model.attention.window": 2,
      "model.attention.pattern": "sliding_window,dense",
    }
  )
  assert [s.attention.kind for s in stack.layer_plan(cfg.model)] == [
    "sliding_window",
    "dense",
  ] * 2
  assert len(model.stack.segments) == 1  # one scan over groups
  assert model.stack.segments[0].repeats == 2
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)
  got = _logits(model, tok, pos, seg)
  want = _reference_forward(
    cfg, model, ["sliding_window", "dense"], tok, pos, seg
  )
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The test has teeth: ignoring the pattern (all dense, all windowed, or
  # the pattern shifted by one layer) gives other logits.
  for wrong in (["dense"], ["sliding_window"], ["dense", "sliding_window"]):
    other = _reference_forward(cfg, model, wrong, tok, pos, seg)
    assert not np.allclose(other, want, atol=1e-3), wrong


def test_pattern_scanned_equals_unrolled_loss_and_gradients():
  over = {
    "model.num_layers": 4,
    "model.attention.window": 3,
    "model.attention.pattern": "sliding_window,dense",
  }
  cfg, scanned = _model(**over, **{"model.scan_layers": True})
  _, unrolled = _model(**over, **{"model.scan_layers": False})
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)

  def loss(m):
    return _logits(m, tok, pos, seg).var()

  l_s, g_s = nnx.value_and_grad(loss)(scanned)
  l_u, g_u = nnx.value_and_grad(loss)(unrolled)
  np.testing.assert_allclose(l_s, l_u, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def test_segments_of_a_mixed_plan():
  """A plan that does not repeat is cut into runs of identical specs."""
  a = stack.LayerSpec(attention=small_config().model.attention)
  b = dataclasses.replace(a, causal=False)
  assert stack.segments((a, a, b)) == (
    stack.Segment((a,), 2),
    stack.Segment((b,), 1),
  )
  assert stack.segments((a, b, a, b)) == (stack.Segment((a, b), 2),)
  assert stack.segments((a,)) == (stack.Segment((a,), 1),)


def test_zeroed_output_projections_leave_the_embedding():
  """With every residual branch's output projection zeroed, logits are the
  head applied to the normalised embeddings: the residual path carries x
  and only the branches add to it."""
  cfg, model = _model()
  params = _params(model)
  layer = params["stack"]["groups"]["segment_0"]["layer_0"]
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)
  want = model.embed.attend(model.final_norm(model.embed(tok, jnp.float32)))
  layer["attn"]["o_HKD"] = jnp.zeros_like(layer["attn"]["o_HKD"])
  nnx.update(model, params)
  with_mlp = _logits(model, tok, pos, seg)
  assert not np.allclose(with_mlp, want, atol=1e-3)  # the MLP adds to x
  layer["mlp"]["down_FD"] = jnp.zeros_like(layer["mlp"]["down_FD"])
  nnx.update(model, params)
  np.testing.assert_allclose(_logits(model, tok, pos, seg), want, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(remat):
  cfg, model = _model(**{"model.remat": "none"})
  _, model_r = _model(**{"model.remat": remat})
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)

  def loss(m):
    return _logits(m, tok, pos, seg).astype(jnp.float32).var()

  g = nnx.grad(loss)(model)
  g_r = nnx.grad(loss)(model_r)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_policy_is_in_the_jaxpr(remat, scan):
  """The configured policy wraps the layer body, scanned or unrolled."""
  cfg, model = _model(**{"model.remat": remat, "model.scan_layers": scan})
  tok, pos, seg = _inputs(1, 8, cfg.model.vocab_size)
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tok, pos, seg)[0])(
    params
  )
  found = []

  def walk(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name in ("checkpoint", "remat2", "remat"):
        found.append(eqn.params["policy"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  if remat == "none":
    assert found == []
  else:
    want = stack.REMAT_POLICIES[remat]
    layers = 1 if scan else cfg.model.num_layers
    assert found == [want] * layers, found


def test_jit_matches_eager_and_bf16_is_close():
  cfg, model = _model()
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)
  eager = _logits(model, tok, pos, seg)
  jitted = nnx.jit(lambda m, *a: m(*a)[0])(model, tok, pos, seg)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  _, model_bf16 = _model(**{"model.dtype": "bfloat16"})
  out = _logits(model_bf16, tok, pos, seg)
  assert out.dtype == jnp.float32  # logits always float32
  np.testing.assert_allclose(out, eager, atol=5e-2)


def test_decoder_1b_shapes_and_param_count():
  """Full-size config shape-checked with eval_shape (nothing allocated);
  the count from the parameter tree matches the closed form."""
  from configs import decoder_1b
  from efficient_lm import config as config_lib
  from efficient_lm.models import flops

  cfg = config_lib.from_config_dict(decoder_1b.get_config())
  model = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(params=0)))
  m = cfg.model
  d, h, g, k, f, v = (
    m.embed_dim,
    m.num_heads,
    m.num_kv_heads,
    m.resolved_head_dim,
    m.mlp_dim,
    m.vocab_size,
  )
  per_layer = d * h * k * 2 + d * g * k * 2 + 3 * d * f + 2 * d
  total = m.num_layers * per_layer + v * d * (1 if m.tie_embeddings else 2)
  total += d  # final norm
  count = flops.param_count(nnx.state(model, nnx.Param))
  assert count == {"total": total, "non_embedding": total - v * d}
  assert 1.0e9 < total < 1.3e9
  b, t = 2, cfg.data.seq_len
  out, aux = nnx.eval_shape(
    lambda m: m(
      jnp.zeros((b, t), jnp.int32),
      jnp.zeros((b, t), jnp.int32),
      jnp.ones((b, t), jnp.int32),
    ),
    model,
  )
  assert out.shape == (b, t, cfg.model.vocab_size) and aux == {}


def test_attention_takes_separate_queries_and_keys():
  """Queries from one sequence over keys/values of another (the pooled-
  query and cached-key case): equals the rows of a joint self-attention
  whose keys are the kv sequence, and the kv side's positions matter."""
  cfg, model = _model(**{"model.num_layers": 1})
  params = jax.tree.map(
    lambda a: a[0], _params(model)["stack"]["groups"]["segment_0"]["layer_0"]
  )
  block = Block(cfg.model, stack.layer_plan(cfg.model)[0], nnx.Rngs(params=0))
  nnx.update(block, params)
  x = jax.random.normal(jax.random.key(0), (1, 12, cfg.model.embed_dim))
  pos = jnp.arange(12, dtype=jnp.int32)[None]
  seg = jnp.ones((1, 12), jnp.int32)
  full = block.attn(Tokens(x, pos, seg))
  # Queries = the last 4 tokens; keys/values = all 12.
  q = Tokens(x[:, 8:], pos[:, 8:], seg[:, 8:])
  part = block.attn(q, Tokens(x, pos, seg))
  np.testing.assert_allclose(part, full[:, 8:], atol=1e-5)
  shifted = block.attn(q, Tokens(x, pos + 3, seg))  # keys 3 later: some
  assert not np.allclose(shifted, part, atol=1e-4)  # become "future"
