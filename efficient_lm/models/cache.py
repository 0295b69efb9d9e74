"""Per-layer KV caches for generation: explicit pytrees of rows.

A cache is a dict of arrays with a slot axis: `pos` and `seg` int32
[B, N] plus the attention module's own fields (`k` [B, N, G, K] and `v` for
MHA / GQA, the latent and RoPE key for MLA, ...). A slot whose `seg` is 0 is
empty; every mask already hides segment 0 (padding), so an empty slot needs
no flag of its own and attention over a cache is ordinary attention over its
rows, visibility decided by their stored positions (docs/attention.md).

`Slots` says where position p lives:
  * full cache (`window=None`): slot p // stride, `num_slots` = the longest
    sequence / stride (stride > 1: a layer whose tokens sit `stride`
    positions apart, the hourglass's shortened layers);
  * rolling buffer: p < prefix -> slot p (global prefix rows kept forever),
    otherwise prefix + p % window. With positions contiguous per row, the
    `window` newest rows never collide, so a sliding window of W tokens
    including self needs exactly W slots after the prefix.

A generation step with T >= 1 new tokens attends over `concat(cache, new)`
(the old rows, then the new ones, the mask deciding what each query sees),
then `write`s the new rows (`step`). Prefill is the same step on an empty
cache, so it is the ordinary forward; a rolling buffer never loses a row
some query of the step still needs, because the step reads the rows before
writing them. A decode step (T = 1) writes first and reads the written
cache, the same rows without the copy `concat` makes (`step`).

Storage dtype (`KV_CACHE_DTYPES`, generate's `--kv_cache_dtype`): `auto`
keeps rows in the model's compute dtype; a float dtype casts them; `int8`
stores each K/V field as int8 with one scale per token and head (the
field's last axis is quantized: K of a K/V head, MLA's latent and shared
RoPE key as one "head" each), symmetric absmax (`quantize`): scale =
max |x| / 127 rounded to bfloat16, q = clip(round(x / scale), -127, 127).
The attention modules pass every K/V row through `store` then `load`
(dequantized to the compute dtype) whether or not there is a cache, so
a forward without a cache sees exactly the keys and values a cached step
reads: cache = recompute holds for a quantized cache too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# What generation may store K/V rows as; `auto` is the compute dtype.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")
# int8 scales: bfloat16 has float32's exponent range (no underflow for
# tiny rows) and half its bytes; q is computed against the rounded scale,
# so rounding it costs no accuracy beyond the int8 grid itself.
SCALE_DTYPE = jnp.bfloat16
_FLOATS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Slots:
  num_slots: int
  prefix: int = 0
  window: int | None = None  # None: a full cache, slot = position
  stride: int = 1  # full cache: slot = position // stride

  def __post_init__(self):
    if self.window is not None and self.stride != 1:
      raise ValueError(f"rolling cache: stride={self.stride} must be 1")
    if self.window is not None and self.num_slots != self.prefix + self.window:
      raise ValueError(
        f"rolling cache: num_slots={self.num_slots} must be prefix "
        f"{self.prefix} + window {self.window}"
      )

  @classmethod
  def full(cls, max_len: int, stride: int = 1) -> Slots:
    return cls(num_slots=-(-max_len // stride), stride=stride)

  @classmethod
  def rolling(cls, window: int, prefix: int = 0) -> Slots:
    return cls(num_slots=prefix + window, prefix=prefix, window=window)

  def slot(self, pos):
    """Slot of each position (int32, same shape)."""
    pos = pos.astype(jnp.int32)
    if self.window is None:
      return pos // self.stride
    return jnp.where(pos < self.prefix, pos, self.prefix + pos % self.window)


def empty(slots: Slots, batch: int, fields: dict[str, tuple]) -> dict:
  """Zero rows for `fields={name: (trailing shape, dtype)}`, plus pos/seg."""
  n = slots.num_slots
  rows = {
    name: jnp.zeros((batch, n, *shape), dtype)
    for name, (shape, dtype) in fields.items()
  }
  rows["pos"] = jnp.zeros((batch, n), jnp.int32)
  rows["seg"] = jnp.zeros((batch, n), jnp.int32)
  return rows


def concat(rows: dict, new: dict) -> dict:
  """The keys a step reads: cache rows, then the new rows (axis 1)."""
  if rows.keys() != new.keys():
    raise ValueError(
      f"cache fields {sorted(rows)} differ from new rows {sorted(new)}"
    )
  return {
    k: jnp.concatenate([rows[k], new[k].astype(rows[k].dtype)], axis=1)
    for k in rows
  }


def step(rows: dict, new: dict, slots: Slots) -> tuple[dict, dict]:
  """(the rows a generation step reads, the cache after it). A step of
  one token per row (decode) writes first and reads the written cache:
  its row lands in a slot no row it sees holds (a full cache's own slot,
  also at a stride, whose rows are `stride` positions apart; in a rolling
  buffer the slot of the position one window back), so these are the
  rows of `concat(rows, new)` without copying the cache into a longer
  array every step. A longer step (prefill) may overwrite rows its own
  earlier queries still see in a rolling buffer: it reads
  `concat(rows, new)`, then writes."""
  written = write(rows, new, slots)
  if new["pos"].shape[1] == 1:
    return written, written
  return concat(rows, new), written


def write(rows: dict, new: dict, slots: Slots) -> dict:
  """Scatter the new rows ([B, T, ...]) into their slots.

  Rows with seg 0 (prompt padding) are dropped. In a rolling buffer a new
  row whose slot a newer row of the same write also claims (it is older
  than that row's window) is dropped, so a long prefill keeps exactly the
  newest `window` rows. Slots past `num_slots` of a full cache are an
  error the caller checks before the step (generation bounds the length).
  """
  pos_BT = new["pos"].astype(jnp.int32)
  keep_BT = new["seg"] != 0
  if slots.window is not None:
    newest_B1 = jnp.max(jnp.where(keep_BT, pos_BT, -1), axis=1, keepdims=True)
    keep_BT &= (pos_BT < slots.prefix) | (pos_BT > newest_B1 - slots.window)
  n = slots.num_slots
  slot_BT = jnp.where(keep_BT, slots.slot(pos_BT), n)  # n: dropped

  def put(dst, src):
    def one(d, idx, s):
      return d.at[idx].set(s.astype(d.dtype), mode="drop")

    return jax.vmap(one)(dst, slot_BT, src)

  return {k: put(rows[k], new[k]) for k in rows}


def nbytes(tree) -> int:
  """Bytes of every array in a cache pytree (for --stats)."""
  return int(
    sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  )


# ----------------------------------------------------------- storage dtype


def check_kv_cache_dtype(kind: str) -> str:
  """`kind` if it is one of KV_CACHE_DTYPES, else a one-line ValueError."""
  if kind not in KV_CACHE_DTYPES:
    raise ValueError(
      f"kv_cache_dtype={kind!r} is not supported; expected one of "
      f"{', '.join(KV_CACHE_DTYPES)}"
    )
  return kind


def quantize(x):
  """Symmetric absmax int8 over the last axis: (q int8 [..., K], scale
  SCALE_DTYPE [...]) with x ~ q * scale; an all-zero row has scale 0."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = (amax / 127.0).astype(SCALE_DTYPE)
  s = scale.astype(jnp.float32)
  q = jnp.round(x / jnp.where(s == 0, 1.0, s))
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale[..., 0]


def dequantize(q, scale, dtype):
  """q * scale (per row of the last axis), in `dtype`."""
  s = scale.astype(jnp.float32)[..., None]
  return (q.astype(jnp.float32) * s).astype(dtype)


def _scale(name: str) -> str:
  return f"{name}_scale"


def kv_fields(shapes: dict[str, tuple], kind: str, dtype) -> dict:
  """`empty`'s fields for K/V fields of trailing `shapes` stored as
  `kind` (`auto`: `dtype`, the compute dtype); int8 adds a scale field
  per K/V field (its shape without the last axis)."""
  if kind == "int8":
    out = {}
    for name, shape in shapes.items():
      out[name] = (shape, jnp.int8)
      out[_scale(name)] = (shape[:-1], SCALE_DTYPE)
    return out
  dt = _FLOATS.get(kind, dtype)
  return {name: (shape, dt) for name, shape in shapes.items()}


def store(rows: dict, names: tuple[str, ...], kind: str) -> dict:
  """Rows as a cache of `kind` holds them: int8 fields `names` plus their
  scales, or `names` cast to the float dtype (`auto`: as they are)."""
  if kind == "auto":
    return rows
  out = dict(rows)
  for name in names:
    if kind == "int8":
      out[name], out[_scale(name)] = quantize(rows[name])
    else:
      out[name] = rows[name].astype(_FLOATS[kind])
  return out


def load(rows: dict, names: tuple[str, ...], kind: str, dtype) -> dict:
  """Stored rows read back in the compute `dtype` (scale fields
  dropped): what attention reads."""
  if kind == "auto":
    return rows
  out = {k: v for k, v in rows.items() if not k.endswith("_scale")}
  for name in names:
    if kind == "int8":
      out[name] = dequantize(rows[name], rows[_scale(name)], dtype)
    else:
      out[name] = rows[name].astype(dtype)
  return out


def row_nbytes(rows: dict) -> int:
  """Bytes one slot of a rows dict holds, measured from its arrays (or
  shape structs): every field but pos/seg (scales included) over the
  B * N slots of `pos` [B, N]."""
  b, n = rows["pos"].shape
  return sum(
    int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize // (b * n)
    for k, x in rows.items()
    if k not in ("pos", "seg")
  )
