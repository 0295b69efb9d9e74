"""The README's CPU default: a small byte-level decoder on the embedded corpus
(the standard library's own source files). A few minutes on 2 CPU cores."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "tiny"
  c.model.num_layers = 4
  c.model.embed_dim = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.model.dtype = "float32"  # bf16 matmuls are emulated (slow) on CPU
  c.data.seq_len = 128
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 30
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.every_steps = 100
  return c
