"""The Hugging Face golden fixtures (tests/fixtures/hf) are reproducible:
tools/hf_reference.py, run under $EFFICIENT_LM_HF_PYTHON (a Python with
torch and transformers), writes them again equal to the committed ones."""

import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import REPO

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
HF_PYTHON = os.environ.get("EFFICIENT_LM_HF_PYTHON")


def _files(root):
  return sorted(
    os.path.relpath(os.path.join(d, f), root)
    for d, _, fs in os.walk(root)
    for f in fs
  )


def _json(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.skipif(
  not HF_PYTHON, reason="EFFICIENT_LM_HF_PYTHON (torch, transformers) unset"
)
def test_fixtures_regenerate_equal(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [HF_PYTHON, "tools/hf_reference.py", "make-fixtures", str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _files(tmp_path) == [f for f in _files(FIXTURES) if f != "README.md"]
  for family in FAMILIES:
    old_dir, new_dir = os.path.join(FIXTURES, family), tmp_path / family
    old = np.load(os.path.join(old_dir, "reference.npz"))
    new = np.load(new_dir / "reference.npz")
    assert sorted(new.files) == ["greedy", "logits", "prompts", "tokens"]
    for key in ("tokens", "prompts", "greedy"):
      assert new[key].dtype == old[key].dtype == np.int32, (family, key)
      np.testing.assert_array_equal(new[key], old[key], err_msg=family)
    assert new["logits"].dtype == np.float32
    np.testing.assert_allclose(
      new["logits"], old["logits"], rtol=0, atol=1e-5, err_msg=family
    )
    for name in _files(old_dir):
      old_path, new_path = os.path.join(old_dir, name), new_dir / name
      if name.endswith(".safetensors"):
        a, b = load_file(old_path), load_file(new_path)
        assert sorted(a) == sorted(b), (family, name)
        for key in a:
          assert a[key].dtype == b[key].dtype, (family, name, key)
          np.testing.assert_array_equal(
            a[key], b[key], err_msg=f"{family} {name} {key}"
          )
      elif name == "meta.json":
        a, b = _json(old_path), _json(new_path)
        a.pop("versions"), b.pop("versions")
        assert a == b, family
      elif name.endswith(".json"):
        assert _json(old_path) == _json(new_path), (family, name)
