"""Sparse upcycling: a dense model's parameters -> an MoE model's, every
routed expert of an MoE layer a copy of that layer's dense MLP (Komatsuzaki
et al. 2022), everything else copied as it is.

At step 0 the MoE model computes what the dense one does: the top-k
weights are normalised to sum to 1 (models/moe.py), so K copies of one MLP
weighed by them give that MLP; shared experts start with a zero down
projection (they add nothing until trained) and the router keeps the MoE
model's own random initialisation. With `noise` > 0 each expert copy gets
independent N(0, noise * std) perturbations (std of the dense weight), which
breaks the symmetry between experts and the step-0 equality.

Parameters are pure dicts (`nnx.to_pure_dict`); the two models' layer plans
may group layers into different scan segments, so the stack is unstacked
into one dict per plan layer and restacked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from efficient_lm.config import ModelConfig
from efficient_lm.models.stack import layer_plan, stack_layers, unstack_layers


def upcycle(
  dense: dict,
  moe_init: dict,
  cfg: ModelConfig,
  *,
  noise: float = 0.0,
  key: jax.Array | None = None,
) -> dict:
  """MoE parameters for `cfg` (model.moe on) from `dense`, the parameters
  of the same model with model.moe.num_experts = 0; `moe_init` is a fresh
  init of the MoE model (its routers and shapes are kept). Raises
  ValueError when an expert's width differs from its layer's dense MLP."""
  dense_cfg = dataclasses.replace(
    cfg, moe=dataclasses.replace(cfg.moe, num_experts=0)
  )
  plan = layer_plan(cfg)
  dense_layers = unstack_layers(dense["stack"], layer_plan(dense_cfg))
  moe_layers = unstack_layers(moe_init["stack"], plan)
  key = jax.random.key(0) if key is None else key
  out_layers = []
  for i, (spec, d, m) in enumerate(
    zip(plan, dense_layers, moe_layers, strict=True)
  ):
    layer = dict(d)
    if spec.moe is not None:
      mlp, e = d["mlp"], spec.moe.num_experts
      if spec.moe.expert_width(spec.mlp_dim) != mlp["gate_DF"].shape[-1]:
        raise ValueError(
          f"layer {i}: expert width {spec.moe.expert_width(spec.mlp_dim)} "
          f"!= the dense MLP's {mlp['gate_DF'].shape[-1]}"
        )
      new = dict(m["mlp"])
      for src, dst in (
        ("gate_DF", "gate_EDF"),
        ("up_DF", "up_EDF"),
        ("down_FD", "down_EFD"),
      ):
        w = jnp.broadcast_to(mlp[src], (e, *mlp[src].shape))
        if noise > 0:
          key, sub = jax.random.split(key)
          w = w + noise * jnp.std(mlp[src]) * jax.random.normal(
            sub, w.shape, w.dtype
          )
        new[dst] = w
      if "shared" in new:
        new["shared"] = {
          **new["shared"],
          "down_FD": jnp.zeros_like(new["shared"]["down_FD"]),
        }
      layer["mlp"] = new
    out_layers.append(layer)
  return {**dense, "stack": stack_layers(out_layers, plan)}
