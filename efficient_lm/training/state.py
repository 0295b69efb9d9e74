"""A config's model on a mesh, abstractly: what a restore needs.

`abstract_state(cfg, mesh)` builds the model under `nnx.eval_shape` (no
array allocated) and returns its graphdef and the abstract parameters and
model state with their NamedShardings; `jit_eval_step` makes the jitted
eval step from it. There is no optimizer here: reading a run
(runs.load_run) needs none, and loop.build_trainer adds the optimizer
state on top.

The run's seed is split once into four keys (DESIGN contract 6): the
parameters' initialisation, the data order, the batch corruption (MLM)
and routing (reserved for the models that use it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

from efficient_lm import models, sharding
from efficient_lm.models import quantization
from efficient_lm.config import Config
from efficient_lm.config.schemes import parse_scheme
from efficient_lm.data import Tokenizer
from efficient_lm.training import losses
from efficient_lm.training import step as step_lib


class RunKeys(NamedTuple):
  params: jax.Array
  data: jax.Array
  noise: jax.Array  # corrupts MLM batches (training/step.py)
  routing: jax.Array

  @property
  def data_seed(self) -> int:
    """The data pipeline's integer seed."""
    return int(jax.random.randint(self.data, (), 0, 2**31 - 1))


def run_keys(seed: int) -> RunKeys:
  return RunKeys(*jax.random.split(jax.random.key(seed), 4))


@dataclasses.dataclass(frozen=True)
class AbstractModel:
  """The model of a config on a mesh, with nothing allocated.

  `params` and `model_state` are pure dicts (nnx.to_pure_dict's structure)
  of `jax.ShapeDtypeStruct`s carrying their NamedShardings: the tree
  `Checkpointer.restore_latest` and `checkpoint.read_latest` restore into.
  `shardings` holds the NamedShardings alone in the same two entries.
  `param_vars` is the abstract nnx.State of the parameters, with their
  metadata (logical axes), for the optimizer's decay mask and the counts.
  `build()` makes the real model, parameters initialised from the seed.
  """

  mesh: jax.sharding.Mesh
  keys: RunKeys
  graphdef: nnx.GraphDef
  param_vars: nnx.State
  params: Any
  model_state: Any
  shardings: dict[str, Any]
  build: Callable[[], nnx.Module]

  @property
  def abstract(self) -> dict[str, Any]:
    """{"params", "model_state"}: the abstract trees a restore reads."""
    return {"params": self.params, "model_state": self.model_state}


def abstract_state(
  cfg: Config, mesh: jax.sharding.Mesh, *, build_model: Callable = models.build
) -> AbstractModel:
  """`cfg.model` built abstractly on `mesh` (`build_model(model_cfg, rngs)`
  replaces models.build; tests pass their own modules)."""
  keys = run_keys(cfg.train.seed)

  def build():
    return quantized(cfg, build_model(cfg.model, nnx.Rngs(params=keys.params)))

  graphdef, param_vars, state_vars = nnx.split(
    nnx.eval_shape(build), nnx.Param, models.ModelState
  )
  shardings = {
    "params": sharding.state_shardings(mesh, param_vars),
    "model_state": sharding.state_shardings(mesh, state_vars),
  }
  placed = {
    k: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nnx.to_pure_dict(v),
      shardings[k],
    )
    for k, v in (("params", param_vars), ("model_state", state_vars))
  }
  return AbstractModel(
    mesh=mesh,
    keys=keys,
    graphdef=graphdef,
    param_vars=param_vars,
    params=placed["params"],
    model_state=placed["model_state"],
    shardings=shardings,
    build=build,
  )


def quantized(cfg: Config, model: nnx.Module) -> nnx.Module:
  """`model` in the form `cfg` gives its weights (models/quantization.py):
  qwix's PTQ form under model.quantization (integer weights and scales, as
  a quantized run stores them), qwix's QAT under train.quantization (float
  weights, quantization simulated in the forward pass), else as built."""
  text = cfg.model.quantization or cfg.train.quantization
  if not text:
    return model
  return quantization.quantize(
    model,
    parse_scheme(text),
    seq_len=cfg.data.seq_len,
    train=not cfg.model.quantization,
  )


def objective(cfg: Config, tokenizer: Tokenizer | None) -> losses.Objective:
  """The training objective of `cfg.train`; train.objective='mlm' reads the
  tokenizer's mask id and its special ids (pad, bos, eos: never masked)."""
  if tokenizer is None:
    return losses.make_objective(cfg.train.objective, z_loss=cfg.train.z_loss)
  specials = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
  return losses.make_objective(
    cfg.train.objective,
    z_loss=cfg.train.z_loss,
    mlm_rate=cfg.train.mlm_rate,
    mask_id=tokenizer.mask_id,
    special_ids=tuple(sorted({i for i in specials if i is not None})),
  )


def jit_eval_step(model: AbstractModel, obj: losses.Objective) -> Callable:
  """step.make_eval_step jitted with the model's shardings:
  (params, model_state, global batch) -> replicated sums."""
  mesh = model.mesh
  return jax.jit(
    sharding.under_mesh(mesh, step_lib.make_eval_step(model.graphdef, obj)),
    in_shardings=(
      model.shardings["params"],
      model.shardings["model_state"],
      sharding.batch_sharding(mesh),
    ),
    out_shardings=sharding.replicated(mesh),
  )
