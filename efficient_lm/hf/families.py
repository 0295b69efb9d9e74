"""Hugging Face architectures <-> our model config, one Family per class.

`model_keys(hf)` reads a config.json dict into our `model.*` keys (a plain
nested dict for the config boundary), refusing in one line every key whose
value we cannot honour. `hf_config(model, arch, base)` writes the reverse;
`choose(model, preferred)` picks the architecture an export writes and
`export_problem` says why a model has none.

Both readings of a config.json are accepted: transformers 5's
`rope_parameters` (per layer type for Gemma 3) and the older top-level
`rope_theta` / `rope_scaling` / `rope_local_base_freq` of checkpoints on
the Hub. Exports are written in transformers 5's form.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from efficient_lm.config import ModelConfig
from efficient_lm.hf.errors import ConvertError


@dataclasses.dataclass(frozen=True)
class Family:
  architecture: str
  model_type: str
  # Gemma: (1 + w) norms, sandwich norms, sqrt(D) embeddings, GeGLU,
  # query_pre_attn_scalar, soft caps; HF names the MLP norms differently.
  gemma: bool = False
  qk_norm: bool = False  # q_norm / k_norm on every layer (Qwen3, Gemma 3)
  qkv_bias: bool = False  # q/k/v biases on every layer (Qwen2)
  # The config class has a head_dim field (Qwen2's has none, but its
  # attention reads one that config.json sets).
  head_dim_key: bool = True
  sliding: str = "none"  # "none", "all" (Mistral), "per_layer" (layer_types)
  local_rope: bool = False  # Gemma 3: sliding layers have their own RoPE
  tie_default: bool = False


FAMILIES = {
  f.architecture: f
  for f in (
    Family("LlamaForCausalLM", "llama"),
    Family("MistralForCausalLM", "mistral", sliding="all"),
    Family(
      "Qwen2ForCausalLM",
      "qwen2",
      qkv_bias=True,
      head_dim_key=False,
      sliding="per_layer",
    ),
    Family("Qwen3ForCausalLM", "qwen3", qk_norm=True, sliding="per_layer"),
    Family(
      "Gemma2ForCausalLM",
      "gemma2",
      gemma=True,
      sliding="per_layer",
      tie_default=True,
    ),
    Family(
      "Gemma3ForCausalLM",
      "gemma3_text",
      gemma=True,
      qk_norm=True,
      sliding="per_layer",
      local_rope=True,
      tie_default=True,
    ),
  )
}
SUPPORTED = ", ".join(FAMILIES)

_ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu_pytorch_tanh": "gelu_tanh",
}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
_LAYER_KINDS = {
  "full_attention": "dense",
  "sliding_attention": "sliding_window",
}
_HF_LAYER_TYPE = {v: k for k, v in _LAYER_KINDS.items()}
_DTYPES = ("float32", "bfloat16")


def family_of(hf: dict[str, Any]) -> Family:
  archs = hf.get("architectures")
  if not isinstance(archs, list) or len(archs) != 1:
    raise ConvertError(
      f"config.json architectures={archs!r}: expected one of {SUPPORTED}"
    )
  if archs[0] not in FAMILIES:
    raise ConvertError(
      f"architecture {archs[0]!r} is not supported; supported: {SUPPORTED}"
    )
  return FAMILIES[archs[0]]


def _int(hf: dict[str, Any], key: str, default: Any = None) -> int:
  value = hf.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConvertError(
      f"config.json {key}={value!r}: expected a positive integer"
    )
  return value


def _refuse(hf, arch: str, key: str, allowed, why: str) -> None:
  value = hf.get(key)
  if value not in allowed:
    raise ConvertError(f"{arch} config.json {key}={value!r}: {why}")


def _rope(params: Any, arch: str, where: str) -> dict[str, Any]:
  """One RoPE parameter set -> our rope_* keys (rope_theta included)."""
  if not isinstance(params, dict):
    raise ConvertError(f"{arch} config.json {where}={params!r}: not a dict")
  kind = params.get("rope_type", params.get("type", "default"))
  out: dict[str, Any] = {}
  if "rope_theta" in params:
    out["rope_theta"] = float(params["rope_theta"])
  factor = params.get("partial_rotary_factor", 1.0)
  if factor != 1.0:
    raise ConvertError(
      f"{arch} config.json {where} partial_rotary_factor={factor}: only "
      "full rotary embeddings (1.0) are supported"
    )
  if kind == "default":
    return {**out, "rope_scaling": "none"}
  if kind == "linear":
    return {
      **out,
      "rope_scaling": "linear",
      "rope_scaling_factor": float(params["factor"]),
    }
  if kind == "llama3":
    return {
      **out,
      "rope_scaling": "llama3",
      "rope_scaling_factor": float(params["factor"]),
      "rope_low_freq_factor": float(params["low_freq_factor"]),
      "rope_high_freq_factor": float(params["high_freq_factor"]),
      "rope_original_max_len": int(params["original_max_position_embeddings"]),
    }
  raise ConvertError(
    f"{arch} config.json {where} rope type {kind!r} is not supported "
    "(supported: default, linear, llama3)"
  )


def _rope_keys(hf: dict[str, Any], fam: Family) -> dict[str, Any]:
  arch = fam.architecture
  params = hf.get("rope_parameters")
  if params is None:  # transformers 4's keys
    params = dict(hf.get("rope_scaling") or {})
    params["rope_theta"] = hf.get("rope_theta", 10_000.0)
    if "partial_rotary_factor" in hf:
      params["partial_rotary_factor"] = hf["partial_rotary_factor"]
    if fam.local_rope:
      params = {
        "full_attention": params,
        "sliding_attention": {
          "rope_type": "default",
          "rope_theta": hf.get("rope_local_base_freq", 10_000.0),
        },
      }
  if isinstance(params, dict) and "full_attention" in params:
    full = _rope(params["full_attention"], arch, "rope_parameters.full")
    local = params.get("sliding_attention")
    if local is not None:
      keys = _rope(local, arch, "rope_parameters.sliding_attention")
      if keys["rope_scaling"] != "none":
        raise ConvertError(
          f"{arch} config.json rope_parameters.sliding_attention: "
          f"{keys['rope_scaling']!r} scaling of sliding layers is not "
          "supported (only of the full-attention layers)"
        )
      full["rope_local_theta"] = keys.get("rope_theta", 10_000.0)
    return full
  return _rope(params, arch, "rope_parameters")


def _layer_kinds(hf: dict[str, Any], fam: Family, n: int) -> list[str]:
  """Per layer: 'dense' or 'sliding_window'."""
  arch = fam.architecture
  window = hf.get("sliding_window")
  types = hf.get("layer_types")
  if fam.sliding == "all":  # Mistral reads sliding_window alone
    types = ["sliding_attention" if window else "full_attention"] * n
  elif types is None:
    if fam.architecture.startswith("Qwen"):
      first = (
        hf.get("max_window_layers", n) if hf.get("use_sliding_window") else n
      )
      types = [
        "sliding_attention" if i >= first else "full_attention"
        for i in range(n)
      ]
    elif fam.architecture == "Gemma2ForCausalLM":
      types = [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(n)
      ]
    elif fam.architecture == "Gemma3ForCausalLM":
      period = hf.get("sliding_window_pattern", 6)
      types = [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(n)
      ]
    else:
      types = ["full_attention"] * n
  elif fam.sliding == "none" and "sliding_attention" in types:
    raise ConvertError(
      f"{arch} config.json layer_types has sliding_attention: {arch} has "
      "no sliding windows"
    )
  if not isinstance(types, list) or len(types) != n:
    raise ConvertError(
      f"{arch} config.json layer_types={types!r}: expected a list of "
      f"num_hidden_layers={n} entries"
    )
  bad = [t for t in types if t not in _LAYER_KINDS]
  if bad:
    raise ConvertError(
      f"{arch} config.json layer_types entry {bad[0]!r} is not supported "
      f"(supported: {', '.join(_LAYER_KINDS)})"
    )
  return [_LAYER_KINDS[t] for t in types]


def _attention(kinds: list[str], window: Any, arch: str) -> dict[str, Any]:
  """Per-layer kinds -> attention.kind / pattern / window: the shortest
  period that repeats into the list, spelled in full if there is none."""
  n = len(kinds)
  period = next(
    p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p)
  )
  out: dict[str, Any] = {"kind": kinds[0], "pattern": ""}
  if period > 1:
    out["pattern"] = ",".join(kinds[:period])
  if "sliding_window" in kinds:
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
      raise ConvertError(
        f"{arch} config.json sliding_window={window!r}: sliding layers "
        "need a positive window"
      )
    out["window"] = window
  return out


def model_keys(
  hf: dict[str, Any], fam: Family, param_dtype: str
) -> dict[str, Any]:
  """config.json -> our model.* keys (nested dict, `attention` inside)."""
  arch = fam.architecture
  n = _int(hf, "num_hidden_layers")
  d = _int(hf, "hidden_size")
  h = _int(hf, "num_attention_heads")
  g = _int(hf, "num_key_value_heads", h)
  head_dim = hf.get("head_dim")
  if head_dim is None:
    if d % h:
      raise ConvertError(
        f"{arch} config.json hidden_size={d} is not a multiple of "
        f"num_attention_heads={h} and head_dim is not given"
      )
    head_dim = d // h
  head_dim = _int({"head_dim": head_dim}, "head_dim")
  act_key = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
  act = hf.get(act_key, "gelu_pytorch_tanh" if fam.gemma else "silu")
  if act not in _ACTIVATIONS:
    raise ConvertError(
      f"{arch} config.json {act_key}={act!r} is not supported "
      f"(supported: {', '.join(_ACTIVATIONS)})"
    )
  _refuse(
    hf,
    arch,
    "attention_bias",
    (None, False),
    "biases on the attention projections need an output-projection bias, "
    "which we do not have",
  )
  _refuse(hf, arch, "mlp_bias", (None, False), "MLP biases are not supported")
  _refuse(
    hf,
    arch,
    "use_bidirectional_attention",
    (None, False),
    "only causal decoders are supported",
  )
  if not fam.gemma:
    for key in (
      "attn_logit_softcapping",
      "final_logit_softcapping",
      "query_pre_attn_scalar",
    ):
      _refuse(hf, arch, key, (None,), f"{arch} has no {key}")
  tie = hf.get("tie_word_embeddings", fam.tie_default)
  if not isinstance(tie, bool):
    raise ConvertError(
      f"{arch} config.json tie_word_embeddings={tie!r}: expected true or false"
    )
  kinds = _layer_kinds(hf, fam, n)
  attention = _attention(kinds, hf.get("sliding_window"), arch)
  attention.update(qk_norm=fam.qk_norm, qkv_bias=fam.qkv_bias)
  keys: dict[str, Any] = {
    "kind": "decoder",
    "num_layers": n,
    "embed_dim": d,
    "num_heads": h,
    "num_kv_heads": g,
    "head_dim": head_dim,
    "mlp_dim": _int(hf, "intermediate_size"),
    "vocab_size": _int(hf, "vocab_size"),
    "tie_embeddings": tie,
    "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "mlp_activation": _ACTIVATIONS[act],
    "dtype": param_dtype,
    "param_dtype": param_dtype,
    **_rope_keys(hf, fam),
  }
  if keys.get("rope_local_theta") is not None and "sliding_window" not in kinds:
    del keys["rope_local_theta"]  # no sliding layer uses it
  if fam.gemma:
    attention["logits_soft_cap"] = hf.get("attn_logit_softcapping")
    attention["query_pre_attn_scalar"] = hf.get(
      "query_pre_attn_scalar", head_dim
    )
    keys.update(
      norm_plus_one=True,
      post_norms=True,
      embed_scale=True,
      final_logits_soft_cap=hf.get("final_logit_softcapping"),
    )
  keys["attention"] = attention
  return keys


# ----------------------------------------------------------------- export

# Our model keys a decoder may set away from their defaults and still have a
# Hugging Face equivalent (the rest is checked by value below).
_NO_EQUIVALENT_KINDS = ("global_local", "block_sparse", "tglobal")


def export_problem(m: ModelConfig) -> str | None:
  """Why `m` has no Hugging Face architecture at all (None: it may)."""
  if m.kind != "decoder":
    return f"model.kind={m.kind!r} has no Hugging Face equivalent"
  if m.routing.kind != "none":
    return (
      f"model.routing.kind={m.routing.kind!r} (routed layers) has no "
      "Hugging Face equivalent"
    )
  if m.attention.projection != "qkv":
    return (
      f"model.attention.projection={m.attention.projection!r} has no "
      "Hugging Face equivalent in the supported families"
    )
  bad = [k for k in m.attention.pattern_kinds if k in _NO_EQUIVALENT_KINDS]
  if bad:
    return f"attention kind {bad[0]!r} has no Hugging Face equivalent"
  for name in ("mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
    values = getattr(m.per_layer, name)
    if len(set(values)) > 1:
      return (
        f"model.per_layer.{name}={values}: layers of different shapes have "
        "no Hugging Face equivalent"
      )
  return None


def choose(m: ModelConfig, preferred: str | None) -> Family:
  """The family an export writes: `preferred` (the imported one), else by
  the switches; ConvertError naming what that family cannot express."""
  problem = export_problem(m)
  if problem:
    raise ConvertError(problem)
  a = m.attention
  if preferred in FAMILIES:
    fam = FAMILIES[preferred]
  elif m.norm_plus_one or m.post_norms or m.embed_scale:
    fam = FAMILIES[
      "Gemma3ForCausalLM"
      if a.qk_norm or m.rope_local_theta is not None
      else "Gemma2ForCausalLM"
    ]
  elif a.qk_norm:
    fam = FAMILIES["Qwen3ForCausalLM"]
  elif a.qkv_bias:
    fam = FAMILIES["Qwen2ForCausalLM"]
  elif "sliding_window" in a.pattern_kinds:
    fam = FAMILIES["MistralForCausalLM"]
  else:
    fam = FAMILIES["LlamaForCausalLM"]
  problem = _cannot_express(m, fam)
  if problem:
    raise ConvertError(f"{fam.architecture} cannot express {problem}")
  return fam


def _cannot_express(m: ModelConfig, fam: Family) -> str | None:
  a = m.attention
  gemma = {
    "model.norm_plus_one": m.norm_plus_one,
    "model.post_norms": m.post_norms,
    "model.embed_scale": m.embed_scale,
  }
  for key, on in gemma.items():
    if on != fam.gemma:
      return f"{key}={on} (Gemma families have all three, others none)"
  if a.qk_norm != fam.qk_norm:
    return f"model.attention.qk_norm={a.qk_norm}"
  if a.qkv_bias != fam.qkv_bias:
    return f"model.attention.qkv_bias={a.qkv_bias}"
  if not fam.gemma:
    for key, value in (
      ("model.attention.logits_soft_cap", a.logits_soft_cap),
      ("model.final_logits_soft_cap", m.final_logits_soft_cap),
      ("model.attention.query_pre_attn_scalar", a.query_pre_attn_scalar),
    ):
      if value is not None:
        return f"{key}={value}"
  kinds = a.pattern_kinds
  if fam.sliding == "none" and "sliding_window" in kinds:
    return f"sliding-window layers (model.attention.pattern={a.pattern!r})"
  if fam.sliding == "all" and len(set(kinds)) > 1:
    return (
      f"model.attention.pattern={a.pattern!r}: Mistral slides on every "
      "layer or none"
    )
  if m.rope_local_theta is not None and not fam.local_rope:
    return f"model.rope_local_theta={m.rope_local_theta}"
  if fam.local_rope and m.rope_local_theta is None and m.rope_scaling != "none":
    return (
      f"model.rope_scaling={m.rope_scaling!r} on sliding layers (Gemma 3 "
      "scales only the global layers: set model.rope_local_theta)"
    )
  return None


def _rope_parameters(m: ModelConfig, theta: float, scaled: bool) -> dict:
  out: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
  if not scaled or m.rope_scaling == "none":
    return out
  out.update(rope_type=m.rope_scaling, factor=m.rope_scaling_factor)
  if m.rope_scaling == "llama3":
    out.update(
      low_freq_factor=m.rope_low_freq_factor,
      high_freq_factor=m.rope_high_freq_factor,
      original_max_position_embeddings=m.rope_original_max_len,
    )
  return out


def hf_config(
  m: ModelConfig, fam: Family, base: dict[str, Any] | None = None
) -> dict[str, Any]:
  """config.json of `m` as `fam` (which `choose` accepted). Keys of `base`
  (the imported config.json) that we do not model are kept as they were
  (max_position_embeddings, token ids, ...); every key we model is ours."""
  out = dict(base or {})
  for key in (
    "rope_scaling",
    "rope_theta",
    "rope_local_base_freq",
    "torch_dtype",
  ):
    out.pop(key, None)  # transformers 4's spellings of rope_parameters
  a = m.attention
  kinds = [a.layer_kind(i) for i in range(m.num_layers)]
  out.update(
    architectures=[fam.architecture],
    model_type=fam.model_type,
    num_hidden_layers=m.num_layers,
    hidden_size=m.embed_dim,
    num_attention_heads=m.num_heads,
    num_key_value_heads=m.num_kv_heads,
    intermediate_size=m.mlp_dim,
    vocab_size=m.vocab_size,
    tie_word_embeddings=m.tie_embeddings,
    rms_norm_eps=m.norm_eps,
    dtype=m.param_dtype,
  )
  act_key = "hidden_activation" if fam.gemma else "hidden_act"
  out[act_key] = _HF_ACTIVATION[m.mlp_activation]
  if fam.head_dim_key or m.resolved_head_dim * m.num_heads != m.embed_dim:
    out["head_dim"] = m.resolved_head_dim
  if fam.architecture != "Qwen2ForCausalLM" and fam.model_type != "mistral":
    out["attention_bias"] = False
  if fam.model_type == "llama":
    out["mlp_bias"] = False
  sliding = "sliding_window" in kinds
  if fam.sliding == "all":
    out["sliding_window"] = a.window if sliding else None
  elif fam.sliding == "per_layer":
    out["layer_types"] = [_HF_LAYER_TYPE[k] for k in kinds]
    out["sliding_window"] = a.window if sliding else None
    if fam.architecture.startswith("Qwen"):
      out["use_sliding_window"] = sliding
      if sliding:
        out["max_window_layers"] = kinds.index("sliding_window")
  if fam.local_rope:
    local = m.rope_theta if m.rope_local_theta is None else m.rope_local_theta
    out["rope_parameters"] = {
      "full_attention": _rope_parameters(m, m.rope_theta, True),
      "sliding_attention": _rope_parameters(m, local, False),
    }
  else:
    out["rope_parameters"] = _rope_parameters(m, m.rope_theta, True)
  if fam.gemma:
    out.update(
      attn_logit_softcapping=a.logits_soft_cap,
      final_logit_softcapping=m.final_logits_soft_cap,
      # transformers' config classes type it int (and refuse 24.0)
      query_pre_attn_scalar=_int_if_whole(
        m.resolved_head_dim
        if a.query_pre_attn_scalar is None
        else a.query_pre_attn_scalar
      ),
    )
  return out


def _int_if_whole(x: float) -> float | int:
  return int(x) if float(x).is_integer() else x


def dtype_name(name: str, what: str) -> str:
  if name not in _DTYPES:
    raise ConvertError(f"{what}={name!r}: expected one of {', '.join(_DTYPES)}")
  return name
