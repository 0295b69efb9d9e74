"""configs/tiny.py shaped like Gemma 3 (issue #19), trained from scratch:
every Gemma switch on. Sandwich norms stored as w with (1 + w) applied,
GeGLU with tanh GELU, embeddings times sqrt(D), q/k norms over the head
dim, attention scale query_pre_attn_scalar ** -0.5, a head dim != D / H,
one kv head (Gemma 3 1B's MQA), and a 5 local : 1 global pattern whose
sliding-window layers use their own RoPE base (rope_local_theta) while
the global layer uses rope_theta with linear scaling (Gemma 3 4B+).
Gemma 2's soft caps are on too (Gemma 3 dropped them: set both to None
for its exact shape). A few seconds a step on 2 CPU cores."""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "tiny_gemma"
  m = c.model
  m.num_layers = 6
  m.embed_dim = 128
  m.num_heads = 4
  m.num_kv_heads = 1
  m.head_dim = 64  # != embed_dim / num_heads
  m.mlp_dim = 384
  m.tie_embeddings = True
  m.norm_plus_one = True
  m.post_norms = True
  m.mlp_activation = "gelu_tanh"
  m.embed_scale = True
  m.final_logits_soft_cap = 30.0
  m.rope_theta = 1_000_000.0
  m.rope_local_theta = 10_000.0
  m.rope_scaling = "linear"
  m.rope_scaling_factor = 8.0
  a = m.attention
  a.pattern = ",".join(["sliding_window"] * 5 + ["dense"])
  a.window = 32  # tokens including self; < data.seq_len
  a.qk_norm = True
  a.query_pre_attn_scalar = 64.0  # = head_dim, as Gemma 3
  a.logits_soft_cap = 50.0
  # Short enough for a 20-step smoke run (--config.train.steps=20).
  c.train.warmup_steps = 10
  c.train.log_every = 5
  return c
