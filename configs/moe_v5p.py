"""A mixture-of-experts decoder (~6.6B parameters, ~0.95B active per
token) for a TPU v5p-32 slice, with expert parallelism.

  python -m efficient_lm.train --config=configs/moe_v5p.py --compile_only
  python -m efficient_lm.train --config=configs/moe_v5p.py \
      --config.data.source=jsonl --config.data.path=gs://... --workdir=...

16 layers of width 2048 (16 query heads, 8 key/value heads); the first
layer has a dense SwiGLU of width 6144, the other 15 an MoE MLP: 32 routed
experts of width 2048, top-2, plus one shared expert (DeepSeek-style), so
a token's MLP is 3 x 2048 = 6144 wide, as in the dense layer. Softmax
router, dropless (tokens sorted by expert, grouped matmuls), the Switch /
GShard balance loss and a small router z-loss. bf16 activations, full
remat, float32 parameters and Adam moments.

Mesh: expert 8 x fsdp 2 = the 16 chips of v5p-32. Each chip holds 4 of the
32 experts of every MoE layer (split once more by fsdp), and the batch is
split over all 16 (expert splits it like data outside the MoE layers); in
an MoE layer the assignments go to the chips holding their experts by
all-to-all. The `--compile_only` command above compiles the full train
step for the slice on this host (libtpu, no TPU) and prints per-chip
memory and FLOPs. Measured figures: README, "Experts".
"""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "moe_v5p"
  m = c.model
  m.num_layers = 16
  m.embed_dim = 2048
  m.num_heads = 16
  m.num_kv_heads = 8
  m.mlp_dim = 6144  # the dense first layer
  m.vocab_size = 32_768
  m.tie_embeddings = False
  m.moe.num_experts = 32
  m.moe.top_k = 2
  m.moe.num_shared_experts = 1
  m.moe.expert_mlp_dim = 2048
  m.moe.first_dense = 1
  m.moe.router = "softmax"
  m.moe.capacity_factor = 0.0  # dropless
  m.moe.balancing = "aux_loss"
  m.moe.aux_loss_weight = 0.01
  m.moe.router_z_loss = 0.001
  m.remat = "full"
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  c.data.seq_len = 2048
  c.data.tokenizer = "byte"
  c.train.steps = 100_000
  c.train.batch_size = 256
  c.train.learning_rate = 3e-4
  c.train.end_learning_rate = 3e-5
  c.train.warmup_steps = 2000
  c.train.z_loss = 1e-4
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.checkpoint.every_steps = 1000
  c.mesh.fsdp = 2
  c.mesh.expert = 8
  c.mesh.tensor = 1
  c.topology = "v5p-32"
  return c
