"""Generation: cached steps equal the full forward, for every cache layout.

The properties (docs/testing.md, docs/attention.md): prefill + token-by-token decode
gives the logits of one forward over the whole sequence; greedy decoding
with the cache gives exactly the tokens of the recompute-everything path,
including prompts longer than the window; caches hold the rows their
formulas say; sampling filters do what they claim.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import runs, sharding
from efficient_lm.generate import Generator, sample, stats_lines
from efficient_lm.models import build
from efficient_lm.training import loop
from tests.helpers import (
  ATTENTION_VARIANTS,
  REPO,
  cli_env,
  greedy_cache_equals_recompute,
  prefill_then_decode,
  small_config,
)

# name -> config overrides. Windows are shorter than the prompts below.
VARIANTS = {
  **ATTENTION_VARIANTS,
  "mixed_3local_1tglobal": {
    "model.num_layers": 4,
    "model.attention.pattern": "sliding_window,sliding_window,"
    "sliding_window,tglobal",
    "model.attention.window": 4,
    "model.attention.tglobal_block": 3,
  },
  "mixed_3local_1dense": {
    "model.num_layers": 4,
    "model.attention.pattern": "sliding_window,sliding_window,"
    "sliding_window,dense",
    "model.attention.window": 4,
  },
}


def _model(overrides, scale=1.0):
  """A float32 model; `scale` > 1 sharpens its random logits so greedy
  decoding wanders instead of repeating one token."""
  cfg = small_config(**overrides)
  model = build(cfg.model, nnx.Rngs(0))
  if scale != 1.0:
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda p: p * scale, params)
    model = nnx.merge(gd, params, rest)
  return cfg, model


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_then_decode_equals_forward(name):
  _, model = _model(VARIANTS[name])
  b, t, p = 2, 14, 8  # prompt > every window; 6 decode steps
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos = _positions(b, t)
  seg = jnp.ones((b, t), jnp.int32)
  want, _ = model(tokens, pos, seg)
  got, _ = prefill_then_decode(
    model, tokens, pos, seg, model.init_cache(b, t), p
  )
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_with_cache_equals_recompute(name):
  _, model = _model(VARIANTS[name], scale=6.0)
  prompts = [list(range(40, 52)), [7, 3, 9]]  # 12 tokens > window
  greedy_cache_equals_recompute(model, prompts, 14)


def test_rolling_cache_keeps_the_newest_window_rows():
  _, model = _model(VARIANTS["sliding_window"])
  b, p, window = 1, 12, 5
  cache = model.init_cache(b, 32)
  rows = cache["segment_0"][0]
  assert rows["k"].shape[2] == window  # [layers, B, slots, G, K]
  tokens = jnp.arange(p, dtype=jnp.int32)[None]
  _, _, cache = model(
    tokens, _positions(b, p), jnp.ones((b, p), jnp.int32), cache=cache
  )
  stored = np.sort(np.asarray(cache["segment_0"][0]["pos"][0, 0]))
  np.testing.assert_array_equal(stored, np.arange(p - window, p))


def test_padding_rows_are_not_cached():
  _, model = _model({})
  cache = model.init_cache(1, 16)
  seg = jnp.array([[1, 1, 1, 0, 0]], jnp.int32)
  _, _, cache = model(jnp.arange(5)[None], _positions(1, 5), seg, cache=cache)
  filled = np.asarray(cache["segment_0"][0]["seg"][0, 0])
  np.testing.assert_array_equal(filled[:5], [1, 1, 1, 0, 0])


@pytest.mark.parametrize(
  "name,kv_heads", [("dense_mha", 4), ("dense_gqa", 2), ("dense_mqa", 1)]
)
def test_cache_bytes_per_token_follow_the_gqa_formula(name, kv_heads):
  cfg, model = _model(VARIANTS[name])
  k = cfg.model.resolved_head_dim
  want = 2 * kv_heads * k * 4  # K and V, float32
  assert model.cache_bytes_per_token() == [want] * cfg.model.num_layers
  gen = Generator(*nnx.split(model))
  stats = gen.cache_stats(batch=3, max_len=10)
  rows = stats["cache_bytes"] - 3 * 10 * 8 * cfg.model.num_layers  # pos, seg
  assert rows == 3 * 10 * want * cfg.model.num_layers


def test_sampling_filters():
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  greedy = sample(logits, None, temperature=0.0)
  keys = [jax.random.key(i) for i in range(5)]
  for key in keys:
    np.testing.assert_array_equal(
      sample(logits, key, temperature=1.0, top_k=1), greedy
    )
    np.testing.assert_array_equal(
      sample(logits, key, temperature=1.0, top_p=1e-6), greedy
    )
  # top_k = 3: every draw is one of the three largest.
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  for key in keys:
    drawn = np.asarray(sample(logits, key, temperature=2.0, top_k=3))
    assert all(d in row for d, row in zip(drawn, top3, strict=True))
  draws = {tuple(np.asarray(sample(logits, k, temperature=2.0))) for k in keys}
  assert len(draws) > 1


def test_stats_lines_round_seconds_and_rates_and_group_counts():
  """Issue #23: `--stats` printed `prefill_s = 4.106719175999842`."""
  stats = {
    "prefill_s": 4.106719175999842,
    "decode_s": 0.25,
    "decode_steps": 11,
    "decode_tokens_per_s": 1234.5678,
    "cache_bytes_per_token": [256, 256],
    "cache_bytes": 3696,
  }
  assert stats_lines(stats) == [
    "prefill_s = 4.107",
    "decode_s = 0.250",
    "decode_steps = 11",
    "decode_tokens_per_s = 1,234.6",
    "cache_bytes_per_token = [256, 256]",
    "cache_bytes = 3,696",
  ]


def test_seeded_sampling_is_reproducible_and_stops_at_eos():
  _, model = _model({}, scale=6.0)
  gen = Generator(*nnx.split(model))
  kw = dict(max_new_tokens=10, temperature=1.0, top_k=20)
  a, _ = gen.generate([[5, 6, 7]], seed=3, **kw)
  b, _ = gen.generate([[5, 6, 7]], seed=3, **kw)
  c, _ = gen.generate([[5, 6, 7]], seed=4, **kw)
  assert a == b and a != c
  greedy, _ = gen.generate([[5, 6, 7]], max_new_tokens=10)
  stop = greedy[0][4]
  first = greedy[0].index(stop)
  cut, _ = gen.generate([[5, 6, 7]], max_new_tokens=10, eos_id=stop)
  assert cut[0] == greedy[0][:first]


def test_too_long_is_an_error():
  _, model = _model({})
  gen = Generator(*nnx.split(model))
  with pytest.raises(ValueError, match="exceeds max_len=8"):
    gen.generate([[1, 2, 3, 4, 5]], max_new_tokens=4, max_len=8)


def test_positions_past_the_block_table_are_refused():
  _, model = _model(VARIANTS["block_sparse"])  # max_len 64
  gen = Generator(*nnx.split(model))
  gen.generate([[1] * 60], max_new_tokens=4)  # 64 positions: covered
  with pytest.raises(ValueError, match="65 positions exceed the 64"):
    gen.generate([[1] * 60], max_new_tokens=5)


def test_generation_under_the_training_mesh_rules():
  """Tensor-parallel heads on 8 fake CPU devices give the single-device
  tokens."""
  cfg, model = _model({"model.num_kv_heads": 2}, scale=6.0)
  prompts = [list(range(30, 40)), [4, 5], [9], [11, 12, 13]]
  want, _ = Generator(*nnx.split(model)).generate(prompts, max_new_tokens=8)
  mesh = sharding.make_mesh(
    type(cfg.mesh)(data=4, fsdp=1, tensor=2), jax.devices()[:8]
  )
  gd, state = nnx.split(model)
  shard = sharding.state_shardings(mesh, state)
  placed = jax.device_put(nnx.to_pure_dict(state), shard)
  nnx.replace_by_pure_dict(state, placed)
  got, _ = Generator(gd, state, mesh=mesh).generate(prompts, max_new_tokens=8)
  assert got == want


# ---------------------------------------------------------------------- CLI


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = (
          os.stat(path).st_mtime_ns,
          hashlib.sha256(f.read()).digest(),
        )
  return out


def test_cli_prints_only_completions_and_leaves_the_run_alone(tmp_path):
  """A 3 local : 1 tglobal decoder trains, then generates from its run."""
  text = "the quick brown fox jumps over the lazy dog\n" * 200
  (tmp_path / "t.txt").write_text(text)
  cfg = small_config(
    **{
      "data.source": "text",
      "data.path": str(tmp_path / "t.txt"),
      "data.tokenizer": "char",
      "train.steps": 30,
      "train.eval_every": 30,
      "train.learning_rate": 1e-2,
      "checkpoint.every_steps": 30,
      "checkpoint.async_save": False,
      "model.num_layers": 4,
      "model.attention.pattern": "sliding_window,sliding_window,"
      "sliding_window,tglobal",
      "model.attention.window": 6,
      "model.attention.tglobal_block": 4,
      "mesh.data": 8,
    }
  )
  workdir = str(tmp_path / "run")
  loop.run(cfg, workdir)
  before = _snapshot(workdir)
  prompts = ["the quick", "lazy "]
  run = runs.load_run(workdir)
  tok = run.tokenizer
  want, _ = Generator(run.graphdef, run.variables, mesh=run.mesh).generate(
    [
      ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(p)
      for p in prompts
    ],
    max_new_tokens=12,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
  )
  want_text = "".join(tok.decode(ids) + "\n" for ids in want)
  assert len(set(want[0])) > 2

  def cli(*extra):
    args = [
      sys.executable,
      "-m",
      "efficient_lm.generate",
      f"--workdir={workdir}",
      "--max_new_tokens=12",
      *extra,
    ]
    args += [f"--prompt={p}" for p in prompts]
    return subprocess.run(
      args,
      cwd=REPO,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
    )

  cached = cli("--stats")
  assert cached.stdout == want_text
  assert "cache_bytes_per_token" in cached.stderr
  assert cli("--use_cache=false").stdout == want_text
  assert _snapshot(workdir) == before


# Routed models (issue #25): the recompute path (`use_cache=False`) must
# route causally as the cached steps do, never by training's top-k.
ROUTED = {
  "mod_mlp": {"model.routing.kind": "mod", "model.routing.predictor": "mlp"},
  "mor_expert": {
    "model.routing.kind": "mor",
    "model.routing.sharing": "cycle",
    "model.routing.num_recursions": 2,
  },
}


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_routed_greedy_with_cache_equals_recompute(name):
  _, model = _model(ROUTED[name], scale=6.0)
  greedy_cache_equals_recompute(model, [list(range(40, 52)), [7, 3, 9]], 10)


def _chi2(counts, probs):
  n = counts.sum()
  return float(np.sum((counts - n * probs) ** 2 / (n * probs)))


@pytest.mark.parametrize(
  "temperature,top_k,top_p",
  [(2.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.5, 0, 0.8)],
)
def test_sampled_frequencies_follow_the_filtered_softmax(
  temperature, top_k, top_p
):
  """Issue #25: the distribution itself, not membership. 40000 draws at a
  fixed key against softmax(logits / T) restricted to the kept tokens (the
  k largest; the smallest prefix by probability whose mass reaches top_p)
  and renormalised: nothing outside, chi-square below its 1e-4 tail (a
  temperature applied twice moves it by thousands)."""
  logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
  n, v = 40000, logits.size
  z = logits / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  kept = np.ones(v, bool)
  if top_k:
    kept[order[top_k:]] = False
  if top_p < 1.0:
    before = np.cumsum(p[order]) - p[order]
    kept[order[before >= top_p]] = False
  assert 1 < kept.sum() < v or (not top_k and top_p == 1.0)
  want = np.where(kept, p, 0.0) / p[kept].sum()
  drawn = sample(
    jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, v)),
    jax.random.key(3),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )
  counts = np.bincount(np.asarray(drawn), minlength=v)
  assert counts[~kept].sum() == 0
  # chi-square 1e-4 upper tail for df = kept - 1 <= 7: at most 29.9.
  assert _chi2(counts[kept], want[kept]) < 29.9, (counts, n * want)


# Layers held apart for generation on CPU (issue #26): the Generator's
# default there runs each layer on its own arrays (views of the stacked
# memory) instead of slicing them out of the stack every step. (MoR's
# shared blocks are separate modules already.)
UNROLLED = {
  "pattern_3local_1tglobal": VARIANTS["mixed_3local_1tglobal"],
  "per_layer_shapes": {
    "model.num_layers": 3,
    "model.per_layer.mlp_dim": (128, 96, 128),
  },
  "mod": {**ROUTED["mod_mlp"], "model.num_layers": 4},
  "hourglass": {
    "model.kind": "hourglass",
    "model.num_layers": 3,
    "model.funnel.stages": (1, 1, 1),
    "model.funnel.factor": 2,
  },
}


def _stacks(gen):
  from efficient_lm.models.stack import Stack

  return [n for _, n in nnx.iter_graph(gen.model()) if isinstance(n, Stack)]


def _steps(gen, tokens, p):
  """Logits of a prefill of `p` tokens, then one per decode step."""
  b, t = tokens.shape
  cache = gen.model().init_cache(b, t)
  lens = jnp.full((b,), p, jnp.int32)
  logits, cache = gen._prefill(gen.variables, cache, tokens[:, :p], lens)
  out = [logits]
  for i in range(p, t):
    logits, cache = gen._decode(
      gen.variables, cache, tokens[:, i], jnp.full((b,), i, jnp.int32)
    )
    out.append(logits)
  return np.stack(out)


@pytest.mark.parametrize("name", sorted(UNROLLED))
def test_unrolled_layers_decode_as_the_stack(name):
  _, model = _model(UNROLLED[name], scale=6.0)
  gd, variables = nnx.split(model)
  stacked = Generator(gd, variables, unroll_layers=False)
  unrolled = Generator(gd, variables)  # the default on one CPU device
  assert _stacks(unrolled) and all(s.unrolled for s in _stacks(unrolled))
  assert not any(s.unrolled for s in _stacks(stacked))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 300)
  np.testing.assert_allclose(
    _steps(unrolled, tokens, 6), _steps(stacked, tokens, 6), atol=2e-5
  )


def test_unrolled_layers_share_the_stacked_memory():
  _, model = _model({"model.num_layers": 3})
  gd, variables = nnx.split(model)
  spans = [
    (a.unsafe_buffer_pointer(), a.nbytes)
    for a in jax.tree.leaves(variables)
    if a.ndim and a.shape[0] == 3  # the layers' stacked arrays
  ]
  unrolled = Generator(gd, variables)
  views = [
    a
    for s in _stacks(unrolled)
    for a in jax.tree.leaves(nnx.state(s, nnx.Param))
  ]
  assert len(views) == 3 * len(spans)
  for a in views:
    ptr = a.unsafe_buffer_pointer()
    assert any(lo <= ptr < lo + n for lo, n in spans), "a copy"


def test_unrolls_by_default_float32_weights_on_one_cpu_only():
  from efficient_lm.generate import unrolls_by_default

  _, model = _model({})
  _, variables = nnx.split(model)
  assert unrolls_by_default(variables)
  narrow = jax.tree.map(
    lambda a: a.astype(jnp.bfloat16) if a.ndim >= 2 else a, variables
  )
  assert not unrolls_by_default(narrow)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  replicated = jax.device_put(
    variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  )
  assert not unrolls_by_default(replicated)
