"""Small shared builders for tests (configs, synthetic batches, CLI runs)."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import numpy as np

from configs import base
from efficient_lm import config as config_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small byte-level model on the embedded corpus, 1 CPU device.
SMALL_FLAGS = [
  "--config=configs/tiny.py",
  "--config.model.num_layers=2",
  "--config.model.embed_dim=64",
  "--config.model.mlp_dim=128",
  "--config.data.seq_len=32",
  "--config.train.batch_size=8",
  "--config.train.steps=20",
  "--config.train.warmup_steps=2",
  "--config.train.log_every=1",
  "--config.train.eval_every=100",
  "--config.train.eval_batches=2",
  "--config.checkpoint.every_steps=10",
  "--config.checkpoint.keep=5",
]


def cli_env(drop=(), **extra):
  """The environment of a CLI subprocess: the repo importable, one CPU
  device (this process's XLA_FLAGS less the device count), no accelerator,
  the session's compilation cache and compile flags (conftest.py). `drop`:
  prefixes of this process's variables to leave out; `extra`: variables set
  last (over the above)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop))}
  env["XLA_FLAGS"] = " ".join(  # one CPU device in subprocesses
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO
  env.update(extra)
  return env


def train_cli(
  workdir,
  *extra,
  flags=SMALL_FLAGS,
  script=("-m", "efficient_lm.train"),
  check=True,
):
  """Runs `python -m efficient_lm.train` (or `script`, e.g. the crashing
  trainer tests.crash_train) with `flags` and `extra` into `workdir`."""
  import subprocess
  import sys

  cmd = [sys.executable, *script, *flags, f"--workdir={workdir}", *extra]
  proc = subprocess.run(
    cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
  )
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def kill_and_resume(
  tmp_path, *extra, flags=SMALL_FLAGS, checkpoint=10, source=None
):
  """Trains straight, and again killed (SIGKILL) at step checkpoint + 2
  after checkpoint `checkpoint` then resumed, with `flags` and `extra`
  (whose train.steps is 2 * checkpoint); with `source`, both workdirs
  start as copies of that run. Asserts the losses of every step, the final
  step, data-iterator state and parameters are bit-identical.
  -> (straight, crashed) workdirs."""
  import shutil

  import jax

  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  if source is not None:
    for d in (straight, crashed):
      shutil.copytree(source, d)
  first = train_cli(straight, *extra, flags=flags)
  if source is not None:
    assert "resumed from step 0" in first.stderr
  proc = train_cli(
    crashed,
    *extra,
    f"--crash_at={checkpoint + 2}",
    f"--crash_after_checkpoint={checkpoint}",
    flags=flags,
    script=("-m", "tests.crash_train"),
    check=False,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  resumed = train_cli(crashed, *extra, flags=flags)
  assert f"resumed from step {checkpoint}" in resumed.stderr
  a, b = logged_losses(straight), logged_losses(crashed)
  steps = 2 * checkpoint
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])  # bit-identical
  step_a, params_a, data_a = final_state(straight)
  step_b, params_b, data_b = final_state(crashed)
  assert step_a == step_b == steps and data_a == data_b
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  return straight, crashed


def crash_and_resume(cfg, tmp_path, crash_at: int, **run_kwargs):
  """`loop.run` uninterrupted into tmp_path/whole, and into tmp_path/broken
  dying (an exception from a step hook) at step `crash_at` and then
  resumed; `run_kwargs` go to every run. -> (whole, broken, the resumed
  run's summary)."""
  import pytest

  from efficient_lm.training import loop

  class Crash(Exception):
    pass

  def crash(step):
    if step == crash_at:
      raise Crash()

  whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
  loop.run(cfg, whole, **run_kwargs)
  with pytest.raises(Crash):
    loop.run(cfg, broken, hooks=(crash,), **run_kwargs)
  return whole, broken, loop.run(cfg, broken, **run_kwargs)


def snapshot(root) -> dict:
  """Every directory and file under `root` with its mtime (files: and the
  sha256 of their bytes): equal snapshots mean nothing was written."""
  import hashlib

  out = {}
  for d, _, files in os.walk(root):
    out[os.path.relpath(d, root)] = (os.stat(d).st_mtime_ns, "dir")
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, digest)
  return out


def restore_latest(workdir, abstract_state):
  """(step, train state on the host, data-iterator state) of the newest
  checkpoint in <workdir>/checkpoints, restored into `abstract_state`
  (a trainer's); read only: nothing is saved or deleted."""
  import jax

  from efficient_lm.training.checkpoint import Checkpointer

  ckpt = Checkpointer(
    os.path.join(workdir, "checkpoints"),
    every_steps=1,
    keep=None,
    async_save=False,
  )
  try:
    step, state, data_state = ckpt.restore_latest(abstract_state)
  finally:
    ckpt.close()
  return step, jax.device_get(state), data_state


def restored_state(workdir):
  """`restore_latest` of a CLI run, with the run's own resolved config
  (mesh 1x1x1: one device per subprocess)."""
  import jax

  from efficient_lm.training import loop

  with open(os.path.join(workdir, "config.json")) as f:
    cfg = config_lib.from_config_dict(json.load(f))
  t = loop.build_trainer(cfg, jax.devices()[:1])
  return restore_latest(workdir, t.abstract_state)


def final_state(workdir):
  """(step, params on the host, data-iterator state) of the newest
  checkpoint of a CLI run (`restored_state`)."""
  step, state, data_state = restored_state(workdir)
  return step, state["params"], data_state


def logged_losses(workdir):
  """step -> loss of <workdir>/metrics.jsonl; a step logged twice (a
  resume that kept the killed run's rows) fails here."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        assert rec["step"] not in out, f"step {rec['step']} logged twice"
        out[rec["step"]] = rec["loss"]
  return out


def override(cd, **overrides):
  """Sets dotted keys on a ConfigDict: override(cd, **{"model.dtype": "x"})."""
  for key, value in overrides.items():
    node = cd
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cd


def small_config(**overrides):
  """A tiny float32 config; overrides use dotted keys: {"model.num_layers": 1}."""
  cd = base.get_config()
  cd.model.num_layers = 2
  cd.model.embed_dim = 64
  cd.model.num_heads = 4
  cd.model.num_kv_heads = 2
  cd.model.mlp_dim = 128
  cd.model.vocab_size = 384
  cd.model.dtype = "float32"
  cd.data.seq_len = 32
  cd.train.batch_size = 8
  cd.train.steps = 20
  cd.train.warmup_steps = 2
  cd.mesh.data = 1
  return config_lib.from_config_dict(override(cd, **overrides))


# One layer kind each, small enough for T ~ 14..24 to cross every window,
# block and summary boundary; the attention-family and generation tests run
# every variant.
ATTENTION_VARIANTS = {
  "dense_mha": {"model.num_kv_heads": 4},
  "dense_gqa": {},
  "dense_mqa": {"model.num_kv_heads": 1},
  "sliding_window": {
    "model.attention.kind": "sliding_window",
    "model.attention.window": 5,
  },
  "global_local": {
    "model.attention.kind": "global_local",
    "model.attention.window": 4,
    "model.attention.num_global": 3,
  },
  "block_sparse": {
    "model.attention.kind": "block_sparse",
    "model.attention.window": 3,
    "model.attention.num_global": 2,
    "model.attention.block_size": 4,
    "model.attention.num_random_blocks": 1,
    "model.attention.max_len": 64,
  },
  "tglobal": {
    "model.attention.kind": "tglobal",
    "model.attention.window": 5,
    "model.attention.tglobal_block": 4,
  },
  "mla": {"model.attention.projection": "mla"},
  "mla_qlatent_window": {
    "model.attention.projection": "mla",
    "model.attention.q_lora_rank": 32,
    "model.attention.kind": "sliding_window",
    "model.attention.window": 5,
  },
}


def train_sentencepiece(tmp_path, vocab_size=40):
  """A tiny BPE SentencePiece model trained on a repeated corpus; returns
  its .model path (skips when sentencepiece is not installed)."""
  import pytest

  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(
    "\n".join(
      [
        "the quick brown fox jumps over the lazy dog",
        "a stitch in time saves nine",
      ]
      * 50
    )
  )
  spm.SentencePieceTrainer.train(
    input=str(corpus),
    model_prefix=str(tmp_path / "sp"),
    vocab_size=vocab_size,
    model_type="bpe",
    minloglevel=2,
  )
  return tmp_path / "sp.model"


def packed_batch(batch: int, seq_len: int, vocab: int, seed: int = 0):
  """Rows holding two documents and trailing padding, like the packer's."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (batch, seq_len), dtype=np.int32)
  targets = rng.integers(0, vocab, (batch, seq_len), dtype=np.int32)
  seg = np.zeros((batch, seq_len), np.int32)
  pos = np.zeros((batch, seq_len), np.int32)
  for b in range(batch):
    cut = int(rng.integers(seq_len // 4, seq_len // 2))
    end = int(rng.integers(3 * seq_len // 4, seq_len + 1))
    seg[b, :cut], seg[b, cut:end] = 1, 2
    pos[b, :cut] = np.arange(cut)
    pos[b, cut:end] = np.arange(end - cut)
  targets[seg == 0] = 0
  return {
    "inputs": inputs,
    "targets": targets,
    "segment_ids": seg,
    "positions": pos,
  }


def two_train_steps(t, state):
  """Two train steps of trainer `t` from `state` on one fixed packed batch:
  (the state after the second step, the first step's metrics on the host).
  The sharded-equals-one-device tests compare these."""
  import jax
  from efficient_lm import sharding

  batch = sharding.host_to_global(
    t.mesh,
    packed_batch(
      t.cfg.train.batch_size, t.cfg.data.seq_len, t.cfg.model.vocab_size
    ),
  )
  state, metrics = t.train_step(state, batch)
  metrics = jax.device_get(metrics)
  state, _ = t.train_step(state, batch)
  return state, metrics


def prefill_then_decode(
  step, tokens_BT, pos_BT, seg_BT, cache, prompt_len: int
):
  """A model's generation call `step(tokens, pos, seg, cache=cache) ->
  (logits, aux, cache)` (the model, jitted or not) over the first
  `prompt_len` tokens, then one token at a time: (logits of every position
  [B, T, V], the final cache)."""
  import jax.numpy as jnp

  p = prompt_len
  got, _, cache = step(
    tokens_BT[:, :p], pos_BT[:, :p], seg_BT[:, :p], cache=cache
  )
  outs = [got]
  for i in range(p, tokens_BT.shape[1]):
    got, _, cache = step(
      tokens_BT[:, i : i + 1],
      pos_BT[:, i : i + 1],
      seg_BT[:, i : i + 1],
      cache=cache,
    )
    outs.append(got)
  return jnp.concatenate(outs, 1), cache


def untouched_in_forward_and_decode(
  block, x_BTD, pos_BT, seg_BT, untouched_BT, prompt_len: int
):
  """A routed block's (or stack's) causal-routing forward and its prefill +
  decode from `init_cache`, both jitted; asserts in each that the tokens
  where `untouched_BT` keep `x_BTD` bitwise and every other token changes.
  -> (forward, stepped) as NumPy."""
  import jax
  import jax.numpy as jnp

  b, t = seg_BT.shape
  fwd, _ = jax.jit(lambda x: block(x, pos_BT, seg_BT, causal_routing=True))(
    x_BTD
  )
  step = jax.jit(lambda x, pos, seg, cache: block(x, pos, seg, cache=cache))
  cache = block.init_cache(b, t, jnp.float32)
  stepped, _ = prefill_then_decode(
    step, x_BTD, pos_BT, seg_BT, cache, prompt_len
  )
  fwd, stepped, xs = np.asarray(fwd), np.asarray(stepped), np.asarray(x_BTD)
  for got in (fwd, stepped):
    np.testing.assert_array_equal(got[untouched_BT], xs[untouched_BT])
    assert np.all(np.abs(got[~untouched_BT] - xs[~untouched_BT]).max(-1) > 0)
  return fwd, stepped


def greedy_cache_equals_recompute(model, prompts, max_new_tokens: int):
  """Greedy generation from `model` with the KV cache equals generation by
  recomputing the whole prefix each token, and decoding actually moves
  (every row's tokens take more than 3 values: the comparison means
  something). -> the cached rows."""
  from flax import nnx

  from efficient_lm.generate import Generator

  gen = Generator(*nnx.split(model))
  cached, _ = gen.generate(prompts, max_new_tokens=max_new_tokens)
  recomputed, _ = gen.generate(
    prompts, max_new_tokens=max_new_tokens, use_cache=False
  )
  assert cached == recomputed
  assert all(len(set(c)) > 3 for c in cached), cached
  return cached


def assert_close(got, want, tol, what=""):
  """Same non-finite entries exactly (e.g. lse -inf), finite ones to atol."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  fin = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=what)
  np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=what)
  np.testing.assert_allclose(
    got[fin], want[fin], atol=tol, rtol=0, err_msg=what
  )


@contextlib.contextmanager
def sigterm_handler_restored():
  """Runs the body with a sentinel SIGTERM handler and yields a training
  hook; afterwards checks that the loop had its own handler installed at
  every step the hook saw and put the sentinel back when it exited, by
  return or by exception (issue #25)."""

  def sentinel(signum, frame):
    del signum, frame

  previous = signal.signal(signal.SIGTERM, sentinel)
  seen = []
  try:
    yield lambda step: seen.append(signal.getsignal(signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is sentinel
    assert seen and all(h is not sentinel for h in seen), seen
  finally:
    signal.signal(signal.SIGTERM, previous)
