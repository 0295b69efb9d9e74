"""BigBird block-sparse attention (docs/attention.md).

The random-block table (strictly earlier blocks in a decoder, a fixed
function of its seed), the mask it makes with the window and the global
prefix against an element rule written here from the method, its tile
kinds, every kernel impl and the model's module against the dense
reference under the equivalent explicit mask (values and gradients),
causality (and the bidirectional form failing the same check), and
positions past the table being an error.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from efficient_lm.models import stack
from efficient_lm.models.attention import mask_spec
from efficient_lm.models.block import make_attention
from kernels import masks
from kernels.masks import EMPTY, FULL, PARTIAL, MaskSpec
from tests.helpers import assert_close, small_config
from tests.test_attention_family import T, _future_jacobian, _leaks, _run
from tests.test_kernels_attention import make_case, outputs_and_grads

# 4-token blocks over max_len 32: 8 blocks, 2 random ones per query block.
BIGBIRD = {
  "model.attention.kind": "block_sparse",
  "model.attention.window": 3,
  "model.attention.num_global": 2,
  "model.attention.block_size": 4,
  "model.attention.num_random_blocks": 2,
  "model.attention.random_seed": 3,
  "model.attention.max_len": 32,
}
F32_TOL = 1e-4


def _cfg(**overrides):
  return small_config(**{**BIGBIRD, **overrides}).model


def _table(n, r, seed, causal):
  return np.asarray(
    masks.bigbird_block_table(n, num_random_blocks=r, seed=seed, causal=causal)
  )


# ------------------------------------------------------------------ table


@pytest.mark.parametrize(
  "n,r,seed", [(1, 3, 0), (2, 3, 0), (9, 3, 1), (40, 2, 7), (40, 0, 0)]
)
def test_causal_table_draws_only_strictly_earlier_blocks(n, r, seed):
  t = _table(n, r, seed, causal=True)
  assert t.shape == (n, n)
  assert not np.triu(t).any(), "a random block at or after its query block"
  # r per query block, fewer for the first ones (fewer earlier blocks).
  np.testing.assert_array_equal(t.sum(1), np.minimum(np.arange(n), r))


@pytest.mark.parametrize("n,r,seed", [(1, 3, 0), (3, 3, 0), (40, 3, 2)])
def test_bidirectional_table_draws_from_the_other_blocks(n, r, seed):
  t = _table(n, r, seed, causal=False)
  assert not np.diag(t).any()
  np.testing.assert_array_equal(t.sum(1), np.full(n, min(r, n - 1)))
  if n > 8:  # later blocks are drawn too, not only earlier ones
    assert np.triu(t, 1).any() and np.tril(t, -1).any()


def test_table_is_a_fixed_function_of_its_arguments():
  args = dict(num_random_blocks=3, seed=5, causal=True)
  table = masks.bigbird_block_table(32, **args)
  masks.bigbird_block_table.cache_clear()
  assert masks.bigbird_block_table(32, **args) == table
  assert masks.bigbird_block_table(32, **{**args, "seed": 6}) != table
  # A causal row does not depend on the length: a longer max_len extends
  # the table rather than redrawing it.
  longer = _table(48, 3, 5, causal=True)
  np.testing.assert_array_equal(longer[:32, :32], table)
  # Nor on the process (no str hash, no global RNG state).
  code = (
    "from kernels import masks; print(masks.bigbird_block_table("
    "32, num_random_blocks=3, seed=5, causal=True) == {!r})"
  )
  env = dict(os.environ, PYTHONHASHSEED="123", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code.format(table)],
    capture_output=True,
    text=True,
    env=env,
    check=True,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_every_layer_and_head_shares_one_table():
  """All block_sparse layers of a model (and, the table having no head
  axis, all heads) use the table of the configured seed."""
  cfg = _cfg(**{"model.num_layers": 4})
  specs = [
    mask_spec(s.attention, causal=s.causal)
    for s in stack.layer_plan(cfg, causal=True)
  ]
  want = masks.bigbird_block_table(8, num_random_blocks=2, seed=3, causal=True)
  assert all(
    s.block_mask == want and s.block_mask_sizes == (4, 4) for s in specs
  )


# --------------------------------------------------------- mask and tiles


def brute_visible(a, causal, table, qp, kp, qs, ks):
  """BigBird's element rule from docs/attention.md, written independently of
  kernels.masks: same document, causal if so, then window (w tokens incl.
  self, both sides in an encoder), prefix columns, prefix rows in an
  encoder (global queries see every key), or a random block."""
  if qs != ks or qs == 0 or (causal and kp > qp):
    return False
  w = a.window
  in_window = qp - (w - 1) <= kp <= qp + (0 if causal else w - 1)
  return bool(
    in_window
    or kp < a.num_global
    or (not causal and qp < a.num_global)
    or table[qp // a.block_size][kp // a.block_size]
  )


def brute_mask(a, causal, qp, kp, qs, ks):
  table = _table(
    -(-a.max_len // a.block_size), a.num_random_blocks, a.random_seed, causal
  )
  return np.array(
    [
      [
        brute_visible(a, causal, table, qp[i], kp[j], qs[i], ks[j])
        for j in range(len(kp))
      ]
      for i in range(len(qp))
    ]
  )


def _random_cfg(rng):
  """A random BigBird plan; max_len not a multiple of the block size."""
  bs = int(rng.choice([3, 4, 8]))
  return _cfg(
    **{
      "model.attention.block_size": bs,
      "model.attention.window": int(rng.integers(1, 7)),
      "model.attention.num_global": int(rng.integers(0, 6)),
      "model.attention.num_random_blocks": int(rng.integers(0, 4)),
      "model.attention.random_seed": int(rng.integers(0, 1000)),
      "model.attention.max_len": 45,
    }
  ).attention


def _layouts(rng, t):
  """(positions, segments): one document with trailing padding, and a
  packed row whose positions restart at each document."""
  seg = np.ones(t, np.int32)
  seg[t - int(rng.integers(0, 4)) :] = 0
  yield np.arange(t, dtype=np.int32), seg
  cut = int(rng.integers(5, t - 5))
  pos = np.concatenate([np.arange(cut), np.arange(t - cut)]).astype(np.int32)
  yield pos, np.where(np.arange(t) < cut, 1, 2).astype(np.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_mask_matches_the_element_rule(causal):
  rng = np.random.default_rng(int(causal))
  for _ in range(6):
    a = _random_cfg(rng)
    spec = mask_spec(a, causal=causal)
    t = int(rng.integers(20, 46))  # never past max_len = 45
    for pos, seg in _layouts(rng, t):
      got = masks.dense_mask(
        spec, *(jnp.asarray(x)[None] for x in (pos, pos, seg, seg))
      )[0]
      np.testing.assert_array_equal(
        np.asarray(got), brute_mask(a, causal, pos, pos, seg, seg)
      )


def _kinds(m_TS, bq, bk):
  t, s = m_TS.shape
  tiles = m_TS.reshape(t // bq, bq, s // bk, bk).transpose(0, 2, 1, 3)
  return np.where(
    tiles.all((-1, -2)), FULL, np.where(tiles.any((-1, -2)), PARTIAL, EMPTY)
  )


@pytest.mark.parametrize("causal", [True, False])
def test_tile_kinds_are_conservative_and_empty_is_exact(causal):
  """Never EMPTY where a pair is visible nor FULL where one is not; with
  tiles the size of the table's blocks on one contiguous document, EMPTY
  is exact too (no tile without a visible pair is walked)."""
  rng = np.random.default_rng(10 + int(causal))
  for _ in range(6):
    a = _random_cfg(rng)
    bs = a.block_size
    spec = mask_spec(a, causal=causal)
    t = bs * (40 // (2 * bs) * 2)  # an even number of blocks, <= 40
    for layout, (pos, seg) in zip(
      ("one", "packed"), _layouts(rng, t), strict=True
    ):
      want_m = brute_mask(a, causal, pos, pos, seg, seg)
      for bq, bk in ((bs, bs), (bs, 2 * bs), (2 * bs, bs), (t, bs)):
        want = _kinds(want_m, bq, bk)
        got = np.asarray(
          masks.classify_blocks(
            spec,
            *(jnp.asarray(x)[None] for x in (pos, pos, seg, seg)),
            block_q=bq,
            block_kv=bk,
          )
        )[0]
        assert not np.any((got == EMPTY) & (want != EMPTY)), "tile skipped"
        assert not np.any((got == FULL) & (want != FULL)), "mask dropped"
        if layout == "one" and (bq, bk) == (bs, bs):
          np.testing.assert_array_equal(got == EMPTY, want == EMPTY)


# ------------------------------------------- impls vs the explicit mask


def _explicit(a, causal):
  """The same mask as an explicit [max_len, max_len] element table over
  positions (block size 1), built from the element rule above; the kernels
  add only the same-document test to it."""
  n = a.max_len
  pos = np.arange(n)
  ones = np.ones(n, np.int32)
  return MaskSpec(
    block_mask=brute_mask(a, causal, pos, pos, ones, ones),
    block_mask_sizes=(1, 1),
  )


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_impls_equal_the_dense_reference(causal):
  """29 tokens (no multiple of the 8-row tiles or the 4-token blocks), two
  packed documents per row, GQA; gradients through out and lse."""
  a = _cfg().attention
  spec = mask_spec(a, causal=causal)
  case = make_case(4, b=2, t=29, s=29, h=4, g=2, kdim=16)
  want = outputs_and_grads(case, _explicit(a, causal), "xla")
  for impl in ("xla", "xla_chunked", "interpret"):
    got = outputs_and_grads(case, spec, impl, None, kernels.BlockSizes(8, 8))
    for name, x, y in zip(
      ("out", "lse", "dq", "dk", "dv"), got, want, strict=True
    ):
      assert_close(x, y, F32_TOL, f"{impl} {name}")


def _module(causal, **overrides):
  cfg = _cfg(**overrides)
  spec = stack.layer_plan(cfg, causal=causal)[0]
  return make_attention(cfg, spec, rngs=nnx.Rngs(0), out_std=0.02)


def _out_and_grads(attn, x, pos, seg):
  graphdef, state = nnx.split(attn)
  w = jax.random.normal(jax.random.key(9), x.shape)

  def loss(state, x):
    y = _run(nnx.merge(graphdef, state), x, pos, seg)
    return jnp.sum(y * w), y

  (_, y), (d_state, dx) = jax.jit(
    jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  )(state, x)
  return y, dx, jax.tree.leaves(d_state)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_module_equals_the_explicit_mask(causal):
  """The model's block_sparse layer, run by each impl, against the same
  parameters attending under the explicit mask; packed documents."""
  d = _cfg().embed_dim
  x = jax.random.normal(jax.random.key(5), (2, T, d))
  cut = 11
  pos = jnp.asarray(
    [np.arange(T), np.r_[np.arange(cut), np.arange(T - cut)]], jnp.int32
  )
  seg = jnp.asarray(
    [np.ones(T), np.r_[np.ones(cut), np.full(T - cut, 2)]], jnp.int32
  )
  ref = _module(causal, **{"model.attention.impl": "xla"})
  ref.mask = _explicit(_cfg().attention, causal)
  want = _out_and_grads(ref, x, pos, seg)
  for impl in ("xla", "xla_chunked", "interpret"):
    got = _out_and_grads(
      _module(causal, **{"model.attention.impl": impl}), x, pos, seg
    )
    assert_close(got[0], want[0], F32_TOL, f"{impl} out")
    assert_close(got[1], want[1], F32_TOL, f"{impl} d x")
    for g, w in zip(got[2], want[2], strict=True):
      assert_close(g, w, F32_TOL, f"{impl} d params")


# ------------------------------------------------------------- causality


def test_causal_block_sparse_does_not_see_the_future():
  attn = _module(True)
  d = _cfg().embed_dim
  assert _leaks(attn, d) == []
  assert _future_jacobian(attn, d) == 0.0


def test_bidirectional_block_sparse_fails_the_causality_check():
  attn = _module(False)
  d = _cfg().embed_dim
  assert _leaks(attn, d), "a bidirectional layer passed the causality check"
  assert _future_jacobian(attn, d) > 0.0


@pytest.mark.parametrize("table_causal", [True, False])
def test_the_random_blocks_alone_decide_causality(table_causal):
  """Without the causal flag, a left-only window and no prefix: the causal
  table (strictly earlier blocks) passes the check, the bidirectional table
  fails it. So the table's own draw is what keeps a decoder causal."""
  a = _cfg(**{"model.attention.num_global": 0}).attention
  attn = _module(True, **{"model.attention.num_global": 0})
  attn.mask = dataclasses.replace(
    mask_spec(a, causal=True),
    causal=False,
    block_mask=masks.bigbird_block_table(
      8, num_random_blocks=2, seed=3, causal=table_causal
    ),
  )
  d = _cfg().embed_dim
  assert bool(_leaks(attn, d)) != table_causal


# --------------------------------------------------------- past the table


def test_positions_past_the_table_are_an_error():
  a = _cfg(**{"model.attention.max_len": 30, "data.seq_len": 30}).attention
  spec = mask_spec(a, causal=True)
  assert masks.block_mask_coverage(spec) == 32  # whole 4-token blocks
  assert masks.block_mask_coverage(MaskSpec(causal=True)) is None
  q = jnp.ones((1, 4, 2, 8))

  def attend(q_pos, k_pos, seg=None):
    q_pos, k_pos = (jnp.asarray([p], jnp.int32) for p in (q_pos, k_pos))
    seg = None if seg is None else jnp.asarray([seg], jnp.int32)
    return kernels.attention(
      q,
      q,
      q,
      mask=spec,
      q_pos=q_pos,
      k_pos=k_pos,
      q_segment_ids=seg,
      kv_segment_ids=seg,
      impl="xla",
    )

  attend([28, 29, 30, 31], [28, 29, 30, 31])  # the last covered block
  msg = r"position {} is past the block-sparse table, which covers "
  with pytest.raises(ValueError, match=msg.format(32) + r"positions 0\.\.31"):
    attend([29, 30, 31, 32], [29, 30, 31, 32])
  with pytest.raises(ValueError, match=msg.format(40)):  # keys alone
    attend([0, 1, 2, 3], [0, 1, 2, 40])
  attend([0, 1, 2, 99], [0, 1, 2, 99], seg=[1, 1, 1, 0])  # padding is free
  # Through the model's layer, eagerly: 33 tokens of a max_len-32 model.
  attn = _module(True)
  x = jnp.ones((1, 33, _cfg().embed_dim))
  with pytest.raises(ValueError, match=msg.format(32)):
    _run(attn, x)
