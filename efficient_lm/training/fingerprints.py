"""Per-array fingerprints of a saved state.

They catch what orbax cannot: zstd chunks carry no checksum, so a flipped
byte in a data file restores silently as a wrong value. Integer sums mod
2^32 are exact, so the value is independent of the sharding. Each is a
collective over a sharded array: with several processes, all compute them
together (training/checkpoint.py agrees on that first).
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat(tree: Any) -> dict[str, Any]:
  """Leaves by dotted path; orbax stores namedtuples as lists and int dict
  keys as strings, so only the key names are compared."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(k) for k in path): x for path, x in leaves}


_POSITION_MIX = np.uint32(0x9E3779B1)
_VALUE_MIX = np.uint32(0x85EBCA6B)


@jax.jit
def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.iscomplexobj(x):
    x = jnp.stack([x.real, x.imag])
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  elif jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:
    # int4 / int2 (a quantized run's weights): no bitcast to a byte type;
    # their values are exact as int32.
    u = x.astype(jnp.int32).astype(jnp.uint32)
  elif x.dtype.itemsize >= 4:  # 8-byte types gain a trailing axis of 2
    u = lax.bitcast_convert_type(x, jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    u = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  # Linear positions without a reshape, which could reshard `x`.
  pos, stride = jnp.zeros(u.shape, jnp.uint32), 1
  for axis in reversed(range(u.ndim)):
    iota = lax.broadcasted_iota(jnp.uint32, u.shape, axis)
    pos, stride = pos + iota * np.uint32(stride % 2**32), stride * u.shape[axis]
  return jnp.sum((u ^ (pos * _POSITION_MIX)) * _VALUE_MIX, dtype=jnp.uint32)


def of(state: Any) -> dict[str, int]:
  """One uint32 per leaf, by dotted path."""
  # One jit per leaf: leaves may live on different device sets.
  sums = {k: _leaf_fingerprint(jnp.asarray(x)) for k, x in flat(state).items()}
  return {k: int(v) for k, v in jax.device_get(sums).items()}


def first_difference(
  expected: dict[str, int] | None, actual: dict[str, int]
) -> str | None:
  """The first key of `actual` whose fingerprint differs from `expected`'s
  (None: all match, or nothing was saved to check against)."""
  if expected is None:  # saved without fingerprints: nothing to check
    return None
  for key, value in actual.items():
    if expected.get(key) != value:
      return key
  return None
