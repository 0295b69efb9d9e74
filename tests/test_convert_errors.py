"""Bad input to `python -m efficient_lm.convert` (issue #19 item 6): each
case is exactly one `error:` line, and nothing is written (the workdir or
output directory stays absent, or unchanged when it existed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from efficient_lm import convert, runs
from tests.helpers import REPO, cli_env, small_config, snapshot
from tests.test_runs import _weights

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")


def _copy(family: str, dest) -> str:
  out = os.path.join(dest, family)
  shutil.copytree(os.path.join(FIXTURES, family, "model"), out)
  return out


def _edit_config(model_dir: str, **changes) -> None:
  path = os.path.join(model_dir, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  for key, value in changes.items():
    if value is _DROP:
      cfg.pop(key, None)
    else:
      cfg[key] = value
  with open(path, "w") as f:
    json.dump(cfg, f)


_DROP = object()


def _edit_tensors(model_dir: str, edit, file: str = "model.safetensors"):
  path = os.path.join(model_dir, file)
  with safe_open(path, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _error(argv, capsys) -> str:
  """The one `error:` line `convert` exits with (status 1: bad input)."""
  with pytest.raises(SystemExit) as e:
    convert.main(argv)
  message = str(e.value.code)
  assert message.startswith("error: ") and "\n" not in message, message
  assert capsys.readouterr().out == ""
  return message


def _import_error(model_dir, tmp_path, capsys, *extra) -> str:
  workdir = tmp_path / "run"
  message = _error(
    ["import", f"--hf={model_dir}", f"--workdir={workdir}", *extra], capsys
  )
  assert not workdir.exists(), "an import that failed wrote its workdir"
  return message


def _drop(name):
  return lambda t: t.pop(name)


def _config_case(**changes):
  return lambda d: _edit_config(d, **changes)


# (id, family, how the copy is broken, what the line must say)
CASES = [
  (
    "architecture",
    "llama",
    _config_case(architectures=["GPT2LMHeadModel"]),
    "architecture 'GPT2LMHeadModel' is not supported; supported: "
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
    "Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM",
  ),
  (
    "rope_yarn",
    "llama",
    _config_case(
      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    ),
    "rope type 'yarn' is not supported (supported: default, linear, llama3)",
  ),
  (
    "rope_scaling_legacy_dynamic",
    "llama",
    _config_case(
      rope_parameters=_DROP,
      rope_theta=1e4,
      rope_scaling={"type": "dynamic", "factor": 2.0},
    ),
    "rope type 'dynamic' is not supported",
  ),
  (
    "attention_bias",
    "llama",
    _config_case(attention_bias=True),
    "LlamaForCausalLM config.json attention_bias=True: biases on the "
    "attention projections need an output-projection bias",
  ),
  ("mlp_bias", "llama", _config_case(mlp_bias=True), "mlp_bias=True"),
  (
    "hidden_act",
    "mistral",
    _config_case(hidden_act="relu"),
    "hidden_act='relu' is not supported",
  ),
  (
    "layer_types",
    "qwen2",
    _config_case(
      layer_types=["full_attention", "chunked_attention", "full_attention"]
    ),
    "layer_types entry 'chunked_attention' is not supported",
  ),
  (
    "partial_rotary",
    "qwen3",
    _config_case(
      rope_parameters={
        "rope_type": "default",
        "rope_theta": 1e4,
        "partial_rotary_factor": 0.5,
      }
    ),
    "partial_rotary_factor=0.5",
  ),
  (
    "tied_config_untied_head",
    "llama",
    _config_case(tie_word_embeddings=True),
    "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' in a "
    "tied model",
  ),
  (
    "untied_config_no_head",
    "qwen3",
    _config_case(tie_word_embeddings=False),
    "tensor 'lm_head.weight' is missing from the checkpoint",
  ),
  (
    "missing_tensor",
    "llama",
    lambda d: _edit_tensors(d, _drop("model.layers.1.mlp.up_proj.weight")),
    "tensor 'model.layers.1.mlp.up_proj.weight' is missing",
  ),
  (
    "unexpected_tensor",
    "llama",
    lambda d: _edit_tensors(
      d,
      lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3)}),
    ),
    "unexpected tensor 'model.layers.0.mlp.extra.weight' in model.safetensors",
  ),
  (
    "shape",
    "llama",
    lambda d: _edit_tensors(
      d,
      lambda t: t.update(
        {
          "model.layers.2.self_attn.k_proj.weight": np.zeros(
            (8, 32), np.float32
          )
        }
      ),
    ),
    "tensor 'model.layers.2.self_attn.k_proj.weight' has shape [8, 32], the "
    "config expects [16, 32]",
  ),
  (
    "config_shape",
    "gemma2",
    _config_case(intermediate_size=48),
    "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], the "
    "config expects [48, 32]",
  ),
  (
    "float16",
    "qwen3",
    lambda d: _edit_tensors(
      d, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()})
    ),
    "the checkpoint is float16",
  ),
  (
    "truncated",
    "llama",
    lambda d: os.truncate(
      os.path.join(d, "model.safetensors"),
      os.path.getsize(os.path.join(d, "model.safetensors")) // 2,
    ),
    "model.safetensors: not a readable safetensors file",
  ),
  (
    "garbage",
    "qwen2",
    lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(
      b"\xff" * 64
    ),
    "model.safetensors: not a readable safetensors file",
  ),
  (
    "shard_missing",
    "mistral",
    lambda d: os.remove(os.path.join(d, "model-00002-of-00002.safetensors")),
    "model-00002-of-00002.safetensors does not exist (named in "
    "model.safetensors.index.json)",
  ),
  (
    "no_weights",
    "qwen3",
    lambda d: os.remove(os.path.join(d, "model.safetensors")),
    "has neither model.safetensors nor model.safetensors.index.json",
  ),
  (
    "no_config",
    "qwen3",
    lambda d: os.remove(os.path.join(d, "config.json")),
    "config.json does not exist",
  ),
  (
    "bad_json",
    "qwen3",
    lambda d: open(os.path.join(d, "config.json"), "w").write("{"),
    "config.json: not readable JSON",
  ),
  (
    "no_tokenizer",
    "gemma3",
    lambda d: os.remove(os.path.join(d, "tokenizer.json")),
    "tokenizer.json does not exist",
  ),
]


@pytest.mark.parametrize(
  "family, breaks, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_checkpoint_is_one_line_and_writes_nothing(
  family, breaks, says, tmp_path, capsys
):
  model_dir = _copy(family, tmp_path)
  breaks(model_dir)
  assert says in _import_error(model_dir, tmp_path, capsys)


def test_existing_workdir_is_left_as_it_is(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  before = snapshot(workdir)
  message = _error(
    ["import", f"--hf={FIXTURES}/qwen3/model", f"--workdir={workdir}"], capsys
  )
  assert "exists and is not empty" in message
  assert snapshot(workdir) == before


def test_rotary_inv_freq_is_skipped(tmp_path):
  model_dir = _copy("llama", tmp_path)
  _edit_tensors(
    model_dir,
    lambda t: t.update(
      {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    ),
  )
  convert.main(["import", f"--hf={model_dir}", f"--workdir={tmp_path / 'r'}"])
  assert runs.load_run(str(tmp_path / "r")).step == 0


@pytest.fixture(scope="module")
def mod_run(tmp_path_factory):
  """A run of a mixture-of-depths model (no Hugging Face equivalent)."""
  cfg = small_config(**{"model.routing.kind": "mod", "mesh.data": 8})
  params, state = _weights(cfg)
  root = tmp_path_factory.mktemp("mod")
  return runs.write_run(str(root / "run"), cfg, params, state)


def test_export_refuses_a_model_without_equivalent(mod_run, tmp_path, capsys):
  out = tmp_path / "hf"
  message = _error(["export", f"--workdir={mod_run}", f"--out={out}"], capsys)
  assert "model.routing.kind='mod'" in message
  assert "no Hugging Face equivalent" in message
  assert not out.exists() and os.listdir(tmp_path) == []


def test_export_leaves_an_existing_out_as_it_is(mod_run, tmp_path, capsys):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "config.json").write_text("{}")
  before = snapshot(out)
  message = _error(["export", f"--workdir={mod_run}", f"--out={out}"], capsys)
  assert "exists and is not empty" in message
  assert snapshot(out) == before


def test_export_of_a_missing_run(tmp_path, capsys):
  message = _error(
    ["export", f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'o'}"],
    capsys,
  )
  assert "does not exist" in message and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
  "argv, says",
  [
    ([], "the following arguments are required: command"),
    (["import", "--hf=x"], "the following arguments are required: --workdir"),
    (["import", "--hf=x", "--workdir=y", "--dtype=float16"], "--dtype"),
    (["export", "--workdir=x", "--out=y", "--shard_size=5XB"], "5XB"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
  ],
)
def test_misuse_is_one_line_exit_2(argv, says, tmp_path):
  """The CLI itself, as a user runs it: usage errors exit 2, one line."""
  proc = subprocess.run(
    [sys.executable, "-m", "efficient_lm.convert", *argv],
    cwd=tmp_path,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert says in lines[0]
  assert proc.returncode == (1 if "shard_size" in " ".join(argv) else 2)
  assert os.listdir(tmp_path) == []
