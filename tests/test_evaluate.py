"""Loading a trained run read-only, tokenizer.json, and the evaluate CLI."""

import json
import math
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_lm import data as data_lib
from efficient_lm import runs
from efficient_lm.data import CharTokenizer, DataError
from efficient_lm.training import loop
from efficient_lm.training.checkpoint import Checkpointer
from tests.helpers import (
  REPO,
  cli_env,
  small_config,
  snapshot,
  train_sentencepiece,
)

# Multi-byte UTF-8 characters, so tokens and bytes differ.
WORDS = [
  "the",
  "café",
  "naïve",
  "über",
  "日本語",
  "smörgåsbord",
  "🙂",
  "fox",
  "a",
  "jumps",
  "over",
  "lazy",
  "dog",
]


def _text(seed: int, num_words: int) -> str:
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(WORDS, num_words)) + "\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A char-level run of 4 steps on a text file, checkpoints at 2 and 4,
  the training loop's eval_loss logged at both (2 batches each)."""
  root = tmp_path_factory.mktemp("evaluate")
  text = _text(0, 3000)
  (root / "train.txt").write_text(text, encoding="utf-8")
  cfg = small_config(
    **{
      "data.source": "text",
      "data.path": str(root / "train.txt"),
      "data.tokenizer": "char",
      "train.steps": 4,
      "train.eval_every": 2,
      "train.eval_batches": 2,
      "checkpoint.every_steps": 2,
      "checkpoint.async_save": False,
      "mesh.data": 8,
    }
  )
  workdir = root / "run"
  loop.run(cfg, str(workdir))
  return types.SimpleNamespace(
    root=root, workdir=str(workdir), text=text, cfg=cfg
  )


@pytest.fixture(scope="module")
def loaded(trained):
  """load_run and two evaluations, with the run directory hashed before
  and after."""
  before = snapshot(trained.workdir)
  run = runs.load_run(trained.workdir)
  first2 = runs.evaluate(run, num_batches=2)
  full = runs.evaluate(run)
  return types.SimpleNamespace(
    run=run,
    first2=first2,
    full=full,
    before=before,
    after=snapshot(trained.workdir),
  )


def _logged_eval_loss(workdir, step):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    [loss] = [
      r["eval_loss"]
      for r in map(json.loads, f)
      if r["step"] == step and "eval_loss" in r
    ]
  return loss


def test_loss_equals_the_training_loops_eval_loss(trained, loaded):
  assert loaded.run.step == 4 and loaded.first2["step"] == 4
  assert loaded.first2["num_batches"] == 2
  np.testing.assert_allclose(
    loaded.first2["loss"], _logged_eval_loss(trained.workdir, 4), rtol=1e-6
  )
  assert loaded.first2["ppl"] == pytest.approx(math.exp(loaded.first2["loss"]))
  # The generate path's view of the same model: one State, graphdef.
  model = nnx.merge(loaded.run.graphdef, loaded.run.variables)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
    jax.device_get(loaded.run.params),
  )


def test_full_pass_reads_every_held_out_target_once(trained, loaded):
  # The text source holds out the last 10% of the token stream; char tokens
  # are characters (no bos/eos), so the pass has one target per held-out
  # character after the first, whatever the batching.
  text, r = trained.text, loaded.full
  cut = int(len(text) * (1 - trained.cfg.data.eval_fraction))
  assert r["num_tokens"] == len(text) - cut - 1
  assert r["num_batches"] > 2  # more than the two compared above
  # Bits per byte, from bytes counted here on the text itself.
  num_bytes = len(text[cut + 1 :].encode("utf-8"))
  assert num_bytes > r["num_tokens"]  # multi-byte characters count
  assert r["num_bytes"] == num_bytes
  assert r["bpb"] == pytest.approx(
    r["loss"] / math.log(2) * r["num_tokens"] / num_bytes, rel=1e-12
  )
  assert r["tokens_per_sec"] > 0


def test_load_and_evaluate_leave_the_run_untouched(loaded):
  assert loaded.before == loaded.after
  assert "tokenizer.json" in loaded.before


def _corrupt(step_dir):
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(d, name)
      if os.sep + "d" + os.sep in path:  # the array data files
        os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.filterwarnings(
  "ignore::pytest.PytestUnraisableExceptionWarning"
)  # tensorstore noise
def test_corrupt_newest_checkpoint_is_skipped_not_renamed(
  trained, tmp_path, capfd
):
  workdir = tmp_path / "run"
  shutil.copytree(trained.workdir, workdir)
  _corrupt(workdir / "checkpoints" / "4")
  before = snapshot(workdir)
  capfd.readouterr()
  run = runs.load_run(str(workdir))
  assert run.step == 2
  assert snapshot(workdir) == before  # "4" is still there as it was
  [line] = [
    x
    for x in capfd.readouterr().err.splitlines()
    if x.startswith("checkpoint:")
  ]
  assert "step 4" in line and "left as it is" in line
  # The training loop's own restore (which sets bad steps aside) on
  # another copy finds the same step and the same parameters.
  other = tmp_path / "other"
  shutil.copytree(trained.workdir, other)
  _corrupt(other / "checkpoints" / "4")
  t = loop.build_trainer(run.config, jax.devices()[: run.mesh.size])
  with Checkpointer(other / "checkpoints", every_steps=2, keep=3) as ckpt:
    step, state, _ = ckpt.restore_latest(t.abstract_state)
  assert step == 2
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(run.params),
    jax.device_get(state["params"]),
  )
  np.testing.assert_allclose(
    runs.evaluate(run, 2)["loss"],
    _logged_eval_loss(trained.workdir, 2),
    rtol=1e-6,
  )


def test_char_tokenizer_is_the_runs_even_on_other_data(trained, loaded):
  path = os.path.join(trained.workdir, "tokenizer.json")
  saved = data_lib.load_tokenizer(path)
  assert json.load(open(path, encoding="utf-8"))["kind"] == "char"
  want = data_lib.make_tokenizer(trained.cfg.data)
  assert saved.chars == loaded.run.tokenizer.chars == want.chars
  assert saved.decode(saved.encode(trained.text)) == trained.text
  # Another data set with fewer characters: the vocabulary stays the run's.
  (trained.root / "other.txt").write_text("über café " * 40, "utf-8")
  run = runs.load_run(
    trained.workdir,
    overrides=[
      f"--config.data.path={trained.root / 'other.txt'}",
      "--config.data.eval_fraction=0.5",
    ],
  )
  assert run.tokenizer.chars == want.chars
  r = runs.evaluate(run)
  assert r["data_path"] == str(trained.root / "other.txt")
  assert r["num_tokens"] == 400 - int(400 * 0.5) - 1


def test_run_without_tokenizer_json_warns_and_rebuilds(
  trained, tmp_path, capfd
):
  workdir = tmp_path / "run"
  shutil.copytree(trained.workdir, workdir)
  os.remove(workdir / "tokenizer.json")
  run = runs.load_run(str(workdir))
  assert "warning:" in capfd.readouterr().err
  assert (
    run.tokenizer.chars
    == CharTokenizer.from_corpus(
      data_lib.sources.load_corpus(trained.cfg.data)
    ).chars
  )


def test_sentencepiece_tokenizer_json_is_self_contained(tmp_path):
  train_sentencepiece(tmp_path)
  tok = data_lib.SentencePieceTokenizer(str(tmp_path / "sp.model"))
  (tmp_path / "run").mkdir()
  path = str(tmp_path / "run" / "tokenizer.json")
  data_lib.save_tokenizer(tok, path)
  os.remove(tmp_path / "sp.model")  # the run keeps its own copy
  back = data_lib.load_tokenizer(path)
  text = "the lazy fox saves time"
  assert back.encode(text) == tok.encode(text)
  np.testing.assert_array_equal(back.bytes_per_id(), tok.bytes_per_id())
  with open(tmp_path / "run" / "tokenizer.model", "ab") as f:
    f.write(b"\0")
  with pytest.raises(DataError, match="sha256"):
    data_lib.load_tokenizer(path)


def test_byte_and_char_bytes_per_id_count_utf8_bytes(tmp_path):
  text = "naïve 日本語 🙂\n"
  path = str(tmp_path / "tokenizer.json")
  data_lib.save_tokenizer(data_lib.ByteTokenizer(), path)
  byte = data_lib.load_tokenizer(path)
  ids = [byte.bos_id, *byte.encode(text), byte.eos_id]  # specials: 0
  assert byte.bytes_per_id()[ids].sum() == len(text.encode("utf-8"))
  char = CharTokenizer(text)
  assert char.bytes_per_id()[char.encode(text)].sum() == len(
    text.encode("utf-8")
  )


@pytest.mark.parametrize(
  "overrides,message",
  [
    (["--config.model.num_layers=3"], "only data.* keys"),
    (["--config.data.tokenizer=byte"], "tokenizer"),
    (
      ["--config.data.seq_len=abc"],
      "--config.data.seq_len=abc: expected an int",
    ),
    (["--config.data.nope=1"], "unknown key data.nope"),
  ],
)
def test_bad_overrides_are_one_line_config_errors(overrides, message):
  with pytest.raises(runs.ERRORS) as e:
    runs.parse_overrides(overrides)
  assert message in str(e.value) and "\n" not in str(e.value)


def _evaluate_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "efficient_lm.evaluate", *args],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_prints_json_and_appends_eval_jsonl_only(trained, loaded, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained.workdir, workdir)
  before = snapshot(workdir)
  proc = _evaluate_cli(f"--workdir={workdir}", "--num_batches=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  # One device here, eight in training: same loss.
  np.testing.assert_allclose(result["loss"], loaded.first2["loss"], rtol=1e-5)
  [summary] = proc.stderr.strip().splitlines()
  assert summary.startswith("step 4: eval loss ") and "bits/byte" in summary
  after = snapshot(workdir)
  # Only eval.jsonl is new (and so the directory holding it changed).
  assert after.pop("eval.jsonl") and after.pop(".") and before.pop(".")
  assert after == before
  with open(workdir / "eval.jsonl") as f:
    assert [json.loads(x) for x in f] == [result]


@pytest.mark.parametrize(
  "case", ["no_checkpoint", "not_a_run", "model_override"]
)
def test_cli_errors_are_one_line(trained, tmp_path, case):
  workdir, extra = tmp_path / "run", []
  if case == "no_checkpoint":  # a run that died before its first save
    workdir.mkdir()
    shutil.copy(os.path.join(trained.workdir, "config.json"), workdir)
    (workdir / "checkpoints").mkdir()
    message = f"workdir {workdir} has no committed checkpoint"
  elif case == "not_a_run":
    workdir.mkdir()
    message = f"{workdir} is not a training run"
  else:
    workdir = trained.workdir
    extra = ["--config.model.num_layers=3"]
    message = "--config.model.num_layers=3: only data.* keys"
  proc = _evaluate_cli(f"--workdir={workdir}", *extra)
  assert proc.returncode != 0
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("error: ") and message in line, line
