"""Mixture-of-experts MLP (model.moe): top-k token-choice routing over
E gated-MLP experts, optional shared experts, load balancing.

Dimension letters: N tokens (B * T flattened), E experts, K top-k choices,
D width, F expert width, C capacity slots per expert and row.

Router (float32): logits z = x W_r; affinities s = softmax(z) ("softmax")
or sigmoid(z) ("sigmoid", DeepSeek-V3). Each token picks the K experts of
highest s + b (b: the loss-free bias, zero otherwise; it steers selection
only) and weighs them by their s normalised to sum to 1 over the K picked
(Mixtral / DeepSeek-V3), so one expert or K = E with copies of one MLP give
that MLP exactly (upcycling).

Compute:
  * dropless (capacity_factor 0): the N*K assignments are sorted by expert
    and each expert's rows go through one grouped matmul
    (`jax.lax.ragged_dot`, or tokamax's with model.moe.impl='tokamax';
    group sizes = tokens per expert); results are unsorted and summed with
    the weights. Every assignment is computed.
  * capacity (capacity_factor c > 0): per sequence row each expert has
    C = ceil(c * T * K / E) slots, taken in the order (position, choice):
    earlier positions first, a token's first choice before its second at
    the same position. Assignments past C are dropped (that choice adds
    nothing; the token's residual passes through). The order depends only
    on earlier positions, so the layer stays causal. Static shapes: an
    [B, E, C, D] buffer and a batched matmul per expert.

Expert parallelism (a mesh with `expert` > 1, mesh.expert): dropless
layers run `_expert_parallel` in shard_map, the assignments exchanged by
all-to-all with the devices holding their experts; capacity mode stays with
GSPMD (its einsums shard over E).

Shared experts (num_shared_experts S): every token also goes through S
experts of width F, built as one gated MLP of width S * F (the same
function as S separate ones summed).

Balancing: "aux_loss": `loss/moe_balance` = w * E * sum_e f_e P_e, f_e the
fraction of the N*K assignments routed to e (before capacity drops), P_e
the mean normalised affinity s_e / sum s over the N tokens (Switch /
GShard; 1 * w when balanced). "loss_free" (DeepSeek-V3): the bias b
(`layers.ModelState`, checkpointed) moves by bias_rate * sign(mean load -
load_e) in every forward without a cache (training; generation leaves it).

aux (the stack averages non-loss keys over layers): `moe/expert{e}_load`
(f_e * E, 1 when balanced), `moe/load_max`, `moe/dropped_fraction`,
`moe/router_entropy` (mean entropy of the normalised affinities, nats),
`loss/moe_balance`, `loss/moe_router_z` (w * mean logsumexp(z)^2, when
router_z_loss > 0). Padding tokens are routed and counted like the others
(the MLP does not see segment ids).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.config import MoEConfig
from efficient_lm.models.layers import ACTIVATIONS, ModelState, SwiGLU, param
from efficient_lm.models.quantization import dequantized
from efficient_lm.sharding import BTD, constrain, shard_map_by_names


def capacity_slots(capacity_factor: float, t: int, k: int, e: int) -> int:
  """C = ceil(capacity_factor * T * K / E), at least 1: each expert's slots
  per sequence row in capacity mode."""
  return max(1, math.ceil(capacity_factor * t * k / e - 1e-9))


def ragged_dot_fn(impl: str):
  """The grouped matmul of model.moe.impl: `(lhs [M, D], rhs [G, D, F],
  group_sizes [G]) -> [M, F]`, rows past sum(group_sizes) zero."""
  if impl == "tokamax":
    # The tokamax extra (not in dev: CI type-checks without it); config
    # validation checked it is installed.
    import tokamax  # pyrefly: ignore[missing-import]

    # implementation=None: its kernel for this backend (Mosaic TPU / GPU),
    # falling back to its XLA path (CPU).
    return tokamax.ragged_dot
  return jax.lax.ragged_dot


def _expert_ffn(
  x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, activation, impl="xla"
):
  """Rows of x sorted by expert (sizes_E rows per expert, in order) through
  their expert's gated MLP: grouped matmuls. Rows past sum(sizes_E) give
  zeros."""
  dt = x_MD.dtype
  ragged_dot = ragged_dot_fn(impl)
  gate = ragged_dot(x_MD, gate_EDF.astype(dt), sizes_E)
  up = ragged_dot(x_MD, up_EDF.astype(dt), sizes_E)
  h_MF = ACTIVATIONS[activation](gate) * up
  return ragged_dot(h_MF, down_EFD.astype(dt), sizes_E)


def _grouped(
  x_ND, idx_NK, gate_EDF, up_EDF, down_EFD, *, activation, impl="xla"
):
  """Dropless on one device: the N*K assignments sorted by expert, grouped
  matmuls, unsorted -> [N, K, D]."""
  n, k = idx_NK.shape
  e = gate_EDF.shape[0]
  flat_M = idx_NK.reshape(-1)
  order_M = jnp.argsort(flat_M, stable=True)
  sizes_E = jnp.zeros((e,), jnp.int32).at[flat_M].add(1)
  y_MD = _expert_ffn(
    x_ND[order_M // k], sizes_E, gate_EDF, up_EDF, down_EFD, activation, impl
  )
  return jnp.zeros_like(y_MD).at[order_M].set(y_MD).reshape(n, k, -1)


def _expert_parallel(
  x_ND, idx_NK, gate_EDF, up_EDF, down_EFD, *, activation, e, impl="xla"
):
  """Dropless with the experts split over the mesh axis `expert` (inside
  shard_map: this device's tokens, its E / ep experts): every assignment
  goes to the device holding its expert by one all-to-all, runs there as
  grouped matmuls, and comes back by a second one -> [N, K, D].

  Static shapes without drops: the buffer to each device has room for all
  N * K local assignments (the worst case, every token to one device), so
  it is ep times what a balanced exchange needs; a capacity-bounded or
  ragged all-to-all (jax.lax.ragged_all_to_all) would send only the rows
  that go."""
  ep = jax.lax.axis_size("expert")
  e_loc = e // ep
  n, k = idx_NK.shape
  m = n * k
  flat_M = idx_NK.reshape(-1)
  dest_M, local_M = flat_M // e_loc, flat_M % e_loc
  to_PM = dest_M[None] == jnp.arange(ep)[:, None]  # P: destination device
  send_PMD = jnp.where(to_PM[..., None], x_ND[jnp.arange(m) // k][None], 0)
  send_PM = jnp.where(to_PM, local_M[None], e_loc)  # e_loc: an empty row
  recv_PMD = jax.lax.all_to_all(send_PMD, "expert", 0, 0)
  recv_R = jax.lax.all_to_all(send_PM, "expert", 0, 0).reshape(ep * m)
  order_R = jnp.argsort(recv_R, stable=True)
  sizes_E = jnp.zeros((e_loc,), jnp.int32).at[recv_R].add(1, mode="drop")
  y_RD = _expert_ffn(
    recv_PMD.reshape(ep * m, -1)[order_R],
    sizes_E,
    gate_EDF,
    up_EDF,
    down_EFD,
    activation,
    impl,
  )
  y_RD = jnp.where((recv_R[order_R] < e_loc)[:, None], y_RD, 0)
  y_PMD = jnp.zeros_like(y_RD).at[order_R].set(y_RD).reshape(ep, m, -1)
  back_PMD = jax.lax.all_to_all(y_PMD, "expert", 0, 0)
  y_MD = jnp.take_along_axis(back_PMD, dest_M[None, :, None], axis=0)[0]
  return y_MD.reshape(n, k, -1)


class MoE(nnx.Module):
  """The MoE MLP of one layer; `__call__(x_BTD, train=True)` -> (y_BTD,
  aux). `train`: a forward without a cache (the loss-free bias moves)."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    cfg: MoEConfig,
    *,
    rngs: nnx.Rngs,
    param_dtype,
    out_std: float,
    activation: str = "silu",
  ):
    e = cfg.num_experts
    self.num_experts = e
    self.top_k = cfg.top_k
    self.router = cfg.router
    self.capacity_factor = cfg.capacity_factor
    self.balancing = cfg.balancing
    self.aux_loss_weight = cfg.aux_loss_weight
    self.bias_rate = cfg.bias_rate
    self.router_z_loss = cfg.router_z_loss
    self.activation = activation
    self.impl = cfg.impl
    self.router_DE = param(rngs, (dim, e), ("embed", None), 0.02, param_dtype)
    self.gate_EDF = param(
      rngs, (e, dim, hidden), ("expert", "embed", "mlp"), 0.02, param_dtype
    )
    self.up_EDF = param(
      rngs, (e, dim, hidden), ("expert", "embed", "mlp"), 0.02, param_dtype
    )
    self.down_EFD = param(
      rngs, (e, hidden, dim), ("expert", "mlp", "embed"), out_std, param_dtype
    )
    self.shared = (
      SwiGLU(
        dim,
        hidden * cfg.num_shared_experts,
        rngs=rngs,
        param_dtype=param_dtype,
        out_std=out_std,
        activation=activation,
      )
      if cfg.num_shared_experts
      else None
    )
    self.bias_E = (
      ModelState(jnp.zeros((e,), jnp.float32), logical_axes=(None,))
      if cfg.balancing == "loss_free"
      else None
    )

  @staticmethod
  def flops(
    dim: int, hidden: int, cfg: MoEConfig, seq_len: int
  ) -> dict[str, float]:
    """Forward matmul FLOPs per token: `mlp` the routed experts that run
    (dropless: K per token; capacity: the E * C slots of a row, computed
    whether filled or not, over T) plus the shared experts; `router` the
    router's D x E matmul."""
    per = SwiGLU.flops(dim, hidden)
    if cfg.capacity_factor > 0:
      c = capacity_slots(
        cfg.capacity_factor, seq_len, cfg.top_k, cfg.num_experts
      )
      routed = cfg.num_experts * c * per / seq_len
    else:
      routed = cfg.top_k * per
    return {
      "mlp": routed + cfg.num_shared_experts * per,
      "router": 2.0 * dim * cfg.num_experts,
    }

  # ----------------------------------------------------------- routing

  def route(self, x_ND: jax.Array):
    """-> (idx_NK int32, w_NK float32, aux pieces): the experts each token
    picks and their weights."""
    z_NE = jnp.einsum(
      "ND,DE->NE",
      x_ND.astype(jnp.float32),
      jnp.asarray(self.router_DE[...], jnp.float32),
    )
    if self.router == "sigmoid":
      s_NE = jax.nn.sigmoid(z_NE)
    else:
      s_NE = jax.nn.softmax(z_NE, axis=-1)
    bias = (
      jnp.zeros((self.num_experts,), jnp.float32)
      if self.bias_E is None
      else self.bias_E[...]
    )
    _, idx_NK = jax.lax.top_k(
      jax.lax.stop_gradient(s_NE) + bias[None], self.top_k
    )
    sel_NK = jnp.take_along_axis(s_NE, idx_NK, axis=-1)
    w_NK = sel_NK / jnp.sum(sel_NK, axis=-1, keepdims=True)
    return idx_NK.astype(jnp.int32), w_NK, z_NE, s_NE

  def _aux(self, idx_NK, z_NE, s_NE, dropped, train: bool) -> dict:
    e, (n, k) = self.num_experts, idx_NK.shape
    count_E = jnp.zeros((e,), jnp.float32).at[idx_NK.reshape(-1)].add(1.0)
    f_E = count_E / (n * k)
    p_NE = s_NE / jnp.sum(s_NE, axis=-1, keepdims=True)
    aux = {
      **{f"moe/expert{i}_load": f_E[i] * e for i in range(e)},
      "moe/load_max": jnp.max(f_E) * e,
      "moe/dropped_fraction": dropped,
      "moe/router_entropy": jnp.mean(
        -jnp.sum(p_NE * jnp.log(jnp.maximum(p_NE, 1e-20)), axis=-1)
      ),
    }
    if self.balancing == "aux_loss":
      aux["loss/moe_balance"] = (
        self.aux_loss_weight * e * jnp.sum(f_E * jnp.mean(p_NE, axis=0))
      )
    elif self.bias_E is not None and train:
      load = jax.lax.stop_gradient(f_E)
      self.bias_E[...] = self.bias_E[...] + self.bias_rate * jnp.sign(
        load.mean() - load
      )
    if self.router_z_loss > 0:
      lse_N = jax.nn.logsumexp(z_NE, axis=-1)
      aux["loss/moe_router_z"] = self.router_z_loss * jnp.mean(
        jnp.square(lse_N)
      )
    return aux

  # ----------------------------------------------------------- compute

  def _dropless(self, x_ND, idx_NK, w_NK):
    mesh = jax.sharding.get_abstract_mesh()
    # Stored quantized (a PTQ run, models/quantization.py): dequantized
    # here, the grouped matmuls run in the compute dtype.
    weights = tuple(
      dequantized(w[...]) for w in (self.gate_EDF, self.up_EDF, self.down_EFD)
    )
    if not mesh.empty and mesh.shape.get("expert", 1) > 1:
      run = shard_map_by_names(
        functools.partial(
          _expert_parallel,
          activation=self.activation,
          e=self.num_experts,
          impl=self.impl,
        ),
        [("batch", None), ("batch", None)] + [("expert", None, None)] * 3,
        ("batch", None, None),
      )
      y_NKD = run(x_ND, idx_NK, *weights)
    else:
      y_NKD = _grouped(
        x_ND, idx_NK, *weights, activation=self.activation, impl=self.impl
      )
    y_ND = jnp.einsum("NKD,NK->ND", y_NKD, w_NK.astype(y_NKD.dtype))
    return y_ND, jnp.zeros((), jnp.float32)

  def _capacity(self, x_BTD, idx_NK, w_NK):
    b, t, d = x_BTD.shape
    e, k = self.num_experts, self.top_k
    c = capacity_slots(self.capacity_factor, t, k, e)
    idx_BL = idx_NK.reshape(b, t * k)  # order (position, choice)
    onehot_BLE = jax.nn.one_hot(idx_BL, e, dtype=jnp.int32)
    slot_BL = jnp.sum((jnp.cumsum(onehot_BLE, axis=1) - 1) * onehot_BLE, -1)
    keep_BL = slot_BL < c
    # Buffer row of each kept assignment; dropped ones point past the end.
    row_BL = jnp.where(keep_BL, idx_BL * c + slot_BL, e * c)
    tok_L = jnp.arange(t * k) // k
    x_BLD = x_BTD[:, tok_L]

    def fill(rows, xs):
      return jnp.zeros((e * c, d), x_BTD.dtype).at[rows].set(xs, mode="drop")

    buf_BECD = jax.vmap(fill)(row_BL, x_BLD).reshape(b, e, c, d)
    dt = x_BTD.dtype
    gate = jnp.einsum(
      "BECD,EDF->BECF", buf_BECD, jnp.asarray(self.gate_EDF[...], dt)
    )
    up = jnp.einsum(
      "BECD,EDF->BECF", buf_BECD, jnp.asarray(self.up_EDF[...], dt)
    )
    h = ACTIVATIONS[self.activation](gate) * up
    out_BECD = jnp.einsum(
      "BECF,EFD->BECD", h, jnp.asarray(self.down_EFD[...], dt)
    )
    out_BXD = out_BECD.reshape(b, e * c, d)
    y_BLD = jax.vmap(lambda o, r: o.at[r].get(mode="fill", fill_value=0))(
      out_BXD, row_BL
    )
    w_BLK = (w_NK.reshape(b, t * k) * keep_BL).astype(dt)
    y_BTD = jnp.sum((y_BLD * w_BLK[..., None]).reshape(b, t, k, d), axis=2)
    dropped = 1.0 - jnp.mean(keep_BL.astype(jnp.float32))
    return y_BTD.reshape(b * t, d), dropped

  def __call__(self, x_BTD: jax.Array, train: bool = True):
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    idx_NK, w_NK, z_NE, s_NE = self.route(x_ND)
    if self.capacity_factor > 0:
      y_ND, dropped = self._capacity(x_BTD, idx_NK, w_NK)
    else:
      y_ND, dropped = self._dropless(x_ND, idx_NK, w_NK)
    y_BTD = y_ND.reshape(b, t, d)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    aux = self._aux(idx_NK, z_NE, s_NE, dropped, train)
    return constrain(y_BTD, BTD), aux
