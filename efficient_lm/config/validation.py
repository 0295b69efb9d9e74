"""Validation of a converted Config: every rule across values, each error
one line naming the values. validate() runs the checks in a fixed order
(the first failing one is reported); the model's own rules (attention,
routing, funnel) are in validation_model.py."""

from __future__ import annotations

from efficient_lm.config.errors import ConfigError, _positive
from efficient_lm.config.schemes import parse_scheme
from efficient_lm.config.schema import (
  Config,
  DataConfig,
  MeshConfig,
  ModelConfig,
  TrainConfig,
)
from efficient_lm.config.validation_model import (
  _validate_attention,
  _validate_family_switches,
  _validate_funnel,
  _validate_per_layer,
  _validate_moe,
  _validate_routing,
)


def _mesh_product(
  mesh: MeshConfig, names: tuple[str, ...], prefix: str = "mesh."
) -> str:
  """`mesh.fsdp*mesh.tensor=2*1` for error messages. dcn and expert are
  named only when they are not 1, so other messages read as they always
  did."""
  names = tuple(
    n for n in names if n not in ("dcn", "expert") or getattr(mesh, n) != 1
  )
  keys = "*".join(prefix + n for n in names)
  return f"{keys}={'*'.join(str(getattr(mesh, n)) for n in names)}"


def validate(cfg: Config, *, device_count: int | None = None) -> None:
  m, mesh = cfg.model, cfg.mesh
  _validate_sizes(cfg)
  _validate_train(cfg.train)
  _validate_distill(cfg)
  _validate_quantization(cfg)
  if mesh.data == 0 or mesh.data < -1:
    raise ConfigError(
      f"mesh.data={mesh.data}: expected a positive size or -1 (all "
      "remaining devices)"
    )
  _validate_heads(m)
  _validate_attention(m.attention, m.num_layers)
  _validate_family_switches(m)
  _validate_routing(m, cfg.data.seq_len)
  _validate_moe(m)
  _validate_funnel(cfg)
  _validate_per_layer(m, cfg.mesh.tensor)
  _validate_data(m, cfg.data)
  _validate_mesh(cfg, device_count)


def _validate_sizes(cfg: Config) -> None:
  """Counts and sizes that must be positive."""
  m, t, d, mesh = cfg.model, cfg.train, cfg.data, cfg.mesh
  for path, v in [
    ("model.num_layers", m.num_layers),
    ("model.embed_dim", m.embed_dim),
    ("model.num_heads", m.num_heads),
    ("model.num_kv_heads", m.num_kv_heads),
    ("model.mlp_dim", m.mlp_dim),
    ("model.vocab_size", m.vocab_size),
    ("data.seq_len", d.seq_len),
    ("train.steps", t.steps),
    ("train.batch_size", t.batch_size),
    ("train.log_every", t.log_every),
    ("train.eval_every", t.eval_every),
    ("checkpoint.every_steps", cfg.checkpoint.every_steps),
    ("checkpoint.keep", cfg.checkpoint.keep),
    ("mesh.dcn", mesh.dcn),
    ("mesh.fsdp", mesh.fsdp),
    ("mesh.expert", mesh.expert),
    ("mesh.tensor", mesh.tensor),
  ]:
    _positive(path, v)


def _validate_heads(m: ModelConfig) -> None:
  """Query heads in whole GQA groups, an even head dim for RoPE."""
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
      f"model.num_heads={m.num_heads} is not divisible by "
      f"model.num_kv_heads={m.num_kv_heads} (GQA groups must be whole)"
    )
  if m.head_dim is None and m.embed_dim % m.num_heads:
    raise ConfigError(
      f"model.embed_dim={m.embed_dim} is not divisible by "
      f"model.num_heads={m.num_heads}; set model.head_dim explicitly"
    )
  if m.resolved_head_dim % 2:
    raise ConfigError(f"head_dim={m.resolved_head_dim} must be even for RoPE")


def _validate_data(m: ModelConfig, d: DataConfig) -> None:
  """The data section, and the block_sparse table and the tglobal blocks
  against its length."""
  _validate_tglobal_block(m, d.seq_len)
  if (
    "block_sparse" in m.attention.pattern_kinds
    and m.attention.max_len < d.seq_len
  ):
    raise ConfigError(
      f"model.attention.max_len={m.attention.max_len} is shorter than "
      f"data.seq_len={d.seq_len}: the block_sparse table must cover every "
      "position"
    )
  if not 0.0 <= d.eval_fraction < 1.0:
    raise ConfigError(
      f"data.eval_fraction={d.eval_fraction}: expected 0 <= x < 1"
    )
  if d.source != "default" and not d.path:
    raise ConfigError(
      f"data.path is empty: data.source={d.source!r} needs a path "
      "(--config.data.path=...)"
    )


def _validate_tglobal_block(m: ModelConfig, seq_len: int) -> None:
  """A tglobal layer whose blocks never complete in a row, or (causal)
  whose summaries no token of a row can see, is a sliding window."""
  if "tglobal" not in m.attention.pattern_kinds:
    return
  k = m.attention.tglobal_block
  if m.kind == "funnel_encoder":  # bidirectional: every token sees it
    if k > seq_len:
      raise ConfigError(
        f"model.attention.tglobal_block={k} > data.seq_len={seq_len}: no "
        "block ever completes, so the tglobal layers would be plain "
        "sliding windows; expected tglobal_block <= seq_len"
      )
  elif k >= seq_len:  # causal: a token sees the blocks before its own
    raise ConfigError(
      f"model.attention.tglobal_block={k} >= data.seq_len={seq_len}: a "
      "token sees only the summaries of complete blocks before its own, so "
      "no token would see one and the tglobal layers would be plain sliding "
      "windows; expected tglobal_block < seq_len"
    )


def _validate_mesh(cfg: Config, device_count: int | None) -> None:
  """Batch, heads and widths divisible by the mesh axes that split them;
  the mesh's size against the devices (when `device_count` is given)."""
  m, t, mesh = cfg.model, cfg.train, cfg.mesh
  dp = mesh.dcn * max(mesh.data, 1) * mesh.fsdp * mesh.expert
  if t.batch_size % dp:
    names = ("dcn", "data", "fsdp", "expert")
    raise ConfigError(
      f"train.batch_size={t.batch_size} is not divisible by the "
      f"data-parallel size {_mesh_product(mesh, names)}={dp}"
    )
  if mesh.expert > 1 and m.moe.num_experts % mesh.expert:
    raise ConfigError(
      f"model.moe.num_experts={m.moe.num_experts} is not divisible by "
      f"mesh.expert={mesh.expert}"
    )
  if m.num_kv_heads % mesh.tensor:
    raise ConfigError(
      f"model.num_kv_heads={m.num_kv_heads} is not divisible by "
      f"mesh.tensor={mesh.tensor}"
    )
  for path, v in [
    ("model.mlp_dim", m.mlp_dim),
    ("model.vocab_size", m.vocab_size),
  ]:
    if v % mesh.tensor:
      raise ConfigError(
        f"{path}={v} is not divisible by mesh.tensor={mesh.tensor}"
      )
  if m.embed_dim % mesh.fsdp:
    raise ConfigError(
      f"model.embed_dim={m.embed_dim} is not divisible by mesh.fsdp={mesh.fsdp}"
    )
  if device_count is not None and mesh.data != -1 and mesh.size != device_count:
    raise ConfigError(
      f"mesh {_mesh_product(mesh, ('dcn', 'data', 'fsdp', 'expert', 'tensor'), '')}="
      f"{mesh.size} does not match the {device_count} available devices"
    )


def _validate_train(t: TrainConfig) -> None:
  """Schedule and optimizer values that would train silently wrong."""
  if t.learning_rate < 0:
    raise ConfigError(
      f"train.learning_rate={t.learning_rate}: expected >= 0 (a negative "
      "rate is gradient ascent)"
    )
  if not 0 <= t.end_learning_rate <= t.learning_rate:
    raise ConfigError(
      f"train.end_learning_rate={t.end_learning_rate}: expected between 0 "
      f"and the peak train.learning_rate={t.learning_rate}"
    )
  if not 0 <= t.warmup_steps <= t.steps:
    raise ConfigError(
      f"train.warmup_steps={t.warmup_steps}: expected between 0 and "
      f"train.steps={t.steps}"
    )
  for path, v in [("train.b1", t.b1), ("train.b2", t.b2)]:
    if not 0 <= v < 1:
      raise ConfigError(f"{path}={v}: expected 0 <= x < 1")
  for path, v in [
    ("train.weight_decay", t.weight_decay),
    ("train.grad_clip", t.grad_clip),
    ("train.z_loss", t.z_loss),
  ]:
    if v < 0:
      raise ConfigError(f"{path}={v}: expected >= 0 (0 turns it off)")
  _positive("train.eval_batches", t.eval_batches)


def _validate_quantization(cfg: Config) -> None:
  """Known schemes; a quantized model (integer weights) is not trained
  again with quantization-aware training."""
  m, t = cfg.model.quantization, cfg.train.quantization
  for what, text in (("model.quantization", m), ("train.quantization", t)):
    if text:
      parse_scheme(text, what)
  if m and t:
    raise ConfigError(
      f"model.quantization={m!r} with train.quantization={t!r}: the "
      "weights are already quantized; quantization-aware training needs "
      "the float run"
    )


def _validate_distill(cfg: Config) -> None:
  """train.objective='distill': a teacher, alpha in [0, 1], T > 0, a causal
  student (the teacher run itself is read when the trainer is built)."""
  t, d = cfg.train, cfg.train.distill
  if t.objective != "distill":
    return
  if not d.teacher:
    raise ConfigError(
      "train.objective='distill' needs a teacher run: "
      "--config.train.distill.teacher=RUN_DIR"
    )
  if not 0 <= d.alpha <= 1:
    raise ConfigError(
      f"train.distill.alpha={d.alpha}: expected 0 <= alpha <= 1"
    )
  if not d.temperature > 0:
    raise ConfigError(
      f"train.distill.temperature={d.temperature}: expected > 0"
    )
  if cfg.model.kind == "funnel_encoder":
    raise ConfigError(
      "train.objective='distill' with model.kind='funnel_encoder': "
      "distillation matches next-token distributions, which a bidirectional "
      "model does not predict; use a causal model (decoder, hourglass)"
    )
