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
then `write`s the new rows. Prefill is the same step on an empty cache, so
it is the ordinary forward; a rolling buffer never loses a row some query of
the step still needs, because the step reads the rows before writing them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


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
