"""Ahead-of-time TPU compile report for `python -m benchmarks.attention
--aot_tpu`.

No TPU needed: libtpu compiles for an abstract topology (e.g. v5e:2x2), so
this reports what a real chip would get: per-chip memory_analysis (temp and
argument bytes) and cost_analysis flops for each (mode, mask, head dim,
length, impl), the temp growth exponent between consecutive lengths (~1
linear for blockwise impls, ~2 for dense xla) and the pallas_tpu / xla
temp ratio per length. Nothing runs, so there are no timings.

Cases that fail to compile (dense xla past HBM) are reported by the
error's first line, which is itself the finding; cases pallas_tpu refuses
(NotImplementedError) are reported as refused.

Caveats. memory_analysis temp is HBM only: XLA's memory-space assignment
places what fits (e.g. dense logits at 1k) in VMEM, uncounted; so each case
is compiled a second time with that pass off, to report the whole temp
footprint too. cost_analysis counts a Mosaic custom call by the kernel's
pl.CostEstimate (dense tile, backward 2.5x forward), so for pallas_tpu it
credits masked tiles too; for xla_chunked they count the loop body once, not per tile; for
dense xla they count every (masked) pair. The model column (visible pairs,
the convention of attention.py) is the comparable figure.
"""

import functools
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

IMPLS = ("pallas_tpu", "xla", "xla_chunked")
P = jax.sharding.PartitionSpec


def topology_mesh(name):
  topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  devices = np.array(topo.devices).reshape(-1)
  return jax.sharding.Mesh(devices, ("data",))


def shard_batch(mesh, check_vma=True):
  """Wraps attend(q, k, v, pos) to run per chip on its batch shard: the
  Mosaic kernels only lower inside shard_map, and per-chip programs are
  what memory_analysis then describes."""

  def wrap(attend):
    return jax.shard_map(
      attend,
      mesh=mesh,
      in_specs=(P("data"),) * 4,
      out_specs=P("data"),
      check_vma=check_vma,
    )

  return wrap


def _first_line(e, limit=200):
  """The error's first line; when that only announces a list (ends in
  ':'), the first item too, which carries the detail."""
  lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [""]
  text = lines[0]
  if text.endswith(":") and len(lines) > 1:
    text += " " + lines[1]
  return f"{type(e).__name__}: {text[:limit]}"


# XLA's memory-space assignment (MSA) moves whichever temporaries fit into
# VMEM (128 MiB on v5e), so HBM temp alone hides most of a short sequence's
# footprint and inflates growth exponents. Compiling again with MSA off (an
# XLA debug flag libtpu accepts) puts every temporary in HBM: the whole
# footprint, whose growth is the linear-vs-quadratic measure.
NO_MSA = {"xla_msa_enable": False}


def compile_one(fn, abstract):
  """(lowered, compiled, seconds to lower + compile)."""
  t0 = time.perf_counter()
  lowered = fn.lower(*abstract)
  compiled = lowered.compile()
  return lowered, compiled, time.perf_counter() - t0


def all_temp(lowered):
  """Temp bytes with MSA off, or None where this libtpu refuses it."""
  try:
    mem = lowered.compile(compiler_options=NO_MSA).memory_analysis()
  except Exception:  # an unknown flag must not lose the main figures
    return None
  return mem.temp_size_in_bytes


def _flops(compiled):
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0] if ca else {}
  return (ca or {}).get("flops")


def run(args, iter_cases, make_fn, block_sizes):
  mesh = _mesh_or_exit(args.aot_tpu)
  n = mesh.devices.size
  dev = mesh.devices.flat[0]
  dtype = jnp.dtype(args.dtype)
  shard = jax.sharding.NamedSharding(mesh, P("data"))
  wrap = shard_batch(mesh)
  # A case whose trace fails shard_map's varying-manual-axes check (a bug
  # in that impl, reported below) is retried with check_vma=False so its
  # memory can still be measured; its rows are marked with '*'.
  loose = shard_batch(mesh, check_vma=False)
  vma_errors = {}  # impl -> first failure under check_vma=True
  hdr = _print_header(args, n, dev, dtype, block_sizes)
  # (mode, mask, kdim, impl) -> [(t, HBM temp, all temp)], bytes per chip
  temps = {}
  for c in iter_cases(args):  # b is per chip here
    if c.first_of_mode:
      print("\n" + hdr)
    abstract = _abstract(c, n, dtype, shard)
    for impl in args.impl:
      make = functools.partial(make_fn, impl, c.spec, c.mode, block_sizes)
      _compile_row(c, impl, make, abstract, wrap, loose, vma_errors, temps)
  for impl, err in vma_errors.items():
    print(
      f"\n* {impl} compiled with shard_map(check_vma=False): with "
      f"check_vma=True it fails to trace: {err}"
    )
  print_growth(temps)


def _mesh_or_exit(topology):
  try:
    return topology_mesh(topology)
  except Exception as e:  # e.g. v5e:1x1: not a multiple of a 2x2 host
    raise SystemExit(
      f"--aot_tpu={topology}: no compile-only topology: {_first_line(e)}"
    ) from None


def _print_header(args, n, dev, dtype, block_sizes):
  """Prints the run's settings and the columns' legend; returns the table
  header."""
  print(
    f"AOT compile for {args.aot_tpu}: {n} x {dev.device_kind}, dtype "
    f"{dtype.name}, jax {jax.__version__}; nothing runs, no timings"
  )
  print(
    f"masks: window={args.window} tokens incl. self, globals="
    f"{args.globals}; block sizes: {block_sizes or 'impl defaults'}"
  )
  print(
    "All figures per chip (batch sharded over chips); memory in MiB. "
    "HBM tmp: memory_analysis temp as compiled; all tmp: temp with "
    "MSA off (no VMEM placement: the whole temp footprint); args: "
    "argument bytes. model GF: visible pairs, fwd+bwd = 3.5 x fwd; "
    "xla GF: cost_analysis (Mosaic kernels by their dense-tile cost "
    "estimate; a scan body once); s: compile s"
  )
  return (
    f"{'mode':8}{'mask':8}{'K':>4}{'T':>6}{'B':>3}{'H':>3} "
    f"{'impl':12}{'s':>5}{'HBM tmp':>9}{'all tmp':>9}{'args':>8}"
    f"{'xla GF':>8}{'model GF':>9}"
  )


def _abstract(c, n, dtype, shard):
  """(q, k, v, pos[, w]) of case `c` as sharded ShapeDtypeStructs: `c.b`
  sequences per chip, `n` chips."""
  mode, kdim, t, b, h, g = c.mode, c.kdim, c.t, c.b, c.h, c.g

  def sds(shape, dt):
    return jax.ShapeDtypeStruct((b * n,) + shape, dt, sharding=shard)

  abstract = (
    sds((t, h, kdim), dtype),
    sds((t, g, kdim), dtype),
    sds((t, g, kdim), dtype),
    sds((t,), jnp.int32),
  )
  if mode != "fwd":
    abstract += (sds((t, h, kdim), jnp.float32),)
  return abstract


def _compile_row(c, impl, make, abstract, wrap, loose, vma_errors, temps):
  """Compiles `make(wrap=...)` for case `c` and prints its row (or why it
  did not compile); adds its temps to `temps`."""
  mode, mask_name, kdim, t, b, h = c.mode, c.mask_name, c.kdim, c.t, c.b, c.h
  model = c.flops
  head = f"{mode:8}{mask_name:8}{kdim:>4}{t:>6}{b:>3}{h:>3} {impl:12}"
  try:
    try:
      fn = make(wrap=wrap)
      lowered, compiled, secs = compile_one(fn, abstract)
    except TypeError as e:
      if "manual axis" not in str(e):
        raise
      vma_errors.setdefault(impl, _first_line(e, 400))
      head = head.replace(f"{impl} ", f"{impl}*", 1)
      fn = make(wrap=loose)
      lowered, compiled, secs = compile_one(fn, abstract)
  except NotImplementedError as e:
    print(f"{head}refused: {_first_line(e)}")
    return
  except Exception as e:  # the failure is the finding
    print(f"{head}no compile: {_first_line(e)}")
    return
  mem = compiled.memory_analysis()
  temp, whole = mem.temp_size_in_bytes, all_temp(lowered)
  temps.setdefault((mode, mask_name, kdim, impl), []).append((t, temp, whole))
  flops = _flops(compiled)
  xla_gf = "-" if flops is None else f"{flops / 1e9:.1f}"
  whole = "-" if whole is None else f"{whole / 2**20:.1f}"
  print(
    f"{head}{secs:5.1f}{temp / 2**20:9.1f}{whole:>9}"
    f"{mem.argument_size_in_bytes / 2**20:8.1f}"
    f"{xla_gf:>8}{model / 1e9:9.1f}"
  )


def growth_exponents(pts):
  """log(m2/m1)/log(t2/t1) between consecutive (t, m) points (m > 0)."""
  return [
    math.log(m2 / m1) / math.log(t2 / t1)
    for (t1, m1), (t2, m2) in itertools.pairwise(pts)
    if m1 > 0 and m2 > 0
  ]


def print_growth(temps):
  if not temps:
    return
  print(
    "\nPer-chip temp MiB vs T and exponents log(m2/m1)/log(T2/T1) "
    "between consecutive lengths (~1 linear, ~2 quadratic). 'all' "
    "(MSA off) is the footprint; 'HBM' undercounts whatever fit in "
    "VMEM, so its exponents overstate growth."
  )
  for (mode, mask_name, kdim, impl), pts in sorted(temps.items()):
    pts.sort()
    print(f"  {mode:8}{mask_name:8}K={kdim:<4}{impl}")
    for label, i in (("all", 2), ("HBM", 1)):
      col = [(p[0], p[i]) for p in pts if p[i] is not None]
      cells = "; ".join(f"{t}: {m / 2**20:.1f}" for t, m in col)
      exps = ", ".join(f"{e:.2f}" for e in growth_exponents(col)) or "-"
      print(f"    {label} {cells}  exponent {exps}")
  print(
    "\npallas_tpu / xla temp per chip, all (HBM); '-': xla did not "
    "compile or used none"
  )
  for (mode, mask_name, kdim, impl), pts in sorted(temps.items()):
    if impl != "pallas_tpu":
      continue
    dense = {p[0]: p for p in temps.get((mode, mask_name, kdim, "xla"), [])}
    cells = []
    for t, temp, whole in pts:
      x = dense.get(t)
      r = [
        f"{a / b:.4f}" if x and a is not None and b else "-"
        for a, b in ((whole, x and x[2]), (temp, x and x[1]))
      ]
      cells.append(f"{t}: {r[0]} ({r[1]})")
    print(f"  {mode:8}{mask_name:8}K={kdim:<4} {'; '.join(cells)}")
