"""The int8 KV cache (`--kv_cache_dtype=int8`, models/cache.py).

Properties: a row's quantization is the NumPy absmax reference exactly;
for every cache layout, prefill + decode over an int8 cache gives the
logits of one forward that reads its K/V through the same quantization
(cache = recompute, both quantized); on a trained tiny model greedy tokens
with the int8 cache are those of the float cache; the cache's bytes per
token, measured from its arrays, are half of bfloat16's plus the scales;
an unknown dtype is one `error:` line.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from efficient_lm.generate import Generator
from efficient_lm.models import build, set_kv_cache_dtype
from efficient_lm.models import cache as cache_lib
from efficient_lm.training import loop
from tests.helpers import (
  ATTENTION_VARIANTS,
  REPO,
  cli_env,
  prefill_then_decode,
  small_config,
)


def _np_quantize(x):
  """The reference: scale = max|x| / 127 over the last axis, rounded to
  bfloat16; q = clip(round-half-even(x / scale), -127, 127); scale 0 for
  an all-zero row (q 0)."""
  x = np.asarray(x, np.float32)
  amax = np.abs(x).max(-1, keepdims=True)
  scale = (amax / np.float32(127)).astype(ml_dtypes.bfloat16)
  s = scale.astype(np.float32)
  q = np.clip(np.round(x / np.where(s == 0, 1, s)), -127, 127)
  return q.astype(np.int8), scale[..., 0]


def test_quantize_a_cache_row_like_numpy():
  rng = np.random.default_rng(0)
  # [B, S, G, K] rows of very different magnitudes, one all zero.
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  x *= 10.0 ** rng.integers(-4, 3, (2, 5, 3, 1))
  x[0, 1, 2] = 0.0
  q, scale = cache_lib.quantize(jnp.asarray(x))
  want_q, want_scale = _np_quantize(x)
  assert q.dtype == jnp.int8 and q.shape == x.shape
  assert scale.dtype == jnp.bfloat16 and scale.shape == x.shape[:-1]
  np.testing.assert_array_equal(np.asarray(scale), want_scale)
  np.testing.assert_array_equal(np.asarray(q), want_q)
  # Every row's max reaches the grid's end (a bfloat16 scale rounded down
  # is clipped there), and the round trip is within half a step.
  assert (np.abs(want_q).max(-1)[want_scale != 0] == 127).all()
  back = np.asarray(cache_lib.dequantize(q, scale, jnp.float32))
  np.testing.assert_array_equal(
    back, want_q.astype(np.float32) * want_scale.astype(np.float32)[..., None]
  )
  step = np.abs(x).max(-1, keepdims=True) / 127
  assert (np.abs(back - x) <= 0.51 * step + 1e-30).all()
  assert not back[0, 1, 2].any()


# Every cache layout: full, rolling with a global prefix and TGlobal's
# rolling local rows + summary rows (one model, a layer of each), MLA's
# latent, and mixture-of-recursions' shared K/V rows (Block.kv_rows);
# slow, the same attention code in other places: MLA rolling with a query
# latent, the hourglass's strided rows, MoD's routed rows, plain rolling.
LAYOUTS = {
  "dense_local_tglobal": {
    "model.num_layers": 3,
    "model.attention.pattern": "dense,global_local,tglobal",
    "model.attention.window": 4,
    "model.attention.num_global": 3,
    "model.attention.tglobal_block": 4,
  },
  "mla": ATTENTION_VARIANTS["mla"],
  "mor_sharing": {
    "model.routing.kind": "mor",
    "model.num_layers": 4,
    "model.routing.num_recursions": 2,
    "model.routing.kv": "recursive_sharing",
  },
}
SLOW_LAYOUTS = {
  "mla_qlatent_window": ATTENTION_VARIANTS["mla_qlatent_window"],
  "hourglass": {
    "model.kind": "hourglass",
    "model.num_layers": 3,
    "model.funnel.stages": (1, 1, 1),
    "model.funnel.factor": 4,
    "data.seq_len": 16,
  },
  "mod": {"model.routing.kind": "mod", "model.num_layers": 4},
  "sliding_window": ATTENTION_VARIANTS["sliding_window"],
}


@pytest.mark.parametrize(
  "name",
  [
    *LAYOUTS,
    *(pytest.param(n, marks=pytest.mark.slow) for n in SLOW_LAYOUTS),
  ],
)
def test_int8_cache_equals_recompute_with_the_same_quantization(name):
  """Tolerance 2e-5 on float32 logits, the float cache's own (test_generate):
  both paths read bit-identical int8 K/V, only the attention sums'
  order differs. The quantization itself moves the logits ~1e-3, so a
  reference that did not quantize would fail (tests/mutate.py)."""
  cfg = small_config(**{**LAYOUTS, **SLOW_LAYOUTS}[name])
  model = build(cfg.model, nnx.Rngs(0))
  b, t, p = 2, 16, 8  # prompt > every window; 8 decode steps
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 300)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  set_kv_cache_dtype(model, "int8")
  want, _ = jax.jit(lambda *a: model(*a, causal_routing=True))(tokens, pos, seg)
  cache = model.init_cache(b, t)
  kv = [a for a in jax.tree.leaves(cache) if a.dtype == jnp.int8]
  assert kv, "no int8 rows in the cache"
  got, cache = prefill_then_decode(jax.jit(model), tokens, pos, seg, cache, p)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


# ------------------------------------------------- a trained tiny model

TEXT = (
  b"the quick brown fox jumps over the lazy dog. a stitch in time saves "
  b"nine. all that glitters is not gold. the early bird catches the worm. "
)


@pytest.fixture(scope="module")
def trained():
  """A tiny decoder (2 layers, D 64, byte ids) trained 300 steps on TEXT
  (~0.01 s a step; loss 2.8 -> 0.16): its greedy continuations are
  confident, not near-ties."""
  steps = 300
  cfg = small_config(
    **{
      "train.learning_rate": 3e-3,
      "train.warmup_steps": 10,
      "train.steps": steps,
    }
  )
  t = loop.build_trainer(cfg, jax.devices()[:1])
  data = np.frombuffer(TEXT * 8, np.uint8).astype(np.int32)
  b, s = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  state = t.init_fn()
  for _ in range(steps):
    starts = rng.integers(0, len(data) - s - 1, b)
    rows = np.stack([data[i : i + s + 1] for i in starts])
    batch = {
      "inputs": rows[:, :-1],
      "targets": rows[:, 1:],
      "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)),
      "segment_ids": np.ones((b, s), np.int32),
    }
    state, m = t.train_step(state, batch)
  assert float(m["loss"]) < 0.5, float(m["loss"])
  return nnx.merge(t.graphdef, state["params"], state["model_state"])


# Greedy tokens that must agree (per prompt). Measured: the first
# disagreement comes at token 64+, 62 and 50 of the three prompts, after
# the text has left the training sentences.
AGREE = 40


def test_int8_greedy_tokens_agree_with_the_float_cache(trained):
  prompts = [list(b"the quick "), list(b"a stitch in "), list(b"all that")]
  want, _ = Generator(*nnx.split(trained)).generate(
    prompts, max_new_tokens=AGREE
  )
  got, _ = Generator(*nnx.split(trained), kv_cache_dtype="int8").generate(
    prompts, max_new_tokens=AGREE
  )
  assert got == want
  assert all(len(set(w)) > 5 for w in want), want  # it really decodes


# ------------------------------------------------------------- bytes, errors


@pytest.mark.parametrize("name", ["dense_gqa", "mla", "tglobal"])
def test_int8_cache_bytes_are_half_of_bfloat16_plus_scales(name):
  """Measured from the arrays: per-token bytes of every layer's stored
  fields, and the whole allocation (pos/seg bookkeeping aside)."""
  cfg = small_config(**ATTENTION_VARIANTS[name])
  model = build(cfg.model, nnx.Rngs(0))
  stats = {
    kind: Generator(*nnx.split(model), kv_cache_dtype=kind).cache_stats(
      batch=2, max_len=16
    )
    for kind in ("bfloat16", "int8")
  }
  bf16, int8 = (sum(stats[k]["cache_bytes_per_token"]) for k in stats)
  n = cfg.model.num_layers
  if name == "mla":  # C + R values, one bfloat16 scale each for c and kr
    c, r = 4 * 16, 8
    assert (bf16, int8) == (n * 2 * (c + r), n * (c + r + 2 * 2))
  else:  # per kv head and for K and V: K values, one bfloat16 scale
    g, k = cfg.model.num_kv_heads, cfg.model.resolved_head_dim
    assert (bf16, int8) == (n * 2 * g * k * 2, n * 2 * g * (k + 2))
    assert int8 / bf16 == 0.5 + 1 / k == 0.5625
  # The whole allocation: the same ratio once the arrays that are neither
  # K/V nor scales (int32 pos/seg, TGlobal's float32 partial block) are
  # taken out; those are the same in both caches.
  set_kv_cache_dtype(model, "bfloat16")
  cache = jax.eval_shape(lambda: model.init_cache(2, 16))
  other = sum(
    a.size * a.dtype.itemsize
    for a in jax.tree.leaves(cache)
    if a.dtype != jnp.bfloat16
  )
  rows = {k: stats[k]["cache_bytes"] - other for k in stats}
  assert rows["int8"] * bf16 == rows["bfloat16"] * int8


def test_unknown_kv_cache_dtype_is_one_error_line():
  model = build(small_config().model, nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"kv_cache_dtype='int4'.*int8$"):
    Generator(*nnx.split(model), kv_cache_dtype="int4")
  # The command line: refused before the run is even read.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.generate",
      "--workdir=/nonexistent/run",
      "--prompt=the",
      "--kv_cache_dtype=int4",
    ],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0] == (
    "error: --kv_cache_dtype='int4': expected one of auto, float32, "
    "bfloat16, int8"
  )
