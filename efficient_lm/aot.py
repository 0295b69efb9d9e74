"""Ahead-of-time compile of the train step for a TPU slice, on any host.

libtpu compiles for an abstract topology without a TPU, so the per-chip
memory of a config on a pod is known before the pod is rented:

  python -m efficient_lm.train --config=configs/decoder_1b.py \
      --compile_only --topology=v5e-16

With `--config.mesh.dcn=N` it compiles for N such slices (multi-slice over
the data-center network); the report stays per chip.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

# Several processes (a test run beside a CLI) may each load libtpu to
# compile; nothing here ever opens a TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from efficient_lm import config as config_lib  # noqa: E402
from efficient_lm import cpu_runtime  # noqa: E402
from efficient_lm import sharding  # noqa: E402
from efficient_lm.training import loop  # noqa: E402

GIB = 2**30
# HBM per chip, GiB (Cloud TPU system architecture pages).
CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# v4 and v5p type names count TensorCores (2 per chip); v5e, v6e chips.
CORES_IN_NAME = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}

# Standard slice shapes by chip count: the topology a Cloud TPU type name
# creates (v5e / v6e are 2D tori, v4 / v5p 3D). Single-chip slices are left
# out: libtpu's compile-only client wants whole 2x2 hosts.
#   chips   v5e, v6e    v4, v5p       e.g.
#       4   2x2         2x2x1         v5e-4,   v4-8,    v5p-8
#       8   2x4         2x2x2         v5e-8,   v4-16,   v5p-16
#      16   4x4         2x2x4         v5e-16,  v4-32,   v5p-32
#      32   4x8         2x4x4         v5e-32,  v4-64,   v5p-64
#      64   8x8         4x4x4         v5e-64,  v4-128,  v5p-128
#     128   8x16        4x4x8         v5e-128, v4-256,  v5p-256
#     256   16x16       4x8x8         v5e-256, v4-512,  v5p-512
#     512               8x8x8                  v4-1024, v5p-1024
_SHAPES_2D = {
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
}
_ACCEPTED = (
  "a Cloud TPU type (v4-32, v5e-16, v5p-32, v6e-8) or a libtpu "
  "topology (v5e:4x4, v5p:2x2x4, v4:2x2x2, v6e:2x2)"
)


class TopologyError(ValueError):
  pass


@dataclass(frozen=True)
class Topology:
  generation: str  # key of CHIP_HBM_GIB
  name: str  # libtpu topology string, e.g. "v5e:4x4"
  chips: int


def parse_topology(text: str | None) -> Topology:
  """`v5e-16` or `v5e:4x4` (see the table above) -> Topology."""
  if not text:
    raise TopologyError(f"--compile_only needs --topology: {_ACCEPTED}")
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
  if m:
    gen, n = m.group(1), int(m.group(2))
    chips, rem = divmod(n, CORES_IN_NAME[gen])
    shapes = _SHAPES_2D if gen in ("v5e", "v6e") else _SHAPES_3D
    if rem or chips not in shapes:
      sizes = ", ".join(f"{gen}-{c * CORES_IN_NAME[gen]}" for c in shapes)
      raise TopologyError(
        f"--topology={text}: no standard {gen} slice of "
        f"that size; expected one of {sizes}"
      )
    return Topology(gen, f"{gen}:{shapes[chips]}", chips)
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", text)
  if m:
    dims = [int(d) for d in m.group(2).split("x")]
    chips = 1
    for d in dims:
      chips *= d
    return Topology(m.group(1), text, chips)
  raise TopologyError(f"unknown --topology={text!r}; expected {_ACCEPTED}")


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` slices; with more than one each
  carries its `slice_index`, as on a multi-slice pod."""
  import importlib.util

  from jax.experimental import topologies

  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(
      "--compile_only needs libtpu (JAX's TPU compiler; it runs on any "
      "host), which is not installed: launch/setup_env.sh dev installs it "
      "(the dev extra; or pip install -e '.[tpu]')"
    )
  cpu_runtime.quiet_libtpu_for_compile_only()  # libtpu loads next
  try:
    desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.name, num_slices=num_slices
    )
  except Exception as e:  # no libtpu, or it rejects the shape
    slices = f" x {num_slices} slices" if num_slices > 1 else ""
    raise TopologyError(
      f"cannot compile for --topology={topo.name}"
      f"{slices}: {' '.join(str(e).split())[:300]}"
    ) from e
  return list(desc.devices)


def compile_train_step(cfg: config_lib.Config, devices):
  """Lowers and compiles the full train step for `devices` (abstract TPU
  devices do): returns (trainer, lowered, compiled)."""
  t = loop.build_trainer(cfg, devices)
  b, s = cfg.train.batch_size, cfg.data.seq_len
  bs = sharding.batch_sharding(t.mesh)
  batch = {
    k: jax.ShapeDtypeStruct((b, s), "int32", sharding=bs)
    for k in ("inputs", "targets", "segment_ids", "positions")
  }
  lowered = t.train_step.lower(t.abstract_state, batch, *t.step_inputs)
  return t, lowered, lowered.compile()


def xla_flops(compiled) -> float:
  """FLOPs XLA's cost analysis counts for one device's program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def _gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB"


def report(cd, topology_text: str | None, *, log=print) -> bool:
  """Compiles `cd`'s train step for the slice and logs the per-device
  report; True when it fits HBM. Raises TopologyError, ConfigError."""
  topo = parse_topology(topology_text)
  cd = cd.copy_and_resolve_references()
  impl = cd.model.attention.impl
  if impl == "auto":
    # "auto" follows this host's backend (CPU: dense XLA attention); on the
    # pod it picks the Pallas TPU kernel, so compile that.
    cd.model.attention.impl = "pallas_tpu"
  # mesh.dcn is the number of slices to compile for: validated (without a
  # device count) before libtpu is asked for them, which would read 0 or -1
  # as one slice.
  slices = config_lib.from_config_dict(cd).mesh.dcn
  devices = topology_devices(topo, num_slices=slices)
  n = len(devices)
  cfg = config_lib.from_config_dict(cd, device_count=n)
  if cfg.train.objective == "distill":  # its teacher is real arrays
    raise config_lib.ConfigError(
      "--compile_only does not compile a distillation step "
      "(train.objective='distill' reads the teacher run's weights)"
    )
  # libtpu exposes v4's two TensorCores as two devices (no megacore), so
  # memory is per device: the chip's HBM split between them.
  hbm = CHIP_HBM_GIB[topo.generation] * GIB * topo.chips * slices / n
  start = time.perf_counter()
  t, _, compiled = compile_train_step(cfg, devices)
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  if m is None:  # the backend reports none; the verdict needs it
    raise TopologyError(f"no memory analysis from XLA for {topo.name}")
  total = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
  )
  b, s = cfg.train.batch_size, cfg.data.seq_len
  model_flops = t.flops["train"] * b * s / n
  counted = xla_flops(compiled)
  if cfg.model.scan_layers:
    # The while loop's body is counted once, not once per layer; say so
    # rather than guess a split (unrolling costs a second compile).
    how = (
      f"scanned layer stack: 1 of {cfg.model.num_layers} layers "
      "counted; --config.model.scan_layers=False counts them all"
    )
  else:
    how = "unrolled layers: all counted"
  verdict = ("fits" if total <= hbm else "does NOT fit") + (
    f", {_gib(abs(hbm - total))} " + ("to spare" if total <= hbm else "over")
  )
  dev = devices[0].device_kind
  where = topo.name if slices == 1 else f"{slices} slices of {topo.name}"
  log(
    f"compiled {cfg.name} for {where} ({n} x {dev}, mesh "
    f"{dict(t.mesh.shape)}, attention {cfg.model.attention.impl}"
    f"{' for auto' if impl == 'auto' else ''}) in {seconds:.1f} s"
  )
  log(
    f"per device: arguments {_gib(m.argument_size_in_bytes)}, outputs "
    f"{_gib(m.output_size_in_bytes)} ({_gib(m.alias_size_in_bytes)} "
    f"aliased), temporaries {_gib(m.temp_size_in_bytes)}; total "
    f"{_gib(total)} of {_gib(hbm)} HBM: {verdict}"
  )
  log(
    f"FLOPs per device per step: model {model_flops:.3e} (analytical, "
    f"dense_tile, backward 2x, remat not counted); XLA cost analysis "
    f"{counted:.3e} ({how}; remat={cfg.model.remat} recomputation "
    "included)"
  )
  return total <= hbm
