"""`--compile_only --topology=...`: TPU slice names, the CLI report (one
slice or several, mesh.dcn), the FLOPs XLA counts for the Pallas kernel,
and the 1B config on v5e-16.

No TPU needed: libtpu compiles for abstract topologies. Skips without it.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu")

from configs import decoder_1b  # noqa: E402
from efficient_lm import aot  # noqa: E402
from efficient_lm import config as config_lib  # noqa: E402
from tests.helpers import cli_env, override  # noqa: E402

pytestmark = pytest.mark.tpu_aot
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
  "model.num_layers": 2,
  "model.embed_dim": 256,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.mlp_dim": 512,
  "model.vocab_size": 512,
  "data.seq_len": 512,
  "train.batch_size": 4,
}


def _devices(topo):
  try:
    return aot.topology_devices(topo)
  except aot.TopologyError as e:  # libtpu present but unusable here
    pytest.skip(str(e))


@pytest.mark.parametrize(
  "text, name, chips",
  [
    ("v5e-16", "v5e:4x4", 16),
    ("v6e-8", "v6e:2x4", 8),
    ("v4-32", "v4:2x2x4", 16),
    ("v5p-32", "v5p:2x2x4", 16),
    ("v5p-8", "v5p:2x2x1", 4),
    ("v5e:2x2", "v5e:2x2", 4),
    ("v4:2x2x2", "v4:2x2x2", 8),
    ("v6e:2x2", "v6e:2x2", 4),
  ],
)
def test_topology_names(text, name, chips):
  topo = aot.parse_topology(text)
  assert (topo.name, topo.chips) == (name, chips)


@pytest.mark.parametrize(
  "text", ["v7-8", "v5e", "v5e-12", "v4-33", "tpu:2x2", "v5e:4x4x4x4"]
)
def test_unknown_topology_is_one_line_error(text):
  with pytest.raises(aot.TopologyError) as e:
    aot.parse_topology(text)
  assert "\n" not in str(e.value) and text in str(e.value)


def test_cli_compile_only_prints_report_without_workdir(tmp_path):
  # No TPU_* variables of this process (another test's libtpu load may
  # have set them): the command keeps libtpu quiet itself (issue #23).
  env = cli_env(drop=("TPU_",))
  args = [f"--config.{k}={v}" for k, v in SMALL.items()]
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.train",
      f"--config={ROOT}/configs/decoder_1b.py",
      "--compile_only",
      "--topology=v5e:2x2",
      "--config.mesh.fsdp=2",
      "--config.mesh.tensor=2",
      *args,
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  if "cannot compile for --topology" in r.stderr:
    pytest.skip(r.stderr.strip().splitlines()[-1])
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stderr == ""  # libtpu's "unexpected worker hostname" lines
  assert "compiled decoder_1b for v5e:2x2 (4 x" in r.stdout
  assert "'fsdp': 2, 'expert': 1, 'tensor': 2" in r.stdout
  assert "attention pallas_tpu for auto" in r.stdout  # as on the pod
  assert "of 16.00 GiB HBM: fits" in r.stdout
  assert "XLA cost analysis" in r.stdout
  assert list(tmp_path.iterdir()) == []  # no workdir, nothing written


def test_report_for_two_slices_is_per_chip_and_names_the_slices():
  """--config.mesh.dcn=2 compiles for two slices of the topology: 8 chips
  of v5e:2x2, each still with its own 16 GiB."""
  _devices(aot.parse_topology("v5e:2x2"))  # skips where libtpu cannot
  cd = override(
    decoder_1b.get_config(),
    **{
      **SMALL,
      "train.batch_size": 8,
      "mesh.dcn": 2,
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
    },
  )
  lines = []
  assert aot.report(cd, "v5e:2x2", log=lines.append), lines
  assert lines[0].startswith(
    "compiled decoder_1b for 2 slices of v5e:2x2 (8 x TPU v5 lite, mesh "
    "{'dcn': 2, 'data': 1, 'fsdp': 2, 'expert': 1, 'tensor': 2}"
  ), lines[0]
  assert "of 16.00 GiB HBM: fits" in lines[1], lines[1]


def test_bad_dcn_is_one_line_error_before_libtpu(monkeypatch):
  # libtpu itself reads num_slices 0 or -1 as one slice.
  def no_libtpu(*args, **kwargs):
    raise AssertionError("libtpu asked for slices of a bad config")

  monkeypatch.setattr(aot, "topology_devices", no_libtpu)
  cd = override(decoder_1b.get_config(), **{"mesh.dcn": -1})
  with pytest.raises(
    config_lib.ConfigError, match=r"^mesh.dcn=-1: expected a positive value$"
  ):
    aot.report(cd, "v5e:2x2")


def test_cli_unknown_topology_is_one_line_error(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "efficient_lm.train",
      f"--config={ROOT}/configs/tiny.py",
      "--compile_only",
      "--topology=v9-4",
    ],
    cwd=tmp_path,
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1
  assert (
    r.stderr.strip()
    .splitlines()[-1]
    .startswith("error: unknown --topology='v9-4'; expected")
  )


def test_pallas_step_flops_match_the_analytical_count():
  """XLA sees the attention FLOPs only through the kernels' cost
  estimates: 1.07x the analytical count with them (the kernels credit the
  backward 2.5x the forward, the model 2x), 0.74x without."""
  topo = aot.parse_topology("v5e:2x2")
  devices = _devices(topo)
  cd = override(
    decoder_1b.get_config(),
    **SMALL,
    **{
      "model.attention.impl": "pallas_tpu",
      "model.scan_layers": False,
      "model.remat": "none",
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
    },
  )
  cfg = config_lib.from_config_dict(cd, device_count=len(devices))
  t, _, compiled = aot.compile_train_step(cfg, devices)
  model = t.flops["train"] * cfg.train.batch_size * cfg.data.seq_len
  counted = aot.xla_flops(compiled) * len(devices)
  assert abs(counted / model - 1) < 0.10, (counted, model)


# 74-80 s of TPU compile (a 2-layer decoder_1b takes as long): `make
# test-all`. The default suite still compiles pod-sharded train steps ahead
# of time (the CLI and two-slice tests above, tests/test_train_tpu_aot.py).
@pytest.mark.slow
def test_decoder_1b_fits_v5e_16():
  _devices(aot.parse_topology("v5e-16"))  # skips where libtpu cannot
  lines = []
  fits = aot.report(decoder_1b.get_config(), "v5e-16", log=lines.append)
  print("\n".join(lines))
  assert fits, lines
