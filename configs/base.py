"""Base experiment config: every key, with defaults. Other configs start here.

Dataclass twins (and validation) live in efficient_lm/config.py.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"

  c.model = ml_collections.ConfigDict()
  c.model.kind = "decoder"
  c.model.num_layers = 2
  c.model.embed_dim = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = config_dict.placeholder(int)  # None: embed_dim/heads
  c.model.mlp_dim = 512
  c.model.vocab_size = 384  # byte tokenizer (259) padded to 128s
  c.model.tie_embeddings = True
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6
  c.model.scan_layers = True
  c.model.remat = "none"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.attention = ml_collections.ConfigDict()
  c.model.attention.kind = "dense"
  c.model.attention.projection = "qkv"
  c.model.attention.window = 0
  c.model.attention.num_global = 0
  c.model.attention.logits_soft_cap = config_dict.placeholder(float)
  c.model.attention.impl = "auto"
  c.model.routing = ml_collections.ConfigDict()
  c.model.routing.kind = "none"

  c.data = ml_collections.ConfigDict()
  c.data.source = "default"
  c.data.path = config_dict.placeholder(str)
  c.data.seq_len = 128
  c.data.tokenizer = "byte"
  c.data.eval_fraction = 0.1
  c.data.shuffle = True

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.seed = 0
  c.train.learning_rate = 1e-3
  c.train.end_learning_rate = 1e-4
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.z_loss = 0.0
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.stop_on_nan = True

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # all devices not used by fsdp * tensor
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
