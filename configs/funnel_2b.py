"""A ~2B-parameter funnel encoder (masked LM) for a TPU v5p-32 slice.

  python -m efficient_lm.train --config=configs/funnel_2b.py --compile_only
  python -m efficient_lm.train --config=configs/funnel_2b.py \
      --config.data.source=jsonl --config.data.path=gs://... --workdir=...

36 layers of width 2048 (16 query heads, 4 key/value heads), compressed
once by 2 after layer 12 (stages (12, 24): sequence 8192 -> 4096), then the
upsampling decoder's 2 full-length layers. TGlobal attention throughout
(LongT5's pairing for an encoder): a 128-token local window each side plus
one summary per 16 positions. A SentencePiece vocabulary when a model file
is given (`--config.data.tokenizer=path/to/sp.model`, up to 32,767 pieces
plus the mask id), byte-level otherwise. bf16 activations, full remat,
parameters and Adam moments in float32, sharded over fsdp 8 x tensor 2 =
the 16 chips of v5p-32.

On a host that cannot hold its training state, the train command stops
before allocating and says so (efficient_lm/training/memory.py); the
`--compile_only` command above compiles the full step for the slice here
(libtpu, no TPU) and prints per-chip memory and FLOPs. Measured figures:
README, "Funnel encoder".
"""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "funnel_2b"
  m = c.model
  m.kind = "funnel_encoder"
  m.num_layers = 36
  m.funnel.stages = (12, 24)
  m.funnel.factor = 2
  m.funnel.decoder_layers = 2
  m.embed_dim = 2048
  m.num_heads = 16
  m.num_kv_heads = 4
  m.mlp_dim = 6912
  m.vocab_size = 32_768
  m.tie_embeddings = True
  m.attention.kind = "tglobal"
  m.attention.window = 128
  m.attention.tglobal_block = 16
  m.remat = "full"
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  c.data.seq_len = 8192
  c.data.tokenizer = "byte"
  c.train.objective = "mlm"
  c.train.mlm_rate = 0.15
  c.train.steps = 100_000
  c.train.batch_size = 64
  c.train.learning_rate = 3e-4
  c.train.end_learning_rate = 3e-5
  c.train.warmup_steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.checkpoint.every_steps = 1000
  c.mesh.fsdp = 8
  c.mesh.tensor = 2
  c.topology = "v5p-32"
  return c
