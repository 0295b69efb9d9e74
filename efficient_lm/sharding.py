"""Mesh, the single logical-axis rules table, activation constraints and
state shardings.

Parameters carry logical axis names (metadata `logical_axes` on nnx.Param);
activations are constrained by logical names through `constrain`. The table
below is the only place that maps names to mesh axes, so changing the
parallelism layout is a config change (mesh sizes), never a model change.
Models and training both import this module; it imports neither.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficient_lm.config import ConfigError, MeshConfig

# dcn (slices over the data-center network) outermost, tensor innermost.
MESH_AXES = ("dcn", "data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
# No parameter name maps to "dcn": parameters and optimizer state are
# replicated across slices, so the only traffic over the slow network is
# the gradient all-reduce (pure data parallelism between slices).
RULES: dict[str, str | tuple[str, ...] | None] = {
  # activations
  "batch": ("dcn", "data", "fsdp", "expert"),
  "length": None,
  "act_embed": None,
  "act_heads": "tensor",
  "act_kv_heads": "tensor",
  "act_mlp": "tensor",
  "act_vocab": "tensor",
  # parameters
  "embed": "fsdp",
  "vocab": "tensor",
  "mlp": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  # MLA latents (kv_lora_rank, q_lora_rank): small, shared by all heads.
  "kv_latent": None,
  "q_latent": None,
  "norm": None,
  # The head_dim axis of q/k/v biases (models/attention.py; no decay).
  "bias": None,
  "layers": None,
  # The experts axis of MoE weights (models/moe.py): expert parallelism.
  "expert": "expert",
}


# Named logical tuples for activations, spelled once. T is the query length,
# S the key/value length: both are the "length" axis to the rules table.
BT = ("batch", "length")
BTD = ("batch", "length", "act_embed")
BTF = ("batch", "length", "act_mlp")
BTV = ("batch", "length", "act_vocab")
BTHK = ("batch", "length", "act_heads", None)
BSGK = ("batch", "length", "act_kv_heads", None)
# MLA: a latent activation (the latent dim replicated, like the width), and
# the absorbed generation's single key/value head (the cached latent),
# which every tensor shard holds whole while the query heads are split.
BTC = ("batch", "length", None)
BS1L = ("batch", "length", None, None)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  return Mesh(device_grid(cfg, devices), MESH_AXES)


def device_grid(
  cfg: MeshConfig, devices: Sequence[Any] | None = None
) -> np.ndarray:
  """The devices in the mesh's shape (dcn, data, fsdp, expert, tensor).

  One slice: a plain reshape of the devices in order, which keeps `tensor`
  innermost (fastest links on TPU slices and NVLink islands). Several
  (dcn > 1): each slice's devices fill one dcn index, laid out within the
  slice by mesh_utils for its ICI torus.
  """
  devices = list(jax.devices() if devices is None else devices)
  if cfg.size != len(devices):
    ep = f"*{cfg.expert}" if cfg.expert != 1 else ""
    raise ConfigError(
      f"mesh dcn*data*fsdp{'*expert' if ep else ''}*tensor={cfg.dcn}*"
      f"{cfg.data}*{cfg.fsdp}{ep}*{cfg.tensor}={cfg.size} does not match "
      f"the {len(devices)} available devices"
    )
  if cfg.dcn == 1:
    return np.asarray(devices).reshape(cfg.shape)
  # Devices of a multi-slice TPU run carry distinct slice_index values.
  # CPU devices of a multi-process run all say slice_index 0 (measured,
  # jax 0.11.2; jax.distributed.initialize(partition_index=...) reaches only
  # PJRT plugin clients, not the CPU one), so when every device is in one
  # slice, each process stands for a slice (process_is_granule).
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  key, granules = (
    ("slice_index", "slices") if by_slice else ("process_index", "processes")
  )
  sizes = collections.Counter(getattr(d, key) for d in devices)
  if len(sizes) != cfg.dcn or len(set(sizes.values())) != 1:
    why = "" if by_slice else " (the devices are in one slice)"
    raise ConfigError(
      f"mesh.dcn={cfg.dcn}: expected the {len(devices)} devices in "
      f"{cfg.dcn} equal {granules}{why}; found {len(sizes)}, of "
      f"{'/'.join(str(n) for n in sizes.values())} devices"
    )
  # allow_split_physical_axes: without it a slice's torus takes only axes
  # that are products of whole torus dims (fsdp=8 on a 4x4 v5e fails).
  try:
    return mesh_utils.create_hybrid_device_mesh(
      (1, cfg.data, cfg.fsdp, cfg.expert, cfg.tensor),
      (cfg.dcn, 1, 1, 1, 1),
      devices,
      process_is_granule=not by_slice,
      allow_split_physical_axes=True,
    )
  except (ValueError, NotImplementedError) as e:
    raise ConfigError(
      f"mesh data*fsdp*expert*tensor={cfg.data}*{cfg.fsdp}*{cfg.expert}*"
      f"{cfg.tensor} cannot be "
      f"laid out on each of the {cfg.dcn} {granules}: "
      f"{' '.join(str(e).split())[:300]}"
    ) from e


def logical_to_spec(names: Sequence[str | None]) -> P:
  """Maps logical axis names to a PartitionSpec through RULES."""
  out, used = [], set()
  for name in names:
    axes = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
    # A mesh axis may shard at most one dimension; later uses replicate.
    if axes is not None:
      tup = (axes,) if isinstance(axes, str) else tuple(axes)
      tup = tuple(a for a in tup if a not in used)
      used.update(tup)
      axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
    out.append(axes)
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def shard_map_by_names(
  fn: Callable,
  in_names: Sequence[Sequence[str | None]],
  out_names: Sequence[str | None],
) -> Callable:
  """Runs `fn` per shard (jax.shard_map) with specs from logical names.

  Kernels (Pallas/Mosaic custom calls) cannot be partitioned by GSPMD, so
  the model calls attention through this: each device gets whole sequences
  of its batch rows and its heads. Without a mesh it returns `fn` as is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=tuple(logical_to_spec(n) for n in in_names),
    out_specs=logical_to_spec(out_names),
    check_vma=False,
  )


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
  """Traces `fn` with `mesh` as the ambient (abstract) mesh, so `constrain`
  and `shard_map_by_names` inside the model see it; wrap before jax.jit."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
  """A variable's logical axis names, one per dimension.

  Layers stacked for a scan (models/stack.py) carry a leading axis that the
  per-layer metadata does not name: it is 'layers'.
  """
  names = tuple(var.get_metadata().get("logical_axes") or ())
  ndim = len(var.shape)
  if len(names) == ndim - 1:
    names = ("layers",) + names
  if len(names) != ndim:
    raise ValueError(
      f"variable of shape {var.shape} has logical axes {names}: every "
      "model variable needs one logical name per dimension"
    )
  return names


def _param_spec(var: nnx.Variable) -> P:
  # A dimension of size 1 is never split: a quantized weight's scale keeps
  # its weight's names over the axes it reduces (models/quantization.py).
  names = logical_axes(var)
  return logical_to_spec(
    tuple(None if n == 1 else a for a, n in zip(names, var.shape, strict=True))
  )


def _state_to_tree(state: Mapping[Any, Any], leaf_fn) -> dict[Any, Any]:
  out = {}
  for key, value in state.items():
    if isinstance(value, nnx.Variable):
      out[key] = leaf_fn(value)
    else:
      out[key] = _state_to_tree(value, leaf_fn)
  return out


def param_specs(abstract_state: nnx.State) -> dict[Any, Any]:
  """PartitionSpec tree (same structure as nnx.to_pure_dict(state))."""
  return _state_to_tree(abstract_state, _param_spec)


def named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
  )


def state_shardings(mesh: Mesh, abstract_vars: nnx.State) -> dict[Any, Any]:
  """NamedSharding tree for model variables (params or non-trainable state),
  in the structure of nnx.to_pure_dict(state)."""
  return named(mesh, param_specs(abstract_vars))


def optax_state_shardings(
  optimizer: optax.GradientTransformation,
  abstract_opt_state: Any,
  param_sh: Any,
  mesh: Mesh,
) -> Any:
  """Moments follow their parameter's sharding; scalars are replicated."""
  return optax.tree_map_params(
    optimizer.init,
    lambda _, s: s,
    abstract_opt_state,
    param_sh,
    transform_non_params=lambda _: replicated(mesh),
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(BT))


def batch_shards(mesh: Mesh) -> int:
  """How many ways `batch_sharding` splits the batch
  (dcn*data*fsdp*expert)."""
  axes = RULES["batch"]
  axes = (axes,) if isinstance(axes, str) else axes or ()
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict:
  """Per-process host batch -> an argument for a step jitted with
  `batch_sharding(mesh)`: globally sharded jax.Arrays across processes.

  One process holds the whole batch: the numpy arrays go to the jitted step
  as they are, which places them by its in_shardings in C++ (~25 us a step
  on CPU) instead of a Python device_put per array (~250 us), a quarter of
  a near-zero-FLOP model's step.
  """
  if jax.process_count() == 1:
    return dict(batch)
  return jax.make_array_from_process_local_data(
    batch_sharding(mesh), dict(batch)
  )
