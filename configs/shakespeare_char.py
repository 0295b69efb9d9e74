"""nanoGPT's CPU "baby GPT" on tinyshakespeare, char-level.

  python -m efficient_lm.train --config=configs/shakespeare_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=runs/sc

Shape and schedule follow nanoGPT's README: 4 layers, 4 heads, width 128,
context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4, warmup 100,
AdamW beta2 0.99, no dropout. Differences (ours: RMSNorm, RoPE, SwiGLU, no
biases) are architectural; the MLP width keeps nanoGPT's parameter count.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "shakespeare_char"
  c.model.num_layers = 4
  c.model.embed_dim = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  # SwiGLU has 3 matrices: 3 * 128 * 341 ~= 2 * 128 * 512 (GPT-2's 4x MLP).
  c.model.mlp_dim = 344
  c.model.vocab_size = 128  # 65 characters, padded
  c.model.dtype = "float32"
  c.data.source = "text"
  c.data.tokenizer = "char"
  c.data.seq_len = 64
  c.data.eval_fraction = 0.1
  c.train.steps = 2000
  c.train.batch_size = 12
  c.train.learning_rate = 1e-3
  c.train.end_learning_rate = 1e-4
  c.train.warmup_steps = 100
  c.train.b2 = 0.99
  c.train.weight_decay = 0.1
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.eval_batches = 20
  c.checkpoint.every_steps = 500
  return c
