"""Model rules: attention kinds and patterns, MoD / MoR routing, the funnel
and hourglass shapes, each checked against the model it configures."""

from __future__ import annotations

import importlib.util
import itertools

from efficient_lm.config.errors import ConfigError, _positive
from efficient_lm.config.schema import (
  ATTENTION_KINDS,
  AttentionConfig,
  Config,
  ModelConfig,
  RoutingConfig,
)


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


def _validate_family_switches(m: ModelConfig) -> None:
  """The Hugging Face family switches (Llama 3 RoPE scaling, Qwen biases
  and q/k norms, Gemma caps, scalars and local RoPE base) on this model."""
  a = m.attention
  for path, cap in [
    ("model.final_logits_soft_cap", m.final_logits_soft_cap),
    ("model.attention.logits_soft_cap", a.logits_soft_cap),
    ("model.attention.query_pre_attn_scalar", a.query_pre_attn_scalar),
    ("model.rope_local_theta", m.rope_local_theta),
  ]:
    if cap is not None and cap <= 0:
      raise ConfigError(f"{path}={cap}: expected a positive value or None")
  _positive("model.rope_scaling_factor", m.rope_scaling_factor)
  if m.rope_scaling == "llama3":
    _positive("model.rope_original_max_len", m.rope_original_max_len)
    _positive("model.rope_low_freq_factor", m.rope_low_freq_factor)
    if m.rope_high_freq_factor <= m.rope_low_freq_factor:
      raise ConfigError(
        f"model.rope_high_freq_factor={m.rope_high_freq_factor}: "
        "rope_scaling='llama3' needs it above "
        f"model.rope_low_freq_factor={m.rope_low_freq_factor}"
      )
  # A local base no layer uses is a mistake, not a no-op: refused.
  if m.rope_local_theta is not None and "sliding_window" not in a.pattern_kinds:
    raise ConfigError(
      f"model.rope_local_theta={m.rope_local_theta}: no layer is "
      "'sliding_window' (attention.kind / pattern); it is the RoPE base of "
      "those layers only, so leave it None"
    )
  if a.projection == "mla":
    for name, default in [
      ("qk_norm", False),
      ("qkv_bias", False),
      ("query_pre_attn_scalar", None),
    ]:
      if getattr(a, name) != default:
        raise ConfigError(
          f"model.attention.{name}={getattr(a, name)!r} with "
          "projection='mla': MLA has no per-head q/k/v projections to norm "
          f"or bias and its own scale; leave it {default!r} or use "
          "projection='qkv'"
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
  """Mixture-of-recursions (models/mor.py, docs/routing.md)."""
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
  r.check_fit(m.num_layers)
  if r.sharing.endswith("sequence"):
    raise ConfigError(
      f"model.routing.sharing={r.sharing!r}: MoR routing needs a contiguous "
      "recursion block; use 'cycle' or 'middle_cycle'"
    )
  _validate_mor_capacities(r)
  if r.alpha <= 0:
    raise ConfigError(f"model.routing.alpha={r.alpha}: expected > 0")
  for name in ("balancing_weight", "bias_rate"):
    if getattr(r, name) < 0:
      raise ConfigError(
        f"model.routing.{name}={getattr(r, name)}: expected >= 0"
      )
  if "tglobal" in m.attention.pattern_kinds:
    raise ConfigError(
      "model.routing.kind='mor' with tglobal attention is not supported: a "
      "recursion step that routes fewer than all tokens would give the "
      "shared tglobal layer no complete block to summarise"
    )
  if r.kv == "recursive_sharing":
    if r.router == "expert_choice" and r.resolved_capacities[0] < 1:
      raise ConfigError(
        f"model.routing.capacities={tuple(r.capacities)}: "
        "kv='recursive_sharing' needs capacities[0] = 1 (every token "
        "writes the first step's keys/values)"
      )
    if r.router == "token_choice" and r.resolved_token_choice_capacities[0] < 1:
      raise ConfigError(
        "model.routing.token_choice_capacities="
        f"{tuple(r.token_choice_capacities)}: kv='recursive_sharing' needs "
        "token_choice_capacities[0] = 1 (every token writes the first "
        "step's keys/values)"
      )
    if (
      m.attention.projection != "qkv" or "tglobal" in m.attention.pattern_kinds
    ):
      raise ConfigError(
        "model.routing.kv='recursive_sharing' supports qkv attention "
        f"without tglobal (got projection={m.attention.projection!r}, "
        f"kinds={m.attention.pattern_kinds})"
      )
  _validate_mor_kinds(m)


def _validate_mor_capacities(r: RoutingConfig) -> None:
  """Explicit capacities (expert-choice `capacities`, token-choice
  `token_choice_capacities`): one per step, fractions, non-increasing."""
  for name in ("capacities", "token_choice_capacities"):
    caps = tuple(getattr(r, name))
    if not caps:
      continue
    key = f"model.routing.{name}={caps}"
    if len(caps) != r.num_recursions:
      raise ConfigError(
        f"{key} has {len(caps)} entries; expected one per recursion "
        f"(num_recursions={r.num_recursions})"
      )
    if not all(0 < c <= 1 for c in caps):
      raise ConfigError(f"{key}: expected fractions in (0, 1]")
    if any(b > a for a, b in itertools.pairwise(caps)):
      raise ConfigError(
        f"{key}: expected non-increasing (active sets are nested)"
      )
  if r.token_choice_capacities and r.router != "token_choice":
    raise ConfigError(
      f"model.routing.token_choice_capacities="
      f"{tuple(r.token_choice_capacities)} with router={r.router!r}: "
      "expected router='token_choice' (expert-choice steps take "
      "model.routing.capacities)"
    )


def _validate_mor_kinds(m: ModelConfig) -> None:
  """Layers sharing parameters (the same unique layer of the layer map)
  need one attention kind; each is compared with the first layer of its
  unique layer."""
  a = m.attention
  mapping = m.routing.layer_map(m.num_layers)
  for layer, unique in enumerate(mapping):
    first = mapping.index(unique)
    if a.layer_kind(layer) != a.layer_kind(first):
      raise ConfigError(
        f"model.attention.pattern={a.pattern!r}: layer "
        f"{layer} ({a.layer_kind(layer)}) shares parameters with layer "
        f"{first} ({a.layer_kind(first)}) under MoR; shared layers need one "
        "kind"
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
  if r.mod_tokens(seq_len) < 1:
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
  stride = f.deepest_stride
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
  for i in range(stages[0], stages[0] + stages[1]):
    if m.attention.layer_kind(i) == "tglobal" and f.factor > 1:
      raise ConfigError(
        f"layer {i} is shortened and tglobal: its blocks count tokens at "
        f"unit position spacing, which slots {f.factor} positions apart "
        "never fill; use another kind for the shortened layers"
      )


def _validate_per_layer(m: ModelConfig, tensor: int) -> None:
  """model.per_layer: one positive entry per layer of the plan; each
  layer's heads whole GQA groups and even head dims; what mesh.tensor
  splits divisible by it."""
  n = m.plan_length
  for name in ("mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
    values = getattr(m.per_layer, name)
    if values and len(values) != n:
      raise ConfigError(
        f"model.per_layer.{name}={tuple(values)} has {len(values)} entries; "
        f"expected one per layer of the plan ({n})"
      )
    if any(v <= 0 for v in values):
      raise ConfigError(
        f"model.per_layer.{name}={tuple(values)}: expected positive values"
      )
  p = m.per_layer
  for i in range(n):  # the uniform values are validated on their own
    s = m.layer_shapes(i)
    where = f"layer {i} (model.per_layer)"
    if (p.num_heads or p.num_kv_heads) and s["num_heads"] % s["num_kv_heads"]:
      raise ConfigError(
        f"{where}: num_heads={s['num_heads']} is not divisible by "
        f"num_kv_heads={s['num_kv_heads']} (GQA groups must be whole)"
      )
    if p.head_dim and s["head_dim"] % 2:
      raise ConfigError(f"{where}: head_dim={s['head_dim']} must be even")
    for key in ("num_kv_heads", "mlp_dim"):
      if getattr(p, key) and s[key] % tensor:
        raise ConfigError(
          f"{where}: {key}={s[key]} is not divisible by mesh.tensor={tensor}"
        )
  if m.routing.kind == "mor":  # layers sharing parameters: one shape
    mapping = m.routing.layer_map(m.num_layers)
    for layer, unique in enumerate(mapping):
      first = mapping.index(unique)
      if m.layer_shapes(layer) != m.layer_shapes(first):
        raise ConfigError(
          f"model.per_layer: layer {layer} shares parameters with layer "
          f"{first} under MoR; shared layers need the same shapes "
          f"({m.layer_shapes(layer)} vs {m.layer_shapes(first)})"
        )


def _validate_moe(m: ModelConfig) -> None:
  """model.moe: counts and weights in range, top_k within the experts,
  MoE only where its layers can take it (a plain decoder's MLPs)."""
  e = m.moe
  if e.num_experts < 0:
    raise ConfigError(f"model.moe.num_experts={e.num_experts}: expected >= 0")
  if e.num_experts == 0:
    return
  if not 1 <= e.top_k <= e.num_experts:
    raise ConfigError(
      f"model.moe.top_k={e.top_k}: expected 1 <= top_k <= "
      f"model.moe.num_experts={e.num_experts}"
    )
  if e.capacity_factor < 0:
    raise ConfigError(
      f"model.moe.capacity_factor={e.capacity_factor}: expected >= 0 "
      "(0 = dropless)"
    )
  for name in (
    "num_shared_experts",
    "expert_mlp_dim",
    "first_dense",
    "aux_loss_weight",
    "bias_rate",
    "router_z_loss",
  ):
    if getattr(e, name) < 0:
      raise ConfigError(f"model.moe.{name}={getattr(e, name)}: expected >= 0")
  if e.every < 1:
    raise ConfigError(f"model.moe.every={e.every}: expected >= 1")
  if e.impl == "tokamax" and importlib.util.find_spec("tokamax") is None:
    raise ConfigError(
      "model.moe.impl='tokamax': the tokamax package is not installed "
      "(pip install -e '.[tokamax]'), or use model.moe.impl='xla'"
    )
  if not any(e.moe_layer(i) for i in range(m.num_layers)):
    raise ConfigError(
      f"model.moe.first_dense={e.first_dense} with model.num_layers="
      f"{m.num_layers}: no layer is MoE"
    )
  if m.kind != "decoder":
    raise ConfigError(
      f"model.moe.num_experts={e.num_experts} with model.kind={m.kind!r}: "
      "MoE MLPs are built for model.kind='decoder' only"
    )
  if m.routing.kind != "none":
    raise ConfigError(
      f"model.moe.num_experts={e.num_experts} with model.routing.kind="
      f"{m.routing.kind!r}: MoE inside routed (MoD / MoR) blocks is not "
      "supported"
    )
