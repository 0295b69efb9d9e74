"""Funnel encoder (models/funnel.py) and the MLM objective.

Pooling against a brute-force numpy reference (values, positions, segment
ids; no slot mixes documents); factor 1 = a plain bidirectional stack;
pool-query-only layer = dense attention with pooled queries; the model is
bidirectional yet packed documents do not leak; embed_documents = a
per-document mean; MLM corruption deterministic per step with BERT's
proportions, the loss over corrupted positions only, resume identical;
FLOPs against XLA; one-line config errors; TPU AOT compile.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import aot, data as data_lib, models
from efficient_lm.config import ConfigError
from efficient_lm.models import flops, funnel, stack
from efficient_lm.models.attention import Tokens
from efficient_lm.models.layers import rope
from efficient_lm.training import loop, losses
from efficient_lm.training import state as state_lib
from tests.helpers import small_config, train_sentencepiece

T = 32
FUNNEL = {
  "model.kind": "funnel_encoder",
  "train.objective": "mlm",
  "data.seq_len": T,
}


def _cfg(**overrides):
  return small_config(**{**FUNNEL, **overrides})


def _packed(seed=0, t=T, b=2, vocab=256):
  """Rows of three documents starting at odd offsets (groups straddle
  them), then padding; positions restart per document."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  seg = np.zeros((b, t), np.int32)
  pos = np.zeros((b, t), np.int32)
  cuts = [(0, 5, 14, t - 3), (0, 11, 19, t - 6)]
  for r in range(b):
    c = cuts[r % 2]
    for i in range(3):
      seg[r, c[i] : c[i + 1]] = i + 1
      pos[r, c[i] : c[i + 1]] = np.arange(c[i + 1] - c[i])
  return tokens, pos, seg


def _pool_reference(x, pos, seg, f):
  """Brute force: slot j's document is that of its first non-padding
  source; its value the mean of that document's sources."""
  b, t, d = x.shape
  n = t // f
  out_x = np.zeros((b, n, d))
  out_pos = np.zeros((b, n), np.int64)
  out_seg = np.zeros((b, n), np.int64)
  for r in range(b):
    for j in range(n):
      src = range(j * f, j * f + f)
      live = [i for i in src if seg[r, i] != 0]
      if not live:
        out_pos[r, j] = pos[r, j * f]
        continue
      owner = seg[r, live[0]]
      mine = [i for i in live if seg[r, i] == owner]
      out_seg[r, j], out_pos[r, j] = owner, pos[r, live[0]]
      out_x[r, j] = x[r, mine].mean(0)
  return out_x, out_pos, out_seg


@pytest.mark.parametrize("f", [2, 3])
def test_pool_matches_brute_force_and_no_slot_mixes_documents(f):
  t = 36
  _, pos, seg = _packed(t=t)
  x = np.random.default_rng(1).normal(size=(2, t, 8)).astype(np.float32)
  p = Tokens(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
  for _ in range(2):  # two stages deep
    got = funnel.pool(p, f)
    want = _pool_reference(
      np.asarray(p.x_BTD), np.asarray(p.pos_BT), np.asarray(p.seg_BT), f
    )
    np.testing.assert_allclose(got.x_BTD, want[0], atol=1e-6)
    np.testing.assert_array_equal(got.pos_BT, want[1])
    np.testing.assert_array_equal(got.seg_BT, want[2])
    # Perturbing one document's rows moves only that document's slots.
    for doc in (1, 2, 3):
      noise = np.where((np.asarray(p.seg_BT) == doc)[..., None], 100.0, 0.0)
      moved = funnel.pool(p._replace(x_BTD=p.x_BTD + noise), f)
      changed = np.abs(np.asarray(moved.x_BTD - got.x_BTD)).max(-1) > 0
      assert np.all(np.asarray(got.seg_BT)[changed] == doc), doc
    p = got
  assert p.x_BTD.shape[1] == t // f**2
  # Upsampling restores T; a row gets its slot only within its document.
  up = funnel.upsample(p, jnp.asarray(seg), f**2)
  assert up.shape == (2, t, 8)
  rep = np.repeat(np.asarray(p.seg_BT), f**2, axis=1)
  zero = (rep != seg) | (seg == 0)
  assert np.all(np.asarray(up)[zero] == 0)
  np.testing.assert_array_equal(
    np.asarray(up)[~zero], np.repeat(np.asarray(p.x_BTD), f**2, 1)[~zero]
  )


def _blocks(st: stack.Stack):
  """The plain Blocks of a Stack, in layer order."""
  out = []
  for i, seg in enumerate(st.segments):
    for r in range(seg.repeats):
      for j in range(len(seg.pattern)):
        gd, p, s = nnx.split(
          st.groups[f"segment_{i}"][f"layer_{j}"], nnx.Param, models.ModelState
        )
        out.append(nnx.merge(gd, *jax.tree.map(lambda a: a[r], (p, s))))
  return out


@pytest.fixture(scope="module")
def factor_one():
  cfg = _cfg(
    **{
      "model.num_layers": 2,
      "model.funnel.stages": (1, 1),
      "model.funnel.factor": 1,
      "model.funnel.decoder_layers": 1,
      "model.attention.pattern": "sliding_window,tglobal",
      "model.attention.window": 5,
      "model.attention.tglobal_block": 4,
    }
  )
  return models.build(cfg.model, nnx.Rngs(params=0))


def test_factor_1_is_a_plain_bidirectional_stack(factor_one):
  """Pooling, the pool-query layer and upsampling are identities at factor
  1: the model = its blocks run as ordinary self-attention layers, the
  bridge added before the decoder."""
  m = factor_one
  tokens, pos, seg = map(jnp.asarray, _packed())
  got = jax.jit(lambda *a: m(*a)[0])(tokens, pos, seg)

  @jax.jit
  def reference(tokens, pos, seg):
    x = m.embed(tokens, jnp.float32)
    for blk in _blocks(m.stages["stage_0"]):
      x = blk(x, pos, seg)[0]
    bridge = x
    x = m.pool_blocks["stage_1"](x, pos, seg)[0]
    x = x + bridge
    for blk in _blocks(m.decoder):
      x = blk(x, pos, seg)[0]
    return m.embed.attend(m.final_norm(x))

  want = reference(tokens, pos, seg)
  live = np.asarray(seg) > 0
  np.testing.assert_allclose(
    np.asarray(got)[live], np.asarray(want)[live], atol=1e-5, rtol=0
  )


@pytest.mark.parametrize("kind", ["dense", "sliding_window"])
def test_pool_query_layer_is_dense_attention_with_pooled_queries(kind):
  cfg = _cfg(
    **{
      "model.num_layers": 2,
      "model.funnel.stages": (1, 1),
      "model.attention.kind": kind,
      "model.attention.window": 6,
    }
  )
  spec = funnel.layer_plan(cfg.model)[1]
  assert spec.pool_query and spec.stage == 1
  from efficient_lm.models.block import Block

  blk = Block(cfg.model, spec, nnx.Rngs(params=1))
  _, pos, seg = _packed()
  x = jax.random.normal(jax.random.key(2), (2, T, 64))
  pos, seg = jnp.asarray(pos), jnp.asarray(seg)

  def ours(x):
    kv = Tokens(x, pos, seg)
    return funnel.pool_query_call(blk, funnel.pool(kv, 2), kv)

  def reference(x):
    """One dense masked softmax over every (pooled query, key)."""
    kv = Tokens(x, pos, seg)
    q = funnel.pool(kv, 2)
    a = blk.attn
    hq, hk = blk.attn_norm(q.x_BTD), blk.attn_norm(kv.x_BTD)
    qh = rope(jnp.einsum("BTD,DHK->BTHK", hq, a.q_DHK[...]), q.pos_BT, 1e4)
    kh = rope(jnp.einsum("BSD,DGK->BSGK", hk, a.k_DGK[...]), kv.pos_BT, 1e4)
    vh = jnp.einsum("BSD,DGK->BSGK", hk, a.v_DGK[...])
    rep = qh.shape[2] // kh.shape[2]
    kh, vh = jnp.repeat(kh, rep, 2), jnp.repeat(vh, rep, 2)
    s = jnp.einsum("BTHK,BSHK->BHTS", qh, kh) / np.sqrt(qh.shape[-1])
    ok = (q.seg_BT[:, :, None] == kv.seg_BT[:, None, :]) & (
      q.seg_BT[:, :, None] > 0
    )
    if kind == "sliding_window":
      ok &= jnp.abs(q.pos_BT[:, :, None] - kv.pos_BT[:, None, :]) <= 5
    s = jnp.where(ok[:, None], s, -1e30)
    # Rows with no key (pooled padding) give zeros.
    w = jax.nn.softmax(s, axis=-1) * ok.any(-1)[:, None, :, None]
    o = jnp.einsum("BHTS,BSHK->BTHK", w, vh)
    y = q.x_BTD + jnp.einsum("BTHK,HKD->BTD", o, a.o_HKD[...])
    return y + blk.mlp(blk.mlp_norm(y))

  np.testing.assert_allclose(
    jax.jit(ours)(x), jax.jit(reference)(x), atol=2e-5, rtol=0
  )
  r = jax.random.normal(jax.random.key(3), (2, T // 2, 64))
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * r)))(x)
  np.testing.assert_allclose(grad(ours), grad(reference), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def packed_model():
  cfg = _cfg(
    **{
      "model.num_layers": 3,
      "model.funnel.stages": (1, 1, 1),
      "model.funnel.decoder_layers": 1,
      "model.funnel.embedding_head": True,
      "model.attention.pattern": "tglobal,dense,sliding_window",
      "model.attention.window": 9,
      "model.attention.tglobal_block": 8,
    }
  )
  m = models.build(cfg.model, nnx.Rngs(params=3))
  return m, jax.jit(lambda tok, pos, seg: m(tok, pos, seg)[0])


def test_bidirectional_but_documents_do_not_leak(packed_model):
  _, fwd = packed_model
  tokens, pos, seg = _packed()
  base = np.asarray(fwd(tokens, pos, seg))
  for doc in (1, 2, 3):
    other = np.where(seg == doc, (tokens + 7) % 256, tokens)
    out = np.asarray(fwd(other, pos, seg))
    moved = np.abs(out - base).max(-1) > 0
    # Every other document (and padding rows' neighbours) unchanged ...
    assert not np.any(moved & (seg != doc) & (seg > 0)), doc
    # ... and the change reaches the document's first token: not causal.
    first = np.argmax(seg == doc, axis=1)
    assert np.all(moved[np.arange(2), first]), doc
  # A late token alone moves an early one.
  late = tokens.copy()
  late[:, 13] = (late[:, 13] + 1) % 256
  assert np.abs(np.asarray(fwd(late, pos, seg))[0, 5] - base[0, 5]).max() > 0


def test_tglobal_in_a_pooled_stage_summarises_its_blocks():
  """Pooled rows stand for f**s positions: a block of 8 positions holds 4
  rows at stride 2 and is complete, so a row sees a far row of its
  document (outside the window) through the block summaries."""
  from efficient_lm.models.block import make_attention

  cfg = _cfg(
    **{
      "model.num_layers": 3,
      "model.funnel.stages": (1, 2),
      "model.attention.kind": "tglobal",
      "model.attention.window": 3,
      "model.attention.tglobal_block": 8,
    }
  )
  spec = funnel.layer_plan(cfg.model)[2]
  assert (spec.stage, spec.pool_query) == (1, False)
  attn = make_attention(cfg.model, spec, rngs=nnx.Rngs(0), out_std=0.02)
  n = 16
  pos = jnp.arange(n)[None] * 2
  seg = jnp.ones_like(pos)
  x = jax.random.normal(jax.random.key(0), (1, n, 64))
  g = attn.summaries(Tokens(x, pos, seg))
  assert int((g.seg_BT > 0).sum()) == 2 * n // 8
  base = attn(Tokens(x, pos, seg))
  far = attn(Tokens(x.at[:, 12].add(1.0), pos, seg))
  assert float(jnp.abs(far[0, 0] - base[0, 0]).max()) > 1e-4


def test_embed_documents_is_the_per_document_mean(packed_model):
  m, _ = packed_model
  tokens, pos, seg = map(jnp.asarray, _packed())
  got, last = jax.jit(lambda *a: (m.embed_documents(*a), m.encode(*a)[1]))(
    tokens, pos, seg
  )
  got = np.asarray(got)
  x, s = np.asarray(last.x_BTD, np.float64), np.asarray(last.seg_BT)
  scale = np.asarray(m.doc_norm.scale[...])
  for r in range(2):
    for n in range(got.shape[1]):
      rows = x[r, s[r] == n + 1]
      if not len(rows):
        assert np.all(got[r, n] == 0)
        continue
      mean = rows.mean(0)
      want = mean / np.sqrt(np.mean(mean**2) + 1e-6) * scale
      np.testing.assert_allclose(got[r, n], want, atol=1e-5)
  with pytest.raises(ValueError, match="embedding_head=True"):
    models.build(
      _cfg(**{"model.funnel.stages": (1, 1)}).model, nnx.Rngs(params=0)
    ).embed_documents(tokens, pos, seg)


# ---------------------------------------------------------------------- MLM


def _mlm_batch(b=64, t=512, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[:, t - 40 :] = 0
  return {
    "inputs": jnp.asarray(rng.integers(0, 259, (b, t)), jnp.int32),
    "targets": jnp.zeros((b, t), jnp.int32),
    "segment_ids": jnp.asarray(seg),
    "positions": jnp.zeros((b, t), jnp.int32),
  }


def test_mlm_corruption_is_bert_80_10_10_over_live_tokens():
  obj = losses.make_objective("mlm", z_loss=0.0, mlm_rate=0.15, mask_id=259)
  batch = _mlm_batch()
  out = obj.corrupt(jax.random.key(5), batch)
  again = obj.corrupt(jax.random.key(5), batch)
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  orig = np.asarray(batch["inputs"])
  picked, new = np.asarray(out["mlm_mask"]), np.asarray(out["inputs"])
  live = np.asarray(batch["segment_ids"]) > 0
  np.testing.assert_array_equal(out["targets"], orig)
  assert not np.any(picked & ~live)
  assert np.all(new[~picked] == orig[~picked])
  assert abs(picked.sum() / live.sum() - 0.15) < 0.01
  n = picked.sum()
  masked = (new == 259) & picked
  same = (new == orig) & picked
  assert abs(masked.sum() / n - 0.8) < 0.02
  # Random ids are drawn below the mask id; a few equal the original.
  assert abs(same.sum() / n - (0.1 + 0.1 / 259)) < 0.015
  assert new.max() <= 259
  other = obj.corrupt(jax.random.key(6), batch)
  assert np.any(np.asarray(other["mlm_mask"]) != picked)


def test_mlm_never_corrupts_special_tokens():
  """Issue #23: BOS / EOS / pad ids (BERT's and Hugging Face's special
  tokens) are never picked; ordinary tokens still are, at the rate. The
  objective reads them from the run's tokenizer."""
  tok = data_lib.ByteTokenizer()
  obj = state_lib.objective(_cfg(), tok)
  batch = _mlm_batch()
  rng = np.random.default_rng(1)
  inputs = np.asarray(batch["inputs"]) % 256  # ordinary bytes
  special = rng.random(inputs.shape) < 0.2
  ids = rng.choice([tok.pad_id, tok.bos_id, tok.eos_id], inputs.shape)
  inputs[special] = ids[special]
  batch["inputs"] = jnp.asarray(inputs)
  live = np.asarray(batch["segment_ids"]) > 0
  picked, unchanged = [], []
  for k in range(4):
    out = obj.corrupt(jax.random.key(k), batch)
    picked.append(np.asarray(out["mlm_mask"]))
    unchanged.append(np.all(np.asarray(out["inputs"])[special] == ids[special]))
  picked = np.stack(picked)
  assert picked[:, live & special].sum() == 0 and all(unchanged)
  assert abs(picked[:, live & ~special].mean() - 0.15) < 0.005


def test_mlm_loss_counts_corrupted_positions_only():
  obj = losses.make_objective("mlm", z_loss=0.0, mask_id=259)
  batch = obj.corrupt(jax.random.key(0), _mlm_batch(b=2, t=64))
  logits = jax.random.normal(jax.random.key(1), (2, 64, 300))
  loss, m = obj(logits, batch, {})
  picked = np.asarray(batch["mlm_mask"])
  lp = np.asarray(jax.nn.log_softmax(logits))
  tgt = np.asarray(batch["targets"])
  nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
  assert float(m["tokens"]) == picked.sum()
  np.testing.assert_allclose(float(loss), nll[picked].mean(), rtol=1e-5)
  # Logits of uncorrupted positions do not matter.
  noisy = jnp.where(jnp.asarray(picked)[..., None], logits, 50 * logits)
  assert float(obj(noisy, batch, {})[0]) == pytest.approx(float(loss))


@pytest.fixture(scope="module")
def mlm_trainer():
  cfg = _cfg(
    **{
      "model.num_layers": 2,
      "model.funnel.stages": (1, 1),
      "model.embed_dim": 32,
      "model.mlp_dim": 64,
      "train.batch_size": 2,
    }
  )
  return cfg, loop.build_trainer(cfg, jax.devices()[:1])


def test_mlm_step_corruption_depends_on_the_step_and_resumes_exactly(
  mlm_trainer,
):
  cfg, t = mlm_trainer
  tokens, pos, seg = _packed()
  batch = {
    "inputs": tokens,
    "targets": tokens * 0,
    "positions": pos,
    "segment_ids": seg,
  }
  state = t.init_fn()
  snap = jax.device_get(state)
  run = []
  for _ in range(3):
    state, m = t.train_step(state, batch)
    run.append(float(m["loss"]))
    if len(run) == 1:
      after_one = jax.device_get(state)
  # From step 1's state, restored to the host and back (a checkpoint),
  # the run continues bit-identically: the corruption key is the step's.
  put = lambda tree: jax.device_put(
    tree, jax.tree.map(lambda a: a.sharding, state)
  )
  state2, resumed = put(after_one), []
  for _ in range(2):
    state2, m = t.train_step(state2, batch)
    resumed.append(float(m["loss"]))
  assert resumed == run[1:]
  for a, b in zip(
    jax.tree.leaves(jax.device_get(state2["params"])),
    jax.tree.leaves(jax.device_get(state["params"])),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  # Same parameters, same batch, another step number: another corruption.
  l0 = float(t.train_step(put(snap), batch)[1]["loss"])
  l1 = float(
    t.train_step(put(dict(snap, step=snap["step"] + 1)), batch)[1]["loss"]
  )
  assert l0 == run[0] and l1 != l0


# ------------------------------------------------------------------ tokens


def test_tokenizers_mask_id_is_past_the_vocabulary(tmp_path):
  byte = data_lib.ByteTokenizer()
  assert byte.mask_id == byte.vocab_size == 259
  assert byte.decode([104, byte.mask_id]) == "h\ufffd"
  char = data_lib.CharTokenizer("abc")
  assert char.mask_id == 3 and char.decode([0, 3]) == "a\ufffd"
  sp = data_lib.SentencePieceTokenizer(str(train_sentencepiece(tmp_path)))
  assert sp.mask_id == sp.vocab_size
  assert sp.mask_id not in sp.encode("the quick brown fox")
  # The model's vocabulary must cover the mask id.
  cfg = _cfg(**{"data.tokenizer": str(train_sentencepiece(tmp_path))})
  cfg = dataclasses.replace(
    cfg, model=dataclasses.replace(cfg.model, vocab_size=sp.vocab_size)
  )
  with pytest.raises(ConfigError, match=r"mask id 40 .*expected > 40"):
    loop.make_tokenizer(cfg)


# ------------------------------------------------------------------- flops


def test_pooled_stages_cost_less_and_match_xla():
  over = {
    "model.num_layers": 4,
    "model.funnel.stages": (2, 2),
    "model.funnel.decoder_layers": 1,
    "model.scan_layers": False,
    "model.embed_dim": 128,
    "model.mlp_dim": 384,
    "model.num_kv_heads": 4,
    "data.seq_len": 64,
    "train.batch_size": 2,
  }
  pooled = _cfg(**over)
  flat = _cfg(**{**over, "model.funnel.factor": 1})
  f_pooled = flops.flops_per_token(pooled.model, 64)
  f_flat = flops.flops_per_token(flat.model, 64)
  # Stage 1 (2 layers of 5) at half length; its first layer's keys full.
  assert f_pooled["forward"] < 0.9 * f_flat["forward"]
  _, _, compiled = aot.compile_train_step(pooled, jax.devices()[:1])
  ours = f_pooled["train"] * 2 * 64
  assert abs(aot.xla_flops(compiled) / ours - 1) < 0.05


@pytest.mark.parametrize("kind", ["sliding_window", "global_local", "tglobal"])
def test_visible_keys_of_pooled_rows_equal_the_mask(kind):
  """The visible convention in a pooled stage counts exactly the pairs
  the layer's mask passes on rows f**s positions apart."""
  from efficient_lm.models import tglobal
  from efficient_lm.models.attention import mask_spec
  from kernels import masks

  cfg = _cfg(
    **{
      "model.attention.kind": kind,
      "model.attention.window": 11,
      "model.attention.num_global": 5,
      "model.attention.tglobal_block": 8,
      "model.funnel.stages": (1, 1),
    }
  )
  spec = funnel.layer_plan(cfg.model)[0]
  for stride, n in ((2, 20), (4, 12)):
    pos = (np.arange(n) * stride)[None].astype(np.int32)
    seg = np.ones_like(pos)
    k_pos, k_seg = pos, seg
    if kind != "tglobal":
      mspec = mask_spec(spec.attention, causal=False)
    else:
      num = n * stride // 8
      g = tglobal.summary_slots(
        pos,
        seg,
        block=8,
        causal=False,
        num_slots=num,
        weight_BT=np.full_like(pos, stride),
      )
      k_pos = np.concatenate([pos, g.pos_BN], 1)
      k_seg = np.concatenate([seg, g.seg_BN], 1)
      mspec = tglobal.mask_spec(spec.attention, causal=False, num_summaries=num)
    brute = np.asarray(masks.dense_mask(mspec, pos, k_pos, seg, k_seg))
    np.testing.assert_array_equal(
      flops.visible_keys(flops._in_rows(spec, stride), n), brute[0].sum(1)
    )


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      {"model.funnel.stages": (1, 2)},
      r"stages=\(1, 2\) sum to 3, not "
      r"model.num_layers=2",
    ),
    ({"model.funnel.stages": (1, 0, 1)}, "positive layer counts"),
    (
      {"model.funnel.stages": (1, 1), "model.funnel.factor": 3},
      r"data.seq_len=32 is not divisible by .*=3",
    ),
    ({"model.funnel.factor": 0}, "model.funnel.factor=0"),
    ({"model.funnel.decoder_layers": -1}, "decoder_layers=-1"),
    ({"train.objective": "next_token"}, "bidirectional model sees"),
    ({"model.kind": "decoder"}, "needs a bidirectional model"),
    (
      {
        "model.kind": "hourglass",
        "model.num_layers": 3,
        "model.funnel.stages": (1, 1, 1),
      },
      "needs a bidirectional model",
    ),
    ({"train.mlm_rate": 0.0}, "mlm_rate=0.0"),
    ({"model.vocab_size": 259}, "mask id 259"),
    (
      {
        "model.attention.kind": "tglobal",
        "model.attention.window": 3,
        "model.attention.tglobal_block": 6,
        "model.num_layers": 3,
        "model.funnel.stages": (1, 1, 1),
      },
      "tglobal_block=6 is not a multiple",
    ),
    (  # issue #23: no block of a row completes (a block of the row is fine)
      {
        "model.attention.kind": "tglobal",
        "model.attention.window": 3,
        "model.attention.tglobal_block": 2 * T,
      },
      rf"^model.attention.tglobal_block={2 * T} > data.seq_len={T}: no block",
    ),
    (
      {"model.attention.kind": "block_sparse", "model.attention.window": 3},
      "block_sparse",
    ),
  ],
)
def test_config_errors_are_one_line(overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    _cfg(**{"model.funnel.stages": (1, 1), **overrides})
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------ TPU AOT


@pytest.mark.tpu_aot
def test_small_funnel_tglobal_mlm_step_compiles_for_tpu():
  pytest.importorskip("libtpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    devices = topologies.get_topology_desc(
      platform="tpu", topology_name="v5e:2x2"
    ).devices
  except Exception as e:  # libtpu present but unusable on this host
    pytest.skip(f"no compile-only TPU topology: {e}")
  from efficient_lm import config as config_lib
  from configs import base
  from tests.helpers import override

  cd = override(
    base.get_config(),
    **{
      **FUNNEL,
      "model.num_layers": 2,
      "model.funnel.stages": (1, 1),
      "model.embed_dim": 128,
      "model.num_heads": 4,
      "model.num_kv_heads": 2,
      "model.mlp_dim": 256,
      "model.vocab_size": 512,
      "model.attention.kind": "tglobal",
      "model.attention.window": 16,
      "model.attention.tglobal_block": 16,
      "model.attention.impl": "pallas_tpu",
      "data.seq_len": 256,
      "train.batch_size": 4,
      "mesh.data": 1,
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
    },
  )
  cfg = config_lib.from_config_dict(cd, device_count=len(devices))
  _, lowered, compiled = aot.compile_train_step(cfg, devices)
  assert "tpu_custom_call" in lowered.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_mlm_corruption_frequencies_by_chi_square():
  """Issue #25: the 80/10/10 rule as a distribution, tight enough to see a
  small systematic error. Every input is 0 and the mask id is 3, so a
  picked token becomes 3 (0.8), 1 or 2 (0.1 / 3 each: a random id below
  the mask id) or 0 (0.1 kept + 0.1 / 3 random): chi-square over the
  ~16k picked tokens below its 1e-4 tail, and the pick count within 4.5
  sigma of rate * live (random ids reaching the mask id move the
  chi-square by ~90)."""
  obj = losses.make_objective("mlm", z_loss=0.0, mlm_rate=0.5, mask_id=3)
  b, t = 32, 1024
  seg = np.ones((b, t), np.int32)
  seg[:, -24:] = 0
  batch = {
    "inputs": jnp.zeros((b, t), jnp.int32),
    "targets": jnp.zeros((b, t), jnp.int32),
    "segment_ids": jnp.asarray(seg),
    "positions": jnp.zeros((b, t), jnp.int32),
  }
  out = obj.corrupt(jax.random.key(7), batch)
  picked, new = np.asarray(out["mlm_mask"]), np.asarray(out["inputs"])
  live = seg > 0
  assert not np.any(picked & ~live) and np.all(new[~picked] == 0)
  n_live = live.sum()
  assert abs(picked.sum() - 0.5 * n_live) < 4.5 * np.sqrt(0.25 * n_live)
  counts = np.bincount(new[picked], minlength=4)
  assert counts.size == 4  # ids 0..3 only
  want = np.array([0.1 + 0.1 / 3, 0.1 / 3, 0.1 / 3, 0.8])
  n = counts.sum()
  chi2 = float(np.sum((counts - n * want) ** 2 / (n * want)))
  assert chi2 < 21.1, (counts, n * want)  # df = 3, 1e-4 upper tail
