"""Layers that differ (issue #18): a decoder whose layers have their own MLP
widths and kv heads (`model.per_layer`, as a pruned or imported model has)
is an ordinary config: it trains, resumes after kill -9 bit-identically,
evaluates, generates with cache = recompute, and its FLOPs match XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_lm import aot, models, runs
from efficient_lm.generate import Generator
from efficient_lm.models import flops
from tests.helpers import (
  SMALL_FLAGS,
  kill_and_resume,
  logged_losses,
  packed_batch,
  prefill_then_decode,
  small_config,
)

MLP = (96, 128, 128, 64)
KV_HEADS = (2, 2, 1, 1)
PER_LAYER = {
  "model.num_layers": 4,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.per_layer.mlp_dim": MLP,
  "model.per_layer.num_kv_heads": KV_HEADS,
}
FLAGS = [
  *SMALL_FLAGS,
  "--config.model.num_layers=4",
  "--config.model.num_heads=4",
  "--config.model.num_kv_heads=2",
  f"--config.model.per_layer.mlp_dim={MLP}",
  f"--config.model.per_layer.num_kv_heads={KV_HEADS}",
  "--config.train.steps=10",
  "--config.checkpoint.every_steps=5",
]


def test_each_layer_has_its_own_shapes():
  cfg = small_config(**PER_LAYER).model
  plan = models.layer_plan(cfg)
  assert [s.mlp_dim for s in plan] == list(MLP)
  assert [s.num_kv_heads for s in plan] == list(KV_HEADS)
  model = models.build(cfg, nnx.Rngs(0))
  shapes = []
  for _, seg in sorted(model.stack.groups.items()):
    for _, layer in sorted(seg.items()):
      for _ in range(layer.mlp.gate_DF.shape[0]):  # stacked repeats
        shapes.append((layer.mlp.gate_DF.shape[-1], layer.attn.k_DGK.shape[-2]))
  assert shapes == list(zip(MLP, KV_HEADS, strict=True))
  assert [s.repeats for s in model.stack.segments] == [1, 1, 1, 1]
  # Identical consecutive layers still scan as one segment.
  other = small_config(
    **{
      **PER_LAYER,
      "model.per_layer.mlp_dim": (128, 128, 64, 64),
      "model.per_layer.num_kv_heads": (),
    }
  )
  model = models.build(other.model, nnx.Rngs(0))
  assert [s.repeats for s in model.stack.segments] == [2, 2]


def test_cache_equals_recompute():
  cfg = small_config(**PER_LAYER, **{"model.dtype": "float32"}).model
  model = models.build(cfg, nnx.Rngs(1))
  b, t = 2, 12
  batch = packed_batch(b, t, cfg.vocab_size, seed=3)
  tok, pos = batch["inputs"], batch["positions"]
  seg = jnp.ones_like(tok)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tok.shape)
  want, _ = model(tok, pos, seg)
  got, _ = prefill_then_decode(model, tok, pos, seg, model.init_cache(b, t), 5)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_flops_within_5_percent_of_xla():
  cfg = small_config(
    **PER_LAYER,
    **{"model.embed_dim": 128, "data.seq_len": 128, "train.batch_size": 4},
  )
  _, _, compiled = aot.compile_train_step(cfg, jax.devices()[:1])
  xla = aot.xla_flops(compiled)
  ours = flops.flops_per_token(cfg.model, 128)["train"] * 4 * 128
  assert abs(xla / ours - 1) < 0.05, (xla, ours)


def test_trains_resumes_evaluates_and_generates(tmp_path):
  straight, crashed = kill_and_resume(tmp_path, flags=FLAGS, checkpoint=5)
  a = logged_losses(straight)

  run = runs.load_run(str(crashed))
  assert run.config.model.per_layer.mlp_dim == MLP
  result = runs.evaluate(run, num_batches=2)
  assert np.isfinite(result["loss"]) and result["loss"] < a[1]
  gen = Generator(run.graphdef, run.variables, mesh=run.mesh)
  prompts = [run.tokenizer.encode("def "), run.tokenizer.encode("import o")]
  cached, _ = gen.generate(prompts, max_new_tokens=8, use_cache=True)
  full, _ = gen.generate(prompts, max_new_tokens=8, use_cache=False)
  assert cached == full and all(len(o) == 8 for o in cached)
