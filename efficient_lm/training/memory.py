"""Will the training state fit this host? Checked before anything is
allocated, from the abstract state and its shardings.

A config sized for a pod (configs/funnel_2b.py, configs/decoder_1b.py) run
with the plain train command on a laptop would otherwise allocate until the
kernel kills it. The check counts what training must hold per device at
least: the state (parameters, model state, optimizer moments) plus one set
of gradients, each leaf by its shard's size. Activations come on top, so a
run that passes can still be too big; one that fails cannot run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

GIB = 1024**3


def state_bytes_per_device(abstract_state: Any) -> int:
  """Bytes per device of the sharded state plus one gradient per param."""

  def shard_bytes(leaf) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
    return int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize

  state = sum(shard_bytes(a) for a in jax.tree.leaves(abstract_state))
  grads = sum(shard_bytes(a) for a in jax.tree.leaves(abstract_state["params"]))
  return state + grads


def host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux), else physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def device_limit_bytes(device) -> int | None:
  """An accelerator's memory limit, if its client reports one."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  return (stats or {}).get("bytes_limit")


def _problem(
  *,
  per_device: int,
  devices: int,
  need: int,
  where: str,
  num_params: int,
  topology: str,
  host: bool,
) -> str:
  """One line: what the state needs, what there is, the ways forward."""
  what = (
    f"{num_params / 1e9:.2f}B parameters with gradients and optimizer state"
  )
  if host:  # CPU devices share the host's memory: lead with the total
    needs = (
      f"{need / GIB:.1f} GiB of host memory before any activation "
      f"({what}; {per_device / GIB:.1f} GiB per device over "
      f"{devices} device(s))"
    )
  else:
    needs = (
      f"{per_device / GIB:.1f} GiB per device before any activation ({what})"
    )
  return (
    f"the training state needs {needs} but {where}; compile it for "
    f"the slice it is sized for instead (--compile_only "
    f"--topology={topology or '<slice>'}) or train a small config "
    f"(configs/tiny.py, configs/tiny_funnel.py)"
  )


def fits_problem(
  abstract_state: Any,
  mesh: jax.sharding.Mesh,
  *,
  num_params: int,
  topology: str = "",
  available: int | None = None,
) -> str | None:
  """Why the sharded state cannot fit, as one line; None if it may.

  CPU devices share the host's memory: the need is per device times the
  local devices. `available` overrides what the host reports (tests)."""
  per_device = state_bytes_per_device(abstract_state)
  devices = [
    d for d in mesh.devices.flat if d.process_index == jax.process_index()
  ]
  platform = devices[0].platform
  if platform == "cpu":
    need = per_device * len(devices)
    have = host_available_bytes() if available is None else available
    where = f"this host has {(have or 0) / GIB:.1f} GiB available"
  else:
    limit = device_limit_bytes(devices[0]) if available is None else available
    need, have = per_device, limit
    where = f"each {devices[0].device_kind} has {(have or 0) / GIB:.1f} GiB"
  if have is None or need <= have:
    return None
  return _problem(
    per_device=per_device,
    devices=len(devices),
    need=need,
    where=where,
    num_params=num_params,
    topology=topology,
    host=platform == "cpu",
  )


def config_problem(cfg, *, available: int | None = None) -> str | None:
  """The same question before any mesh exists, for a CPU-only host: every
  byte of the state must live in host memory at least once, however it is
  sharded, so a state larger than the host cannot train here, whatever
  devices the config's mesh asks for (a pod config's mesh also fails the
  device-count check, which would hide the real problem)."""
  from flax import nnx
  from efficient_lm import models
  from efficient_lm.training import optim

  abstract = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  pure = nnx.to_pure_dict(params)
  opt = optim.make_optimizer(
    cfg.train,
    decay_mask=optim.decay_mask(
      params, decay_embeddings=cfg.train.decay_embeddings
    ),
  )
  opt_state = jax.eval_shape(opt.init, pure)
  nbytes = lambda tree: sum(
    a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)
  )
  need = 2 * nbytes(pure) + nbytes(opt_state)
  have = host_available_bytes() if available is None else available
  if have is None or need <= have:
    return None
  m = cfg.mesh
  devices = m.dcn * max(m.data, 1) * m.fsdp * m.expert * m.tensor
  return _problem(
    per_device=need // devices,
    devices=devices,
    need=need,
    where=f"this host has {have / GIB:.1f} GiB available",
    num_params=sum(a.size for a in jax.tree.leaves(pure)),
    topology=cfg.topology,
    host=True,
  )
