r"""Sample text from a trained run: `python -m efficient_lm.generate`.

  python -m efficient_lm.generate --workdir=runs/tiny \
      --prompt="def " --prompt="import " --max_new_tokens=64

Each prompt's completion goes to stdout, one after another, each followed by
a newline and nothing else; progress, timing and `--stats` go to stderr. The
run is read, never written: the newest good checkpoint's parameters, the
saved config and tokenizer (`efficient_lm/runs.py`).

Several prompts are one batch. Row b's prompt sits at positions
0..len_b-1 (right-padded with segment-0 tokens, which every mask hides) and
its new tokens follow at len_b, len_b+1, ... so rows of different lengths
decode together. With the cache (default), prefill is one forward over the
prompts that fills every layer's cache (models/cache.py) and each new token
is one step over the cache; `--use_cache=false` recomputes the whole
sequence for every new token, the reference the cached path must equal.
`--temperature=0` is greedy; otherwise logits / temperature, then top-k,
then top-p (nucleus) filtering, sampled from `--seed`. A row stops at the
tokenizer's end-of-sequence token.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_lm import models, sharding
from efficient_lm.models import cache as cache_lib

# Positions are int32 (the model's inputs and the caches' position rows).
MAX_POSITIONS = 2**31 - 1


def sample(
  logits_BV, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0
):
  """Next tokens [B] from float32 logits [B, V]."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (at least one).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_BV = jnp.where(before_BV < top_p, sorted_BV, jnp.inf)
    cut_B1 = jnp.min(kept_BV, axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cut_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _last(logits_BTV, lens_B):
  """Logits at each row's last real token [B, V]."""
  idx = (lens_B - 1)[:, None, None]
  return jnp.take_along_axis(logits_BTV, idx, axis=1)[:, 0]


def unrolls_by_default(variables) -> bool:
  """Whether the Generator holds the layers apart (`unroll_layers`)
  unless told: every array of `variables` on one CPU device and every
  weight (array of 2 or more axes) float32. XLA:CPU upcasts narrower
  weights (bfloat16, int8) to float32 before its dots; unrolled, it
  schedules every layer's upcast at the start of the step, all the
  float32 copies alive at once, which measured 2x slower than the scan
  (one layer's copy at a time) for a bfloat16 model."""
  arrays = jax.tree.leaves(variables)
  narrow = any(
    isinstance(a, jax.Array) and a.ndim >= 2 and a.dtype != jnp.float32
    for a in arrays
  )
  return models.stack.on_one_cpu(arrays) and not narrow


class Generator:
  """Jitted prefill / decode / full-forward steps for one model.

  `graphdef` and `variables` (params and model state, placed as the
  trainer places them) come from `nnx.split(model)`; `mesh` is the mesh
  they live on (None: the default device). `kv_cache_dtype`
  (cache.KV_CACHE_DTYPES) is how the caches store K/V rows; the
  recompute path (use_cache=False) reads K/V through the same storage.
  `unroll_layers` (default: `unrolls_by_default`, float32 weights on one
  CPU device) holds the layer stacks apart, each layer its own arrays
  (views of the stacked memory, no copy) and its own cache, and runs them
  in a Python loop (`models.unroll_layers`): XLA:CPU copies a scanned
  layer's weights out of the stack on every decode step.
  """

  def __init__(
    self,
    graphdef,
    variables,
    *,
    mesh=None,
    kv_cache_dtype="auto",
    unroll_layers: bool | None = None,
  ):
    if unroll_layers is None:
      unroll_layers = unrolls_by_default(variables)
    if kv_cache_dtype != "auto" or unroll_layers:
      model = nnx.merge(graphdef, variables)
      models.set_kv_cache_dtype(model, kv_cache_dtype)
      if unroll_layers:
        models.unroll_layers(model)
      graphdef, variables = nnx.split(model)
    self.graphdef, self.variables, self.mesh = graphdef, variables, mesh
    wrap = (
      (lambda f: f)
      if mesh is None
      else (lambda f: sharding.under_mesh(mesh, f))
    )

    def prefill(variables, cache, tokens_BT, lens_B):
      model = nnx.merge(graphdef, variables)
      t = tokens_BT.shape[1]
      pos_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_BT.shape)
      seg_BT = (pos_BT < lens_B[:, None]).astype(jnp.int32)
      logits_BTV, _, cache = model(tokens_BT, pos_BT, seg_BT, cache=cache)
      return _last(logits_BTV, lens_B), cache

    def decode(variables, cache, tok_B, pos_B):
      model = nnx.merge(graphdef, variables)
      logits_BTV, _, cache = model(
        tok_B[:, None],
        pos_B[:, None],
        jnp.ones_like(tok_B)[:, None],
        cache=cache,
      )
      return logits_BTV[:, 0], cache

    def full(variables, tokens_BS, lens_B):
      model = nnx.merge(graphdef, variables)
      pos_BS = jnp.broadcast_to(
        jnp.arange(tokens_BS.shape[1], dtype=jnp.int32), tokens_BS.shape
      )
      seg_BS = (pos_BS < lens_B[:, None]).astype(jnp.int32)
      logits_BSV, _ = model(tokens_BS, pos_BS, seg_BS, causal_routing=True)
      return _last(logits_BSV, lens_B)

    self._prefill = jax.jit(wrap(prefill), donate_argnums=1)
    self._decode = jax.jit(wrap(decode), donate_argnums=1)
    self._full = jax.jit(wrap(full))
    self._sample = jax.jit(
      sample, static_argnames=("temperature", "top_k", "top_p")
    )

  def model(self):
    return nnx.merge(self.graphdef, self.variables)

  def cache_stats(self, batch: int, max_len: int) -> dict[str, Any]:
    """Cache bytes per token per layer (measured from the fields of one
    cached row: K/V in the stored dtype, int8 scales included) and the
    bytes the cache of this batch and length actually allocates."""
    model = self.model()
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    return {
      "cache_bytes_per_token": model.cache_bytes_per_token(),
      "cache_bytes": cache_lib.nbytes(shapes),
    }

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    use_cache: bool = True,
    max_len: int | None = None,
  ):
    """New token ids per prompt (without the end-of-sequence token) and
    timing stats. `max_len` (default: longest prompt + max_new_tokens)
    bounds positions and the cache."""
    buf, lens, longest = self._batch(prompts, max_new_tokens, max_len, pad_id)
    key = jax.random.key(seed)
    samp = dict(
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)
    )
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    logits, cache = self._start(buf, lens, longest, use_cache)
    jax.block_until_ready(logits)
    stats["prefill_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    out, steps, logits = self._decode_loop(
      logits,
      cache,
      buf,
      lens,
      key,
      samp,
      max_new_tokens=max_new_tokens,
      eos_id=eos_id,
      use_cache=use_cache,
    )
    jax.block_until_ready(logits)
    n = len(prompts)
    stats["decode_s"] = time.perf_counter() - t1
    stats["decode_steps"] = steps
    stats["decode_tokens_per_s"] = (
      steps * n / stats["decode_s"] if steps else 0.0
    )
    return out[:n], stats

  def check(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    max_len: int | None = None,
  ) -> int:
    """`max_len` (default: longest prompt + max_new_tokens) once the
    request is known to be one `generate` can serve; before anything is
    allocated, ValueError (one line) for an empty prompt, a negative count,
    more positions than the model addresses, or a model that cannot
    generate (an encoder)."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
      raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 0")
    longest = max(len(p) for p in prompts)
    max_len = self._check_positions(longest, max_new_tokens, max_len)
    model = self.model()
    jax.eval_shape(lambda: model.init_cache(1, max_len))  # encoders refuse
    return max_len

  def _batch(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    max_len: int | None,
    pad_id: int | None,
  ) -> tuple[np.ndarray, np.ndarray, int]:
    """`(buf [B, max_len], lens [B], longest prompt)`: the prompts as one
    right-padded batch of token ids."""
    max_len = self.check(prompts, max_new_tokens, max_len)
    n = len(prompts)
    # Pad the batch to a multiple of the data-parallel size with copies of
    # the first prompt; their outputs are dropped.
    dp = 1 if self.mesh is None else sharding.batch_shards(self.mesh)
    rows = list(prompts) + [prompts[0]] * (-n % dp)
    b = len(rows)
    lens = np.array([len(p) for p in rows], np.int32)
    longest = int(lens.max())
    buf = np.full((b, max_len), pad_id or 0, np.int32)  # seg 0 hides it
    for i, p in enumerate(rows):
      buf[i, : len(p)] = p
    return buf, lens, longest

  def _check_positions(
    self, longest: int, max_new_tokens: int, max_len: int | None
  ) -> int:
    """`max_len` (default: longest + max_new_tokens), checked against the
    positions generation needs and those the model can attend."""
    total = longest + max_new_tokens
    max_len = total if max_len is None else max_len
    if total > max_len:
      raise ValueError(
        f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
        f"{total} positions exceeds max_len={max_len}"
      )
    limit = self.model().max_positions()
    if limit is not None and max_len > limit:
      raise ValueError(
        f"{max_len} positions exceed the {limit} the block-sparse table "
        "covers (model.attention.max_len); positions past it would be "
        "invisible"
      )
    if max_len > MAX_POSITIONS:
      raise ValueError(
        f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
        f"{max_len} positions exceeds the {MAX_POSITIONS} the model can "
        "address (int32 positions)"
      )
    return max_len

  def _start(self, buf, lens, longest: int, use_cache: bool):
    """`(logits [B, V], cache)` after the prompts: prefill into a fresh
    cache, or (no cache: None) one full forward."""
    cache = None  # used only if use_cache
    if use_cache:
      b, max_len = buf.shape
      cache = self.model().init_cache(b, max_len)
      logits, cache = self._prefill(
        self.variables, cache, jnp.asarray(buf[:, :longest]), jnp.asarray(lens)
      )
    else:
      logits = self._full(self.variables, jnp.asarray(buf), jnp.asarray(lens))
    return logits, cache

  def _decode_loop(
    self,
    logits,
    cache,
    buf,
    lens,
    key,
    samp: dict[str, Any],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    use_cache: bool,
  ):
    """`(new tokens per row, decode steps, last logits)`: samples from
    `logits`, writes each token into `buf` and feeds it back."""
    b = buf.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    cur = lens.copy()
    steps = 0
    for i in range(max_new_tokens):
      tok = np.asarray(self._sample(logits, jax.random.fold_in(key, i), **samp))
      for r in range(b):
        if done[r]:
          continue
        if eos_id is not None and tok[r] == eos_id:
          done[r] = True
        else:
          out[r].append(int(tok[r]))
      if done.all() or i == max_new_tokens - 1:
        break
      buf[np.arange(b), cur] = tok
      if use_cache:
        logits, cache = self._decode(
          self.variables, cache, jnp.asarray(tok), jnp.asarray(cur)
        )
      else:
        logits = self._full(
          self.variables, jnp.asarray(buf), jnp.asarray(cur + 1)
        )
      cur += 1
      steps += 1
    return out, steps, logits


# ---------------------------------------------------------------------- CLI


def _flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "a trained run's directory")
  flags.DEFINE_multi_string("prompt", [], "a prompt; repeat for a batch")
  flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy")
  flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
  flags.DEFINE_float(
    "top_p",
    1.0,
    "nucleus: keep the smallest set of tokens with this probability mass",
  )
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_bool(
    "use_cache",
    True,
    "false: recompute the whole sequence "
    "for every new token (the reference path)",
  )
  flags.DEFINE_bool("stats", False, "print cache sizes and timing to stderr")
  flags.DEFINE_string(
    "kv_cache_dtype",
    "auto",
    "how the caches store K/V rows: auto (the model's dtype), float32, "
    "bfloat16, int8 (per-token, per-head absmax scales)",
  )
  flags.DEFINE_string(
    "quantize",
    None,
    "sample from the weights quantized by this scheme (qwix PTQ): "
    "int8_weights, int4_weights[:GROUP], int8_dynamic, fp8",
  )
  flags.mark_flag_as_required("workdir")
  return flags.FLAGS


def main(argv) -> None:
  from absl import flags, logging
  from efficient_lm import cpu_runtime, runs

  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each read at INFO
  cpu_runtime.use_cpu_only_without_accelerator()
  f = FLAGS
  if not f.prompt:
    sys.exit("error: give at least one --prompt")
  if f.temperature < 0 or not 0 < f.top_p <= 1 or f.top_k < 0:
    sys.exit(
      f"error: --temperature={f.temperature} (>= 0), --top_p={f.top_p} "
      f"(0 < p <= 1), --top_k={f.top_k} (>= 0) out of range"
    )
  if f.kv_cache_dtype not in cache_lib.KV_CACHE_DTYPES:
    sys.exit(
      f"error: --kv_cache_dtype={f.kv_cache_dtype!r}: expected one of "
      f"{', '.join(cache_lib.KV_CACHE_DTYPES)}"
    )
  try:  # every bad input fails here, before the cache is allocated
    run = runs.load_run(f.workdir, quantize=f.quantize)
    tok = run.tokenizer
    bos = [] if tok.bos_id is None else [tok.bos_id]
    prompts = [bos + tok.encode(p) for p in f.prompt]
    gen = Generator(
      run.graphdef,
      run.variables,
      mesh=run.mesh,
      kv_cache_dtype=f.kv_cache_dtype,
    )
    max_len = gen.check(prompts, f.max_new_tokens)
  except (ValueError, *runs.ERRORS) as e:
    sys.exit(f"error: {e}")
  print(
    f"generate: step {run.step} of {f.workdir}, {len(prompts)} "
    f"prompt(s), up to {f.max_new_tokens} new tokens",
    file=sys.stderr,
  )
  try:
    outs, stats = gen.generate(
      prompts,
      max_new_tokens=f.max_new_tokens,
      temperature=f.temperature,
      top_k=f.top_k,
      top_p=f.top_p,
      seed=f.seed,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
      use_cache=f.use_cache,
    )
  except ValueError as e:
    sys.exit(f"error: {e}")
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
      raise
    need = gen.cache_stats(len(prompts), max_len)["cache_bytes"]
    sys.exit(
      f"error: out of memory for {len(prompts)} prompt(s) of up to "
      f"{max_len} positions (the cache alone is {need:,} bytes); lower "
      "--max_new_tokens"
    )
  for ids in outs:
    sys.stdout.write(tok.decode(ids) + "\n")
  sys.stdout.flush()
  if f.stats:
    stats.update(gen.cache_stats(len(prompts), max_len) if f.use_cache else {})
    for line in stats_lines(stats):
      print(f"generate: {line}", file=sys.stderr)


def stats_lines(stats: dict[str, Any]) -> list[str]:
  """`--stats` as `key = value` lines: seconds (`*_s`) to the millisecond,
  rates (`*_per_s`) to one decimal, counts with thousands separators."""

  def text(key: str, v: Any) -> str:
    if isinstance(v, float):
      return f"{v:,.1f}" if key.endswith("_per_s") else f"{v:.3f}"
    if isinstance(v, int):
      return f"{v:,}"
    return str(v)

  return [f"{k} = {text(k, v)}" for k, v in stats.items()]


if __name__ == "__main__":
  from absl import app

  FLAGS = _flags()
  app.run(main)
