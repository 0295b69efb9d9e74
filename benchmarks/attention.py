"""Attention throughput and memory for every impl available here.

  python -m benchmarks.attention                  # platform defaults
  python -m benchmarks.attention --seq=512,1024 --impl=xla,xla_chunked,interpret
  python -m benchmarks.attention --aot_tpu=v5e:2x2 --batch=1 --heads=8

For each (mode, mask, head dim, sequence length) it times each impl (fwd,
or fwd+bwd = value and grads of sum(out * w) w.r.t. q, k, v) and prints
TFLOP/s and the speed ratio to `cudnn` and to `xla` measured in this same
run (ratio > 1: faster than that baseline). Then it prints the compiled
temp memory per sequence vs length and its growth exponent (1 = linear, 2 =
quadratic): blockwise impls must stay near 1.

FLOP convention: only visible (non-masked) (query, key) pairs count. With
N visible pairs per (batch, head): fwd = 2 * N * (K + E) (q.k and p.v),
fwd+bwd = 3.5 * fwd (the backward's five matmuls = 2.5 * fwd, as in the
FlashAttention papers). Causal therefore counts ~half the dense FLOPs, as
the published anchors printed at the end do.

--aot_tpu=TOPOLOGY compiles (never runs) pallas_tpu, xla and xla_chunked
for an abstract TPU slice instead, and reports per-chip compiled memory and
flops (benchmarks/attention_aot.py); --batch is then per chip.
"""

import argparse
import os
import sys
import time
from typing import NamedTuple

# AOT topologies load libtpu, whose lockfile another process (a test run)
# may hold; the lock guards real chips, which compile-only never touches.
# Not set otherwise: on a TPU host the lock should keep guarding them.
if any(a.startswith("--aot_tpu") for a in sys.argv[1:]):
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402
from benchmarks import attention_aot  # noqa: E402
from kernels import masks  # noqa: E402
from kernels.flash_attention import vjp  # noqa: E402

ANCHORS = """Published anchors, one H100 SXM (989 TFLOP/s bf16 dense peak):
  FlashAttention-2 fwd+bwd, d128 causal, 16k:       ~328 TFLOP/s
  cuDNN forward, d128 causal, 16k:                  ~539 TFLOP/s
  FlashAttention-3 forward, d128 non-causal, 16k:   ~648 TFLOP/s"""

IMPLS = (
  "pallas_gpu",
  "pallas_gpu_hopper",
  "cudnn",
  "xla",
  "xla_chunked",
  "pallas_tpu",
  "interpret",
  "interpret_gpu",
)
# pallas_gpu with the tiles its Mosaic GPU (wgmma) kernels take on sm90;
# plain pallas_gpu with default 128 x 128 tiles runs its Triton kernels.
HOPPER_TILES = vjp.BlockSizes(64, 128, 64, 64)


def _ints(s):
  return [int(x) for x in s.split(",") if x]


def _words(s):
  return [x for x in s.split(",") if x]


def parse_args(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  aot = any(a.startswith("--aot_tpu") for a in argv)
  # AOT targets a TPU whatever the host is, so it takes the TPU defaults.
  on_cpu = jax.default_backend() == "cpu" and not aot
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--seq",
    type=_ints,
    default=_ints("512,1024" if on_cpu else "1024,2048,4096,8192,16384,32768"),
  )
  p.add_argument(
    "--head_dim", type=_ints, default=_ints("64" if on_cpu else "64,128")
  )
  p.add_argument(
    "--mask", type=_words, default=_words("causal,window,global_local")
  )
  p.add_argument(
    "--impl", type=_words, default=list(attention_aot.IMPLS if aot else IMPLS)
  )
  p.add_argument(
    "--aot_tpu",
    default="",
    metavar="TOPOLOGY",
    help="compile only, for a TPU topology such as v5e:2x2",
  )
  p.add_argument("--mode", type=_words, default=_words("fwd,fwd_bwd"))
  p.add_argument(
    "--tokens",
    type=int,
    default=1024 if on_cpu else 16384,
    help="batch = max(1, tokens // seq), unless --batch",
  )
  p.add_argument("--batch", type=int, default=0)
  p.add_argument(
    "--hidden",
    type=int,
    default=128 if on_cpu else 2048,
    help="query heads = hidden // head_dim, unless --heads",
  )
  p.add_argument("--heads", type=int, default=0, help="query heads")
  p.add_argument("--kv_heads", type=int, default=0, help="0: = query heads")
  p.add_argument(
    "--window",
    type=int,
    default=256 if on_cpu else 1024,
    help="causal window in tokens, self included",
  )
  p.add_argument(
    "--globals",
    type=int,
    default=64,
    help="global prefix tokens for global_local",
  )
  p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
  p.add_argument(
    "--block_sizes",
    type=_ints,
    default=None,
    help="block_q,block_kv[,block_q_bwd,block_kv_bwd]",
  )
  p.add_argument("--iters", type=int, default=3 if on_cpu else 20)
  p.add_argument(
    "--xla_max_gib",
    type=float,
    default=2.0 if on_cpu else 16,
    help="skip the dense xla impl above this logits size "
    "(not with --aot_tpu: there the compiler's verdict is "
    "reported)",
  )
  args = p.parse_args(argv)
  allowed = attention_aot.IMPLS if aot else IMPLS
  for name in args.impl:
    if name not in allowed:
      p.error(f"unknown impl {name!r}; choose from {allowed}")
  return args


def mask_spec(name, args):
  if name == "causal":
    return masks.MaskSpec(causal=True)
  if name == "window":
    return masks.MaskSpec(causal=True, window=(args.window - 1, 0))
  if name == "global_local":
    return masks.MaskSpec(
      causal=True, window=(args.window - 1, 0), global_prefix=args.globals
    )
  if name == "full":
    return masks.MaskSpec()
  raise ValueError(f"unknown mask {name!r}")


def visible_pairs(spec, t, rows=512):
  """Visible (query, key) pairs for positions 0..t-1, counted in row
  chunks so 32k x 32k never materialises."""
  pos = jnp.arange(t, dtype=jnp.int32)
  n = -(-t // rows)
  starts = jnp.arange(n, dtype=jnp.int32) * rows

  def count(start):
    q = start + jnp.arange(rows, dtype=jnp.int32)
    seg_q = jnp.ones((rows, 1), jnp.int32)  # one segment, no padding
    seg_k = jnp.ones((1, t), jnp.int32)
    vis = masks.element_mask(
      spec, q[:, None], pos[None, :], seg_q, seg_k, False
    )
    return jnp.sum(vis & (q < t)[:, None], dtype=jnp.int32)

  return int(jnp.sum(jax.jit(lambda s: jax.lax.map(count, s))(starts)))


class Case(NamedTuple):
  mode: str
  mask_name: str
  spec: masks.MaskSpec
  kdim: int
  t: int
  b: int  # sequences (per chip in --aot_tpu mode)
  h: int
  g: int
  flops: float  # visible (query, key) pairs; fwd+bwd = 3.5 x fwd
  first_of_mode: bool


def iter_cases(args):
  """The benchmark grid, shared by the timed and the --aot_tpu modes."""
  for mode in args.mode:
    first = True
    for mask_name in args.mask:
      spec = mask_spec(mask_name, args)
      for kdim in args.head_dim:
        for t in args.seq:
          b = args.batch or max(1, args.tokens // t)
          h = args.heads or max(1, args.hidden // kdim)
          g = args.kv_heads or h
          flops = (
            b
            * h
            * visible_pairs(spec, t)
            * 2
            * (kdim + kdim)
            * (3.5 if mode != "fwd" else 1)
          )
          yield Case(mode, mask_name, spec, kdim, t, b, h, g, flops, first)
          first = False


def unavailable(impl, spec, args, b, h, t):
  """Why `impl` cannot run here (None when it can)."""
  platform = jax.default_backend()
  if impl in ("pallas_gpu", "pallas_gpu_hopper", "cudnn") and (
    platform != "gpu"
  ):
    return f"needs a CUDA GPU (platform is {platform})"
  if impl == "pallas_gpu_hopper":
    cc = getattr(jax.devices()[0], "compute_capability", "0")
    if not str(cc).startswith("9") or args.dtype == "float32":
      return f"Mosaic GPU kernels need sm90 and bf16 / f16 (sm {cc})"
  if impl == "pallas_tpu" and platform != "tpu":
    return f"needs a TPU (platform is {platform})"
  if impl == "cudnn" and (spec.global_prefix or args.dtype == "float32"):
    return "cuDNN flash takes causal / window only, in bf16 / fp16"
  if impl == "xla":
    gib = b * h * t * t * 4 / 2**30
    if gib > args.xla_max_gib:
      return f"dense logits would take {gib:.0f} GiB (> --xla_max_gib)"
  if impl in ("interpret", "interpret_gpu") and t > 4096:
    return "the interpreter is for correctness; too slow beyond 4k"
  return None


def make_fn(impl, spec, mode, block_sizes, wrap=None):
  """jit of fwd or fwd+bwd; `wrap` (e.g. a shard_map) wraps attend."""
  if impl == "pallas_gpu_hopper":
    impl, block_sizes = "pallas_gpu", HOPPER_TILES

  def attend(q, k, v, pos):
    # Explicit impls raise rather than fall back, so a timing is never
    # silently another impl's.
    return kernels.attention(
      q,
      k,
      v,
      mask=spec,
      q_pos=pos,
      k_pos=pos,
      impl=impl,
      block_sizes=block_sizes,
    )

  if wrap is not None:
    attend = wrap(attend)
  if mode == "fwd":
    return jax.jit(attend)

  def loss(q, k, v, pos, w):
    return jnp.sum(attend(q, k, v, pos).astype(jnp.float32) * w)

  grad = jax.grad(loss, argnums=(0, 1, 2))
  return jax.jit(lambda q, k, v, pos, w: grad(q, k, v, pos, w))


def run_one(fn, args_, iters):
  """(seconds per call, compiled temp bytes)."""
  compiled = fn.lower(*args_).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem else None
  jax.block_until_ready(compiled(*args_))  # warm-up
  t0 = time.perf_counter()
  for _ in range(iters):
    out = compiled(*args_)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters, temp


def _fmt_ratio(base, t):
  return "-" if base is None or t is None else f"{base / t:5.2f}x"


def main(argv=None):
  args = parse_args(argv)
  bs = None
  if args.block_sizes:
    bs = vjp.BlockSizes(*args.block_sizes)
  if args.aot_tpu:
    attention_aot.run(args, iter_cases, make_fn, bs)
    return
  dev = jax.devices()[0]
  dtype = jnp.dtype(args.dtype)
  hdr = _print_header(dev, dtype, args, bs)
  memory = {}  # (mode, mask, kdim, impl) -> [(t, temp bytes per sequence)]
  rng = np.random.default_rng(0)
  for c in iter_cases(args):
    if c.first_of_mode:
      print("\n" + hdr)
    rows = time_case(c, _inputs(c, dtype, rng), args, bs)
    print_rows(c, rows, memory)
  print_memory(memory)
  _print_footer(dev)


def _print_header(dev, dtype, args, bs):
  """Prints the run's settings; returns the table header."""
  print(
    f"device: {dev.device_kind} ({jax.default_backend()}), "
    f"dtype {dtype.name}, jax {jax.__version__}"
  )
  print(
    f"masks: window={args.window} tokens incl. self, globals="
    f"{args.globals}; block sizes: {bs or vjp.BlockSizes()}"
  )
  print("FLOPs count visible (query, key) pairs only; fwd+bwd = 3.5 x fwd")
  return (
    f"{'mode':8}{'mask':13}{'K':>4}{'T':>7}{'B':>4}{'H':>4} "
    f"{'impl':18}{'ms':>10}{'TFLOP/s':>10}{'vs cudnn':>9}"
    f"{'vs xla':>8}{'temp MiB/seq':>14}"
  )


def _inputs(c, dtype, rng):
  """(q, k, v, pos), plus the loss weights w for fwd+bwd, for case `c`."""
  mode, kdim, t, b, h, g = c.mode, c.kdim, c.t, c.b, c.h, c.g
  q = jnp.asarray(rng.normal(size=(b, t, h, kdim)), dtype)
  k = jnp.asarray(rng.normal(size=(b, t, g, kdim)), dtype)
  v = jnp.asarray(rng.normal(size=(b, t, g, kdim)), dtype)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  call = (q, k, v, pos)
  if mode != "fwd":
    call += (jnp.asarray(rng.normal(size=(b, t, h, kdim)), jnp.float32),)
  return call


def time_case(c, call, args, bs):
  """impl -> (seconds, temp bytes), or the reason it was skipped."""
  mode, spec, t, b, h = c.mode, c.spec, c.t, c.b, c.h
  rows = {}  # impl -> (seconds, temp bytes) or reason skipped
  for impl in args.impl:
    why = unavailable(impl, spec, args, b, h, t)
    if why is None:
      try:
        rows[impl] = run_one(make_fn(impl, spec, mode, bs), call, args.iters)
        continue
      except Exception as e:  # report and keep benchmarking
        why = f"failed: {type(e).__name__}: {str(e)[:90]}"
    rows[impl] = why
  return rows


def print_rows(c, rows, memory):
  """One line per impl of case `c`; adds its temp bytes to `memory`."""
  mode, mask_name, kdim, t, b, h = c.mode, c.mask_name, c.kdim, c.t, c.b, c.h
  secs = {i: r[0] for i, r in rows.items() if isinstance(r, tuple)}
  for impl, r in rows.items():
    head = f"{mode:8}{mask_name:13}{kdim:>4}{t:>7}{b:>4}{h:>4} {impl:18}"
    if isinstance(r, str):
      print(f"{head}skipped: {r}")
      continue
    sec, temp = r
    mib = "-"
    if temp is not None:
      memory.setdefault((mode, mask_name, kdim, impl), []).append((t, temp / b))
      mib = f"{temp / b / 2**20:.1f}"
    print(
      f"{head}{sec * 1e3:10.2f}{c.flops / sec / 1e12:10.3f}"
      f"{_fmt_ratio(secs.get('cudnn'), sec):>9}"
      f"{_fmt_ratio(secs.get('xla'), sec):>8}{mib:>14}"
    )


def _print_footer(dev):
  """The GPU's peak memory (on a GPU) and the published anchors."""
  if jax.default_backend() == "gpu":
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is not None:
      print(
        f"GPU process peak bytes in use (whole run): {peak / 2**30:.2f} "
        "GiB (memory_stats peak is monotone; per-config figures above "
        "are the compiled temp sizes)"
      )
  print("\n" + ANCHORS)
  if jax.default_backend() != "gpu":
    print("GPU figures pending: this run had no GPU.")


def print_memory(memory):
  """Temp bytes per sequence vs T, with the growth exponent per doubling."""
  if not memory:
    return
  print(
    "\nCompiled temp memory per sequence (memory_analysis), growth "
    "exponent log(m2/m1)/log(T2/T1): ~1 linear, ~2 quadratic"
  )
  for (mode, mask_name, kdim, impl), pts in sorted(memory.items()):
    pts.sort()
    cells = [f"T={t}: {m / 2**20:.1f} MiB" for t, m in pts]
    exps = attention_aot.growth_exponents(pts)
    exp = ", ".join(f"{e:.2f}" for e in exps) or "-"
    print(
      f"  {mode:8}{mask_name:13}K={kdim:<4}{impl:18} "
      f"{'; '.join(cells)}  exponent {exp}"
    )


if __name__ == "__main__":
  main()
