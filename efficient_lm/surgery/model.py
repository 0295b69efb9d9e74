"""The model under surgery: its config and parameters laid out per layer,
and the jitted passes over the calibration batches that every criterion
and every before/after line reads."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_lm import config as config_lib
from efficient_lm import models
from efficient_lm.config import Config, ModelConfig
from efficient_lm.models import flops
from efficient_lm.models.lm import LanguageModel
from efficient_lm.surgery import layers as layers_lib


@dataclasses.dataclass(frozen=True)
class Surgery:
  """`cfg` the full run config; `rest` the parameters outside the layer
  stack (embedding, final norm, head) and `layers` one dict per layer, in
  plan order, numpy arrays on the host."""

  cfg: Config
  rest: dict
  layers: list

  @classmethod
  def of(cls, cfg: Config, params: Any) -> Surgery:
    params = jax.tree.map(np.asarray, jax.device_get(params))
    rest, layers = layers_lib.unstack(params, models.layer_plan(cfg.model))
    return cls(cfg, rest, layers)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def params(self) -> dict:
    return layers_lib.restack(
      self.rest, self.layers, models.layer_plan(self.cfg.model)
    )

  def replaced(self, layers: list, shapes: list | None = None) -> Surgery:
    """This model with new per-layer parameters; the config follows their
    shapes (see `config_for`)."""
    return Surgery(config_for(self.cfg, layers, shapes), self.rest, layers)

  def model(self) -> LanguageModel:
    """The nnx model with these parameters (jax arrays on the default
    device; no mesh)."""
    abstract = nnx.eval_shape(lambda: models.build(self.cfg.model, nnx.Rngs(0)))
    graphdef, _, state = nnx.split(abstract, nnx.Param, models.ModelState)
    params = jax.tree.map(jnp.asarray, self.params())
    return cast(LanguageModel, nnx.merge(graphdef, params, state))

  def measure(self, batches: Sequence[dict]) -> dict[str, float]:
    """Parameters, forward FLOPs per token (dense_tile, models/flops.py),
    KV cache bytes per token (all layers) and the calibration loss."""
    model = self.model()
    seq_len = self.cfg.data.seq_len
    return {
      "params": layers_lib.tree_size(self.params()),
      "flops_per_token": flops.flops_per_token(self.cfg.model, seq_len)[
        "forward"
      ],
      "kv_bytes_per_token": int(sum(model.cache_bytes_per_token())),
      "loss": calibration_loss(model, batches),
    }


def config_for(cfg: Config, layers: list, shapes: list | None = None) -> Config:
  """`cfg` with model.num_layers and the per-layer shapes of `layers`
  (uniform values where every layer agrees, model.per_layer otherwise;
  head_dim written out, since its default follows num_heads), validated.
  `shapes`: each layer's former `layer_shapes` (default: layer i's of
  `cfg`; a layer drop passes the kept layers'), which supply what the
  arrays do not say (an MLA layer's heads)."""
  m = cfg.model
  n = len(layers)
  if shapes is None:
    shapes = [dict(m.layer_shapes(i)) for i in range(m.plan_length)]
  new = []
  for i, layer in enumerate(layers):
    s = dict(shapes[i])
    s["mlp_dim"] = int(layer["mlp"]["gate_DF"].shape[1])
    if "k_DGK" in layer["attn"]:
      _, h, k = layer["attn"]["q_DHK"].shape
      s.update(
        num_heads=int(h),
        num_kv_heads=int(layer["attn"]["k_DGK"].shape[1]),
        head_dim=int(k),
      )
    new.append(s)
  d = cfg.to_dict()
  d["model"]["num_layers"] = n
  per_layer = {}
  for key in ("mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
    values = tuple(s[key] for s in new)
    if len(set(values)) == 1:
      d["model"][key] = values[0]
      per_layer[key] = ()
    else:
      per_layer[key] = values
  d["model"]["per_layer"] = per_layer
  return config_lib.from_config_dict(d, device_count=cfg.mesh.size)


@functools.lru_cache(maxsize=32)
def _structure(cfg: ModelConfig):
  """(graphdef, model state) of the model `cfg` builds, made once: equal
  graphdefs let the jitted passes below compile once per shape."""
  abstract = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
  graphdef, _, state = nnx.split(abstract, nnx.Param, models.ModelState)
  return graphdef, jax.tree.map(jnp.asarray, nnx.to_pure_dict(state))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(fn: Callable, graphdef, state, batch):
  return fn(nnx.merge(graphdef, state), batch)


def per_batch(model, batches: Sequence[dict], fn: Callable) -> list:
  """fn(model, batch) for each batch, jitted (once per model structure
  and `fn`, a module-level function): host numpy results."""
  graphdef, state = nnx.split(model)
  return [
    jax.tree.map(np.asarray, jax.device_get(_apply(fn, graphdef, state, b)))
    for b in batches
  ]


def _nll(model, batch):
  logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  return layers_lib.token_nll(logits, batch)


def calibration_loss(model, batches: Sequence[dict]) -> float:
  """Mean next-token NLL over the real tokens of `batches` (nats)."""
  outs = per_batch(model, batches, _nll)
  total = sum(float(s) for s, _ in outs)
  count = sum(float(c) for _, c in outs)
  return total / max(count, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _grad(graphdef, params, state, batch):
  def nll(params):
    return _nll(nnx.merge(graphdef, params, state), batch)

  return jax.grad(nll, has_aux=True)(params)


def loss_grads(model, batches: Sequence[dict]) -> dict:
  """d(mean calibration NLL)/d(params), as a pure dict stacked like the
  parameters (numpy)."""
  graphdef, params, state = nnx.split(model, nnx.Param, ...)
  total, count = None, 0.0
  for batch in batches:
    g, c = _grad(graphdef, params, state, batch)
    g = jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(g)))
    total = g if total is None else jax.tree.map(np.add, total, g)
    count += float(c)
  return jax.tree.map(lambda a: a / max(count, 1.0), total)
