"""Transient-global attention (docs/attention.md): the module against a dense
reference built here from explicit [K_local ; K_global] keys and an explicit
element mask, its degenerate forms (sliding window, dense), the block
aggregates and orphan rules, causality, packing and position-only block ids.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm.config import AttentionConfig
from efficient_lm.models import cache as cache_lib
from efficient_lm.models.attention import Attention, Tokens
from efficient_lm.models.layers import rope
from efficient_lm.models.tglobal import TGlobalAttention, summary_slots
from tests.helpers import assert_close

D, H, G, K = 16, 4, 2, 8
EPS = 1e-6


def _cfg(**kw):
  kw = {"kind": "tglobal", "window": 3, "tglobal_block": 4, "impl": "xla", **kw}
  return AttentionConfig(**kw)


def _module(causal, seed=0, cls=TGlobalAttention, **kw):
  extra = {"norm_eps": EPS} if cls is TGlobalAttention else {}
  m = cls(
    embed_dim=D,
    num_heads=H,
    num_kv_heads=G,
    head_dim=K,
    rope_theta=10_000.0,
    cfg=_cfg(**kw),
    causal=causal,
    rngs=nnx.Rngs(params=seed),
    param_dtype=jnp.float32,
    out_std=0.02,
    **extra,
  )
  if cls is TGlobalAttention:
    # A non-trivial summary scale, so the reference must apply it.
    scale = m.summary_norm.scale
    scale[...] = 1 + 0.5 * jax.random.normal(jax.random.key(seed + 7), (D,))
  return m


def _apply(m, x, pos, seg):
  return m(Tokens(x, jnp.asarray(pos), jnp.asarray(seg)))


def _x(b, t, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


def _packed():
  """Two rows: [doc 11 tokens | doc 6 | pad 2] and [doc 5 | doc 14]; no
  length is a multiple of the block (4) and blocks straddle documents in
  array index."""
  pos = np.zeros((2, 19), np.int32)
  seg = np.zeros((2, 19), np.int32)
  pos[0, :11], seg[0, :11] = np.arange(11), 1
  pos[0, 11:17], seg[0, 11:17] = np.arange(6), 2
  pos[1, :5], seg[1, :5] = np.arange(5), 1
  pos[1, 5:], seg[1, 5:] = np.arange(14), 2
  return pos, seg


# ---------------------------------------------------------------- reference


def _members(pos, seg, k, causal):
  """Per row, the summaries as lists of member token indices, with the
  summary's block and segment, from a plain loop over documents."""
  rows = []
  for b in range(pos.shape[0]):
    out = []
    for s in sorted(set(seg[b]) - {0}):
      idx = [i for i in range(pos.shape[1]) if seg[b, i] == s]
      blocks = {}
      for i in idx:
        blocks.setdefault(pos[b, i] // k, []).append(i)
      full = sorted(
        j
        for j, m in blocks.items()
        if sorted(pos[b, m]) == list(range(j * k, j * k + k))
      )
      summ = {j: list(blocks[j]) for j in full}
      if not causal and full:
        for j, m in blocks.items():
          if j not in summ:
            summ[full[-1]] += m  # orphans join the last complete block
      out += [(s, j, sorted(summ[j])) for j in full]
    rows.append(out)
  return rows


def _reference(m, x, pos, seg, causal, window):
  """Dense attention over explicit keys [x ; g] under an explicit mask."""
  k = m.block
  b, t, _ = x.shape
  rows = _members(pos, seg, k, causal)
  n = max(1, max(len(r) for r in rows))
  member = np.zeros((b, n, t), np.float32)
  g_pos = np.zeros((b, n), np.int32)
  g_seg = np.zeros((b, n), np.int32)
  g_blk = np.zeros((b, n), np.int32)
  for r, summ in enumerate(rows):
    for i, (s, j, idx) in enumerate(summ):
      member[r, i, idx] = 1
      g_pos[r, i] = (j + 1) * k if causal else j * k + k // 2
      g_seg[r, i], g_blk[r, i] = s, j
  sums = jnp.einsum("BNT,BTD->BND", member, x)
  g = sums * jax.lax.rsqrt(jnp.mean(sums * sums, -1, keepdims=True) + EPS)
  g = g * m.summary_norm.scale[...][None, None, :]
  # Element mask, local part then global part, written out per pair.
  local = np.zeros((b, t, t), bool)
  glob = np.zeros((b, t, n), bool)
  for r in range(b):
    for i in range(t):
      if seg[r, i] == 0:
        continue
      for j in range(t):
        d = pos[r, i] - pos[r, j]
        local[r, i, j] = (
          seg[r, j] == seg[r, i] and abs(d) < window and (d >= 0 or not causal)
        )
      for c in range(len(rows[r])):
        glob[r, i, c] = g_seg[r, c] == seg[r, i] and (
          pos[r, i] // k > g_blk[r, c] or not causal
        )
  mask = np.concatenate([local, glob], axis=2)
  keys = jnp.concatenate([x, g], axis=1)
  k_pos = jnp.asarray(np.concatenate([pos, g_pos], 1))
  q_ = rope(
    jnp.einsum("BTD,DHK->BTHK", x, m.q_DHK[...]), jnp.asarray(pos), m.rope_theta
  )
  k_ = rope(
    jnp.einsum("BSD,DGK->BSGK", keys, m.k_DGK[...]), k_pos, m.rope_theta
  )
  v_ = jnp.einsum("BSD,DGK->BSGK", keys, m.v_DGK[...])
  k_ = jnp.repeat(k_, H // G, axis=2)
  v_ = jnp.repeat(v_, H // G, axis=2)
  logits = jnp.einsum("BTHK,BSHK->BHTS", q_, k_) * m.scale
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  p = jnp.where(mask[:, None].any(-1, keepdims=True), p, 0)
  o = jnp.einsum("BHTS,BSHK->BTHK", p, v_)
  return jnp.einsum("BTHK,HKD->BTD", o, m.o_HKD[...])


def _loss_and_grads(fn, m, x, ct):
  params = nnx.state(m, nnx.Param)
  graph = nnx.graphdef(m)

  def loss(params, x):
    return jnp.sum(fn(nnx.merge(graph, params), x) * ct)

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  return value, nnx.to_pure_dict(grads[0]), grads[1]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
  "window,impl", [(3, "xla"), (6, "xla"), (3, "xla_chunked")]
)
def test_equals_dense_reference_values_and_grads(causal, window, impl):
  pos, seg = _packed()
  m = _module(causal, window=window, impl=impl)
  x = _x(*pos.shape)
  ct = _x(*pos.shape, seed=1)
  got = _apply(m, x, pos, seg)
  want = _reference(m, x, pos, seg, causal, window)
  assert_close(got, want, 1e-5, "out")
  fwd = lambda m, x: _apply(m, x, pos, seg)
  ref = lambda m, x: _reference(m, x, pos, seg, causal, window)
  v1, gp1, gx1 = _loss_and_grads(fwd, m, x, ct)
  v2, gp2, gx2 = _loss_and_grads(ref, m, x, ct)
  assert_close(v1, v2, 1e-5, "loss")
  assert_close(gx1, gx2, 1e-5, "dx")
  for name in ("q_DHK", "k_DGK", "v_DGK", "o_HKD"):
    assert_close(gp1[name], gp2[name], 1e-5, name)
  # The summary-norm scale gets a gradient, so summaries were used.
  assert np.abs(np.asarray(gp1["summary_norm"]["scale"])).max() > 1e-6
  assert_close(
    gp1["summary_norm"]["scale"],
    gp2["summary_norm"]["scale"],
    1e-5,
    "summary scale",
  )


# ------------------------------------------------------------ degenerate forms


def _copy_params(src, dst):
  """dst gets src's q/k/v/o projections (same names and shapes)."""
  for name in ("q_DHK", "k_DGK", "v_DGK", "o_HKD"):
    getattr(dst, name)[...] = getattr(src, name)[...]
  return dst


@pytest.mark.parametrize("causal", [True, False])
def test_without_summaries_is_sliding_window(causal):
  """No complete block in the call (block longer than every document):
  exactly the sliding-window layer with the same projections."""
  pos, seg = _packed()
  x = _x(*pos.shape)
  m = _module(causal, window=3, tglobal_block=32)
  ref = _copy_params(
    m, _module(causal, seed=5, cls=Attention, kind="sliding_window", window=3)
  )
  assert_close(_apply(m, x, pos, seg), _apply(ref, x, pos, seg), 1e-6)


def test_causal_shorter_than_block_is_sliding_window():
  """Causal: a call shorter than a block has no summary at all."""
  x = _x(2, 5)
  pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
  seg = jnp.ones((2, 5), jnp.int32)
  m = _module(True, window=2, tglobal_block=8)
  assert m.summaries(Tokens(x, pos, seg)).x_BTD.shape[1] == 0
  ref = _copy_params(
    m, _module(True, seed=5, cls=Attention, kind="sliding_window", window=2)
  )
  assert_close(_apply(m, x, pos, seg), _apply(ref, x, pos, seg), 1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_wide_window_without_summaries_is_dense(causal):
  pos, seg = _packed()
  x = _x(*pos.shape)
  m = _module(causal, window=19, tglobal_block=32)
  ref = _copy_params(m, _module(causal, seed=5, cls=Attention, kind="dense"))
  assert_close(_apply(m, x, pos, seg), _apply(ref, x, pos, seg), 1e-6)


# ------------------------------------------------------------------ aggregates


@pytest.mark.parametrize("causal", [True, False])
def test_aggregates_on_a_hand_example(causal):
  """Block 4; row: doc A positions 0..9 (blocks 0, 1 complete, orphans 8, 9),
  doc B positions 0..2 (no complete block), four padding rows at position
  0 (as the packer pads). Causal: g0 = A[0:4], g1 = A[4:8], orphans in
  none. Bidirectional: orphans join g1 = A[4:10]. Doc B and the padding
  are in no summary, and a NaN in padding reaches none."""
  t = 17
  pos = np.array([[*range(10), 0, 1, 2, 0, 0, 0, 0]], np.int32)
  seg = np.array([[1] * 10 + [2] * 3 + [0] * 4], np.int32)
  x = _x(1, t).at[0, 13].set(jnp.nan)
  m = _module(causal)
  g = m.summaries(Tokens(x, jnp.asarray(pos), jnp.asarray(seg)))
  assert g.x_BTD.shape[1] == t // 4  # static bound: 4 slots
  members = [range(0, 4), range(4, 8) if causal else range(4, 10)]
  for j, idx in enumerate(members):
    s = np.asarray(x[0, list(idx)], np.float64).sum(0)
    want = (
      s / np.sqrt(np.mean(s * s) + EPS) * np.asarray(m.summary_norm.scale[...])
    )
    assert_close(g.x_BTD[0, j], want, 1e-5, f"g{j}")
  assert np.all(np.asarray(g.x_BTD[0, 2:]) == 0)  # empty slots
  offset = 4 if causal else 2
  np.testing.assert_array_equal(g.pos_BT[0, :2], [offset, 4 + offset])
  np.testing.assert_array_equal(g.seg_BT[0], [1, 1, 0, 0])
  slot = summary_slots(
    jnp.asarray(pos), jnp.asarray(seg), block=4, causal=causal, num_slots=4
  ).slot_BT[0]
  orphan = -1 if causal else 1
  np.testing.assert_array_equal(
    slot, [0] * 4 + [1] * 4 + [orphan] * 2 + [-1] * 7
  )


def test_block_ids_come_from_positions_not_indices():
  """Shuffling the rows of a packed batch (positions and segments moving
  with their tokens) shuffles the outputs the same way."""
  pos, seg = _packed()
  x = _x(*pos.shape)
  perm = np.random.default_rng(0).permutation(pos.shape[1])
  for causal in (True, False):
    m = _module(causal)
    y = _apply(m, x, pos, seg)
    y_perm = _apply(m, x[:, perm], pos[:, perm], seg[:, perm])
    assert_close(y_perm, y[:, perm], 1e-5, f"causal={causal}")


# ------------------------------------------------------------------ causality


def _one_doc(t, seed=0):
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
  return _x(1, t, seed), pos, jnp.ones((1, t), jnp.int32)


def test_causal_perturbation_at_and_inside_blocks():
  t_len = 23
  x, pos, seg = _one_doc(t_len)
  m = _module(True, window=2, tglobal_block=4)
  base = _apply(m, x, pos, seg)
  noise = _x(1, t_len, seed=9)
  # t = k - 1 and k at block boundaries; t + 1 inside t's block otherwise.
  for t in (0, 3, 4, 5, 7, 8, 9, 12, 14, 19, 21):
    future = x.at[:, t + 1 :].set(noise[:, t + 1 :])
    nxt = x.at[:, t + 1].set(noise[:, t + 1])
    for other in (future, nxt):
      y = _apply(m, other, pos, seg)
      np.testing.assert_allclose(
        y[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0, err_msg=f"t={t}"
      )
      assert not np.allclose(y[:, t + 1 :], base[:, t + 1 :], atol=1e-6)


def test_causal_jacobian_is_lower_triangular():
  t_len = 13
  x, pos, seg = _one_doc(t_len)
  m = _module(True, window=2, tglobal_block=3)
  jac = jax.jacfwd(lambda x: _apply(m, x, pos, seg))(x)  # [1,T,D,1,T,D]
  dep = np.abs(np.asarray(jac[0, :, :, 0])).max(axis=(1, 3))  # [T_out, T_in]
  assert np.all(dep[np.triu_indices(t_len, 1)] == 0)
  # Summaries do reach beyond the window: token 7 (block 2 of 3-blocks)
  # depends on tokens 0..2 through summary 0, though its window is 6..7.
  assert dep[7, 0] > 0 and dep[7, 2] > 0


def test_bidirectional_fails_the_causality_check():
  """Negative control: in the encoder form a token outside the window and
  in the future reaches token 0 through the summaries."""
  t_len = 16
  x, pos, seg = _one_doc(t_len)
  m = _module(False, window=2, tglobal_block=4)
  base = _apply(m, x, pos, seg)
  y = _apply(m, x.at[:, 14].set(_x(1, t_len, 9)[:, 14]), pos, seg)
  assert np.abs(np.asarray(y[:, 0] - base[:, 0])).max() > 1e-4


# ------------------------------------------------------------------- packing


@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_equal_separate_runs(causal):
  pos, seg = _packed()
  x = _x(*pos.shape)
  m = _module(causal)
  packed = m(Tokens(x, jnp.asarray(pos), jnp.asarray(seg)))
  # Each document alone in its own row (trailing padding), one call.
  docs = [(r, np.flatnonzero(seg[r] == s)) for r in range(2) for s in (1, 2)]
  t = pos.shape[1]
  x_alone = jnp.stack(
    [jnp.pad(x[r, idx], ((0, t - len(idx)), (0, 0))) for r, idx in docs]
  )
  pos_alone = np.stack(
    [np.pad(pos[r, idx], (0, t - len(idx))) for r, idx in docs]
  )
  seg_alone = np.arange(t)[None] < np.array([[len(i)] for _, i in docs])
  alone = m(
    Tokens(
      x_alone, jnp.asarray(pos_alone), jnp.asarray(seg_alone.astype(np.int32))
    )
  )
  for i, (r, idx) in enumerate(docs):
    assert_close(packed[r, idx], alone[i, : len(idx)], 1e-5, f"doc {i}")
  # Padding rows see nothing: zero output.
  assert np.all(np.asarray(packed[0, 17:]) == 0)


def test_errors_are_one_line():
  with pytest.raises(ValueError, match="kind='tglobal'"):
    _module(True, cls=TGlobalAttention, kind="sliding_window")
  x, pos, seg = _one_doc(4)
  with pytest.raises(ValueError, match="self-attention only"):
    _module(True)(Tokens(x, pos, seg), Tokens(x, pos, seg))


# ----------------------------------------------------------------- generation


@nnx.jit
def _step(m, x, pos, seg, cache):
  return m(Tokens(x, pos, seg), cache=cache)


def _steps(m, x, pos, seg, chunks, max_len):
  """Outputs of consecutive `step`s over the given chunk lengths."""
  cache = m.init_cache(x.shape[0], max_len, jnp.float32)
  outs, start = [], 0
  for n in chunks:
    sl = slice(start, start + n)
    y, cache = _step(m, x[:, sl], pos[:, sl], seg[:, sl], cache)
    outs.append(y)
    start += n
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
  "chunks",
  [
    [9] + [1] * 14,  # prefill past the window and a block, then decode
    [1] * 23,  # decode from the first token
    [6, 3, 1, 5, 8],  # multi-token steps starting mid-block
  ],
)
def test_prefill_then_decode_equals_forward(chunks):
  t_len = sum(chunks)
  x, pos, seg = _one_doc(t_len)
  x = jnp.concatenate([x, _x(1, t_len, seed=3)], 0)  # two rows
  pos, seg = (jnp.concatenate([a, a], 0) for a in (pos, seg))
  m = _module(True, window=3, tglobal_block=4)
  want = m(Tokens(x, pos, seg))
  got, cache = _steps(m, x, pos, seg, chunks, max_len=t_len + 2)
  assert_close(got, want, 1e-5)
  # Five complete blocks cached (positions 0..19), 20..22 carried.
  np.testing.assert_array_equal(cache["global"]["seg"][0], [1] * 5 + [0] * 1)
  np.testing.assert_array_equal(cache["partial"]["count"], [3, 3])


def test_prefill_with_padded_prompts_then_decode():
  """Prompts of 5 and 10 tokens padded to 10 (segment 0 past the prompt,
  positions running on, as generate.py prefills), then per-row decode at
  each row's own positions: equals each row's full forward."""
  lens, new, width = [5, 10], 9, 10
  m = _module(True, window=3, tglobal_block=4)
  xs = [_x(1, n + new, seed=r) for r, n in enumerate(lens)]
  prompt = jnp.concatenate(
    [
      jnp.pad(x[:, :n], ((0, 0), (0, width - n), (0, 0)))
      for x, n in zip(xs, lens, strict=True)
    ],
    0,
  )
  pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (2, width))
  seg = (pos < jnp.asarray(lens)[:, None]).astype(jnp.int32)
  cache = m.init_cache(2, max(lens) + new, jnp.float32)
  first, cache = _step(m, prompt, pos, seg, cache)
  outs = [[first[r : r + 1, :n]] for r, n in enumerate(lens)]
  for i in range(new):
    x_B1D = jnp.concatenate(
      [x[:, n + i : n + i + 1] for x, n in zip(xs, lens, strict=True)], 0
    )
    p_B1 = jnp.asarray([[n + i] for n in lens], jnp.int32)
    y, cache = _step(m, x_B1D, p_B1, jnp.ones_like(p_B1), cache)
    for r in range(2):
      outs[r].append(y[r : r + 1])
  for r, (x, n) in enumerate(zip(xs, lens, strict=True)):
    p = jnp.arange(n + new, dtype=jnp.int32)[None]
    want = m(Tokens(x, p, jnp.ones_like(p)))
    assert_close(jnp.concatenate(outs[r], 1), want, 1e-5, f"row {r}")


def test_cache_size_and_bytes_per_token():
  m = _module(True, window=3, tglobal_block=4)
  shapes = jax.eval_shape(lambda: m.init_cache(2, 30, jnp.float32))
  per = m.cache_bytes_per_token(jnp.float32)
  assert per == 2 * G * K * 4
  rows = 3 + 30 // 4  # window + completed blocks
  pos_seg = 2 * rows * 2 * 4
  partial = 2 * (D * 4 + 3 * 4)  # sum, count, pos, seg
  assert cache_lib.nbytes(shapes) == 2 * rows * per + pos_seg + partial


def test_generation_needs_a_causal_layer():
  with pytest.raises(ValueError, match="needs a causal"):
    _module(False).init_cache(1, 8, jnp.float32)
