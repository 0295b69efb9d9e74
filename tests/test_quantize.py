"""Quantization through qwix (models/quantization.py, runs.quantize_run,
efficient_lm.quantize): each scheme's matmul against a NumPy reference,
PTQ of a trained tiny run (loss, parameter bytes), quantized runs written
and loaded as they are, QAT resume, and the one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from efficient_lm import models, runs
from efficient_lm.generate import Generator
from efficient_lm.config import ConfigError
from efficient_lm.config.schemes import parse_scheme
from efficient_lm.models import quantization
from efficient_lm.training import loop
from tests.helpers import (
  REPO,
  cli_env,
  crash_and_resume,
  small_config,
  snapshot,
)

D, F, B = 64, 96, 5


class _Linear(nnx.Module):
  def __init__(self, w):
    self.w_DF = nnx.Param(jnp.asarray(w), logical_axes=("embed", "mlp"))

  def __call__(self, x_BD):
    return jnp.einsum(
      "BD,DF->BF", x_BD, jnp.asarray(self.w_DF[...], x_BD.dtype)
    )


class _Net(nnx.Module):
  """A layer below the root, as qwix's rule (quantization.LAYERS) wants."""

  def __init__(self, w):
    self.lin = _Linear(w)

  def __call__(self, x_BD):
    return self.lin(x_BD)


def _int_quantize(a, qmax, axis):
  """Symmetric absmax in float32 (as the model's weights are): scale =
  absmax / (qmax + 0.5) over `axis`, values rounded (half to even) and
  clipped to [-qmax - 1, qmax]; both returned as float64."""
  a = a.astype(np.float32)
  scale = np.abs(a).max(axis=axis, keepdims=True) / np.float32(qmax + 0.5)
  q = np.clip(np.round(a / scale), -qmax - 1, qmax)
  return q.astype(np.float64), scale.astype(np.float64)


def _reference(scheme: str, x, w):
  """The scheme's product by hand: quantize (float32), integer (or fp8)
  product in float64, rescale."""
  if scheme == "int8_weights":
    q, s = _int_quantize(w, 127, axis=0)  # one scale per output channel
    return (x @ q) * s
  if scheme.startswith("int4_weights"):
    g = parse_scheme(scheme).group
    wg = w.reshape(D // g, g, F)  # groups along the contracted axis
    q, s = _int_quantize(wg, 7, axis=1)
    xg = x.reshape(B, D // g, g)
    return np.einsum("bng,ngf->bf", xg, q * 1.0 * s)
  if scheme == "int8_dynamic":
    qw, sw = _int_quantize(w, 127, axis=0)
    qx, sx = _int_quantize(x, 127, axis=1)  # one scale per token
    return (qx @ qw) * sx * sw
  assert scheme == "fp8"
  fp8 = ml_dtypes.float8_e4m3fn
  top = float(ml_dtypes.finfo(fp8).max)

  def q(a, axis):
    s = np.abs(a).max(axis=axis, keepdims=True) / np.float32(top)
    v = (a / s).astype(fp8).astype(np.float64)
    return v, s.astype(np.float64)

  qw, sw = q(w, 0)
  qx, sx = q(x, 1)
  return (qx @ qw) * sx * sw


@pytest.mark.parametrize(
  "scheme", ["int8_weights", "int4_weights:16", "int8_dynamic", "fp8"]
)
def test_quantized_matmul_matches_numpy_reference(scheme):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D, F)).astype(np.float32)
  x = rng.normal(size=(B, D)).astype(np.float32)
  # Each block's largest magnitude maps to the edge of the top bucket
  # (qmax + 0.5), where float rounding decides between -qmax and -qmax-1
  # for a negative one: make it positive (clipped to qmax either way).
  for r in range(0, D, 16):  # every int4 group's first row, and row 0
    w[r] = 1.5 * np.abs(w).max(axis=0)
  x[:, 0] = 1.5 * np.abs(x).max(axis=1)
  net = qwix_net = _Net(w)
  provider = quantization._Ptq(quantization.rules(parse_scheme(scheme)))
  import qwix

  qwix_net = qwix.quantize_model(net, provider, jnp.asarray(x))
  stored = qwix_net.lin.w_DF.array.qvalue[...]
  assert stored.dtype != jnp.float32  # the weight is stored quantized
  got = np.asarray(jax.jit(lambda m, x: m(x))(qwix_net, jnp.asarray(x)))
  want = _reference(scheme, x, w)
  float_out = x.astype(np.float64) @ w.astype(np.float64)
  # The reference of the same scheme, to float32 rounding; far tighter
  # than the quantization error itself.
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert np.abs(want - float_out).max() > 100 * np.abs(got - want).max()


# ------------------------------------------------------------ trained run

# head_dim 32: int4's group of 32 divides every contracted axis.
_TINY = {
  "model.num_heads": 2,
  "model.num_kv_heads": 1,
  "train.learning_rate": 3e-3,
  "train.warmup_steps": 5,
  "train.log_every": 50,
  "train.eval_every": 1000,
  "train.eval_batches": 2,
  "checkpoint.async_save": False,
  "mesh.data": 8,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A byte-level run of 120 steps on the embedded corpus."""
  root = tmp_path_factory.mktemp("quantize")
  cfg = small_config(
    **{**_TINY, "train.steps": 120, "checkpoint.every_steps": 120}
  )
  workdir = str(root / "run")
  loop.run(cfg, workdir)
  return types.SimpleNamespace(root=root, workdir=workdir, cfg=cfg)


@pytest.fixture(scope="module")
def float_run(trained):
  return runs.load_run(trained.workdir, devices=jax.devices()[:1])


# int8 weight-only PTQ of a trained tiny model: within 0.01 nats of its
# float loss (measured: ~1e-4).
INT8_TOLERANCE = 0.01


def test_int8_weights_eval_within_tolerance_and_bytes(trained, float_run):
  before = snapshot(trained.workdir)
  r = runs.evaluate_quantized(float_run, "int8_weights", num_batches=4)
  assert r["quantize"] == "int8_weights"
  assert abs(r["loss_delta"]) < INT8_TOLERANCE, r
  assert r["loss_delta"] == r["loss"] - r["float_loss"]
  assert r["loss"] != r["float_loss"]  # the weights did change
  assert r["quantized_bytes"] <= 0.3 * r["float_quantized_bytes"], r
  assert r["param_bytes"] < r["float_param_bytes"]
  assert snapshot(trained.workdir) == before  # the source is untouched


def test_int4_weights_bytes(float_run, tmp_path):
  q = runs.quantize_run(float_run, parse_scheme("int4_weights:32"))
  got = quantization.quantized_bytes(q.params, float_run.params)
  assert got[0] <= 0.17 * got[1], got
  leaves = jax.tree.leaves(q.params)
  assert any(a.dtype == jnp.int4 for a in leaves)
  # An int4 run is written (its checkpoint's fingerprints once failed to
  # bitcast int4) and loads back as it was.
  runs.write_run(str(tmp_path / "q4"), q.config, q.params, q.model_state)
  back = runs.load_run(str(tmp_path / "q4"), devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, back.params, q.params)


def test_bad_schemes_are_one_line_errors(float_run):
  with pytest.raises(ConfigError, match="unknown scheme"):
    runs.quantize_run(float_run, parse_scheme("int3_weights"))
  with pytest.raises(ConfigError, match="group size 24 does not divide"):
    runs.quantize_run(float_run, parse_scheme("int4_weights:24"))
  gpu = types.SimpleNamespace(
    platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100"
  )
  with pytest.raises(ConfigError, match="no fp8 matmul"):
    quantization.check_device(parse_scheme("fp8"), gpu)
  quantization.check_device(parse_scheme("int8_dynamic"), gpu)


def _cli(*args):
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_quantize_cli_writes_a_run_that_loads_as_is(trained, float_run):
  """DST holds int8 weights and scales, loads without re-quantizing (its
  loss equals PTQ of the source on the same batches), and quantizing it
  again is one error line; SRC is untouched."""
  out = trained.root / "q8"
  before = snapshot(trained.workdir)
  p = _cli(
    "-m",
    "efficient_lm.quantize",
    f"--workdir={trained.workdir}",
    f"--out={out}",
    "--scheme=int8_weights",
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert "bytes on disk against" in p.stdout
  assert snapshot(trained.workdir) == before
  q = runs.load_run(str(out), devices=jax.devices()[:1])
  assert q.config.model.quantization == "int8_weights"
  assert any(a.dtype == jnp.int8 for a in jax.tree.leaves(q.params))
  want = runs.quantize_run(float_run, parse_scheme("int8_weights"))
  jax.tree.map(np.testing.assert_array_equal, q.params, want.params)
  assert runs.evaluate(q, 2)["loss"] == runs.evaluate(want, 2)["loss"]
  again = _cli(
    "-m",
    "efficient_lm.quantize",
    f"--workdir={out}",
    f"--out={trained.root / 'q8q8'}",
    "--scheme=int8_weights",
  )
  assert again.returncode != 0
  lines = again.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "already quantized" in lines[-1]
  assert not (trained.root / "q8q8").exists()


# ------------------------------------------------------------------- QAT


def test_qat_resume_after_crash_is_bit_identical(tmp_path):
  """train.quantization=int4_weights:32: a run that dies after step 5
  (checkpoint at 4) and is resumed ends with the params of an
  uninterrupted run, bit for bit."""
  cfg = small_config(
    **{
      **_TINY,
      "train.steps": 8,
      "train.log_every": 1,
      "checkpoint.every_steps": 4,
      "train.quantization": "int4_weights:32",
    }
  )

  whole, broken, _ = crash_and_resume(cfg, tmp_path, crash_at=5)
  a = runs.load_run(whole, devices=jax.devices()[:1])
  b = runs.load_run(broken, devices=jax.devices()[:1])
  assert a.step == b.step == 8
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  # The QAT forward is the PTQ forward of the same scheme.
  q = runs.quantize_run(a, parse_scheme("int4_weights:32"))
  assert runs.evaluate(a, 2)["loss"] == pytest.approx(
    runs.evaluate(q, 2)["loss"], abs=1e-5
  )


@pytest.mark.slow
def test_qat_resume_after_kill_is_bit_identical(tmp_path):
  """The CLI variant: kill -9 after step 12 (checkpoint at 10), resume."""
  from tests.helpers import SMALL_FLAGS, kill_and_resume

  flags = [*SMALL_FLAGS, "--config.train.quantization=int8_dynamic"]
  kill_and_resume(tmp_path, flags=flags)


@pytest.mark.slow
def test_qat_ptq_gap_is_smaller_than_a_float_runs_at_int4(tmp_path):
  """Two runs of the same config and seed, one trained with QAT at int4:
  the QAT run's int4 PTQ loss is closer to its own float loss than the
  float run's int4 PTQ loss is to its float loss."""
  scheme = "int4_weights:32"
  gaps = {}
  for name, qat in (("float", ""), ("qat", scheme)):
    cfg = small_config(
      **{
        **_TINY,
        "train.steps": 200,
        "checkpoint.every_steps": 200,
        "train.quantization": qat,
      }
    )
    workdir = str(tmp_path / name)
    loop.run(cfg, workdir)
    run = runs.load_run(workdir, devices=jax.devices()[:1])
    q = runs.quantize_run(run, parse_scheme(scheme))
    gaps[name] = abs(
      runs.evaluate(q, 8)["loss"]
      - runs.evaluate(runs.without_qat(run), 8)["loss"]
    )
  assert gaps["qat"] < gaps["float"], gaps


# Routed models quantize too: MoR reads its router one recursion step's
# column at a time, which qwix's PTQ once replaced by a quantized vector
# (an IndexError at the next step); the quantized run must decode with
# cache = recompute like the float one.
_ROUTED = {
  "mod": {"model.routing.kind": "mod", "model.routing.every": 2},
  "mor": {
    "model.routing.kind": "mor",
    "model.routing.sharing": "middle_cycle",
    "model.routing.num_recursions": 2,
    "model.num_layers": 4,
  },
}


@pytest.mark.parametrize("name", sorted(_ROUTED))
def test_routed_run_quantizes_and_decodes_as_it_recomputes(tmp_path, name):
  cfg = small_config(**{**_TINY, "mesh.data": 1, **_ROUTED[name]})
  model = models.build(cfg.model, nnx.Rngs(params=0))
  _, params, model_state = nnx.split(model, nnx.Param, models.ModelState)
  runs.write_run(str(tmp_path / "run"), cfg, params, model_state)
  run = runs.load_run(
    str(tmp_path / "run"), devices=jax.devices()[:1], quantize="int8_weights"
  )
  leaves = jax.tree.leaves(run.params)
  assert any(a.dtype == jnp.int8 for a in leaves)
  gen = Generator(*nnx.split(run.model()))
  prompts = [list(range(40, 52)), [7, 3, 9]]
  cached, _ = gen.generate(prompts, max_new_tokens=8)
  recomputed, _ = gen.generate(prompts, max_new_tokens=8, use_cache=False)
  assert cached == recomputed


# ------------------------------------------------------------ SmoothQuant


def _batch(seed: int, b: int = 4, t: int = 32) -> dict:
  tok = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)))
  return {
    "inputs": tok,
    "targets": tok,
    "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
    "segment_ids": jnp.ones((b, t), jnp.int32),
  }


def _logits(params, cfg, batch):
  from efficient_lm.surgery.model import Surgery

  model = Surgery.of(cfg, params).model()
  return np.asarray(
    model(batch["inputs"], batch["positions"], batch["segment_ids"])[0]
  )


@pytest.mark.parametrize(
  "attention", [{}, {"model.attention.projection": "mla"}], ids=["gqa", "mla"]
)
def test_smoothing_alone_preserves_the_logits(attention):
  """SmoothQuant's folds (norm -> q/k/v or MLA's down projections, norm ->
  gate/up, up -> down) leave a float32 model's function unchanged while
  changing its weights."""
  from efficient_lm.surgery import smooth

  cfg = small_config(**{"model.num_layers": 1, **attention})
  model = models.build(cfg.model, nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  new, report = smooth.smooth_params(cfg, params, 0.5, [_batch(0)])
  folds = ["attn_norm->qkv", "mlp_norm->gate,up", "up->down"]
  assert report["folds"] == [folds]
  batch = _batch(1)
  want, got = _logits(params, cfg, batch), _logits(new, cfg, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), params, new)
  assert sum(jax.tree.leaves(changed)) >= 6  # norms, q/k/v, gate/up/down


def test_smooth_shrinks_int8_dynamic_error_on_outlier_channels(
  trained, float_run, tmp_path
):
  """A trained run given outlier input channels (4 channels of every
  attention norm's scale x 30, the matching rows of q/k/v / 30: the same
  float function): `quantize --scheme=int8_dynamic --smooth=0.5` writes a
  run (provenance records smooth: 0.5) whose logits are closer to the
  float ones than int8_dynamic's without smoothing."""
  from efficient_lm import quantize
  from efficient_lm.surgery.model import Surgery

  cfg = float_run.config
  s = Surgery.of(cfg, float_run.params)
  ch = np.array([3, 17, 40, 61])
  layers = []
  for layer in s.layers:
    layer = jax.tree.map(np.copy, layer)
    layer["attn_norm"]["scale"][ch] *= 30.0
    for w in ("q_DHK", "k_DGK", "v_DGK"):
      layer["attn"][w][ch] /= 30.0
    layers.append(layer)
  params = dataclasses.replace(s, layers=layers).params()
  src = str(tmp_path / "outlier")
  runs.write_run(src, cfg, params, float_run.model_state, float_run.tokenizer)
  out = tmp_path / "smoothed"
  quantize.main(
    [
      f"--workdir={src}",
      f"--out={out}",
      "--scheme=int8_dynamic",
      "--smooth=0.5",
      "--calibration_tokens=512",
    ]
  )
  prov = json.loads((out / "provenance.json").read_text())
  assert prov["source"]["smooth"] == 0.5
  batch = _batch(2)
  outlier = runs.load_run(src, devices=jax.devices()[:1])
  plain = runs.quantize_run(outlier, parse_scheme("int8_dynamic"))
  smoothed = runs.load_run(str(out), devices=jax.devices()[:1])
  assert smoothed.config.model.quantization == "int8_dynamic"

  def logits(run):
    m = run.model()
    return np.asarray(
      m(batch["inputs"], batch["positions"], batch["segment_ids"])[0]
    )

  want = logits(outlier)
  err_plain = np.mean((logits(plain) - want) ** 2)
  err_smooth = np.mean((logits(smoothed) - want) ** 2)
  print(f"logit MSE int8_dynamic {err_plain:.3g}, smoothed {err_smooth:.3g}")
  assert err_smooth < err_plain, (err_smooth, err_plain)


@pytest.mark.parametrize(
  "argv, expect",
  [
    (["--scheme=int8_weights", "--smooth=0.5"], "--smooth needs"),
    (["--smooth=0.5"], "--smooth needs"),
    (["--scheme=int8_dynamic", "--smooth=1.5"], "--smooth=1.5: expected"),
    (["--scheme=int8_dynamic", "--smooth=-0.1"], "expected an alpha in"),
    (["--scheme=int8_dynamic", "--calibration_tokens=8"], "give --smooth"),
    (["--scheme=int8_dynamic", "--config.data.seq_len=8"], "give --smooth"),
  ],
)
def test_smooth_misuse_is_one_error_line(tmp_path, capsys, argv, expect):
  from efficient_lm import quantize

  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    quantize.main([f"--workdir={tmp_path}", f"--out={out}", *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0]
  assert not out.exists()


# ------------------------------------------------- dropless MoE experts

_MOE = {  # configs/tiny_moe.py's MoE shape, small_config's width
  "model.moe.num_experts": 8,
  "model.moe.top_k": 2,
  "model.moe.num_shared_experts": 1,
  "model.moe.expert_mlp_dim": 96,
  "model.moe.first_dense": 1,
  "model.moe.capacity_factor": 0.0,  # dropless: jax.lax.ragged_dot
}

# int8 PTQ of the whole tiny MoE (experts included): the mean |logit
# error| within 1% of the float logits' mean magnitude (measured: 0.37%;
# the largest error, 1.5% of the largest logit, is at a token whose top-k
# the int8 router flips).
MOE_INT8_TOLERANCE = 0.01


def test_dropless_moe_experts_quantize_to_int8():
  """qwix's PTQ does not intercept ragged_dot: quantization.quantize
  stores the dropless experts' weights as int8 values and per-(expert,
  output channel) scales (<= 0.3x their float32 bytes, equal to a NumPy
  reference of the same quantization), and the quantized model's logits
  stay within MOE_INT8_TOLERANCE of the float model's (the router and the
  attention quantized too); QAT's simulated forward equals PTQ's."""
  cfg = small_config(**{**_MOE, "model.num_layers": 2})
  model = models.build(cfg.model, nnx.Rngs(params=0))
  q = quantization.quantize(model, parse_scheme("int8_weights"), seq_len=32)
  fparams = quantization._flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  qparams = quantization._flat(nnx.to_pure_dict(nnx.state(q, nnx.Param)))

  def experts(flat):
    return [
      a
      for k, a in flat.items()
      if any(n in k for n in quantization.EXPERT_WEIGHTS)
    ]

  qbytes = quantization.param_bytes(experts(qparams))
  fbytes = quantization.param_bytes(experts(fparams))
  assert qbytes <= 0.3 * fbytes, (qbytes, fbytes)
  # One expert weight against NumPy: the gate of layer 1 (the MoE
  # layer; stacked index 0), expert 3, [D, F], a scale per output channel.
  key = ("stack", "groups", "segment_1", "layer_0", "mlp", "gate_EDF")
  w = np.asarray(fparams[key])[0, 3]
  qv = np.asarray(qparams[(*key, "array", "qvalue")])[0, 3]
  sc = np.asarray(qparams[(*key, "array", "scale")])[0, 3]
  want_q, want_s = _int_quantize(w, 127, axis=0)
  assert qv.dtype == np.int8
  np.testing.assert_allclose(sc, want_s, rtol=1e-6)
  # Each channel's largest magnitude sits on the top bucket's edge
  # (127.5): float rounding there picks -128 or -127 (XLA multiplies by
  # 1 / scale); every other value is the reference's exactly.
  edge = np.abs(np.abs(w / want_s) - 127.5) < 1e-3
  np.testing.assert_array_equal(qv[~edge], want_q[~edge])
  assert np.abs(qv[edge] - want_q[edge]).max() <= 1
  b = _batch(3, b=2)
  want = np.asarray(model(b["inputs"], b["positions"], b["segment_ids"])[0])
  got = np.asarray(q(b["inputs"], b["positions"], b["segment_ids"])[0])
  err = np.abs(got - want).mean() / np.abs(want).mean()
  assert 0 < err <= MOE_INT8_TOLERANCE, err
  # QAT (train.quantization) simulates the same experts: its forward is
  # the PTQ one (qwix's own QAT ragged_dot failed on weight-only rules).
  qat = quantization.quantize(
    model, parse_scheme("int8_weights"), seq_len=32, train=True
  )
  simulated = qat(b["inputs"], b["positions"], b["segment_ids"])[0]
  np.testing.assert_allclose(np.asarray(simulated), got, rtol=1e-5, atol=1e-5)
