"""configs/funnel_2b.py: its size, the host guard, and the pod compile."""

import re
import subprocess
import sys

import pytest
from flax import nnx

from configs import funnel_2b
from efficient_lm import config as config_lib, models
from efficient_lm.models import flops
from efficient_lm.training import memory
from tests.helpers import REPO, cli_env


def _cfg():
  return config_lib.from_config_dict(funnel_2b.get_config(), device_count=16)


def test_builds_abstractly_with_the_expected_parameter_count():
  cfg = _cfg()
  m = cfg.model
  assert (
    m.kind,
    m.funnel.stages,
    m.attention.kind,
    cfg.data.seq_len,
    cfg.mesh.fsdp * cfg.mesh.tensor,
  ) == ("funnel_encoder", (12, 24), "tglobal", 8192, 16)
  abstract = nnx.eval_shape(lambda: models.build(m, nnx.Rngs(0)))
  counts = flops.param_count(nnx.state(abstract, nnx.Param))
  d, f, k = m.embed_dim, m.mlp_dim, m.resolved_head_dim
  per_layer = (
    2 * d * m.num_heads * k  # q, o
    + 2 * d * m.num_kv_heads * k  # k, v
    + 3 * d * f  # SwiGLU
    + 3 * d
  )  # two norms, summary norm
  layers = m.num_layers + m.funnel.decoder_layers
  assert counts["total"] == (m.vocab_size * d + layers * per_layer + d)
  assert 1.9e9 < counts["total"] < 2.2e9


def test_train_command_stops_before_allocating_on_this_host(tmp_path):
  need_gib = 31.0
  have = memory.host_available_bytes()
  if have is None or have >= need_gib * memory.GIB:
    pytest.skip("this host could hold funnel_2b's training state")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.train",
      "--config=configs/funnel_2b.py",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(
    f"error: the training state needs {need_gib} GiB of host memory"
  ), lines
  assert "2.08B parameters" in lines[0]
  assert "--compile_only --topology=v5p-32" in lines[0]
  assert "configs/tiny_funnel.py" in lines[0]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.tpu_aot
def test_compiles_for_v5p_32_and_fits():
  pytest.importorskip("libtpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.train",
      "--config=configs/funnel_2b.py",
      "--compile_only",
    ],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "compiled funnel_2b for v5p:2x2x4 (16 x" in out
  m = re.search(r"total ([\d.]+) GiB of ([\d.]+) GiB HBM: fits", out)
  assert m and float(m.group(1)) < float(m.group(2)), out[-2000:]
