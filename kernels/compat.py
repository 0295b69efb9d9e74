"""The one place that absorbs Pallas API churn (tested with jax 0.11.2).

Names moved between releases (TPUCompilerParams -> CompilerParams,
TPUMemorySpace -> MemorySpace, `interpret=` growing TPU-specific params);
kernels import them from here so an upgrade touches one file.
"""

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec
BlockSpec = pl.BlockSpec
when = pl.when
program_id = pl.program_id
num_programs = pl.num_programs


def _first(module, *names):
  """`module`'s attribute of the first of `names` it has. By name: the old
  spellings are absent from the pinned jax, so as plain attributes a type
  checker rejects them."""
  for name in names:
    if hasattr(module, name):
      return getattr(module, name)
  raise AttributeError(f"{module.__name__} has none of {names}")


def tpu_compiler_params(dimension_semantics):
  cls = _first(pltpu, "CompilerParams", "TPUCompilerParams")
  return cls(dimension_semantics=tuple(dimension_semantics))


def vmem(shape, dtype):
  """A VMEM scratch buffer of the given shape."""
  if hasattr(pltpu, "VMEM"):
    space = pltpu.VMEM
  else:  # older releases: pltpu.TPUMemorySpace.VMEM
    space = _first(pltpu, "TPUMemorySpace").VMEM
  return space(shape, dtype)


def interpret_mode(interpret: bool):
  """Value for pallas_call(interpret=...).

  `True` selects the generic HLO interpreter (a jitted scan over the grid,
  scalar prefetch and scratch included); it runs on CPU and is fast enough
  for tests. `pltpu.InterpretParams()` would simulate TPU memory spaces and
  DMAs too, at a large speed cost we do not need here.
  """
  return bool(interpret)


def pallas_call(
  kernel,
  *,
  out_shape,
  grid_spec,
  dimension_semantics,
  interpret,
  name=None,
  cost=None,
):
  """`cost`: (flops, transcendentals, bytes_accessed) for XLA's cost
  analysis, which otherwise counts a Mosaic kernel as zero FLOPs."""
  estimate = None if cost is None else pl.CostEstimate(*(int(c) for c in cost))
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid_spec=grid_spec,
    compiler_params=tpu_compiler_params(dimension_semantics),
    interpret=interpret_mode(interpret),
    name=name,
    cost_estimate=estimate,
  )


def _varying(x) -> frozenset:
  """Manual mesh axes `x` varies over (empty outside shard_map)."""
  # jax 0.11: aval.manual_axis_type.varying; earlier releases: aval.vma.
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()) or ())


def match_varying(*xs):
  """Cast operands to the union of their varying manual axes.

  Under `jax.shard_map(check_vma=True)` a pallas_call needs its operands to
  agree on which mesh axes they vary over (e.g. replicated positions with
  batch-sharded q). Outside shard_map this is the identity.
  """
  axes = frozenset().union(*(_varying(x) for x in xs))
  out = []
  for x in xs:
    missing = tuple(sorted(axes - _varying(x)))
    out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
  return out


def out_struct(shape, dtype, like):
  """ShapeDtypeStruct that varies over the same manual axes as `like`."""
  mat = getattr(jax.typeof(like), "mat", None)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def varying_like(tree, *likes):
  """Marks `tree` as varying over every manual mesh axis `likes` vary over.

  Under jax.shard_map(check_vma=True) a scan carry built from constants is
  unvarying while the body's output varies with the sharded inputs, and
  scan rejects the mismatch. Outside shard_map this is the identity.
  """
  axes = tuple(sorted(frozenset().union(*(_varying(x) for x in likes))))
  if not axes:
    return tree
  return jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), tree)
