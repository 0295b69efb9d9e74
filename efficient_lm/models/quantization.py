"""Quantization of a model through qwix: post-training (PTQ) and
quantization-aware training (QAT), by scheme (config/schemes.py).

  qmodel = quantize(model, parse_scheme("int8_weights"), seq_len=128)

qwix intercepts the `jnp.einsum` calls inside the model's `__call__`. Every
einsum with a weight operand in the layers is quantized: attention
projections (MHA/GQA, MLA, TGlobal), the gated MLP, the capacity-dispatch
MoE experts, the MoD / MoR / MoE routers. The token embedding and the
output head (tied or not) stay float, as is usual, and so do the norms.

The MoE experts of the dropless path (`jax.lax.ragged_dot`, which qwix's
PTQ does not intercept: its PtqProvider intercepts einsum, dot_general,
dot, conv and asarray only) are quantized here, weights only, whatever the
scheme: `quantize` replaces each dropless MoE's stacked expert weights
([.., E, D, F]: gate, up; [.., E, F, D]: down) by qwix's quantized form
(qwix.quantize: one scale per expert and output channel, int4: and per
group of G along the contracted axis; int8_dynamic: int8, fp8: fp8
weights) stored as the einsum weights are (`<name>/array/qvalue`,
`.scale`), and models/moe.py dequantizes them to the compute dtype just
before the grouped matmul (`dequantized`). A memory saving (the weights at
rest, in the checkpoint and in HBM), not integer compute: the matmul runs
in the compute dtype on a transient dequantized copy, and the experts'
activations stay float under int8_dynamic and fp8. Activation x activation products (attention's
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
from qwix._src.core.qarray import HowToQuantize
from qwix._src.providers.ptq import WithAux  # the PTQ weight wrapper
from qwix._src.utils.flax_util import find_param, update_boxed

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
  """qwix's QAT on the einsums that have a weight operand only, and on the
  dropless experts' grouped matmuls as PTQ stores them."""

  def __init__(self, scheme: Scheme):
    super().__init__(rules(scheme))
    self.scheme = scheme

  def einsum(self, einsum_str, *operands, **kwargs):
    if not _has_weight(operands):
      return jnp.einsum(einsum_str, *operands, **kwargs)
    return super().einsum(einsum_str, *operands, **kwargs)

  def ragged_dot(
    self,
    lhs,
    rhs,
    group_sizes,
    precision=None,
    preferred_element_type=None,
    group_offset=None,
  ):
    """The dropless experts (rhs: an expert weight [E, contracted, out]):
    the weight fake-quantized as `_quantize_dropless_experts` stores it
    (weights only, straight-through), so the QAT forward is the PTQ one.
    qwix's own QAT ragged_dot would also quantize lhs (and, weight-only,
    fails on its None activation qtype)."""
    how = expert_how(self.scheme, rhs.shape)
    fake = qwix.dequantize(qwix.quantize(rhs, how.qtype, **_how_kwargs(how)))
    rhs = rhs + jax.lax.stop_gradient(fake.astype(rhs.dtype) - rhs)
    return jax.lax.ragged_dot(
      lhs,
      rhs,
      group_sizes,
      precision=precision,
      preferred_element_type=preferred_element_type,
      group_offset=group_offset,
    )


_WEIGHT_QTYPE = {
  "int8_weights": jnp.int8,
  "int4_weights": jnp.int4,
  "int8_dynamic": jnp.int8,
  "fp8": jnp.float8_e4m3fn,
}
# A dropless MoE's expert weights, each [..., E, contracted, out].
EXPERT_WEIGHTS = ("gate_EDF", "up_EDF", "down_EFD")


def expert_how(scheme: Scheme, shape: tuple[int, ...]) -> HowToQuantize:
  """How a stacked expert weight [..., E, contracted, out] is quantized:
  one scale per leading index, expert and output channel (int4: per
  group of `scheme.group` along the contracted axis too)."""
  c = len(shape) - 2
  if scheme.name == "int4_weights":
    assert scheme.group is not None
    if shape[c] % scheme.group:
      raise ConfigError(
        f"quantization scheme {scheme}: the group size {scheme.group} does "
        f"not divide the MoE experts' contracted axis ({shape[c]}); "
        "expected a group size dividing every layer's contracted width "
        "(int4_weights:G)"
      )
    return HowToQuantize(
      qtype=jnp.int4,
      channelwise_axes=[a for a in range(len(shape)) if a != c],
      tiled_axes={c: scheme.group},
    )
  return HowToQuantize(
    qtype=_WEIGHT_QTYPE[scheme.name],
    channelwise_axes=[a for a in range(len(shape)) if a != c],
  )


def _quantize_dropless_experts(model: nnx.Module, scheme: Scheme) -> None:
  """Replaces, in place, every dropless MoE's expert weights by their
  quantized form (qwix.quantize), boxed as qwix's PTQ boxes a weight."""
  for _, m in nnx.iter_graph(model):
    if getattr(m, "capacity_factor", None) != 0 or not hasattr(m, "up_EDF"):
      continue
    for name in EXPERT_WEIGHTS:
      param = getattr(m, name)
      if isinstance(param, WithAux):
        continue
      how = expert_how(scheme, param.shape)
      q = WithAux(qwix.quantize(param[...], how.qtype, **_how_kwargs(how)), how)
      setattr(
        m, name, jax.tree.map(lambda v, p=param: update_boxed(p, value=v), q)
      )


def _how_kwargs(how: HowToQuantize) -> dict:
  return {
    "channelwise_axes": how.channelwise_axes,
    "tiled_axes": dict(how.tiled_axes),
  }


def dequantized(w: Any) -> Any:
  """A weight as the model reads it: a dropless expert weight stored
  quantized (`_quantize_dropless_experts`) dequantized (its scales'
  dtype, float32); any other array as it is."""
  if isinstance(w, WithAux):
    return qwix.dequantize(w.array)
  return w


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
  provider = _Qat(scheme) if train else _Ptq(rules(scheme))
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
  try:
    qmodel = qwix.quantize_model(model, provider, tokens, pos, tokens + 1)
  except ValueError as e:
    if "cannot be tiled" not in str(e):
      raise
    raise ConfigError(
      f"quantization scheme {scheme}: the group size {scheme.group} does "
      f"not divide the contracted axis of a weight ({e}); expected a group "
      "size dividing every layer's contracted width (int4_weights:G)"
    ) from None
  if not train:
    _quantize_dropless_experts(qmodel, scheme)
  return qmodel


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
