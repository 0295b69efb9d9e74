"""Decoder properties: causality, packing, scan/remat/jit equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm.models import transformer
from tests.helpers import small_config


def _model(**overrides):
  cfg = small_config(**overrides)
  return cfg, transformer.build(cfg.model, nnx.Rngs(params=1))


def _inputs(b, t, vocab, seed=0):
  tok = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return tok, pos, jnp.ones((b, t), jnp.int32)


@pytest.mark.parametrize("kind,extra", [
  ("dense", {}),
  ("sliding_window", {"model.attention.window": 5}),
  ("global_local", {"model.attention.window": 4,
                    "model.attention.num_global": 3}),
])
def test_causality_perturbation(kind, extra):
  cfg, model = _model(**{"model.attention.kind": kind, **extra})
  t_len = 24
  tok, pos, seg = _inputs(2, t_len, cfg.model.vocab_size)
  base = model(tok, pos, seg)
  for t in (0, 3, 7, 8, 15, 22):
    other = jax.random.randint(jax.random.key(t + 100), tok.shape, 0,
                               cfg.model.vocab_size)
    perturbed = tok.at[:, t + 1:].set(other[:, t + 1:])
    out = model(perturbed, pos, seg)
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6,
                               rtol=0)
    # The perturbation is real: later logits do change.
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4)


def test_causality_jacobian():
  """d logits[t] / d embedding[s] == 0 for s > t (through the whole net)."""
  cfg, model = _model(**{"model.num_layers": 1})
  t_len = 8
  tok, pos, seg = _inputs(1, t_len, cfg.model.vocab_size)
  emb = jnp.take(model.embed.table_VD[...], tok, axis=0)

  def f(e):
    x = e
    graphdef, st = nnx.split(model.blocks)
    x, _ = jax.lax.scan(
      lambda h, s: (nnx.merge(graphdef, s)(h, pos, seg), None), x, st)
    return model.final_norm(x).sum(-1)[0]           # [T]

  jac = jax.jacfwd(f)(emb)[:, 0]                     # [T_out, T_in, D]
  influence = np.abs(np.asarray(jac)).sum(-1)
  assert np.all(influence[np.triu_indices(t_len, k=1)] == 0.0)
  assert np.all(np.diag(influence) > 0)


def test_packing_equals_separate_documents():
  cfg, model = _model()
  len_a, len_b, t_len = 11, 14, 32
  tok, _, _ = _inputs(1, t_len, cfg.model.vocab_size, seed=3)
  pos = np.zeros((1, t_len), np.int32)
  seg = np.zeros((1, t_len), np.int32)
  pos[0, :len_a] = np.arange(len_a)
  pos[0, len_a:len_a + len_b] = np.arange(len_b)
  seg[0, :len_a], seg[0, len_a:len_a + len_b] = 1, 2
  packed = model(tok, jnp.asarray(pos), jnp.asarray(seg))

  def alone(start, n):
    return model(tok[:, start:start + n],
                 jnp.arange(n, dtype=jnp.int32)[None],
                 jnp.ones((1, n), jnp.int32))

  np.testing.assert_allclose(packed[:, :len_a], alone(0, len_a), atol=1e-5)
  np.testing.assert_allclose(packed[:, len_a:len_a + len_b],
                             alone(len_a, len_b), atol=1e-5)
  # Padding rows are defined (zeros from attention, finite logits).
  assert np.isfinite(np.asarray(packed)).all()


def test_scan_equals_unrolled_layers():
  cfg_s, scanned = _model(**{"model.scan_layers": True})
  _, unrolled = _model(**{"model.scan_layers": False})
  p_scan = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  p_unr = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  for i in range(cfg_s.model.num_layers):
    p_unr["blocks"][f"layer_{i}"] = jax.tree.map(lambda x: x[i],
                                                 p_scan["blocks"])
  p_unr["embed"], p_unr["final_norm"] = p_scan["embed"], p_scan["final_norm"]
  nnx.update(unrolled, p_unr)
  tok, pos, seg = _inputs(2, 16, cfg_s.model.vocab_size)
  np.testing.assert_allclose(unrolled(tok, pos, seg), scanned(tok, pos, seg),
                             atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(remat):
  cfg, model = _model(**{"model.remat": "none"})
  _, model_r = _model(**{"model.remat": remat})
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)

  def loss(m):
    return m(tok, pos, seg).astype(jnp.float32).var()

  g = nnx.grad(loss)(model)
  g_r = nnx.grad(loss)(model_r)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_jit_matches_eager_and_bf16_is_close():
  cfg, model = _model()
  tok, pos, seg = _inputs(2, 16, cfg.model.vocab_size)
  eager = model(tok, pos, seg)
  jitted = nnx.jit(lambda m, *a: m(*a))(model, tok, pos, seg)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  _, model_bf16 = _model(**{"model.dtype": "bfloat16"})
  out = model_bf16(tok, pos, seg)
  assert out.dtype == jnp.float32  # logits always float32
  np.testing.assert_allclose(out, eager, atol=5e-2)


def test_decoder_1b_shapes_and_param_count():
  """Full-size config shape-checked with eval_shape (nothing allocated)."""
  from configs import decoder_1b
  from efficient_lm import config as config_lib
  cfg = config_lib.from_config_dict(decoder_1b.get_config())
  model = nnx.eval_shape(
    lambda: transformer.build(cfg.model, nnx.Rngs(params=0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == transformer.param_count(cfg.model)["total"]
  assert 1.0e9 < n < 1.3e9
  b, t = 2, cfg.data.seq_len
  out = nnx.eval_shape(
    lambda m: m(jnp.zeros((b, t), jnp.int32), jnp.zeros((b, t), jnp.int32),
                jnp.ones((b, t), jnp.int32)), model)
  assert out.shape == (b, t, cfg.model.vocab_size)


def test_pallas_interpret_training_matches_xla():
  """The model's attention goes through kernels.attention: the Pallas
  kernels (interpret mode on CPU) train exactly like the dense reference."""
  from efficient_lm.training import loop, sharding
  from tests.helpers import packed_batch
  runs = {}
  for impl in ("xla", "interpret"):
    cfg = small_config(**{"model.attention.impl": impl,
                          "model.num_layers": 1, "train.batch_size": 2})
    t = loop.build_trainer(cfg, jax.devices()[:1])
    state, losses = t.init_fn(), []
    for i in range(3):      # packed rows with padding: segments matter
      batch = sharding.host_to_global(
        t.mesh, packed_batch(2, cfg.data.seq_len, cfg.model.vocab_size, i))
      state, m = t.train_step(state, batch)
      losses.append(float(m["loss"]))
    runs[impl] = losses, jax.device_get(state["params"])
  np.testing.assert_allclose(runs["interpret"][0], runs["xla"][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               runs["interpret"][1], runs["xla"][1])


def test_gpu_kernels_interpreted_train_like_xla():
  """Same property for the GPU (Triton-lowered) kernels, interpreted."""
  from efficient_lm.training import loop, sharding
  from tests.helpers import packed_batch
  losses = {}
  for impl in ("xla", "interpret_gpu"):
    cfg = small_config(**{"model.attention.impl": impl,
                          "model.num_layers": 1, "train.batch_size": 2})
    t = loop.build_trainer(cfg, jax.devices()[:1])
    state = t.init_fn()
    batch = sharding.host_to_global(
      t.mesh, packed_batch(2, cfg.data.seq_len, cfg.model.vocab_size, 0))
    state, m = t.train_step(state, batch)
    _, m2 = t.train_step(state, batch)
    losses[impl] = [float(m["loss"]), float(m2["loss"])]
  np.testing.assert_allclose(losses["interpret_gpu"], losses["xla"],
                             rtol=1e-5)
