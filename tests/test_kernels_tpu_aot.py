"""The Mosaic kernels lower and compile ahead of time for a TPU topology.

No TPU needed: libtpu compiles for an abstract v5e 2x2 slice. Each case runs
forward and backward inside `jax.shard_map` (check_vma on), exports with
`jax.export(platforms=["tpu"])` and compiles. Skips without libtpu.
"""

import os

import pytest

pytest.importorskip("libtpu")
# Another process (a parallel test run) may hold libtpu's lockfile; that
# lock guards real TPU chips, which compile-only topologies never touch.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

import kernels  # noqa: E402
from kernels.masks import MaskSpec  # noqa: E402

pytestmark = pytest.mark.tpu_aot
P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def mesh():
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # libtpu present but unusable on this host
    pytest.skip(f"no compile-only TPU topology: {e}")
  return jax.sharding.Mesh(np.array(topo.devices).reshape(4), ("data",))


CASES = {
  "causal_window_prefix_gqa": dict(
    spec=MaskSpec(causal=True, window=(200, 0), global_prefix=16)
  ),
  "chunk_softcap_f32": dict(
    spec=MaskSpec(causal=True, chunk=96), dtype=jnp.float32, cap=30.0
  ),
  "tglobal_suffix": dict(
    spec=MaskSpec(causal=True, window=(100, 0), global_suffix=16)
  ),
  "block_mask": dict(
    spec=MaskSpec(block_mask=((1, 0), (1, 1)), block_mask_sizes=(256, 256))
  ),
  "mla_dims_ragged_len": dict(spec=MaskSpec(causal=True), kdim=96, e=64, t=300),
  "bwd_block_sizes": dict(
    spec=MaskSpec(causal=True), bs=kernels.BlockSizes(128, 256, 256, 128)
  ),
  # 32k keys per device: SMEM tile lists fit, dynamic grid keeps it short.
  "window_32k": dict(spec=MaskSpec(causal=True, window=(1023, 0)), t=32768),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_and_compiles_in_shard_map(mesh, name):
  c = CASES[name]
  b, t, h, g = 4, c.get("t", 512), 4, 2
  kdim, e = c.get("kdim", 128), c.get("e", 128)
  dtype = c.get("dtype", jnp.bfloat16)

  def attn(q, k, v, pos, seg):
    def inner(q, k, v, pos, seg):
      return kernels.attention(
        q,
        k,
        v,
        mask=c["spec"],
        q_pos=pos,
        k_pos=pos,
        q_segment_ids=seg,
        kv_segment_ids=seg,
        logits_soft_cap=c.get("cap"),
        block_sizes=c.get("bs"),
        impl="pallas_tpu",
      )

    return jax.shard_map(
      inner, mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P("data")
    )(q, k, v, pos, seg)

  def loss(*args):
    return jnp.sum(attn(*args).astype(jnp.float32))

  shard = jax.sharding.NamedSharding(mesh, P("data"))
  args = [
    jax.ShapeDtypeStruct(s, dt, sharding=shard)
    for s, dt in (
      ((b, t, h, kdim), dtype),
      ((b, t, g, kdim), dtype),
      ((b, t, g, e), dtype),
      ((b, t), jnp.int32),
      ((b, t), jnp.int32),
    )
  ]
  fwd_bwd = jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))
  for fn, kernels_expected in ((attn, 1), (fwd_bwd, 3)):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert exported.platforms == ("tpu",)
    assert exported.mlir_module().count("tpu_custom_call") == kernels_expected
    jax.jit(fn).lower(*args).compile()


def test_smem_overflow_is_a_clear_error():
  q = jax.ShapeDtypeStruct((1, 65536, 1, 128), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((1, 65536), jnp.int32)
  with pytest.raises(NotImplementedError, match="SMEM"):
    jax.jit(
      lambda q, pos: kernels.attention(
        q,
        q,
        q,
        mask=MaskSpec(causal=True),
        q_pos=pos,
        k_pos=pos,
        impl="pallas_tpu",
      )
    ).trace(q, pos)


def test_unaligned_kv_block_is_refused():
  q = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
  pos = jnp.zeros((1, 256), jnp.int32)
  with pytest.raises(NotImplementedError, match="block_kv"):
    jax.jit(
      lambda q: kernels.attention(
        q,
        q,
        q,
        mask=MaskSpec(causal=True),
        q_pos=pos,
        k_pos=pos,
        impl="pallas_tpu",
        block_sizes=kernels.BlockSizes(128, 64),
      )
    ).trace(q)
