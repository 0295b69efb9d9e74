"""ConfigDict -> frozen, validated dataclasses.

This is the only module that reads an ml_collections ConfigDict. Everything
downstream receives the (frozen) dataclass it needs. Validation runs here,
before anything is compiled, and every error is one line naming the values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, Optional

import ml_collections


class ConfigError(ValueError):
  """A bad configuration value; the message names the value and expectation."""


# ----------------------------------------------------------------- sections


AttentionKind = Literal[
  "dense", "sliding_window", "global_local", "block_sparse", "tglobal"
]
ATTENTION_KINDS: tuple[str, ...] = typing.get_args(AttentionKind)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  # "dense": full attention; "sliding_window": a window of `window` tokens
  # including self; "global_local": sliding window plus the first
  # `num_global` positions visible to every token; "block_sparse": BigBird,
  # the sliding window and `num_global` prefix positions plus
  # `num_random_blocks` random key blocks of `block_size` per query block
  # (strictly earlier ones in a decoder), drawn once from `random_seed`;
  # "tglobal": LongT5 transient-global, the sliding window plus one summary
  # key per `tglobal_block` tokens (completed earlier blocks only in a
  # decoder). Causal in decoders, bidirectional in encoders.
  kind: AttentionKind = "dense"
  # Comma-separated attention kinds cycled over the layers, e.g.
  # "sliding_window,sliding_window,sliding_window,dense" (3 local : 1
  # global); its length must divide model.num_layers. Empty: every layer
  # uses `kind`. The other keys (window, num_global, ...) are shared.
  pattern: str = ""
  # "qkv": MHA / GQA / MQA, chosen by model.num_kv_heads; "mla": DeepSeek
  # multi-head latent attention (the *_rank and *_head_dim keys below).
  projection: Literal["qkv", "mla"] = "qkv"
  window: int = 0
  num_global: int = 0
  logits_soft_cap: Optional[float] = None
  # block_sparse: key/query block length, random key blocks per query
  # block, the seed of their draw, and the longest sequence the static
  # block table covers (positions >= max_len are an error).
  block_size: int = 64
  num_random_blocks: int = 3
  random_seed: int = 0
  max_len: int = 4096
  # tglobal: tokens summarised by one global key.
  tglobal_block: int = 16
  # mla: latent widths (q_lora_rank 0 = queries projected directly) and
  # head dims; 0 = DeepSeek-V2's ratios to model head_dim K: kv_lora_rank
  # 4K, rope_head_dim K/2, nope_head_dim K, v_head_dim K.
  kv_lora_rank: int = 0
  q_lora_rank: int = 0
  rope_head_dim: int = 0
  nope_head_dim: int = 0
  v_head_dim: int = 0
  # Entry point implementation passed to kernels.attention.
  impl: str = "auto"

  @property
  def pattern_kinds(self) -> tuple[str, ...]:
    """The kinds the pattern cycles through (just `kind` without one)."""
    if not self.pattern.strip():
      return (self.kind,)
    return tuple(k.strip() for k in self.pattern.split(","))


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
  # "none": every token through every layer; "mod": mixture-of-depths
  # (routed blocks process the top `capacity` of each sequence); "mor":
  # mixture-of-recursions (shared layers applied `num_recursions` times, a
  # router choosing each token's depth). METHODS.md sections 1 and 2.
  kind: Literal["none", "mod", "mor"] = "none"
  # --- mod
  # Every `every`-th block is routed (2: every other block, the paper's
  # best), the others dense.
  every: int = 2
  # Fraction of each sequence's tokens a routed block processes (top-k).
  capacity: float = 0.125
  # The causal decision used by evaluation and generation: "router_bce"
  # (the router's own logit > 0, trained by a BCE aux loss towards top-k
  # membership) or "mlp" (a small predictor on stop-gradient inputs).
  predictor: Literal["router_bce", "mlp"] = "router_bce"
  # --- shared by mod and mor
  # Weight of the BCE loss teaching the causal decision top-k membership.
  aux_loss_weight: float = 0.01
  # Router z-loss weight (mean squared router logit); 0 = off.
  router_z_loss: float = 0.0
  # --- mor
  num_recursions: int = 2
  sharing: Literal["cycle", "sequence", "middle_cycle", "middle_sequence"] = (
    "middle_cycle"
  )
  router: Literal["expert_choice", "token_choice"] = "expert_choice"
  # Expert-choice capacity per recursion step; empty = (N_r - r + 1) / N_r.
  capacities: tuple[float, ...] = ()
  # Gate scale: g = alpha * sigmoid(z) (expert-choice).
  alpha: float = 0.1
  # token_choice load balancing: "aux_loss" (weight `balancing_weight`) or
  # "loss_free" (a non-trainable per-depth bias moved by `bias_rate`).
  balancing: Literal["aux_loss", "loss_free"] = "aux_loss"
  balancing_weight: float = 0.1
  bias_rate: float = 0.001
  # How a selected token's state is updated (METHODS.md 1.2 step 5):
  # "paper": H + g * Block(H) (the block's own residual included);
  # "residual_delta": H + g * (Block(H) - H), the MoD form. Default "paper":
  # the released code's rule, kept for reproduction (the residual stream
  # grows by (1 + g) per step). token_choice applies it once, at a token's
  # last step, against the recursions' input (models/mor.py).
  update_rule: Literal["paper", "residual_delta"] = "paper"
  # "recursion_wise": step r attends only among the tokens active at r;
  # "recursive_sharing": the first step's keys/values serve every step.
  kv: Literal["recursion_wise", "recursive_sharing"] = "recursion_wise"


@dataclasses.dataclass(frozen=True)
class FunnelConfig:
  # funnel_encoder: layers per stage; the sequence is pooled by `factor`
  # between stages, e.g. (12, 24) = compress once after layer 12 of 36.
  # hourglass: (full-length, shortened, full-length) layers. The sum must
  # equal model.num_layers.
  stages: tuple[int, ...] = (1, 1)
  factor: int = 2
  # funnel_encoder: full-length layers of the upsampling decoder.
  decoder_layers: int = 1
  # funnel_encoder: also return one mean-pooled vector per document.
  embedding_head: bool = False


@dataclasses.dataclass(frozen=True)
class PerLayerConfig:
  # Per-layer shapes (a pruned or imported model whose layers differ): one
  # entry per layer of the layer plan (model.num_layers, plus the funnel
  # encoder's decoder_layers after them), e.g. mlp_dim=(96, 128, 128, 64).
  # Empty: every layer takes the uniform model.* value.
  mlp_dim: tuple[int, ...] = ()
  num_heads: tuple[int, ...] = ()
  num_kv_heads: tuple[int, ...] = ()
  head_dim: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # "decoder": causal LM; "funnel_encoder": bidirectional, pooled through
  # depth, with an upsampling decoder; "hourglass": causal funnel decoder.
  kind: Literal["decoder", "funnel_encoder", "hourglass"] = "decoder"
  num_layers: int = 2
  embed_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: Optional[int] = None  # None: embed_dim // num_heads
  mlp_dim: int = 512
  vocab_size: int = 384
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  scan_layers: bool = True
  # "none": keep activations; "full": recompute each block in the backward;
  # "dots": save matmul outputs only (jax.checkpoint_policies).
  remat: Literal["none", "full", "dots"] = "none"
  dtype: Literal["float32", "bfloat16"] = "bfloat16"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  attention: AttentionConfig = AttentionConfig()
  routing: RoutingConfig = RoutingConfig()
  funnel: FunnelConfig = FunnelConfig()
  per_layer: PerLayerConfig = PerLayerConfig()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # "default": the embedded corpus (the standard library's own .py files);
  # "text": plain text file(s) at `path` (a file, directory or glob);
  # "jsonl": JSON lines with a `text` field at `path`.
  source: Literal["default", "text", "jsonl"] = "default"
  path: Optional[str] = None
  seq_len: int = 128
  # "byte", "char" (vocabulary = sorted set of characters of the training
  # text), or a path to a SentencePiece .model file.
  tokenizer: str = "byte"
  eval_fraction: float = 0.1
  shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # Training objective (efficient_lm/training/losses.py): "next_token" =
  # cross-entropy of each next token over non-padding positions.
  objective: Literal["next_token", "mlm"] = "next_token"
  # mlm: fraction of non-padding tokens corrupted (BERT 80/10/10: mask id,
  # random token, unchanged); the loss counts corrupted positions only.
  mlm_rate: float = 0.15
  steps: int = 300
  batch_size: int = 16
  seed: int = 0
  learning_rate: float = 1e-3
  end_learning_rate: float = 1e-4
  warmup_steps: int = 20
  weight_decay: float = 0.1
  # Weight decay applies to matrices, never to norms; the token embedding
  # and an untied output head follow this switch.
  decay_embeddings: bool = True
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  z_loss: float = 0.0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  # Stop with an error if the loss is NaN/inf (the last good checkpoint
  # stays the latest one).
  stop_on_nan: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  # Slices (multi-slice TPU; processes where devices have no slice index):
  # data parallelism over the data-center network, the outermost mesh axis.
  # Parameters are replicated across slices, sharded by fsdp within one.
  dcn: int = 1
  # -1: every device not used by dcn * fsdp * tensor (resolved from the
  # device count before validation).
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (self.dcn, self.data, self.fsdp, self.tensor)

  @property
  def size(self) -> int:
    return self.dcn * self.data * self.fsdp * self.tensor


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  name: str = "run"
  # The TPU slice a pod-sized config is meant for (e.g. "v5p-32"): the
  # default of `--compile_only --topology`, and the slice the train
  # command's host-memory error points to. Empty: none.
  topology: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ------------------------------------------------------------- conversion


def default_config_dict(cls: type = Config) -> ml_collections.ConfigDict:
  """The dataclass defaults as a ConfigDict (configs/base.py starts here).

  Optional fields become typed placeholders so that command-line overrides
  (`--config.model.head_dim=64`) still parse with the right type.
  """
  hints = typing.get_type_hints(cls)
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    value = getattr(cls(), f.name)
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      out[f.name] = default_config_dict(tp)
    elif value is None:
      inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
      out[f.name] = ml_collections.config_dict.placeholder(inner)
    else:
      out[f.name] = value
  return out


def _check_value(path: str, value: Any, tp: Any) -> Any:
  """Checks `value` against annotation `tp`; returns the (coerced) value."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _check_value(path, value, arg)
      except ConfigError as e:
        errors.append(str(e))
    raise (
      errors[0]
      if len(errors) == 1
      else ConfigError(f"{path}={value!r}: expected one of {args}")
    )
  if origin is Literal:
    allowed = typing.get_args(tp)
    if value not in allowed:
      raise ConfigError(
        f"{path}={value!r}: expected one of {', '.join(map(repr, allowed))}"
      )
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}={value!r}: expected a bool")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(
        f"{path}={value!r}: expected an int, got {type(value).__name__}"
      )
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(
        f"{path}={value!r}: expected a float, got {type(value).__name__}"
      )
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(
        f"{path}={value!r}: expected a str, got {type(value).__name__}"
      )
    return value
  if origin is tuple:
    return _check_tuple(path, value, typing.get_args(tp))
  if dataclasses.is_dataclass(tp):
    return _to_dataclass(path, value, tp)
  raise TypeError(f"unsupported annotation {tp} at {path}")


def _check_tuple(path: str, value: Any, args: tuple[Any, ...]) -> tuple:
  """tuple[X, ...] or tuple[X, Y]: lists are accepted (config.json holds
  JSON arrays) and every element is checked."""
  if isinstance(value, str) or not isinstance(value, (tuple, list)):
    raise ConfigError(
      f"{path}={value!r}: expected a tuple, got {type(value).__name__}"
    )
  if len(args) == 2 and args[1] is Ellipsis:
    types_ = (args[0],) * len(value)
  else:
    types_ = args
    if len(value) != len(args):
      raise ConfigError(
        f"{path}={tuple(value)!r}: expected {len(args)} elements, got "
        f"{len(value)}"
      )
  return tuple(
    _check_value(f"{path}[{i}]", v, tp)
    for i, (v, tp) in enumerate(zip(value, types_))
  )


def _to_dataclass(path: str, value: Any, cls: type) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if not isinstance(value, dict):
    raise ConfigError(f"{path}={value!r}: expected a section (dict)")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(value) - fields)
  if unknown:
    where = f"{path}." if path else ""
    raise ConfigError(
      f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
      f"known keys of {path or 'the config'}: {', '.join(sorted(fields))}"
    )
  kwargs = {}
  for name, v in value.items():
    kwargs[name] = _check_value(
      f"{path}.{name}" if path else name, v, hints[name]
    )
  return cls(**kwargs)


def _mesh_product(
  mesh: MeshConfig, names: tuple[str, ...], prefix: str = "mesh."
) -> str:
  """`mesh.fsdp*mesh.tensor=2*1` for error messages. dcn is named only when
  it is not 1, so single-slice messages read as they always did."""
  names = tuple(n for n in names if n != "dcn" or mesh.dcn != 1)
  keys = "*".join(prefix + n for n in names)
  return f"{keys}={'*'.join(str(getattr(mesh, n)) for n in names)}"


def from_config_dict(
  cd: ml_collections.ConfigDict | dict, *, device_count: int | None = None
) -> Config:
  """Converts and validates. `device_count` enables the mesh-size check."""
  cfg = _to_dataclass("", cd, Config)
  mesh = cfg.mesh
  _positive("mesh.dcn", mesh.dcn)  # before it divides the device count
  if device_count is not None and mesh.data == -1:
    rest = mesh.dcn * mesh.fsdp * mesh.tensor
    if rest <= 0 or device_count % rest:
      raise ConfigError(
        f"{_mesh_product(mesh, ('dcn', 'fsdp', 'tensor'))} does not divide "
        f"the {device_count} available devices"
      )
    cfg = dataclasses.replace(
      cfg, mesh=dataclasses.replace(mesh, data=device_count // rest)
    )
  validate(cfg, device_count=device_count)
  return cfg


# ------------------------------------------------------------- validation


def _positive(path: str, value: int | float) -> None:
  if value <= 0:
    raise ConfigError(f"{path}={value}: expected a positive value")


def _validate_attention(a: AttentionConfig, num_layers: int) -> None:
  kinds = a.pattern_kinds
  unknown = [k for k in kinds if k not in ATTENTION_KINDS]
  if unknown:
    raise ConfigError(
      f"model.attention.pattern={a.pattern!r}: unknown kind {unknown[0]!r}; "
      f"expected comma-separated kinds from {', '.join(ATTENTION_KINDS)}"
    )
  if num_layers % len(kinds):
    raise ConfigError(
      f"model.attention.pattern={a.pattern!r} has {len(kinds)} kinds, which "
      f"does not divide model.num_layers={num_layers}"
    )
  where = (
    f"attention.kind={a.kind!r}"
    if not a.pattern.strip()
    else f"attention.pattern={a.pattern!r}"
  )
  if any(k != "dense" for k in kinds) and a.window <= 0:
    raise ConfigError(
      f"model.attention.window={a.window}: {where} needs a positive window "
      "(tokens including self)"
    )
  if "global_local" in kinds and a.num_global <= 0:
    raise ConfigError(
      f"model.attention.num_global={a.num_global}: {where} uses "
      "'global_local', which needs at least one global position"
    )
  if a.num_global < 0:
    raise ConfigError(
      f"model.attention.num_global={a.num_global}: expected >= 0"
    )
  if "block_sparse" in kinds:
    for name in ("block_size", "max_len"):
      _positive(f"model.attention.{name}", getattr(a, name))
    if a.num_random_blocks < 0:
      raise ConfigError(
        f"model.attention.num_random_blocks={a.num_random_blocks}: "
        "expected >= 0"
      )
  if "tglobal" in kinds:
    _positive("model.attention.tglobal_block", a.tglobal_block)
  for name in (
    "kv_lora_rank",
    "q_lora_rank",
    "rope_head_dim",
    "nope_head_dim",
    "v_head_dim",
  ):
    if getattr(a, name) < 0:
      raise ConfigError(
        f"model.attention.{name}={getattr(a, name)}: expected >= 0 (0 = "
        "derived from model.head_dim)"
      )
  if a.projection == "mla" and "tglobal" in kinds:
    raise ConfigError(
      f"model.attention.projection='mla' with {where}: MLA with tglobal "
      "summaries is not supported; use projection='qkv' for tglobal layers"
    )
  if a.rope_head_dim % 2:
    raise ConfigError(
      f"model.attention.rope_head_dim={a.rope_head_dim} must be even for RoPE"
    )


def validate(cfg: Config, *, device_count: int | None = None) -> None:
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
    ("mesh.tensor", mesh.tensor),
  ]:
    _positive(path, v)
  _validate_train(t)
  if mesh.data == 0 or mesh.data < -1:
    raise ConfigError(
      f"mesh.data={mesh.data}: expected a positive size or -1 (all "
      "remaining devices)"
    )
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
  _validate_attention(m.attention, m.num_layers)
  _validate_routing(m, d.seq_len)
  _validate_funnel(cfg)
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
  dp = mesh.dcn * max(mesh.data, 1) * mesh.fsdp
  if t.batch_size % dp:
    raise ConfigError(
      f"train.batch_size={t.batch_size} is not divisible by the "
      f"data-parallel size {_mesh_product(mesh, ('dcn', 'data', 'fsdp'))}="
      f"{dp}"
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
      f"mesh {_mesh_product(mesh, ('dcn', 'data', 'fsdp', 'tensor'), '')}="
      f"{mesh.size} does not match the {device_count} available devices"
    )


def _validate_routing(m: ModelConfig, seq_len: int) -> None:
  """model.routing (MoD / MoR) against the model it routes."""
  r = m.routing
  if r.kind == "none":
    return
  for name in ("aux_loss_weight", "router_z_loss"):
    if getattr(r, name) < 0:
      raise ConfigError(
        f"model.routing.{name}={getattr(r, name)}: expected >= 0 "
        "(0 turns it off)"
      )
  if r.kind == "mor":
    _validate_mor(m)
  else:
    _validate_mod(m, seq_len)


def _validate_mor(m: ModelConfig) -> None:
  """Mixture-of-recursions (models/mor.py, METHODS.md §1)."""
  r = m.routing
  n = r.num_recursions
  if m.kind != "decoder":
    raise ConfigError(
      f"model.routing.kind='mor' with model.kind={m.kind!r}: MoR routes the "
      "decoder's layers only; use model.kind='decoder'"
    )
  if n < 1:
    raise ConfigError(
      f"model.routing.num_recursions={n}: expected a positive count"
    )
  middle = r.sharing.startswith("middle_")
  recursed = m.num_layers - 2 if middle else m.num_layers
  if recursed < n or recursed % n:
    what = "num_layers - 2" if middle else "num_layers"
    raise ConfigError(
      f"model.num_layers={m.num_layers} does not fit "
      f"model.routing.sharing={r.sharing!r} with "
      f"model.routing.num_recursions={n}: {what} must be a positive "
      f"multiple of {n}"
    )
  if r.sharing.endswith("sequence"):
    raise ConfigError(
      f"model.routing.sharing={r.sharing!r}: MoR routing needs a contiguous "
      "recursion block; use 'cycle' or 'middle_cycle'"
    )
  if r.capacities:
    if len(r.capacities) != n:
      raise ConfigError(
        f"model.routing.capacities={tuple(r.capacities)} has "
        f"{len(r.capacities)} entries; expected one per recursion "
        f"(num_recursions={n})"
      )
    if not all(0 < c <= 1 for c in r.capacities):
      raise ConfigError(
        f"model.routing.capacities={tuple(r.capacities)}: expected "
        "fractions in (0, 1]"
      )
    if any(b > a for a, b in zip(r.capacities, r.capacities[1:])):
      raise ConfigError(
        f"model.routing.capacities={tuple(r.capacities)}: expected "
        "non-increasing (active sets are nested)"
      )
  if r.alpha <= 0:
    raise ConfigError(f"model.routing.alpha={r.alpha}: expected > 0")
  for name in ("balancing_weight", "bias_rate"):
    if getattr(r, name) < 0:
      raise ConfigError(
        f"model.routing.{name}={getattr(r, name)}: expected >= 0"
      )
  if r.kv == "recursive_sharing":
    if r.router == "expert_choice" and r.capacities and r.capacities[0] < 1:
      raise ConfigError(
        f"model.routing.capacities={tuple(r.capacities)}: "
        "kv='recursive_sharing' needs capacities[0] = 1 (every token "
        "writes the first step's keys/values)"
      )
    if (
      m.attention.projection != "qkv" or "tglobal" in m.attention.pattern_kinds
    ):
      raise ConfigError(
        "model.routing.kv='recursive_sharing' supports qkv attention "
        f"without tglobal (got projection={m.attention.projection!r}, "
        f"kinds={m.attention.pattern_kinds})"
      )
  kinds = m.attention.pattern_kinds
  start = 1 if middle else 0
  depth = recursed // n
  for i in range(recursed):
    a = kinds[(start + i) % len(kinds)]
    b = kinds[(start + i % depth) % len(kinds)]
    if a != b:
      raise ConfigError(
        f"model.attention.pattern={m.attention.pattern!r}: layer "
        f"{start + i} ({a}) shares parameters with layer "
        f"{start + i % depth} ({b}) under MoR; shared layers need one kind"
      )


def _validate_mod(m: ModelConfig, seq_len: int) -> None:
  """Mixture-of-depths: which blocks, how many tokens, loss weights."""
  r = m.routing
  if m.kind != "decoder":
    raise ConfigError(
      f"model.routing.kind='mod' with model.kind={m.kind!r}: mixture-of-"
      "depths routes the plain decoder's blocks only (model.kind='decoder')"
    )
  if not 1 <= r.every <= m.num_layers:
    raise ConfigError(
      f"model.routing.every={r.every}: expected 1 <= every <= "
      f"model.num_layers={m.num_layers} (every every-th block is routed)"
    )
  if not 0.0 < r.capacity <= 1.0:
    raise ConfigError(
      f"model.routing.capacity={r.capacity}: expected 0 < capacity <= 1 "
      "(the fraction of each sequence a routed block processes)"
    )
  if math.floor(r.capacity * seq_len + 1e-9) < 1:
    raise ConfigError(
      f"model.routing.capacity={r.capacity} selects no token of "
      f"data.seq_len={seq_len}: expected capacity * seq_len >= 1"
    )
  if "tglobal" in m.attention.pattern_kinds:
    raise ConfigError(
      "model.routing.kind='mod' with tglobal attention is not supported: "
      "tglobal summaries over a routed subset are not defined here"
    )


def _validate_funnel(cfg: Config) -> None:
  """model.kind funnel_encoder / hourglass, model.funnel and the objective."""
  m, t = cfg.model, cfg.train
  if m.kind == "hourglass":
    _validate_hourglass(cfg)
  if t.objective == "mlm" and m.kind != "funnel_encoder":
    raise ConfigError(
      f"train.objective='mlm' needs a bidirectional model "
      f"(model.kind='funnel_encoder'); model.kind={m.kind!r} is causal"
    )
  if t.objective == "next_token" and m.kind == "funnel_encoder":
    raise ConfigError(
      "train.objective='next_token' with model.kind='funnel_encoder': a "
      "bidirectional model sees the tokens it predicts; use "
      "train.objective='mlm'"
    )
  if t.objective == "mlm":
    if not 0 < t.mlm_rate <= 1:
      raise ConfigError(f"train.mlm_rate={t.mlm_rate}: expected 0 < x <= 1")
    # The byte tokenizer's mask id is 259, one past its vocabulary
    # (data/tokenizers.py); other tokenizers are checked once built.
    if cfg.data.tokenizer == "byte" and m.vocab_size < 260:
      raise ConfigError(
        f"model.vocab_size={m.vocab_size} does not cover the byte "
        "tokenizer's mask id 259 (train.objective='mlm'): expected >= 260"
      )
  if m.kind != "funnel_encoder":
    return
  f = m.funnel
  if not f.stages or any(n <= 0 for n in f.stages):
    raise ConfigError(
      f"model.funnel.stages={f.stages}: expected one or more positive "
      "layer counts"
    )
  if sum(f.stages) != m.num_layers:
    raise ConfigError(
      f"model.funnel.stages={f.stages} sum to {sum(f.stages)}, not "
      f"model.num_layers={m.num_layers}"
    )
  _positive("model.funnel.factor", f.factor)
  if f.decoder_layers < 0:
    raise ConfigError(
      f"model.funnel.decoder_layers={f.decoder_layers}: expected >= 0"
    )
  stride = f.factor ** (len(f.stages) - 1)
  if cfg.data.seq_len % stride:
    raise ConfigError(
      f"data.seq_len={cfg.data.seq_len} is not divisible by "
      f"model.funnel.factor**(stages-1)={f.factor}**{len(f.stages) - 1}="
      f"{stride}"
    )
  kinds = m.attention.pattern_kinds
  if "block_sparse" in kinds:
    raise ConfigError(
      "model.attention 'block_sparse' with model.kind='funnel_encoder' is "
      "not supported (its random-block table is drawn over unpooled "
      "positions)"
    )
  if "tglobal" in kinds and m.attention.tglobal_block % stride:
    raise ConfigError(
      f"model.attention.tglobal_block={m.attention.tglobal_block} is not a "
      f"multiple of the deepest funnel stride {stride} (a pooled row "
      "stands for that many positions)"
    )


def _validate_hourglass(cfg: Config) -> None:
  """model.funnel for the causal funnel: (pre, shortened, post) layers, a
  factor dividing the sequence, attention kinds the slots can use."""
  m, f = cfg.model, cfg.model.funnel
  stages = tuple(f.stages)
  if len(stages) != 3:
    raise ConfigError(
      f"model.funnel.stages={stages}: hourglass expects 3 layer counts "
      "(pre, shortened, post)"
    )
  if min(stages) < 0 or stages[1] < 1:
    raise ConfigError(
      f"model.funnel.stages={stages}: expected counts >= 0 and at least one "
      "shortened layer"
    )
  if sum(stages) != m.num_layers:
    raise ConfigError(
      f"model.funnel.stages={stages} sum to {sum(stages)}, not "
      f"model.num_layers={m.num_layers}"
    )
  if f.factor < 1:
    raise ConfigError(f"model.funnel.factor={f.factor}: expected >= 1")
  if cfg.data.seq_len % f.factor:
    raise ConfigError(
      f"data.seq_len={cfg.data.seq_len} is not divisible by "
      f"model.funnel.factor={f.factor}"
    )
  kinds = m.attention.pattern_kinds
  for i in range(stages[0], stages[0] + stages[1]):
    if kinds[i % len(kinds)] == "tglobal" and f.factor > 1:
      raise ConfigError(
        f"layer {i} is shortened and tglobal: its blocks count tokens at "
        f"unit position spacing, which slots {f.factor} positions apart "
        "never fill; use another kind for the shortened layers"
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
