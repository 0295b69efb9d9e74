"""Global tokens of global_local and block_sparse (docs/attention.md):
the first num_global positions of a document are seen by every token and,
in the bidirectional (encoder) form, see every token themselves (global
rows); in the causal form they see only earlier tokens, like every token.

The mask is written here from that definition, element by element, and
compared with kernels.masks' dense mask and its tile kinds (what the
blockwise kernels skip), and every kernel impl with the dense reference
under the definition's explicit mask.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp
import kernels
from efficient_lm.models import flops, stack
from efficient_lm.models.attention import mask_spec
from kernels import masks
from kernels.masks import EMPTY, FULL, MaskSpec
from tests.helpers import assert_close, small_config
from tests.test_kernels_attention import make_case, outputs_and_grads

F32_TOL = 1e-4
# (kind, window, num_global, block_size): block_size only for block_sparse.
SHAPES = [
  ("global_local", 3, 4, None),
  ("global_local", 1, 1, None),
  ("global_local", 6, 9, None),
  ("block_sparse", 3, 2, 4),
  ("block_sparse", 2, 5, 3),
  ("block_sparse", 1, 7, 8),
]


def _attn_cfg(kind, window, num_global, block_size, max_len=48):
  overrides = {
    "model.attention.kind": kind,
    "model.attention.window": window,
    "model.attention.num_global": num_global,
  }
  if block_size is not None:
    overrides |= {
      "model.attention.block_size": block_size,
      "model.attention.num_random_blocks": 1,
      "model.attention.random_seed": 5,
      "model.attention.max_len": max_len,
    }
  return small_config(**overrides).model


def definition(a, causal, pos, seg):
  """Row i sees key j iff same document and (not causal or j <= i) and
  (j in i's window, or j < num_global, or (not causal and i < num_global),
  or the random-block table has (i's block, j's block)); positions, not
  indices."""
  table = None
  if a.attention.kind == "block_sparse":
    table = np.asarray(mask_spec(a.attention, causal=causal).block_mask)
  w, g = a.attention.window, a.attention.num_global
  t = len(pos)
  out = np.zeros((t, t), bool)
  for i in range(t):
    for j in range(t):
      qp, kp = int(pos[i]), int(pos[j])
      if seg[i] != seg[j] or seg[i] == 0 or (causal and kp > qp):
        continue
      in_window = qp - (w - 1) <= kp <= qp + (0 if causal else w - 1)
      block = table is not None and bool(
        table[qp // a.attention.block_size][kp // a.attention.block_size]
      )
      out[i, j] = in_window or kp < g or (not causal and qp < g) or block
  return out


def _layouts(t):
  """One document with two padding tokens, and two packed documents."""
  seg = np.ones(t, np.int32)
  seg[-2:] = 0
  yield np.arange(t, dtype=np.int32), seg
  cut = t // 3
  pos = np.r_[np.arange(cut), np.arange(t - cut)].astype(np.int32)
  yield pos, np.where(np.arange(t) < cut, 1, 2).astype(np.int32)


def _tile_kinds(m, bq, bk):
  t, s = m.shape
  tiles = m.reshape(t // bq, bq, s // bk, bk).transpose(0, 2, 1, 3)
  return np.where(
    tiles.all((-1, -2)), FULL, np.where(tiles.any((-1, -2)), 1, 0)
  )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mask_and_tiles_equal_the_definition(shape, causal):
  a = _attn_cfg(*shape)
  spec = mask_spec(a.attention, causal=causal)
  for t in (24, 40):
    for pos, seg in _layouts(t):
      want = definition(a, causal, pos, seg)
      got = np.asarray(
        masks.dense_mask(
          spec, *(jnp.asarray(x)[None] for x in (pos, pos, seg, seg))
        )
      )[0]
      np.testing.assert_array_equal(got, want)
      for bq, bk in ((8, 8), (4, 8), (8, 4)):
        kinds = np.asarray(
          masks.classify_blocks(
            spec,
            *(jnp.asarray(x)[None] for x in (pos, pos, seg, seg)),
            block_q=bq,
            block_kv=bk,
          )
        )[0]
        ref = _tile_kinds(want, bq, bk)
        assert not np.any((kinds == EMPTY) & (ref != EMPTY)), "tile skipped"
        assert not np.any((kinds == FULL) & (ref != FULL)), "mask dropped"


def test_encoder_global_tokens_see_every_key():
  """The issue's case: 96 tokens, 4 globals; each global row sees all 96
  keys bidirectional, and only keys 0..i causal."""
  a = _attn_cfg("global_local", 8, 4, None)
  pos = np.arange(96, dtype=np.int32)[None]
  seg = np.ones_like(pos)
  for causal, want in ((False, [96] * 4), (True, [1, 2, 3, 4])):
    m = masks.dense_mask(
      mask_spec(a.attention, causal=causal), pos, pos, seg, seg
    )
    np.testing.assert_array_equal(np.asarray(m)[0, :4].sum(1), want)
    layer = stack.layer_plan(a, causal=causal)[0]
    np.testing.assert_array_equal(flops.visible_keys(layer, 96)[:4], want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=str)
def test_kernel_impls_equal_the_definition(shape, causal):
  """xla, xla_chunked and the Pallas kernel (interpret) under the layer's
  spec against the dense reference under the definition's explicit table
  (block size 1); 29 tokens, packed rows, GQA, values and gradients."""
  a = _attn_cfg(*shape, max_len=64)
  n = 64
  pos, ones = np.arange(n, dtype=np.int32), np.ones(n, np.int32)
  explicit = MaskSpec(
    block_mask=definition(a, causal, pos, ones), block_mask_sizes=(1, 1)
  )
  spec = mask_spec(a.attention, causal=causal)
  case = make_case(7, b=2, t=29, s=29, h=4, g=2, kdim=16)
  want = outputs_and_grads(case, explicit, "xla")
  for impl in ("xla", "xla_chunked", "interpret"):
    got = outputs_and_grads(case, spec, impl, None, kernels.BlockSizes(8, 8))
    for name, x, y in zip(
      ("out", "lse", "dq", "dk", "dv"), got, want, strict=True
    ):
      assert_close(x, y, F32_TOL, f"{impl} {name}")
