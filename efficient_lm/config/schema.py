"""The configuration schema: frozen dataclasses, one per config section.

Every key, its type (Literal kinds included) and its default is written down
here once, with a comment saying what it means. Reading a ConfigDict into
these dataclasses is convert.py's work; the checks across values are
validation.py's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Literal

from efficient_lm.config.errors import ConfigError

# ----------------------------------------------------------------- sections


AttentionKind = Literal[
  "dense", "sliding_window", "global_local", "block_sparse", "tglobal"
]
ATTENTION_KINDS: tuple[str, ...] = typing.get_args(AttentionKind)
MoRSharing = Literal["cycle", "sequence", "middle_cycle", "middle_sequence"]


class LayerShapes(typing.TypedDict):
  """`ModelConfig.layer_shapes`: one layer's shapes, as LayerSpec keys."""

  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int


# floor(c * n) is taken with this slack so that binary rounding never loses
# a token: 0.29 * 100 is 28.999999999999996 and 2/3 * 6 is 3.9999999999999996
# in floats.
FLOOR_EPS = 1e-6


def capacity_slots(capacity: float, n: int) -> int:
  """C = max(1, ceil(capacity * n)), at most n: the static slots of a
  capacity-bounded step (MoR token-choice), room for at least the
  capacity's share of n."""
  return max(1, min(n, math.ceil(capacity * n - FLOOR_EPS)))


def capacity_tokens(capacity: float, n: int, minimum: int = 0) -> int:
  """k = max(minimum, floor(capacity * n)), at most n: the tokens a routing
  step of this capacity takes from n (MoD: minimum 0, MoR: minimum 1;
  models/routing.py applies the same rule to arrays)."""
  return max(minimum, min(n, math.floor(capacity * n + FLOOR_EPS)))


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  # "dense": full attention; "sliding_window": a window of `window` tokens
  # including self; "global_local": sliding window plus the first
  # `num_global` positions visible to every token (in an encoder they also
  # see every token: global rows); "block_sparse": BigBird,
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
  logits_soft_cap: float | None = None
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
  # Qwen3 / Gemma 3: an RMSNorm over head_dim on each head's queries and
  # keys (modules `q_norm`, `k_norm`, scale [head_dim]), before RoPE; it
  # follows model.norm_plus_one like every other norm. projection='qkv'.
  qk_norm: bool = False
  # Qwen2: biases on the q, k and v projections (params `q_bias_HK`,
  # `k_bias_GK`, `v_bias_GK`); never on the output projection.
  # projection='qkv'.
  qkv_bias: bool = False
  # Gemma 2 / 3: the attention scale is query_pre_attn_scalar ** -0.5
  # instead of head_dim ** -0.5. None: head_dim ** -0.5. projection='qkv'.
  query_pre_attn_scalar: float | None = None

  @property
  def pattern_kinds(self) -> tuple[str, ...]:
    """The kinds the pattern cycles through (just `kind` without one)."""
    if not self.pattern.strip():
      return (self.kind,)
    return tuple(k.strip() for k in self.pattern.split(","))

  def layer_kind(self, layer: int) -> AttentionKind:
    """The attention kind of layer `layer` (0-based): the pattern cycles
    over the layers (its names are kinds once validation has passed)."""
    kinds = self.pattern_kinds
    return typing.cast(AttentionKind, kinds[layer % len(kinds)])


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
  # "none": every token through every layer; "mod": mixture-of-depths
  # (routed blocks process the top `capacity` of each sequence); "mor":
  # mixture-of-recursions (shared layers applied `num_recursions` times, a
  # router choosing each token's depth). docs/routing.md.
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
  sharing: MoRSharing = "middle_cycle"
  router: Literal["expert_choice", "token_choice"] = "expert_choice"
  # Expert-choice capacity per recursion step; empty = (N_r - r + 1) / N_r.
  capacities: tuple[float, ...] = ()
  # Token-choice capacity per recursion step (training only): step r runs
  # on at most C_r = ceil(c_r * T) gathered tokens per row, earlier
  # positions first; an active token past C_r exits at step r - 1.
  # Empty = 1.0 each: every step runs masked over all T (no gather).
  token_choice_capacities: tuple[float, ...] = ()
  # Gate scale: g = alpha * sigmoid(z) (expert-choice).
  alpha: float = 0.1
  # token_choice load balancing: "aux_loss" (weight `balancing_weight`) or
  # "loss_free" (a non-trainable per-depth bias moved by `bias_rate`).
  balancing: Literal["aux_loss", "loss_free"] = "aux_loss"
  balancing_weight: float = 0.1
  bias_rate: float = 0.001
  # How a selected token's state is updated (docs/routing.md, MoR step 5):
  # "paper": H + g * Block(H) (the block's own residual included);
  # "residual_delta": H + g * (Block(H) - H), the MoD form. Default "paper":
  # the released code's rule, kept for reproduction (the residual stream
  # grows by (1 + g) per step). token_choice applies it once, at a token's
  # last step, against the recursions' input (models/mor.py).
  update_rule: Literal["paper", "residual_delta"] = "paper"
  # "recursion_wise": step r attends only among the tokens active at r;
  # "recursive_sharing": the first step's keys/values serve every step.
  kv: Literal["recursion_wise", "recursive_sharing"] = "recursion_wise"

  # The rules below are stated once here: validation and the models
  # (models/stack.py, mor.py, flops.py) use them.

  def routes_layer(self, layer: int) -> bool:
    """MoD: layer `layer` (0-based) is routed, every `every`-th block
    counting from 1: (layer + 1) % every == 0. False unless kind 'mod'."""
    return self.kind == "mod" and (layer + 1) % self.every == 0

  def mod_tokens(self, seq_len: int) -> int:
    """MoD: k = floor(capacity * seq_len), the tokens a routed block
    processes per row (`capacity_tokens`)."""
    return capacity_tokens(self.capacity, seq_len)

  @property
  def unique_ends(self) -> bool:
    """MoR: the middle_* schemes keep the first and last layers unique,
    outside the recursion."""
    return self.sharing.startswith("middle_")

  def recursed_layers(self, num_layers: int) -> int:
    """MoR: virtual layers inside the recursion (all, or all but the first
    and last: `unique_ends`)."""
    return num_layers - 2 if self.unique_ends else num_layers

  def fits(self, num_layers: int) -> bool:
    """MoR: recursed_layers(num_layers) is a positive multiple of
    num_recursions."""
    m, n = self.recursed_layers(num_layers), self.num_recursions
    return n >= 1 and m >= n and m % n == 0

  def check_fit(self, num_layers: int) -> None:
    """Raises ConfigError unless `fits(num_layers)`."""
    if self.fits(num_layers):
      return
    n = self.num_recursions
    what = "num_layers - 2" if self.unique_ends else "num_layers"
    raise ConfigError(
      f"model.num_layers={num_layers} does not fit "
      f"model.routing.sharing={self.sharing!r} with "
      f"model.routing.num_recursions={n}: {what} must be a positive "
      f"multiple of {n}"
    )

  def recursion_depth(self, num_layers: int) -> int:
    """MoR: D, the unique layers of the recursion block applied
    num_recursions times (recursed_layers / num_recursions). Raises
    ConfigError unless `fits(num_layers)`."""
    self.check_fit(num_layers)
    return self.recursed_layers(num_layers) // self.num_recursions

  def layer_map(self, num_layers: int) -> tuple[int, ...]:
    """MoR: the unique layer each virtual layer uses (docs/routing.md):
    cycle l -> l mod D; sequence l -> l // N_r; middle_*: the first layer
    is 0, the last D + 1, the middle ones 1 + (cycle or sequence map of
    l - 1). Raises ConfigError unless `fits(num_layers)`."""
    d = self.recursion_depth(num_layers)
    m, n = self.recursed_layers(num_layers), self.num_recursions
    if self.sharing.endswith("cycle"):
      inner = [i % d for i in range(m)]
    else:
      inner = [i // n for i in range(m)]
    if self.unique_ends:
      return (0, *[1 + u for u in inner], d + 1)
    return tuple(inner)

  @property
  def resolved_capacities(self) -> tuple[float, ...]:
    """MoR: expert-choice capacity c_r of each recursion step r = 1..N_r,
    `capacities` or by default (N_r - r + 1) / N_r."""
    n = self.num_recursions
    return tuple(self.capacities) or tuple((n - i) / n for i in range(n))

  @property
  def resolved_token_choice_capacities(self) -> tuple[float, ...]:
    """MoR token-choice: capacity c_r of each recursion step,
    `token_choice_capacities` or by default 1.0 (no gather)."""
    n = self.num_recursions
    return tuple(self.token_choice_capacities) or (1.0,) * n

  def token_choice_slots(self, seq_len: int) -> tuple[int, ...]:
    """MoR token-choice: C_r = max(1, ceil(c_r * seq_len)) slots per row
    at each step (seq_len: a step of capacity 1 runs all tokens)."""
    return tuple(
      capacity_slots(c, seq_len) for c in self.resolved_token_choice_capacities
    )


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  # Mixture-of-experts MLPs (models/moe.py). 0 experts: no MoE, every MLP
  # dense.
  num_experts: int = 0
  # Routed experts per token.
  top_k: int = 2
  # Experts every token goes through besides the routed ones (DeepSeek),
  # each of width expert_mlp_dim.
  num_shared_experts: int = 0
  # Hidden width F of each expert (routed and shared); 0: the layer's own
  # mlp_dim.
  expert_mlp_dim: int = 0
  # Which layers are MoE: layers i >= first_dense with
  # (i - first_dense) % every == 0 (DeepSeek: first_dense=1..3, every=1).
  every: int = 1
  first_dense: int = 0
  # "softmax": weights = softmax over the experts, the top k kept
  # (Switch / Mixtral keep them unnormalised: softmax over all E);
  # "sigmoid": DeepSeek-V3, affinities sigmoid(logit), the top k's
  # normalised to sum to 1.
  router: Literal["softmax", "sigmoid"] = "softmax"
  # 0: dropless (every assignment computed, tokens sorted by expert and a
  # grouped matmul). > 0: each expert takes at most
  # ceil(capacity_factor * T * top_k / num_experts) assignments per
  # sequence row, earlier positions first (a token's first choice before
  # its second at the same position); the rest are dropped (the token's
  # residual passes through for that choice). Static shapes.
  capacity_factor: float = 0.0
  # "aux_loss": the Switch / GShard loss w * E * sum_e f_e P_e
  # (`loss/moe_balance`, weight aux_loss_weight); "loss_free": DeepSeek-V3,
  # a non-trainable per-expert bias added to the scores for selection only,
  # moved by bias_rate * sign(mean load - load) in every forward without a
  # cache (checkpointed model state); "none".
  balancing: Literal["aux_loss", "loss_free", "none"] = "aux_loss"
  aux_loss_weight: float = 0.01
  bias_rate: float = 0.001
  # Router z-loss weight (mean squared logsumexp of the router logits,
  # `loss/moe_router_z`); 0 = off.
  router_z_loss: float = 0.0
  # The dropless grouped matmul: "xla" jax.lax.ragged_dot; "tokamax" the
  # tokamax package's ragged_dot (the tokamax extra), which picks its
  # Mosaic TPU / GPU kernel on those backends and its XLA path elsewhere
  # (CPU: the same results as "xla"). A resume may change it.
  impl: Literal["xla", "tokamax"] = "xla"

  def moe_layer(self, layer: int) -> bool:
    """Layer `layer` (0-based) has an MoE MLP."""
    return (
      self.num_experts > 0
      and layer >= self.first_dense
      and (layer - self.first_dense) % self.every == 0
    )

  def expert_width(self, mlp_dim: int) -> int:
    """F of one expert in a layer whose dense width is `mlp_dim`."""
    return self.expert_mlp_dim or mlp_dim


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

  @property
  def deepest_stride(self) -> int:
    """funnel_encoder: positions one row of the last stage stands for,
    factor ** (len(stages) - 1)."""
    return self.factor ** (len(self.stages) - 1)


@dataclasses.dataclass(frozen=True)
class PerLayerConfig:
  # Per-layer shapes (a pruned or imported model whose layers differ): one
  # entry per layer of the layer plan (model.num_layers, then the funnel
  # encoder's decoder_layers), e.g. mlp_dim=(96, 128, 128, 64). Empty: every
  # layer takes the uniform model.* value (head_dim: model.head_dim, or
  # embed_dim // num_heads).
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
  head_dim: int | None = None  # None: embed_dim // num_heads
  mlp_dim: int = 512
  vocab_size: int = 384
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  # Gemma: every RMSNorm (block norms, final norm, q/k norms) stores w,
  # initialised to 0, and scales by (1 + w); the math runs in float32 and
  # the param keeps its name `scale`. False: x * scale, scale initialised
  # to 1 (Llama, Mistral, Qwen).
  norm_plus_one: bool = False
  # Gemma 2 / 3 "sandwich" norms: an RMSNorm on the attention output
  # (`post_attn_norm`) and on the MLP output (`post_mlp_norm`), applied to
  # the branch before the residual add.
  post_norms: bool = False
  # Gate activation of the gated MLP: "silu" = SwiGLU (Llama, Mistral,
  # Qwen); "gelu_tanh" = GeGLU with the tanh-approximate GELU (Gemma).
  mlp_activation: Literal["silu", "gelu_tanh"] = "silu"
  # Gemma: token embeddings times sqrt(embed_dim), that factor rounded to
  # the compute dtype first (as Hugging Face does). The output head (tied
  # or not) is unscaled.
  embed_scale: bool = False
  # Gemma 2: cap * tanh(logits / cap) on the float32 output logits. None:
  # no cap. (Attention logits: attention.logits_soft_cap.)
  final_logits_soft_cap: float | None = None
  # Gemma 3 (rope_local_base_freq): the RoPE base of the 'sliding_window'
  # layers, which then get no rope_scaling. None: every layer uses
  # rope_theta. Needs at least one 'sliding_window' layer.
  rope_local_theta: float | None = None
  # RoPE frequency scaling of the layers on rope_theta: "none"; "linear"
  # (Gemma 3 global layers; position interpolation): inverse frequencies
  # divided by rope_scaling_factor; "llama3" (Llama 3.1 / 3.2): wavelengths
  # longer than rope_original_max_len / rope_low_freq_factor are divided by
  # the factor, those shorter than rope_original_max_len /
  # rope_high_freq_factor kept, the band between interpolated smoothly.
  rope_scaling: Literal["none", "linear", "llama3"] = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  scan_layers: bool = True
  # "none": keep activations; "full": recompute each block in the backward;
  # "dots": save matmul outputs only (jax.checkpoint_policies).
  remat: Literal["none", "full", "dots"] = "none"
  dtype: Literal["float32", "bfloat16"] = "bfloat16"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  attention: AttentionConfig = AttentionConfig()
  routing: RoutingConfig = RoutingConfig()
  moe: MoEConfig = MoEConfig()
  funnel: FunnelConfig = FunnelConfig()
  per_layer: PerLayerConfig = PerLayerConfig()
  # The form of the stored weights: "" float; a quantization scheme
  # (config/schemes.py: int8_weights, int4_weights[:GROUP], int8_dynamic,
  # fp8): the layers' matmul weights are qwix's integer (or fp8) values and
  # scales, written by `python -m efficient_lm.quantize`
  # (models/quantization.py). Such a run is evaluated and sampled, not
  # trained.
  quantization: str = ""

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def plan_length(self) -> int:
    """Layers in the layer plan: num_layers, then a funnel encoder's
    upsampling decoder_layers."""
    extra = self.funnel.decoder_layers if self.kind == "funnel_encoder" else 0
    return self.num_layers + extra

  def layer_shapes(self, layer: int) -> LayerShapes:
    """Layer `layer`'s shapes (0-based, in plan order): `per_layer` where it
    names them, the uniform values otherwise."""
    p = self.per_layer

    def pick(values: tuple[int, ...], default: int) -> int:
      return values[layer] if values else default

    return {
      "mlp_dim": pick(p.mlp_dim, self.mlp_dim),
      "num_heads": pick(p.num_heads, self.num_heads),
      "num_kv_heads": pick(p.num_kv_heads, self.num_kv_heads),
      "head_dim": pick(p.head_dim, self.resolved_head_dim),
    }


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # "default": the embedded corpus (the standard library's own .py files);
  # "text": plain text file(s) at `path` (a file, directory or glob);
  # "jsonl": JSON lines with a `text` field at `path`.
  source: Literal["default", "text", "jsonl"] = "default"
  path: str | None = None
  seq_len: int = 128
  # "byte", "char" (vocabulary = sorted set of characters of the training
  # text), a path to a SentencePiece .model file, or a path to a Hugging
  # Face tokenizer.json (*.json; bos/eos from the config.json or
  # tokenizer_config.json beside it).
  tokenizer: str = "byte"
  eval_fraction: float = 0.1
  shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  # train.objective="distill": a trained run directory (any run: trained
  # here, imported, pruned) with this run's tokenizer, run frozen beside the
  # student in the same step (training/distill.py).
  teacher: str = ""
  # loss = alpha * T^2 * KL(teacher || student, both at temperature T)
  #        + (1 - alpha) * next-token cross-entropy, over the same
  #        non-padding positions.
  alpha: float = 0.5
  temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # Training objective (efficient_lm/training/losses.py): "next_token" =
  # cross-entropy of each next token over non-padding positions; "distill"
  # = next-token training against a teacher's distribution (`distill`).
  objective: Literal["next_token", "mlm", "distill"] = "next_token"
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
  distill: DistillConfig = DistillConfig()
  # Quantization-aware training: "" off; a scheme (config/schemes.py) whose
  # quantization qwix simulates in the forward pass (straight-through
  # gradients to the float weights, models/quantization.py). The run is
  # then quantized with the same scheme for serving.
  quantization: str = ""


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
  # Expert parallelism (model.moe): the routed experts are split over this
  # axis and tokens exchanged by all-to-all; it also splits the batch, like
  # data, for everything else.
  expert: int = 1
  tensor: int = 1

  @property
  def shape(self) -> tuple[int, int, int, int, int]:
    return (self.dcn, self.data, self.fsdp, self.expert, self.tensor)

  @property
  def size(self) -> int:
    return self.dcn * self.data * self.fsdp * self.expert * self.tensor


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
