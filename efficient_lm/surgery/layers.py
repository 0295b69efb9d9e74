"""A decoder's parameters as one dict per layer, and the decoder run one
layer at a time.

The stack keeps each segment's layers stacked on a leading repeats axis
(models/stack.py); pruning changes one layer's shapes, which moves it to
another segment. `unstack` lays the stack out as a list in plan order,
`restack` stacks such a list again for the plan its new shapes give.

`forward` runs the model's own blocks one by one (the same modules the
stack's scan runs: `Block.attend`, `Block.mlp_branch`), which lets
surgery read what the scan hides: each layer's MLP hidden activations,
each head's output and the residual stream around each layer, and skip a
layer. Its logits equal the model's (tests/test_surgery.py checks it), so
the captures are of the model as it runs. Chosen over an nnx intermediate
capture (`sow`) because it needs no change in models/.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from efficient_lm.models import ModelState
from efficient_lm.models.attention import Attention, Tokens
from efficient_lm.models.block import Block
from efficient_lm.models.layers import ACTIVATIONS
from efficient_lm.models.stack import (
  LayerSpec,
  stack_layers,
  unstack_layers,
)


def unstack(params: dict, plan: tuple[LayerSpec, ...]) -> tuple[dict, list]:
  """A pure parameter dict -> (everything outside the stack, one dict per
  layer in plan order)."""
  rest = {k: v for k, v in params.items() if k != "stack"}
  return rest, unstack_layers(params["stack"], plan)


def restack(rest: dict, layers: list, plan: tuple[LayerSpec, ...]) -> dict:
  """`unstack`'s inverse for `plan` (the plan of the new shapes)."""
  return {**rest, "stack": stack_layers(layers, plan, np.stack)}


def blocks(model) -> Iterator[Block]:
  """The decoder's blocks in plan order, each merged from its slice of the
  stacked parameters (as the stack's unrolled loop does)."""
  stack = model.stack
  for i, seg in enumerate(stack.segments):
    group = stack.groups[f"segment_{i}"]
    split = [
      nnx.split(group[f"layer_{j}"], nnx.Param, ModelState)
      for j in range(len(seg.pattern))
    ]
    for r in range(seg.repeats):
      for gd, p, st in split:
        yield cast(
          Block, nnx.merge(gd, *jax.tree.map(lambda a, r=r: a[r], (p, st)))
        )


def mlp_hidden(block, x_BTD) -> jax.Array:
  """act(x W_gate) * (x W_up) of the block's MLP on Norm(x), [B, T, F]."""
  mlp = block.mlp
  n_BTD = block.mlp_norm(x_BTD)
  dt = n_BTD.dtype
  gate = jnp.einsum("BTD,DF->BTF", n_BTD, mlp.gate_DF[...].astype(dt))
  up = jnp.einsum("BTD,DF->BTF", n_BTD, mlp.up_DF[...].astype(dt))
  return ACTIVATIONS[mlp.activation](gate) * up


def head_contributions(block, x_BTD, pos_BT, seg_BT) -> jax.Array:
  """Each query head's share of the attention update, o_h W_o[h] [B, T,
  H, D] float32 (what `Attention._attend` sums over heads)."""
  attn = block.attn
  if not isinstance(attn, Attention) or type(attn) is not Attention:
    raise TypeError(f"head outputs need qkv attention, not {type(attn)}")
  h = Tokens(block.attn_norm(x_BTD), pos_BT, seg_BT)
  rows = attn.kv_rows(h)
  out = kernels.attention(
    attn.queries(h),
    rows["k"],
    rows["v"],
    mask=attn.mask,
    q_pos=pos_BT,
    k_pos=rows["pos"],
    q_segment_ids=seg_BT,
    kv_segment_ids=rows["seg"],
    scale=attn.scale,
    logits_soft_cap=attn.soft_cap,
    impl=attn.impl,
  )
  o_BTHK = cast(jax.Array, out).astype(jnp.float32)
  w_HKD = attn.o_HKD[...].astype(jnp.float32)
  return jnp.einsum("BTHK,HKD->BTHD", o_BTHK, w_HKD)


def forward(
  model, batch: dict, *, skip: jax.Array | None = None, capture=()
) -> tuple[jax.Array, dict[str, list]]:
  """The decoder's logits, its layers run one at a time -> (logits,
  {name: one array per layer}). `skip` (bool [L]): those layers pass
  their input on unchanged. `capture` names what to return per layer:
  "mlp_hidden" [B, T, F], "heads" [B, T, H, D] (head_contributions), "io" the
  layer's input and output [2, B, T, D], "attn_in" / "mlp_in" what the
  attention / the MLP reads (its norm's output) [B, T, D]."""
  tok, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  x = model.embed_tokens(tok)
  out: dict[str, list] = {name: [] for name in capture}
  for i, block in enumerate(blocks(model)):
    x_in = x
    if "heads" in capture:
      out["heads"].append(head_contributions(block, x, pos, seg))
    if "attn_in" in capture:
      out["attn_in"].append(block.attn_norm(x))
    a, _ = block.attend(x, pos, seg)
    x = x + a
    if "mlp_hidden" in capture:
      out["mlp_hidden"].append(mlp_hidden(block, x))
    if "mlp_in" in capture:
      out["mlp_in"].append(block.mlp_norm(x))
    x = x + block.mlp_branch(x)
    if skip is not None:
      x = jnp.where(skip[i], x_in, x)
    if "io" in capture:
      out["io"].append(jnp.stack([x_in, x]))
  return model.logits(x), out


def token_nll(logits_BTV, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over real tokens, their count), float32."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  real = batch["segment_ids"] > 0
  return jnp.sum(jnp.where(real, nll, 0.0)), jnp.sum(real).astype(jnp.float32)


def tree_size(tree: Any) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
