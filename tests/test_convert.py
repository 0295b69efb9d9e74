"""Hugging Face checkpoints in and out (issue #19): every fixture family
(tests/fixtures/hf, tiny transformers models with their golden outputs)
imports to a run whose logits and greedy tokens equal transformers', exports
back bit-identically, and re-imports to the same parameters; an imported
run trains on and resumes bit-identically after kill -9. With
$EFFICIENT_LM_HF_PYTHON (a Python with torch and transformers) transformers
itself loads the exports, and a model trained here, and gives our logits."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from efficient_lm import config as config_lib
from efficient_lm import runs, sharding
from efficient_lm.generate import Generator
from efficient_lm.hf import exporter, families, importer
from efficient_lm.training import loop
from efficient_lm.training.fingerprints import flat
from tests.helpers import REPO, kill_and_resume, logged_losses, small_config

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
HF_PYTHON = os.environ.get("EFFICIENT_LM_HF_PYTHON")
needs_hf = pytest.mark.skipif(
  not HF_PYTHON, reason="EFFICIENT_LM_HF_PYTHON (torch, transformers) not set"
)


def _model_dir(family: str) -> str:
  return os.path.join(FIXTURES, family, "model")


def _tensors(directory: str, only: str = "") -> dict[str, np.ndarray]:
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors") and name.startswith(only):
      with safe_open(os.path.join(directory, name), framework="numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _logits(run: runs.LoadedRun, tokens_BT: np.ndarray) -> np.ndarray:
  """Our float32 logits of full rows (every position real)."""

  def forward(variables, t_BT):
    model = nnx.merge(run.graphdef, variables)
    pos_BT = jnp.broadcast_to(
      jnp.arange(t_BT.shape[1], dtype=jnp.int32), t_BT.shape
    )
    return model(t_BT, pos_BT, jnp.ones_like(t_BT))[0]

  args = (run.variables, jnp.asarray(tokens_BT, jnp.int32))
  # Held to transformers' logits at 1e-4: compiled at XLA's default backend
  # level (3), not the suite's 0 (tests/conftest.py), which rounds a few
  # qwen2 logits 1.2e-4 away.
  compiled = (
    jax.jit(forward)
    .lower(*args)
    .compile(compiler_options={"xla_backend_optimization_level": 3})
  )
  return np.asarray(compiled(*args), np.float32)


class _Lazy(dict):
  """family -> value, made on first use (a -k selection imports only its
  families)."""

  def __init__(self, make):
    super().__init__()
    self.make = make

  def __missing__(self, family):
    self[family] = value = self.make(family)
    return value


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """family -> its import (run dir, loaded run, reference outputs)."""
  root = tmp_path_factory.mktemp("hf")

  def make(family):
    workdir = importer.import_checkpoint(_model_dir(family), str(root / family))
    return types.SimpleNamespace(
      workdir=workdir,
      run=runs.load_run(workdir),
      ref=np.load(os.path.join(FIXTURES, family, "reference.npz")),
      root=root,
    )

  return _Lazy(make)


@pytest.fixture(scope="module")
def exported(imported):
  """family -> its export directory (shards of 20 kB: several files)."""
  return _Lazy(
    lambda family: exporter.export_run(
      imported[family].workdir,
      str(imported[family].root / f"{family}-export"),
      shard_size=20_000,
    )
  )


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(imported, family):
  x = imported[family]
  got = _logits(x.run, x.ref["tokens"])
  np.testing.assert_allclose(got, x.ref["logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers(imported, family):
  x = imported[family]
  prompts = x.ref["prompts"].tolist()
  window = x.run.config.model.attention.window
  assert len(prompts[0]) > window > 0 or family in ("llama", "qwen3")
  gen = Generator(x.run.graphdef, x.run.variables, mesh=x.run.mesh)
  got, _ = gen.generate(prompts, max_new_tokens=40, temperature=0.0)
  assert got == x.ref["greedy"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_run_records_its_source(imported, family):
  x = imported[family]
  with open(os.path.join(x.workdir, "provenance.json")) as f:
    source = json.load(f)["source"]
  with open(os.path.join(_model_dir(family), "config.json"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert source["config_sha256"] == digest
  assert (
    source["architecture"] == families.family_of(source["config"]).architecture
  )
  assert source["files"] == sorted(
    n for n in os.listdir(_model_dir(family)) if n.endswith(".safetensors")
  )
  assert x.run.step == 0 and x.run.tokenizer.vocab_size == 300
  assert x.run.config.model.param_dtype == "float32"


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reproduces_the_source(imported, exported, family):
  src, out = _model_dir(family), exported[family]
  want, got = _tensors(src), _tensors(out)
  assert sorted(got) == sorted(want)
  for name, a in want.items():
    b = got[name]
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_array_equal(a, b, err_msg=name)
  with open(os.path.join(src, "config.json")) as f:
    source = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  # Architecture, every switch and the rest, in the same JSON types
  # (transformers refuses query_pre_attn_scalar=24.0 for 24).
  assert json.dumps(config, sort_keys=True) == json.dumps(
    source, sort_keys=True
  )
  files = [n for n in os.listdir(out) if n.endswith(".safetensors")]
  assert len(files) > 1
  for name in files:  # at most 20 kB of tensors, or one larger tensor
    sizes = [a.nbytes for a in _tensors(out, name).values()]
    assert sum(sizes) <= 20_000 or len(sizes) == 1, (name, sizes)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)["weight_map"]
  assert sorted(index) == sorted(want) and set(index.values()) == set(files)
  with open(os.path.join(src, "tokenizer.json")) as f:
    tokenizer = f.read()
  with open(os.path.join(out, "tokenizer.json")) as f:
    assert f.read() == tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_import_of_the_export_gives_the_same_params(
  imported, exported, family, tmp_path
):
  again = importer.import_checkpoint(exported[family], str(tmp_path / "again"))
  a = flat(jax.device_get(imported[family].run.params))
  b = flat(jax.device_get(runs.load_run(again).params))
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_4_config_maps_the_same(family):
  """legacy_config.json: the fixture's config as transformers 4 and most
  Hub checkpoints spell it (top-level rope_theta / rope_scaling /
  rope_local_base_freq, no layer_types), which the fixture generator
  checked loads to the same logits in transformers."""
  with open(os.path.join(_model_dir(family), "config.json")) as f:
    hf = json.load(f)
  with open(os.path.join(FIXTURES, family, "legacy_config.json")) as f:
    old = json.load(f)
  assert "layer_types" not in old and "rope_parameters" not in old
  fam = families.family_of(hf)
  assert families.model_keys(old, fam, "float32") == families.model_keys(
    hf, fam, "float32"
  )


def test_import_in_bfloat16(tmp_path):
  workdir = importer.import_checkpoint(
    _model_dir("qwen3"), str(tmp_path / "bf16"), dtype="bfloat16"
  )
  run = runs.load_run(workdir)
  assert run.config.model.param_dtype == run.config.model.dtype == "bfloat16"
  assert {a.dtype for a in jax.tree.leaves(run.params)} == {
    jnp.dtype("bfloat16")
  }
  want = _tensors(_model_dir("qwen3"))["model.embed_tokens.weight"]
  got = np.asarray(run.params["embed"]["table_VD"])
  np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))


# ------------------------------------------------------- continued training

# A short fine-tuning of the imported run: small batches on the embedded
# corpus, tokenized by the checkpoint's tokenizer.json.
_TRAIN_FLAGS = [
  "--config.mesh.data=1",  # imported on this process's 8 devices
  "--config.data.seq_len=32",
  "--config.train.batch_size=4",
  "--config.train.steps=10",
  "--config.train.warmup_steps=2",
  "--config.train.learning_rate=0.003",
  "--config.train.log_every=1",
  "--config.train.eval_every=100",
  "--config.checkpoint.every_steps=5",
  "--config.checkpoint.async_save=false",
]


def test_imported_run_fine_tunes_under_its_own_data_config(
  imported, tmp_path, capsys
):
  """train from the weights-only step 0 with another seq_len and batch
  size than the import recorded: a fresh optimizer state and data
  position, the imported weights (the first loss is theirs)."""
  workdir = tmp_path / "tuned"
  shutil.copytree(imported["mistral"].workdir, workdir)
  with open(workdir / "config.json") as f:
    d = json.load(f)
  d["data"].update(seq_len=32)
  d["train"].update(
    batch_size=8, steps=2, warmup_steps=1, log_every=1, eval_every=100
  )
  d["checkpoint"].update(async_save=False)
  cfg = config_lib.from_config_dict(d, device_count=jax.device_count())
  summary = loop.run(cfg, str(workdir))
  assert "resumed from step 0" in capsys.readouterr().err
  assert summary["start_step"] == 0 and summary["final_step"] == 2
  # The imported weights made the first loss, not a fresh initialisation.
  t = loop.build_trainer(cfg, jax.devices())
  it = loop.make_iterator(t, loop.make_tokenizer(cfg), "train")
  run = imported["mistral"].run
  state = loop.start_state(t, run.params, run.model_state)
  batch = sharding.host_to_global(t.mesh, next(it))
  want = float(t.train_step(state, batch)[1]["loss"])
  np.testing.assert_allclose(logged_losses(workdir)[1], want, rtol=1e-6)


@pytest.mark.slow  # three train CLI runs (~70 s on 2 cores)
def test_imported_run_resumes_bit_identically_after_kill(imported, tmp_path):
  source = imported["mistral"].workdir
  flags = [f"--config=configs/run.py:{source}", *_TRAIN_FLAGS]
  straight, _ = kill_and_resume(
    tmp_path, flags=flags, checkpoint=5, source=source
  )
  a = logged_losses(straight)
  assert a[10] < a[1]  # it learns from the imported weights


# ------------------------------------------- transformers on the other side


def _hf_logits(model_dir: str, tokens: np.ndarray, tmp_path) -> np.ndarray:
  np.save(tmp_path / "tokens.npy", tokens.astype(np.int64))
  proc = subprocess.run(
    [
      HF_PYTHON,
      os.path.join(REPO, "tools", "hf_reference.py"),
      "logits",
      model_dir,
      str(tmp_path / "tokens.npy"),
      str(tmp_path / "logits.npy"),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(tmp_path / "logits.npy")


@needs_hf
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_runs_the_export(imported, exported, family, tmp_path):
  x = imported[family]
  got = _hf_logits(exported[family], x.ref["tokens"], tmp_path)
  np.testing.assert_allclose(got, x.ref["logits"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(
    got, _logits(x.run, x.ref["tokens"]), rtol=0, atol=1e-4
  )


@needs_hf
@pytest.mark.parametrize(
  "overrides",
  [
    {},  # configs/tiny.py's kind: dense, tied -> LlamaForCausalLM
    {  # our switches -> Gemma3ForCausalLM
      "model.norm_plus_one": True,
      "model.post_norms": True,
      "model.embed_scale": True,
      "model.mlp_activation": "gelu_tanh",
      "model.attention.qk_norm": True,
      "model.attention.pattern": "sliding_window,dense",
      "model.attention.window": 8,
      "model.rope_local_theta": 500.0,
      "model.head_dim": 32,
      "model.attention.query_pre_attn_scalar": 24.0,
      "model.tie_embeddings": False,
    },
  ],
  ids=["llama", "gemma3"],
)
def test_a_model_trained_here_runs_in_transformers(overrides, tmp_path):
  cfg = small_config(
    **{
      "train.steps": 3,
      "train.eval_every": 100,
      "checkpoint.async_save": False,
      "mesh.data": 8,  # this process's devices
      **overrides,
    }
  )
  loop.run(cfg, str(tmp_path / "run"))
  out = exporter.export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
  with open(os.path.join(out, "config.json")) as f:
    arch = json.load(f)["architectures"]
  assert arch == ["Gemma3ForCausalLM" if overrides else "LlamaForCausalLM"]
  run = runs.load_run(str(tmp_path / "run"))
  tokens = np.random.default_rng(0).integers(0, 384, (2, 40))
  np.testing.assert_allclose(
    _hf_logits(out, tokens, tmp_path), _logits(run, tokens), rtol=0, atol=1e-4
  )
