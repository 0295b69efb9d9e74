"""The Hugging Face family switches of the model config (issue #19): each one
against a small numpy reference written here from the published formula
(Hugging Face transformers' Llama / Qwen2 / Qwen3 / Gemma 2 / Gemma 3
modeling code and modeling_rope_utils), the parameters each adds, and a
decoder with every switch on (also with MLA and TGlobal layers) that stays
causal and whose cached generation equals its full forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm.config import AttentionConfig, ConfigError
from efficient_lm.models import build
from efficient_lm.models.attention import Attention, Tokens
from efficient_lm.models.layers import (
  RMSNorm,
  Rope,
  SwiGLU,
  layer_rope,
  rope,
)
from efficient_lm.training import optim
from tests.helpers import prefill_then_decode, small_config

EPS = 1e-6


def _inputs(b, t, vocab=384, seed=0):
  tok = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return tok, pos, jnp.ones((b, t), jnp.int32)


# A model's float32 logits, compiled once per model structure and shape.
_logits = nnx.jit(lambda model, *args: model(*args)[0])


def _paths(model) -> dict[str, tuple[int, ...]]:
  """Flat parameter names -> shapes."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, k)): tuple(v[...].shape) for k, v in flat}


def _jitter(model, seed=1, std=0.1):
  """Every parameter plus noise, so zero-initialised biases and plus-one
  norm weights matter."""
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [
    p + std * jax.random.normal(k, p.shape, p.dtype)
    for p, k in zip(leaves, keys, strict=True)
  ]
  return nnx.merge(gd, jax.tree.unflatten(tree, leaves), rest)


# ------------------------------------------------------------------- RoPE


def _llama3_reference(theta, k, factor, low, high, old_len):
  """Meta's apply_scaling (Llama 3.1 reference code), float64, per freq."""
  out = []
  for i in range(0, k, 2):
    freq = 1.0 / theta ** (i / k)
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
      out.append(freq)
    elif wavelen > old_len / low:
      out.append(freq / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_llama3_inverse_frequencies_follow_the_published_rule():
  # Llama 3.1 8B: theta 500000, head dim 128, factor 8, low 1, high 4,
  # original context 8192.
  r = Rope(500_000.0, "llama3", 8.0, 1.0, 4.0, 8192)
  got = np.asarray(r.inv_freq(128), np.float64)
  want = _llama3_reference(500_000.0, 128, 8.0, 1.0, 4.0, 8192)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # The three bands: wavelengths < 2048 kept, > 8192 divided by 8, the
  # band between smoothed.
  plain = 500_000.0 ** (-np.arange(0, 128, 2) / 128)
  wavelen = 2 * np.pi / plain
  kept, divided = wavelen < 2048, wavelen > 8192
  assert (kept.sum(), divided.sum()) == (29, 29)  # 6 smoothed
  np.testing.assert_allclose(got[kept], plain[kept], rtol=2e-6)
  np.testing.assert_allclose(got[divided], plain[divided] / 8, rtol=2e-6)
  mid = ~kept & ~divided
  assert np.all(got[mid] < plain[mid]) and np.all(got[mid] > plain[mid] / 8)
  assert got[0] == 1.0
  np.testing.assert_allclose(got[-1], 500_000.0 ** (-126 / 128) / 8, rtol=2e-6)


def _rope_reference(x, pos, inv_freq):
  """Hugging Face's apply_rotary_pos_emb: x cos + rotate_half(x) sin."""
  ang = np.asarray(pos, np.float64)[:, :, None] * inv_freq[None, None]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, :, None]
  k = x.shape[-1]
  rot = np.concatenate([-x[..., k // 2 :], x[..., : k // 2]], -1)
  return x * cos + rot * sin


def test_rope_uses_the_scaled_frequencies():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 7, 3, 16)))
  pos = np.broadcast_to(np.arange(0, 70, 10), (2, 7))
  r = Rope(10_000.0, "llama3", 4.0, 1.0, 4.0, 64)
  want = _rope_reference(x, pos, _llama3_reference(1e4, 16, 4.0, 1.0, 4.0, 64))
  got = rope(jnp.asarray(x), jnp.asarray(pos), r)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # The scaling is visible at these sizes.
  assert not np.allclose(got, rope(jnp.asarray(x), jnp.asarray(pos), 1e4))


def test_linear_scaling_is_position_interpolation():
  r = Rope(10_000.0, "linear", 4.0)
  base = Rope(10_000.0).inv_freq(16)
  np.testing.assert_allclose(r.inv_freq(16), base / 4, rtol=1e-6)
  x = jax.random.normal(jax.random.key(1), (1, 9, 2, 16))
  pos = jnp.arange(0, 36, 4)[None]
  np.testing.assert_allclose(
    rope(x, pos, r), rope(x, pos / 4, 10_000.0), atol=1e-5
  )


def test_each_layer_gets_its_own_rope():
  cfg = small_config(
    **{
      "model.num_layers": 2,
      "model.attention.pattern": "sliding_window,dense",
      "model.attention.window": 4,
      "model.rope_theta": 1e6,
      "model.rope_local_theta": 1e4,
      "model.rope_scaling": "linear",
      "model.rope_scaling_factor": 8.0,
    }
  ).model
  assert layer_rope(cfg, "sliding_window") == Rope(1e4)
  assert layer_rope(cfg, "dense") == Rope(1e6, "linear", 8.0)
  assert layer_rope(cfg, "tglobal") == Rope(1e6, "linear", 8.0)
  # Without rope_local_theta every layer is on rope_theta with scaling.
  plain = small_config(**{"model.rope_scaling": "linear"}).model
  assert layer_rope(plain, "sliding_window").theta == plain.rope_theta
  assert layer_rope(plain, "sliding_window").scaling == "linear"
  # The built model's layers carry them.
  model = build(cfg, nnx.Rngs(0))
  ropes = {
    m.rope_theta for _, m in nnx.iter_graph(model) if isinstance(m, Attention)
  }
  assert ropes == {Rope(1e4), Rope(1e6, "linear", 8.0)}


# ---------------------------------------------------------------- norms, MLP


def test_plus_one_norm():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8)) * 3
  plain = RMSNorm(8, eps=EPS, param_dtype=jnp.float32)
  gemma = RMSNorm(8, eps=EPS, param_dtype=jnp.float32, plus_one=True)
  # w = 0 (the initialisation) is the plain norm with scale 1.
  np.testing.assert_array_equal(np.asarray(gemma.scale[...]), np.zeros(8))
  np.testing.assert_allclose(gemma(x), plain(x), atol=1e-6)
  w = np.linspace(-0.5, 0.7, 8, dtype=np.float32)
  gemma.scale[...] = jnp.asarray(w)
  plain.scale[...] = jnp.asarray(w)
  xn = np.asarray(x, np.float64)
  normed = xn / np.sqrt(np.mean(xn**2, -1, keepdims=True) + EPS)
  np.testing.assert_allclose(gemma(x), normed * (1 + w), atol=1e-5)
  np.testing.assert_allclose(plain(x), normed * w, atol=1e-5)
  assert not np.allclose(gemma(x), plain(x), atol=1e-2)


def test_gelu_tanh_gate_is_geglu():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 2
  mlp = SwiGLU(
    8,
    16,
    rngs=nnx.Rngs(0),
    param_dtype=jnp.float32,
    out_std=0.5,
    activation="gelu_tanh",
  )
  g_std = np.asarray(mlp.gate_DF[...]) * 40  # gate inputs of order 1..3
  mlp.gate_DF[...] = jnp.asarray(g_std)
  xn = np.asarray(x, np.float64)
  gate = xn @ g_std
  up = xn @ np.asarray(mlp.up_DF[...])
  tanh_gelu = (
    0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
  )
  want = (tanh_gelu * up) @ np.asarray(mlp.down_FD[...])
  got = np.asarray(mlp(x))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Not the exact (erf) GELU, nor SiLU.
  erf_gelu = 0.5 * gate * (1 + np.vectorize(math.erf)(gate / np.sqrt(2)))
  assert (
    np.abs(got - (erf_gelu * up) @ np.asarray(mlp.down_FD[...])).max() > 1e-4
  )
  mlp.activation = "silu"
  assert np.abs(np.asarray(mlp(x)) - got).max() > 1e-3


# ------------------------------------------------------------- attention


def _attention(**kw):
  """A qkv Attention with random (jittered) parameters, float32."""
  norm_plus_one = kw.pop("norm_plus_one", False)
  a = AttentionConfig(impl="xla", **kw)
  m = Attention(
    embed_dim=16,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=Rope(100.0),
    cfg=a,
    causal=True,
    rngs=nnx.Rngs(params=0),
    param_dtype=jnp.float32,
    out_std=0.2,
    norm_eps=EPS,
    norm_plus_one=norm_plus_one,
  )
  return _jitter(m, std=0.3)


def _np_norm(x, w, plus_one):
  x = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + EPS)
  return x * ((1 + w) if plus_one else w)


def _attention_reference(m, x, pos, *, window=0, cap=None, scalar=None):
  """The attention layer from its parameters in numpy, Hugging Face's
  eager path: q/k/v projections (+ biases), q/k norms over head_dim,
  RoPE, scores * scale (query_pre_attn_scalar ** -0.5 or head_dim **
  -0.5), soft cap, causal (sliding) mask, softmax, o projection."""
  p = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64)
  q = np.einsum("btd,dhk->bthk", x, p(m.q_DHK))
  k = np.einsum("btd,dgk->btgk", x, p(m.k_DGK))
  v = np.einsum("btd,dgk->btgk", x, p(m.v_DGK))
  if m.q_bias_HK is not None:
    q, k, v = q + p(m.q_bias_HK), k + p(m.k_bias_GK), v + p(m.v_bias_GK)
  if m.q_norm is not None:
    q = _np_norm(q, p(m.q_norm.scale), m.q_norm.plus_one)
    k = _np_norm(k, p(m.k_norm.scale), m.k_norm.plus_one)
  inv = np.asarray(Rope(100.0).inv_freq(8), np.float64)
  q, k = _rope_reference(q, pos, inv), _rope_reference(k, pos, inv)
  k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  s = np.einsum("bthk,bshk->bhts", q, k) * (scalar or 8) ** -0.5
  if cap is not None:
    s = cap * np.tanh(s / cap)
  t = x.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  ok = (j <= i) & ((i - j < window) if window else True)
  s = np.where(ok, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshk->bthk", w, v)
  return np.einsum("bthk,hkd->btd", o, p(m.o_HKD))


@pytest.mark.parametrize(
  "kw",
  [
    {},
    {"qk_norm": True},
    {"qk_norm": True, "norm_plus_one": True},
    {"qkv_bias": True},
    {"query_pre_attn_scalar": 3.0},
    {
      "qk_norm": True,
      "qkv_bias": True,
      "norm_plus_one": True,
      "query_pre_attn_scalar": 5.0,
      "logits_soft_cap": 2.0,
      "kind": "sliding_window",
      "window": 3,
    },
  ],
  ids=["plain", "qk_norm", "qk_norm_plus_one", "qkv_bias", "scalar", "gemma"],
)
def test_attention_against_the_reference(kw):
  m = _attention(**kw)
  x = jax.random.normal(jax.random.key(3), (2, 9, 16))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  seg = jnp.ones((2, 9), jnp.int32)
  got = m(Tokens(x, pos, seg))
  want = _attention_reference(
    m,
    x,
    np.asarray(pos),
    window=kw.get("window", 0),
    cap=kw.get("logits_soft_cap"),
    scalar=kw.get("query_pre_attn_scalar"),
  )
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_attention_switches_add_exactly_their_params():
  base = set(_paths(_attention()))
  assert base == {"q_DHK", "k_DGK", "v_DGK", "o_HKD"}
  assert _paths(_attention(qkv_bias=True)).items() - _paths(
    _attention()
  ).items() == {
    ("q_bias_HK", (4, 8)),
    ("k_bias_GK", (2, 8)),
    ("v_bias_GK", (2, 8)),
  }
  assert set(_paths(_attention(qk_norm=True))) - base == {
    "q_norm.scale",
    "k_norm.scale",
  }
  assert _paths(_attention(qk_norm=True))["q_norm.scale"] == (8,)
  assert set(_paths(_attention(query_pre_attn_scalar=3.0))) == base
  # Biases change the outputs once they are non-zero.
  a = _attention(qkv_bias=True)
  x = jax.random.normal(jax.random.key(3), (1, 5, 16))
  t = Tokens(x, jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))
  before = a(t)
  a.v_bias_GK[...] = a.v_bias_GK[...] + 1.0
  assert not np.allclose(a(t), before, atol=1e-3)


def test_biases_are_not_weight_decayed():
  assert not optim.decays(("layers", "heads", "bias"))
  assert not optim.decays(("kv_heads", "bias"))
  assert optim.decays(("embed", "heads", "head_dim"))


# -------------------------------------------------------------- the model

_DEFAULT_TREE = {
  "embed.table_VD": (384, 64),
  "final_norm.scale": (64,),
  **{
    f"stack.groups.segment_0.layer_0.{name}": (2, *shape)
    for name, shape in {
      "attn.q_DHK": (64, 4, 16),
      "attn.k_DGK": (64, 2, 16),
      "attn.v_DGK": (64, 2, 16),
      "attn.o_HKD": (4, 16, 64),
      "attn_norm.scale": (64,),
      "mlp_norm.scale": (64,),
      "mlp.gate_DF": (64, 128),
      "mlp.up_DF": (64, 128),
      "mlp.down_FD": (128, 64),
    }.items()
  },
}


def test_defaults_keep_the_parameter_tree():
  model = build(small_config().model, nnx.Rngs(0))
  assert _paths(model) == _DEFAULT_TREE
  # Switches without parameters keep it too.
  for key, value in [
    ("model.mlp_activation", "gelu_tanh"),
    ("model.embed_scale", True),
    ("model.final_logits_soft_cap", 30.0),
    ("model.rope_scaling", "llama3"),
    ("model.attention.query_pre_attn_scalar", 20.0),
    ("model.norm_plus_one", True),
  ]:
    model = build(small_config(**{key: value}).model, nnx.Rngs(0))
    assert _paths(model) == _DEFAULT_TREE, key
  layer = "stack.groups.segment_0.layer_0."
  post = build(small_config(**{"model.post_norms": True}).model, nnx.Rngs(0))
  assert _paths(post).items() - _DEFAULT_TREE.items() == {
    (layer + "post_attn_norm.scale", (2, 64)),
    (layer + "post_mlp_norm.scale", (2, 64)),
  }


def test_plus_one_norms_start_at_zero():
  model = build(
    small_config(**{"model.norm_plus_one": True}).model, nnx.Rngs(0)
  )
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  norms = [v[...] for k, v in flat if k[-1] == "scale"]
  assert len(norms) == 3 and all(not np.any(n) for n in norms)


def test_post_norms_normalise_each_branch():
  """Block output = x + N(Attn(N(x))), then + N(MLP(N(.))): zeroing a
  post norm's weight silences that branch."""
  cfg = small_config(**{"model.post_norms": True, "model.num_layers": 1})
  model = _jitter(build(cfg.model, nnx.Rngs(0)))
  tok, pos, seg = _inputs(2, 6)
  base = _logits(model, tok, pos, seg)
  block = model.stack.groups["segment_0"]["layer_0"]
  block.post_mlp_norm.scale[...] = block.post_mlp_norm.scale[...] * 0
  assert not np.allclose(_logits(model, tok, pos, seg), base, atol=1e-3)
  block.post_attn_norm.scale[...] = block.post_attn_norm.scale[...] * 0
  # Both branches silenced: the logits of the bare embedding.
  np.testing.assert_allclose(
    _logits(model, tok, pos, seg),
    model.logits(model.embed_tokens(tok)),
    atol=1e-5,
  )


def test_embed_scale_and_final_soft_cap():
  model = _jitter(build(small_config().model, nnx.Rngs(0)), std=0.3)
  state = nnx.state(model)
  tok, pos, seg = _inputs(2, 7)

  def switched(**overrides):
    """`model` with the same parameters and other switches."""
    other = build(small_config(**overrides).model, nnx.Rngs(0))
    return nnx.merge(nnx.graphdef(other), state)

  scaled = switched(**{"model.embed_scale": True})
  np.testing.assert_allclose(
    scaled.embed_tokens(tok), model.embed_tokens(tok) * 8.0, rtol=1e-6
  )
  # The factor is rounded to the compute dtype (bf16: sqrt(48) as bf16).
  bf = build(
    small_config(
      **{
        "model.embed_scale": True,
        "model.embed_dim": 48,
        "model.dtype": "bfloat16",
      }
    ).model,
    nnx.Rngs(0),
  )
  want = bf.embed(tok, jnp.bfloat16) * jnp.asarray(math.sqrt(48), jnp.bfloat16)
  np.testing.assert_array_equal(bf.embed_tokens(tok), want)
  # cap * tanh(logits / cap) on the float32 logits.
  capped = switched(**{"model.final_logits_soft_cap": 2.0})
  raw = np.asarray(_logits(model, tok, pos, seg))
  got = np.asarray(_logits(capped, tok, pos, seg))
  assert np.abs(raw).max() > 4.0  # the cap is reached
  assert np.abs(got).max() <= 2.0
  np.testing.assert_allclose(got, 2.0 * np.tanh(raw / 2.0), atol=1e-5)


# Every switch on, with a sliding / dense pattern on two RoPE bases; MLA and
# TGlobal layers with the switches they take.
_GEMMA = {
  "model.num_layers": 3,
  "model.head_dim": 24,  # != embed_dim / num_heads
  "model.attention.pattern": "sliding_window,sliding_window,dense",
  "model.attention.window": 4,
  "model.norm_plus_one": True,
  "model.post_norms": True,
  "model.mlp_activation": "gelu_tanh",
  "model.embed_scale": True,
  "model.final_logits_soft_cap": 3.0,
  "model.attention.logits_soft_cap": 5.0,
  "model.attention.qk_norm": True,
  "model.attention.qkv_bias": True,
  "model.attention.query_pre_attn_scalar": 20.0,
  "model.rope_local_theta": 100.0,
  "model.rope_scaling": "linear",
  "model.rope_scaling_factor": 2.0,
}
_LLAMA3 = {
  "model.rope_scaling": "llama3",
  "model.rope_scaling_factor": 4.0,
  "model.rope_original_max_len": 32,
}
SWITCHED = {
  "gemma": _GEMMA,
  "tglobal": {
    **_LLAMA3,
    "model.attention.pattern": "sliding_window,tglobal",
    "model.attention.window": 4,
    "model.attention.tglobal_block": 3,
    "model.rope_local_theta": 100.0,
    "model.attention.qk_norm": True,
    "model.attention.qkv_bias": True,
    "model.attention.query_pre_attn_scalar": 12.0,
    "model.norm_plus_one": True,
    "model.post_norms": True,
  },
  "mla": {
    **_LLAMA3,
    "model.attention.projection": "mla",
    "model.attention.q_lora_rank": 16,
    "model.attention.pattern": "sliding_window,dense",
    "model.attention.window": 4,
    "model.rope_local_theta": 100.0,
    "model.norm_plus_one": True,
    "model.post_norms": True,
    "model.mlp_activation": "gelu_tanh",
    "model.embed_scale": True,
  },
}


@pytest.mark.parametrize("name", sorted(SWITCHED))
def test_switched_decoder_is_causal_and_caches_exactly(name):
  cfg = small_config(**SWITCHED[name])
  gd, state = nnx.split(_jitter(build(cfg.model, nnx.Rngs(0))))
  forward = jax.jit(lambda s, *a: nnx.merge(gd, s)(*a)[0])
  step = jax.jit(lambda s, *a, cache: nnx.merge(gd, s)(*a, cache=cache))
  b, t, p = 2, 13, 7  # prompt > every window
  tok, pos, seg = _inputs(b, t)
  base = forward(state, tok, pos, seg)
  for cut in (2, 6):
    other = jax.random.randint(jax.random.key(cut), tok.shape, 0, 384)
    out = forward(
      state, tok.at[:, cut + 1 :].set(other[:, cut + 1 :]), pos, seg
    )
    np.testing.assert_allclose(out[:, : cut + 1], base[:, : cut + 1], atol=1e-6)
    assert not np.allclose(out[:, cut + 1 :], base[:, cut + 1 :], atol=1e-4)
  cache = nnx.merge(gd, state).init_cache(b, t)
  got, _ = prefill_then_decode(
    lambda *a, cache: step(state, *a, cache=cache), tok, pos, seg, cache, p
  )
  np.testing.assert_allclose(got, base, atol=2e-5, rtol=0)


# ------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"model.rope_scaling_factor": 0.0}, "model.rope_scaling_factor=0.0"),
    (
      {
        "model.rope_scaling": "llama3",
        "model.rope_low_freq_factor": 4.0,
        "model.rope_high_freq_factor": 4.0,
      },
      "model.rope_high_freq_factor=4.0: rope_scaling='llama3' needs it above",
    ),
    (
      {"model.rope_scaling": "llama3", "model.rope_original_max_len": 0},
      "model.rope_original_max_len=0",
    ),
    (
      {"model.rope_local_theta": 1e4},
      "model.rope_local_theta=10000.0: no layer",
    ),
    ({"model.rope_local_theta": -1.0}, "model.rope_local_theta=-1.0"),
    ({"model.final_logits_soft_cap": 0.0}, "model.final_logits_soft_cap=0.0"),
    (
      {"model.attention.logits_soft_cap": -3.0},
      "model.attention.logits_soft_cap=-3.0",
    ),
    (
      {"model.attention.query_pre_attn_scalar": 0.0},
      "model.attention.query_pre_attn_scalar=0.0",
    ),
    (
      {"model.attention.projection": "mla", "model.attention.qk_norm": True},
      "model.attention.qk_norm=True with projection='mla'",
    ),
    (
      {"model.attention.projection": "mla", "model.attention.qkv_bias": True},
      "model.attention.qkv_bias=True with projection='mla'",
    ),
    (
      {
        "model.attention.projection": "mla",
        "model.attention.query_pre_attn_scalar": 8.0,
      },
      "model.attention.query_pre_attn_scalar=8.0 with projection='mla'",
    ),
    ({"model.mlp_activation": "relu"}, "model.mlp_activation='relu'"),
    ({"model.rope_scaling": "yarn"}, "model.rope_scaling='yarn'"),
  ],
)
def test_unsupported_combinations_are_one_line_errors(overrides, message):
  with pytest.raises(ConfigError) as e:
    small_config(**overrides)
  assert message in str(e.value)
  assert "\n" not in str(e.value)
