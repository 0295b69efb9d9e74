"""Analytical FLOPs/token agree with XLA's cost analysis of the train step."""

import jax
import pytest

from efficient_lm.models import transformer
from efficient_lm.training import loop
from tests.helpers import small_config


@pytest.mark.parametrize("kv_heads,tied", [(4, True), (2, False)])
def test_flops_per_token_within_5_percent_of_xla(kv_heads, tied):
  # Unrolled layers: XLA's cost analysis counts a while-loop body once,
  # whatever its trip count, so the scanned model would be undercounted.
  cfg = small_config(**{
    "model.embed_dim": 256, "model.mlp_dim": 768, "model.num_heads": 4,
    "model.num_kv_heads": kv_heads, "model.tie_embeddings": tied,
    "model.scan_layers": False, "data.seq_len": 128,
    "train.batch_size": 4, "mesh.data": 1})
  t = loop.build_trainer(cfg, jax.devices()[:1])
  b, s = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, s), "int32")
           for k in ("inputs", "targets", "segment_ids", "positions")}
  compiled = t.train_step.lower(t.abstract_state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = cost["flops"]
  ours = transformer.flops_per_token(cfg.model, s)["train"] * b * s
  assert abs(xla_flops / ours - 1) < 0.05, (xla_flops, ours)
