"""Distillation (train.objective='distill', issue #20 item 4): the KL term,
alpha = 0 as next-token training, the frozen teacher, eval_kl, resume."""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from efficient_lm import config as config_lib
from efficient_lm import models, runs, sharding
from efficient_lm.training import distill, loop, losses
from efficient_lm.training import step as step_lib
from efficient_lm.training.fingerprints import flat
from tests.helpers import (
  final_state,
  kill_and_resume,
  logged_losses,
  packed_batch,
  small_config,
  train_cli,
)

# The student: one layer (the teacher has SMALL_FLAGS' two) and a wider
# padded vocabulary (the byte tokenizer has 259 ids; the teacher's 384).
STUDENT = [
  "--config.model.num_layers=1",
  "--config.model.vocab_size=320",
  "--config.train.objective=distill",
  "--config.train.distill.alpha=0.5",
  "--config.train.distill.temperature=2.0",
  "--config.train.steps=10",
  "--config.train.eval_every=5",
  "--config.checkpoint.every_steps=5",
]


def _model(cfg, seed):
  model = models.build(cfg.model, nnx.Rngs(params=seed))
  graphdef, params, model_state = nnx.split(model, nnx.Param, models.ModelState)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)


def _unit_config(**overrides):
  """One layer, 2 x 16 tokens: these tests are about the loss, and compile
  time is most of their cost."""
  return small_config(
    **{
      "model.num_layers": 1,
      "train.batch_size": 2,
      "data.seq_len": 16,
      **overrides,
    }
  )


def _batch(cfg):
  b = packed_batch(cfg.train.batch_size, cfg.data.seq_len, 259)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _loss_and_grad(graphdef, params, model_state, batch, objective):
  (loss, (obj, _, _)), grads = jax.value_and_grad(
    lambda p: step_lib.loss_fn(graphdef, p, model_state, batch, objective),
    has_aux=True,
  )(params)
  return loss, obj, grads


def test_kl_equals_numpy_formula_at_temperature():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  t = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  mask = rng.random((2, 5)) < 0.6
  mask[0, 0] = True
  temp = 2.5

  def log_softmax(x):
    x = x.astype(np.float64) / temp
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lp, lq = log_softmax(t), log_softmax(s)
  want = ((np.exp(lp) * (lp - lq)).sum(-1) * mask).sum() / mask.sum()
  got = losses.distill_kl(
    jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), temperature=temp
  )
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert want > 0.05  # a real difference, not a vacuous zero


def test_student_equal_to_teacher_has_zero_kl_and_zero_gradient():
  cfg = _unit_config()
  graphdef, params, model_state = _model(cfg, 0)
  obj = losses.Distill(alpha=1.0, temperature=2.0, vocab_size=259, z_loss=0.0)

  @jax.jit
  def run(params, batch):
    teacher = {"params": params, "model_state": model_state}
    logits = jax.lax.stop_gradient(distill._logits(graphdef, teacher, batch))
    batch = {**batch, "teacher_logits": logits}
    return _loss_and_grad(graphdef, params, model_state, batch, obj)

  loss, metrics, grads = run(params, _batch(cfg))
  # 0 up to the float error of two evaluations of the same logits.
  assert abs(float(metrics["kl"])) < 1e-7 and abs(float(loss)) < 1e-6
  assert float(metrics["ce"]) > 1.0  # the CE is there, weighted by 1 - 1
  assert float(optax.tree.norm(grads)) < 1e-6


def test_alpha_zero_is_next_token_training_exactly():
  cfg = _unit_config()
  graphdef, params, model_state = _model(cfg, 0)
  _, t_params, t_state = _model(cfg, 1)  # another teacher: KL is not 0
  plain = losses.make_objective("next_token", z_loss=1e-4)
  dist = losses.Distill(alpha=0.0, temperature=3.0, vocab_size=259, z_loss=1e-4)

  @jax.jit
  def run(params, batch):
    want = _loss_and_grad(graphdef, params, model_state, batch, plain)
    teacher = {"params": t_params, "model_state": t_state}
    logits = jax.lax.stop_gradient(distill._logits(graphdef, teacher, batch))
    batch = {**batch, "teacher_logits": logits}
    got = _loss_and_grad(graphdef, params, model_state, batch, dist)
    return want, got

  (loss_a, obj_a, grads_a), (loss_b, obj_b, grads_b) = run(params, _batch(cfg))
  assert float(obj_b["kl"]) > 1e-4
  assert float(loss_a) == float(loss_b)
  assert float(obj_a["ce"]) == float(obj_b["ce"])
  jax.tree.map(np.testing.assert_array_equal, grads_a, grads_b)


def test_bad_distill_config_is_one_line():
  cases = {
    "train.distill.teacher": ("", "needs a teacher run"),
    "train.distill.alpha": (1.5, "0 <= alpha <= 1"),
    "train.distill.temperature": (0.0, "expected > 0"),
  }
  for key, (value, needle) in cases.items():
    over = {"train.objective": "distill", "train.distill.teacher": "x"}
    with pytest.raises(config_lib.ConfigError) as e:
      small_config(**{**over, key: value})
    assert needle in str(e.value) and "\n" not in str(e.value), key
  with pytest.raises(config_lib.ConfigError, match="funnel_encoder"):
    distill._teacher_config(
      {"model": {"kind": "funnel_encoder"}}, small_config(), "t", 259
    )


@pytest.fixture(scope="module")
def written_teacher(tmp_path_factory):
  """A two-layer teacher run at step 0 (runs.write_run: no training)."""
  cfg = _unit_config(**{"model.num_layers": 2})
  _, params, model_state = _model(cfg, 1)
  path = tmp_path_factory.mktemp("distill") / "written"
  runs.write_run(str(path), cfg, params, model_state, devices=jax.devices()[:1])
  return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A teacher run: SMALL_FLAGS, 10 steps, checkpoints 5 and 10."""
  path = tmp_path_factory.mktemp("distill") / "teacher"
  train_cli(
    path, "--config.train.steps=10", "--config.checkpoint.every_steps=5"
  )
  return path


def _snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_trainer_keeps_the_teacher_frozen_and_out_of_the_state(
  written_teacher,
):
  cfg = _unit_config(
    **{
      "train.objective": "distill",
      "train.distill.teacher": str(written_teacher),
    }
  )
  t = loop.build_trainer(cfg, jax.devices()[:1])
  assert t.teacher is not None and t.teacher.step == 0
  before = jax.device_get(t.teacher.variables)
  state = t.init_fn()
  batch = _batch(cfg)
  for _ in range(2):
    state, m = t.train_step(state, batch, *t.step_inputs)
  assert set(state) == {"params", "model_state", "opt_state", "step"}

  def size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))

  # The optimizer state is the student's (1 layer) alone, not the teacher's
  # (2 layers).
  assert size(state["opt_state"]) < 3 * size(state["params"])
  assert size(state["params"]) < size(before["params"])
  # The teacher's arrays are alive (not donated) and unchanged.
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(t.teacher.variables), before
  )
  assert float(m["kl"]) > 0


def _load(cfg):
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  return distill.load_teacher(cfg, mesh, loop.make_tokenizer(cfg))


def test_teacher_not_a_run_or_another_tokenizer_is_one_line(
  written_teacher, tmp_path
):
  (tmp_path / "empty").mkdir()
  cases = {
    "is not a training run": {"train.distill.teacher": str(tmp_path / "e")},
    "is not a training run ": {
      "train.distill.teacher": str(tmp_path / "empty")
    },
    "tokenizer (ByteTokenizer with 259 ids) is not this run's (CharTokenizer": {
      "data.tokenizer": "char"
    },
  }
  for needle, over in cases.items():
    cfg = _unit_config(
      **{
        "train.objective": "distill",
        "train.distill.teacher": str(written_teacher),
        **over,
      }
    )
    with pytest.raises(config_lib.ConfigError) as e:
      _load(cfg)
    assert needle.strip() in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def _one_error_line(proc) -> str:
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: "), lines
  return lines[0]


@pytest.mark.slow
def test_distill_cli_logs_eval_kl_and_refuses_a_changed_teacher(
  teacher, tmp_path
):
  mine = tmp_path / "teacher"
  shutil.copytree(teacher, mine)
  snapshot = _snapshot(mine)
  student = tmp_path / "student"
  train_cli(student, *STUDENT, f"--config.train.distill.teacher={mine}")
  rows = [json.loads(x) for x in open(student / "metrics.jsonl")]
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [5, 10]
  assert all(r["eval_kl"] > 0 for r in evals)
  assert all("kl" in r for r in rows if "grad_norm" in r)
  a = logged_losses(student)
  assert a[10] < a[1] - 1.0
  record = json.load(open(student / distill.TEACHER_RECORD))
  assert (record["workdir"], record["step"]) == (str(mine), 10)
  # The checkpoint holds the student's train state only; the teacher's run
  # is untouched.
  handler = ocp.handlers.PyTreeCheckpointHandler()
  meta = flat(handler.metadata(student / "checkpoints" / "10" / "state").tree)
  handler.close()
  assert {k.split(".")[0] for k in meta} <= {
    "params",
    "model_state",
    "opt_state",
    "step",
  }
  assert tuple(meta["params.embed.table_VD"].shape) == (320, 64)
  assert _snapshot(mine) == snapshot

  # The teacher changes (its newest checkpoint is gone): a resume refuses.
  shutil.rmtree(mine / "checkpoints" / "10")
  proc = train_cli(
    student,
    *STUDENT,
    f"--config.train.distill.teacher={mine}",
    "--config.train.steps=15",
    check=False,
  )
  line = _one_error_line(proc)
  assert "step 10" in line and "step 5" in line, line

  # Another tokenizer: one line, nothing trained.
  proc = train_cli(
    tmp_path / "char",
    *STUDENT,
    "--config.data.tokenizer=char",
    f"--config.train.distill.teacher={teacher}",
    check=False,
  )
  line = _one_error_line(proc)
  assert "tokenizer" in line and "ByteTokenizer" in line, line
  assert not (tmp_path / "char" / "checkpoints").exists()


@pytest.mark.slow
def test_distill_resume_after_kill_is_bit_identical(teacher, tmp_path):
  flags = (*STUDENT, f"--config.train.distill.teacher={teacher}")
  straight, crashed = kill_and_resume(tmp_path, *flags, checkpoint=5)

  def rows(path):
    return [
      json.loads(x)
      for x in open(path / "metrics.jsonl")
      if "eval_kl" in json.loads(x) or '"kl"' in x
    ]

  want = {
    (r["step"], k): r[k]
    for r in rows(straight)
    for k in ("kl", "eval_kl")
    if k in r
  }
  got = {
    (r["step"], k): r[k]
    for r in rows(crashed)
    for k in ("kl", "eval_kl")
    if k in r
  }
  assert {k: got[k] for k in want} == want
  _, params_a, data_a = final_state(straight)
  _, params_b, data_b = final_state(crashed)
  assert data_a == data_b
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_distill_loss_at_a_non_degenerate_alpha_by_hand():
  """Issue #25: the other tests sit at alpha 0 and 1 (and KL 0). At alpha
  0.3, T = 2, z-loss on and an aux loss, with 3 padded vocabulary columns
  past the tokenizer's 7 ids: loss = 0.7 ce + 0.3 T^2 KL(first 7 ids)
  + z-loss + aux, ce and the z-loss over every column, non-padding
  positions only."""
  rng = np.random.default_rng(3)
  b, t, v, extra = 2, 6, 7, 3
  s = rng.normal(size=(b, t, v + extra)).astype(np.float32) * 2
  te = rng.normal(size=(b, t, v + extra)).astype(np.float32) * 2
  te[..., v:] += 5.0  # ids past the vocabulary: must not enter the KL
  seg = np.ones((b, t), np.int32)
  seg[1, 4:] = 0
  targets = rng.integers(0, v, size=(b, t))
  batch = {
    "targets": jnp.asarray(targets),
    "segment_ids": jnp.asarray(seg),
    "teacher_logits": jnp.asarray(te),
  }
  obj = losses.Distill(alpha=0.3, temperature=2.0, vocab_size=v, z_loss=1e-2)
  aux = {"loss/extra": jnp.float32(0.25)}
  loss, m = obj(jnp.asarray(s), batch, aux)

  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  real = seg > 0
  ls = log_softmax(s)
  nll = -np.take_along_axis(ls, targets[..., None], -1)[..., 0]
  ce = nll[real].mean()
  x = s.astype(np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  zl = 1e-2 * np.square(lse)[real].mean()
  lp, lq = log_softmax(te[..., :v] / 2.0), log_softmax(s[..., :v] / 2.0)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)[real].mean()
  np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-5)
  np.testing.assert_allclose(
    float(loss), 0.7 * ce + 0.3 * 4.0 * kl + zl + 0.25, rtol=1e-5
  )


def test_a_routed_teacher_predicts_with_causal_routing():
  """Issue #25: the teacher's logits are its evaluation forward (causal
  routing), not training's top-k over the row: for a MoD teacher with
  sharp routers, where the two differ."""
  cfg = _unit_config(**{"model.num_layers": 2, "model.routing.kind": "mod"})
  graphdef, params, model_state = _model(cfg, 0)
  params = jax.tree_util.tree_map_with_path(
    lambda path, v: v * (80.0 if "w_D" in jax.tree_util.keystr(path) else 4.0),
    params,
  )
  batch = _batch(cfg)
  teacher = {"params": params, "model_state": model_state}

  @jax.jit
  def run(batch):
    model = nnx.merge(graphdef, params, model_state)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    return (
      distill._logits(graphdef, teacher, batch),
      model(*args, causal_routing=True)[0],
      model(*args, causal_routing=False)[0],
    )

  got, causal, top_k = run(batch)
  np.testing.assert_array_equal(got, causal)
  assert float(jnp.abs(causal - top_k).max()) > 1e-3
