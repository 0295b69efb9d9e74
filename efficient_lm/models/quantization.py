"""Quantization of a model through qwix: post-training (PTQ) and
quantization-aware training (QAT), by scheme (config/schemes.py).

  qmodel = quantize(model, parse_scheme("int8_weights"), seq_len=128)

qwix intercepts the `jnp.einsum` calls inside the model's `__call__`. Every
einsum with a weight operand in the layers is quantized: attention
projections (MHA/GQA, MLA, TGlobal), the gated MLP, the capacity-dispatch
MoE experts, the MoD / MoR / MoE routers. The token embedding and the
output head (tied or not) stay float, as is usual; so do the MoE experts
of the dropless path (`jax.lax.ragged_dot`, which qwix's PTQ does not
intercept) and the norms. Activation x activation products (attention's
scores and values, where the XLA reference kernel runs them as einsums)
are never quantized: the Pallas kernels hide them from qwix anyway, so the
schemes mean the same on every backend.

PTQ (`train=False`): qwix's PtqProvider replaces each float weight by its
quantized arrays (`<name>.array.qvalue`, `.scale`) on a first call; the
stacked layers carry the new form out of their scan (models/stack.py).
QAT (`train=True`): qwix's QtProvider fake-quantizes the same weights (and
activations) in every forward pass; gradients pass straight through to the
float weights, whose tree is unchanged.

Weights are read as `jnp.asarray(w[...], dtype)` in the model files, not
`w[...].astype(dtype)`: qwix intercepts `jnp.asarray`, so a quantized
weight reaches its einsum as qwix's QArray.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from qwix._src.providers.ptq import WithAux  # the PTQ weight wrapper
from qwix._src.utils.flax_util import find_param

from efficient_lm.config import ConfigError
from efficient_lm.config.schemes import Scheme

# Every module but the root (the untied head's einsum runs there) and the
# embedding (whose table a lookup also reads).
LAYERS = r"(?!embed$).+"


def rules(scheme: Scheme) -> list[qwix.QtRule]:
  """The qwix rule of `scheme`, matching every layer module."""
  kw: dict[str, Any] = {
    "int8_weights": dict(weight_qtype=jnp.int8),
    "int4_weights": dict(weight_qtype=jnp.int4, tile_size=scheme.group),
    "int8_dynamic": dict(weight_qtype=jnp.int8, act_qtype=jnp.int8),
    "fp8": dict(weight_qtype=jnp.float8_e4m3fn, act_qtype=jnp.float8_e4m3fn),
  }[scheme.name]
  return [qwix.QtRule(module_path=LAYERS, **kw)]


def _has_weight(operands) -> bool:
  return len(operands) == 2 and (
    isinstance(operands[1], WithAux) or find_param(operands[1]) is not None
  )


class _Ptq(qwix.PtqProvider):
  """qwix's PTQ on the einsums that have a weight operand only."""

  def einsum(self, einsum_str, *operands, **kwargs):
    if not _has_weight(operands):
      return jnp.einsum(einsum_str, *operands, **kwargs)
    return super().einsum(einsum_str, *operands, **kwargs)


class _Qat(qwix.QtProvider):
  """qwix's QAT on the einsums that have a weight operand only."""

  def einsum(self, einsum_str, *operands, **kwargs):
    if not _has_weight(operands):
      return jnp.einsum(einsum_str, *operands, **kwargs)
    return super().einsum(einsum_str, *operands, **kwargs)


def check_device(scheme: Scheme, device: Any) -> None:
  """ConfigError (one line) if `device` cannot run `scheme`: fp8 matmuls
  need an NVIDIA GPU of compute capability 8.9 (Ada, Hopper) or later;
  CPUs (emulated) and TPUs run every scheme."""
  if scheme.name != "fp8" or device.platform != "gpu":
    return
  cc = getattr(device, "compute_capability", None)
  if cc is not None and tuple(int(x) for x in str(cc).split(".")) < (8, 9):
    raise ConfigError(
      f"quantization scheme fp8: the device {device.device_kind} (compute "
      f"capability {cc}) has no fp8 matmul; expected compute capability "
      ">= 8.9, or another scheme (int8_dynamic)"
    )


def quantize(
  model: nnx.Module, scheme: Scheme, *, seq_len: int, train: bool = False
) -> nnx.Module:
  """A quantized copy of `model` (PTQ; `train`: QAT). qwix runs the model
  once on a [1, seq_len] batch to find the weights (abstract under
  nnx.eval_shape). ConfigError if int4's group size does not divide a
  weight's contracted axis."""
  check_device(scheme, jax.devices()[0])
  provider = (_Qat if train else _Ptq)(rules(scheme))
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
  try:
    return qwix.quantize_model(model, provider, tokens, pos, tokens + 1)
  except ValueError as e:
    if "cannot be tiled" not in str(e):
      raise
    raise ConfigError(
      f"quantization scheme {scheme}: the group size {scheme.group} does "
      f"not divide the contracted axis of a weight ({e}); expected a group "
      "size dividing every layer's contracted width (int4_weights:G)"
    ) from None


def param_bytes(tree: Any) -> int:
  """Bytes the arrays of `tree` occupy, measured from them: each jax
  array's one replica as the device stores it (`on_device_size_in_bytes`:
  int4 packs two values a byte, where `.nbytes` counts one a byte), numpy
  arrays' `.nbytes`."""
  total = 0
  for a in jax.tree.leaves(tree):
    if isinstance(a, jax.Array):
      total += sum(
        s.data.on_device_size_in_bytes()
        for s in a.addressable_shards
        if s.replica_id == 0
      )
    else:
      total += np.asarray(a).nbytes
  return total


def _flat(tree: Any) -> dict[tuple, Any]:
  return {
    tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def quantized_bytes(qparams: Any, fparams: Any) -> tuple[int, int]:
  """(bytes of the quantized weights' arrays in `qparams`: their values
  and scales, the same weights' bytes in the float `fparams`), both
  measured from the arrays (`param_bytes`). A quantized weight `w` is
  stored as `w/array/qvalue` and `w/array/scale`."""
  q = {k: a for k, a in _flat(qparams).items() if "array" in k}
  f = _flat(fparams)
  names = {k[: k.index("array")] for k in q}
  return param_bytes(list(q.values())), param_bytes([f[k] for k in names])
