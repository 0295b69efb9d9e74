"""Hugging Face reference side of issue #19: golden fixtures and a checker.

Runs under a Python with PyTorch (CPU), transformers, safetensors, tokenizers
and numpy -- never efficient_lm's venv (JAX); tests reach it through
$EFFICIENT_LM_HF_PYTHON. Subcommands:

  make-fixtures OUT_DIR [--family F ...]
      For each family (llama, mistral, qwen2, qwen3, gemma2, gemma3) build a
      tiny random transformers model (seeded, float32, eager attention, every
      family switch on), write OUT_DIR/<family>/model/ (save_pretrained plus a
      trained tokenizer.json and tokenizer_config.json), reference.npz
      (tokens, logits, prompts, greedy), meta.json, and legacy_config.json
      (config.json spelt as pre-transformers-5 / Hub files spell it:
      rope_theta and rope_scaling, no layer_types; transformers loads it to
      the same logits). Each family is checked on the way: every switch
      changes the logits, greedy `generate` gives 40 tokens and equals greedy
      by full recomputation, and sliding windows count keys including the
      query's own position.
  logits MODEL_DIR TOKENS.npy OUT.npy
      Load MODEL_DIR (AutoModelForCausalLM, float32, eager) and write the
      float32 logits [B, T, V] of the int tokens [B, T].
  generate MODEL_DIR PROMPTS.npy N OUT.npy
      Write the N greedy new tokens [P, N] (int32) after each prompt row (no
      eos stop).
  make-model OUT_DIR [--hidden D --layers L --intermediate F --heads H
      --kv_heads K --vocab V --seed S]
      A random Llama (transformers' own initialisation from torch seed S,
      float32, tied embeddings as SmolLM2) saved with save_pretrained, plus
      the llama fixture's tokenizer.json (300 ids): what
      benchmarks/vs_transformers.py imports. Prints the parameter count.
  bench-generate MODEL_DIR PROMPTS.npy N THREADS [--reps R]
      Greedy `generate` of N new tokens after the prompt rows [B, T] on
      THREADS torch threads (torch.set_num_threads), sdpa attention: one
      warm-up call, then R timed calls; prints one JSON line
      {"seconds": [...], "tokens": [[...]], "threads", "torch"}.

Regenerate the committed fixtures (from the repository root):

  /work/.venv-hf/bin/python tools/hf_reference.py make-fixtures tests/fixtures/hf

(any Python with torch, transformers, safetensors, tokenizers and numpy does;
meta.json records the versions that wrote them).
"""

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

# The repository's own top-level `kernels` package (JAX) shadows the
# Hugging Face `kernels` package that transformers probes for: drop the
# repository from the path (PYTHONPATH=repo, or run from its root with -m/-c).
_REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]

# One thread: the same reduction order on every machine and run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEED = 19
VOCAB = 300
WINDOW = 8
BATCH, SEQ = 2, 24  # SEQ >= 2 * WINDOW
PROMPTS, PROMPT_LEN = 2, 12  # PROMPT_LEN > WINDOW
NEW_TOKENS = 40
MIN_GAP, MIN_DISTINCT, SEED_TRIES = 1e-3, 10, 20
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")

# Text the tokenizers are trained on (their merges only; the reference
# tokens are random ids over the whole vocabulary).
TEXT = """\
the quick brown fox jumps over the lazy dog. a tiny model reads the text
and learns the next token. the window slides over the tokens, and the global
layers see the whole sequence. rotary positions turn the queries and the keys
by an angle that grows with the position. the norm keeps the activations in
range, the gate decides how much of the hidden state passes, and the head
turns the last hidden state into logits over the vocabulary. greedy decoding
takes the most likely token at every step, so the reference and the port must
agree on every logit to the last few digits. import, export, and then import
again: the parameters must come back bit for bit.
"""


def _config_kwargs(family):
  """The tiny transformers config of one family: (config class, kwargs)."""
  common = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    attention_dropout=0.0,
  )
  if family == "llama":
    from transformers import LlamaConfig

    return LlamaConfig, dict(
      common,
      hidden_act="silu",
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
      # head_dim 8, theta 500: wavelengths 6.3, 29.7, 141, 666 positions;
      # with original_max_position_embeddings 64 (low/high wavelength 64 and
      # 16) the first is kept, the second smoothed, the last two / factor.
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
      ),
    )
  if family == "mistral":
    from transformers import MistralConfig

    return MistralConfig, dict(
      common,
      hidden_act="silu",
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
      sliding_window=WINDOW,
      rope_parameters=dict(rope_type="default", rope_theta=1000.0),
    )
  if family == "qwen2":
    from transformers import Qwen2Config

    return Qwen2Config, dict(
      common,
      hidden_act="silu",
      tie_word_embeddings=False,
      bos_token_id=VOCAB - 3,
      eos_token_id=VOCAB - 3,
      use_sliding_window=True,
      sliding_window=WINDOW,
      max_window_layers=1,  # layers >= 1 slide: full, sliding, sliding
      rope_parameters=dict(rope_type="default", rope_theta=1000.0),
    )
  if family == "qwen3":
    from transformers import Qwen3Config

    return Qwen3Config, dict(
      common,
      head_dim=8,
      hidden_act="silu",
      tie_word_embeddings=True,
      attention_bias=False,
      use_sliding_window=False,
      bos_token_id=VOCAB - 3,
      eos_token_id=VOCAB - 1,
      rope_parameters=dict(rope_type="default", rope_theta=1000.0),
    )
  if family == "gemma2":
    from transformers import Gemma2Config

    return Gemma2Config, dict(
      common,
      num_hidden_layers=4,
      head_dim=16,  # != hidden_size / heads = 8
      hidden_activation="gelu_pytorch_tanh",
      tie_word_embeddings=True,
      pad_token_id=0,
      eos_token_id=1,
      bos_token_id=2,
      query_pre_attn_scalar=24,  # != head_dim
      attn_logit_softcapping=2.0,
      final_logit_softcapping=2.0,
      sliding_window=WINDOW,
      layer_types=["sliding_attention", "full_attention"] * 2,
      rope_parameters=dict(rope_type="default", rope_theta=1000.0),
    )
  if family == "gemma3":
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig, dict(
      common,
      num_hidden_layers=4,
      head_dim=16,  # != hidden_size / heads = 8
      hidden_activation="gelu_pytorch_tanh",
      tie_word_embeddings=True,
      pad_token_id=0,
      eos_token_id=1,
      bos_token_id=2,
      query_pre_attn_scalar=24,
      sliding_window=WINDOW,
      # Period 3 (two local, one global), not dividing 4 layers.
      sliding_window_pattern=3,
      rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=4.0, rope_theta=5000.0),
        sliding_attention=dict(rope_type="default", rope_theta=200.0),
      ),
    )
  raise SystemExit(f"error: family {family!r} is not one of {FAMILIES}")


# Variants of the config that switch one feature off: each must change the
# logits, or the fixture would not test that feature.
def _switch_offs(family, kwargs):
  offs = {}
  if family == "llama":
    offs["rope llama3"] = dict(
      rope_parameters=dict(rope_type="default", rope_theta=500.0)
    )
  if family in ("mistral", "qwen2", "gemma2", "gemma3"):
    offs["sliding window"] = dict(sliding_window=4096)
  if family == "gemma2":
    offs["attn soft cap"] = dict(attn_logit_softcapping=None)
    offs["final soft cap"] = dict(final_logit_softcapping=None)
  if family in ("gemma2", "gemma3"):
    offs["query_pre_attn_scalar"] = dict(query_pre_attn_scalar=16)
  if family == "gemma3":
    rp = kwargs["rope_parameters"]
    offs["local rope theta"] = dict(
      rope_parameters=dict(
        full_attention=dict(rp["full_attention"]),
        sliding_attention=dict(rope_type="default", rope_theta=5000.0),
      )
    )
    offs["linear rope scaling"] = dict(
      rope_parameters=dict(
        full_attention=dict(rope_type="default", rope_theta=5000.0),
        sliding_attention=dict(rp["sliding_attention"]),
      )
    )
  return offs


def _model_class(family):
  import transformers

  return getattr(
    transformers,
    {
      "llama": "LlamaForCausalLM",
      "mistral": "MistralForCausalLM",
      "qwen2": "Qwen2ForCausalLM",
      "qwen3": "Qwen3ForCausalLM",
      "gemma2": "Gemma2ForCausalLM",
      "gemma3": "Gemma3ForCausalLM",
    }[family],
  )


def _build(family, kwargs):
  config_cls, _ = _config_kwargs(family)
  config = config_cls(**copy.deepcopy(kwargs))
  config._attn_implementation = "eager"
  model = _model_class(family)(config).to(torch.float32).eval()
  return model


def _randomize(model, family, seed):
  """Every parameter random with a visible scale, norms and biases too.

  Linear weights are large (gain 3) so the blocks, not the embedding, steer
  the output: with tied embeddings a small-gain model only repeats its input
  token. Gemma's embeddings are small (they are multiplied by sqrt(hidden))
  and its post-norms scale by about 2, for the same reason.
  """
  gen = torch.Generator().manual_seed(seed)
  gemma = family.startswith("gemma")
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        # Gemma stores w and applies (1 + w); the others apply w.
        if gemma:
          value = (1.0 if ".post_" in name else 0.0) + 0.3 * noise
        else:
          value = 1.0 + 0.3 * noise
      elif name.endswith(".bias"):
        value = 0.5 * noise
      elif "embed_tokens" in name:
        value = (0.1 if gemma else 1.0) * noise
      elif p.ndim == 2:  # Linear [out, in]
        value = noise * (3.0 / p.shape[1] ** 0.5)
      else:
        raise SystemExit(f"error: no rule to randomise parameter {name!r}")
      p.copy_(value)


def _logits(model, tokens):
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False)
  return out.logits.to(torch.float32).numpy()


def _generate(model, prompts, n):
  ids = torch.as_tensor(prompts, dtype=torch.long)
  with torch.no_grad():
    out = model.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      max_new_tokens=n,
      do_sample=False,
      num_beams=1,
      use_cache=True,
      eos_token_id=None,
      pad_token_id=0,
      temperature=None,
      top_p=None,
      top_k=None,
    )
  new = out[:, ids.shape[1] :].numpy().astype(np.int32)
  if new.shape != (ids.shape[0], n):
    raise SystemExit(
      f"error: generate gave {new.shape[1]} new tokens, expected {n}"
    )
  return new


def _greedy_recompute(model, prompts, n):
  """Greedy by full recomputation; also the smallest top-1/top-2 gap."""
  ids = torch.as_tensor(prompts, dtype=torch.long)
  gap = float("inf")
  with torch.no_grad():
    for _ in range(n):
      last = model(ids, use_cache=False).logits[:, -1]
      top2 = torch.topk(last, 2, dim=-1).values
      gap = min(gap, float((top2[:, 0] - top2[:, 1]).min()))
      ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
  return ids[:, prompts.shape[1] :].numpy().astype(np.int32), gap


def _tokenizer(family):
  """A tokenizer.json of exactly VOCAB ids; (Tokenizer, specials by role)."""
  from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
  )

  if family.startswith("qwen"):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=True
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=VOCAB - len(specials),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    )
    tok.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    roles = {"bos": specials[0], "eos": specials[0], "pad": specials[0]}
    if family == "qwen3":
      roles["eos"] = specials[2]
  else:
    # SentencePiece-like: specials, the 256 byte-fallback tokens, then
    # pieces and merges learnt over Metaspace ("▁") words.
    if family.startswith("gemma"):
      specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
      roles = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
    else:
      specials = ["<unk>", "<s>", "</s>"]
      roles = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = meta
    n_learnt = VOCAB - len(specials) - len(byte_tokens)
    trainer = trainers.BpeTrainer(vocab_size=n_learnt, show_progress=False)
    learner.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    learnt = json.loads(learner.to_str())["model"]
    pieces = sorted(learnt["vocab"].items(), key=lambda kv: kv[1])
    vocab = {}
    for piece in specials + byte_tokens + [p for p, _ in pieces]:
      vocab[piece] = len(vocab)
    merges = [
      tuple(m) if isinstance(m, list) else tuple(m.split(" "))
      for m in learnt["merges"]
    ]
    tok = Tokenizer(
      models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=roles["unk"],
        byte_fallback=True,
        fuse_unk=True,
      )
    )
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
      [
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
      ]
    )
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
  if tok.get_vocab_size() != VOCAB:
    raise SystemExit(
      f"error: {family} tokenizer has {tok.get_vocab_size()} ids, "
      f"expected {VOCAB}"
    )
  return tok, {role: (s, tok.token_to_id(s)) for role, s in roles.items()}


def _check_window_counts_self(model, tokens):
  """A window of WINDOW keys includes the query: positions < WINDOW see
  every key (logits equal to a model without the window), position WINDOW
  loses key 0 (logits differ)."""
  ref = _logits(model, tokens)
  cfg = copy.deepcopy(model.config)
  cfg.sliding_window = 4096
  full = type(model)(cfg).to(torch.float32).eval()
  full.load_state_dict(model.state_dict())
  got = _logits(full, tokens)
  same = np.abs(ref[:, :WINDOW] - got[:, :WINDOW]).max()
  diff = np.abs(ref[:, WINDOW] - got[:, WINDOW]).max()
  if same > 1e-6 or diff < 1e-4:
    raise SystemExit(
      f"error: sliding window semantics changed: positions < {WINDOW} "
      f"differ by {same}, position {WINDOW} by {diff}"
    )


def _draw(family, kwargs, seed):
  """Model and reference data of one seed, and whether greedy decoding is
  well separated (top-1/top-2 gap >= MIN_GAP at every step) and varied."""
  torch.manual_seed(seed)
  model = _build(family, kwargs)
  _randomize(model, family, seed)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  prompts = rng.integers(0, VOCAB, size=(PROMPTS, PROMPT_LEN)).astype(np.int32)
  recomputed, gap = _greedy_recompute(model, prompts, NEW_TOKENS)
  distinct = min(len(set(row.tolist())) for row in recomputed)
  ok = gap >= MIN_GAP and distinct >= MIN_DISTINCT
  return model, tokens, prompts, recomputed, gap, distinct, ok


def _weight_groups_matter(model, family, tokens, logits):
  """Parameters a converter could drop or map wrongly (biases, q/k norms,
  Gemma's post-norms) set to their identity value move the logits."""
  gemma = family.startswith("gemma")
  groups = {
    "biases -> 0": lambda n: n.endswith(".bias"),
    "q/k norm weights -> identity": lambda n: (
      "_norm.weight" in n and ("q_norm" in n or "k_norm" in n)
    ),
    "post norm weights -> identity": lambda n: ".post_" in n and gemma,
    "final norm weight -> identity": lambda n: n == "model.norm.weight",
  }
  moved = {}
  for what, match in groups.items():
    names = [n for n, _ in model.named_parameters() if match(n)]
    if not names:
      continue
    other = copy.deepcopy(model)
    with torch.no_grad():
      for n, p in other.named_parameters():
        if n in names:
          identity = 0.0 if n.endswith(".bias") or gemma else 1.0
          p.fill_(identity)
    delta = float(np.abs(_logits(other, tokens) - logits).max())
    if delta < 1e-2:
      raise SystemExit(f"error: {family}: {what} moves logits by {delta}")
    moved[what] = delta
  return moved


def _check_llama3(config):
  """Llama 3 scaling keeps some inverse frequencies, smooths and divides
  others at this head_dim and original_max_position_embeddings."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  rp = config.rope_parameters
  dim = config.head_dim
  base = rp["rope_theta"] ** (-torch.arange(0, dim, 2).double() / dim)
  scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
  ratio = (base / scaled.double()).tolist()
  kept = sum(abs(r - 1) < 1e-6 for r in ratio)
  divided = sum(abs(r - rp["factor"]) < 1e-4 for r in ratio)
  smoothed = len(ratio) - kept - divided
  if not (kept and divided and smoothed):
    raise SystemExit(
      f"error: llama3 scaling ratios {ratio}: want some kept, some "
      "smoothed, some divided by the factor"
    )
  return {
    "kept": kept,
    "smoothed": smoothed,
    "divided": divided,
    "ratios": ratio,
  }


def make_family(family, out_dir):
  import safetensors
  import tokenizers
  import transformers

  config_cls, kwargs = _config_kwargs(family)
  # The first seed from the family's base whose greedy run is well
  # separated; the search is deterministic, meta.json records the seed.
  base = SEED + 1000 * FAMILIES.index(family)
  for seed in range(base, base + SEED_TRIES):
    model, tokens, prompts, recomputed, gap, distinct, ok = _draw(
      family, kwargs, seed
    )
    if ok:
      break
  else:
    raise SystemExit(f"error: {family}: no seed in {SEED_TRIES} tries")
  logits = _logits(model, tokens)

  # Every switch matters: switched off, the logits move.
  switches = {}
  for what, change in _switch_offs(family, kwargs).items():
    other = _build(family, {**kwargs, **change})
    other.load_state_dict(model.state_dict())
    delta = float(np.abs(_logits(other, tokens) - logits).max())
    if delta < 1e-2:
      raise SystemExit(f"error: {family}: {what} off moves logits by {delta}")
    switches[what] = delta
  switches.update(_weight_groups_matter(model, family, tokens, logits))
  if getattr(model.config, "sliding_window", None) is not None:
    _check_window_counts_self(model, tokens)
  if family == "llama":
    rope_check = _check_llama3(model.config)
  else:
    rope_check = None

  greedy = _generate(model, prompts, NEW_TOKENS)
  if not np.array_equal(greedy, recomputed):
    raise SystemExit(
      f"error: {family}: cached generate differs from full recomputation"
    )
  top2 = np.sort(logits, axis=-1)[..., -2:]
  logits_gap = float((top2[..., 1] - top2[..., 0]).min())

  fam_dir = Path(out_dir) / family
  if fam_dir.exists():
    shutil.rmtree(fam_dir)
  model_dir = fam_dir / "model"
  tok, roles = _tokenizer(family)
  for role in ("bos", "eos", "pad"):
    want = getattr(model.config, f"{role}_token_id", None)
    if role in roles and want is not None and roles[role][1] != want:
      raise SystemExit(
        f"error: {family}: config {role}_token_id {want} is "
        f"{roles[role][1]} in the tokenizer"
      )
  if family == "mistral":
    model.save_pretrained(model_dir, max_shard_size="100KB")
  else:
    model.save_pretrained(model_dir)
  tok.save(str(model_dir / "tokenizer.json"))
  tok_config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": model.config.max_position_embeddings,
  }
  for role, (piece, _) in sorted(roles.items()):
    tok_config[f"{role}_token"] = piece
  (model_dir / "tokenizer_config.json").write_text(
    json.dumps(tok_config, indent=2, sort_keys=True) + "\n"
  )
  _write_legacy_config(
    model_dir, fam_dir / "legacy_config.json", tokens, logits
  )
  np.savez(
    fam_dir / "reference.npz",
    tokens=tokens,
    logits=logits.astype(np.float32),
    prompts=prompts,
    greedy=greedy,
  )
  meta = {
    "family": family,
    "architecture": type(model).__name__,
    "config_class": config_cls.__name__,
    "config_kwargs": kwargs,
    "layer_types": getattr(model.config, "layer_types", None),
    "seed": seed,
    "versions": {
      "python": sys.version.split()[0],
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "tokenizers": tokenizers.__version__,
      "safetensors": safetensors.__version__,
      "numpy": np.__version__,
    },
    "dtype": "float32",
    "attn_implementation": "eager",
    "weights": "every parameter torch.randn (generator seeded with seed): "
    "norm weights 1 + 0.3 n (gemma: 0.3 n, applied as 1 + w), biases "
    "0.5 n, embeddings n, linear weights 1.5 n / sqrt(fan_in)",
    "reference": {
      "tokens": [BATCH, SEQ],
      "prompts": [PROMPTS, PROMPT_LEN],
      "greedy_new_tokens": NEW_TOKENS,
      "generate": "greedy, use_cache=True, eos_token_id=None; equal to "
      "greedy by full recomputation",
    },
    "tokenizer": {
      role: {"token": s, "id": i} for role, (s, i) in roles.items()
    },
    "checks": {
      "logits moved by switching off / identity weights (max abs)": switches,
      "llama3 inverse frequencies (kept, smoothed, divided)": rope_check,
      "sliding window keys (including the query)": (
        WINDOW if getattr(model.config, "sliding_window", None) else None
      ),
      "min top1-top2 logit gap (reference logits)": logits_gap,
      "min top1-top2 logit gap (greedy steps)": gap,
      "fewest distinct greedy tokens in a row": distinct,
    },
  }
  (fam_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
  return meta


def _legacy(config):
  """config.json as checkpoints written before transformers 5 spell it
  (what the Hub's Llama 3.1 / Gemma 2 and 3 / Qwen 2 files say): `rope_theta`
  and `rope_scaling` at the top instead of `rope_parameters` (Gemma 3:
  `rope_local_base_freq` for its sliding layers), no `layer_types`."""
  config = dict(config)
  rope = config.pop("rope_parameters")
  # Older files have no layer_types: Qwen 2 derives them from
  # max_window_layers, Gemma 2 alternates, Gemma 3 has its pattern.
  config.pop("layer_types", None)
  if "full_attention" in rope:  # Gemma 3: nested by layer type
    config.pop("_sliding_window_pattern", None)
    config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    rope = dict(rope["full_attention"])
  else:
    rope = dict(rope)
  config["rope_theta"] = rope.pop("rope_theta")
  kind = rope.pop("rope_type")
  if kind != "default":
    config["rope_scaling"] = {"rope_type": kind, **rope}
  return config


def _write_legacy_config(model_dir, path, tokens, logits):
  """Writes the legacy spelling of model_dir's config.json to `path`, after
  checking that transformers loads it to the same logits."""
  import tempfile

  config = json.loads((model_dir / "config.json").read_text())
  legacy = _legacy(config)
  text = json.dumps(legacy, indent=2, sort_keys=True) + "\n"
  with tempfile.TemporaryDirectory() as tmp:
    copy_dir = Path(tmp) / "model"
    shutil.copytree(model_dir, copy_dir)
    (copy_dir / "config.json").write_text(text)
    got = _logits(_load(copy_dir), tokens)
  if not np.array_equal(got, logits):
    raise SystemExit(f"error: {path}: the legacy config changes the logits")
  path.write_text(text)


def _load(model_dir):
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, attn_implementation="eager"
  )
  return model.eval()


def make_model(
  out_dir, *, hidden, layers, intermediate, heads, kv_heads, vocab, seed
):
  from transformers import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=intermediate,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters=dict(rope_type="default", rope_theta=100000.0),
  )
  torch.manual_seed(seed)
  model = LlamaForCausalLM(config).to(torch.float32).eval()
  out = Path(out_dir)
  if out.exists():
    shutil.rmtree(out)
  model.save_pretrained(out)
  fixture = _REPO / "tests" / "fixtures" / "hf" / "llama" / "model"
  shutil.copy(fixture / "tokenizer.json", out / "tokenizer.json")
  return sum(p.numel() for p in model.parameters())


def bench_generate(model_dir, prompts, n, threads, reps):
  import time

  import transformers

  torch.set_num_threads(threads)
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, attn_implementation="sdpa"
  ).eval()
  _generate(model, prompts, n)  # warm-up
  seconds, new = [], None
  for _ in range(reps):
    t0 = time.perf_counter()
    new = _generate(model, prompts, n)
    seconds.append(time.perf_counter() - t0)
  return {
    "seconds": seconds,
    "tokens": new.tolist(),
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("make-fixtures", help="write the golden fixtures")
  p.add_argument("out_dir")
  p.add_argument("--family", action="append", choices=FAMILIES)
  p = sub.add_parser("logits", help="logits of a model directory")
  p.add_argument("model_dir")
  p.add_argument("tokens")
  p.add_argument("out")
  p = sub.add_parser("generate", help="greedy tokens of a model directory")
  p.add_argument("model_dir")
  p.add_argument("prompts")
  p.add_argument("n", type=int)
  p.add_argument("out")
  p = sub.add_parser("make-model", help="a random Llama for benchmarks")
  p.add_argument("out_dir")
  p.add_argument("--hidden", type=int, default=576)
  p.add_argument("--layers", type=int, default=20)
  p.add_argument("--intermediate", type=int, default=1536)
  p.add_argument("--heads", type=int, default=9)
  p.add_argument("--kv_heads", type=int, default=3)
  p.add_argument("--vocab", type=int, default=49152)
  p.add_argument("--seed", type=int, default=SEED)
  p = sub.add_parser("bench-generate", help="time greedy generate")
  p.add_argument("model_dir")
  p.add_argument("prompts")
  p.add_argument("n", type=int)
  p.add_argument("threads", type=int)
  p.add_argument("--reps", type=int, default=1)
  args = parser.parse_args(argv)
  torch.set_num_threads(1)
  if args.cmd == "make-model":
    kw = {k: v for k, v in vars(args).items() if k not in ("cmd", "out_dir")}
    print(json.dumps({"parameters": make_model(args.out_dir, **kw)}))
    return
  if args.cmd == "bench-generate":
    result = bench_generate(
      args.model_dir, np.load(args.prompts), args.n, args.threads, args.reps
    )
    print(json.dumps(result))
    return
  if args.cmd == "make-fixtures":
    for family in args.family or FAMILIES:
      meta = make_family(family, args.out_dir)
      print(f"{family}: {json.dumps(meta['checks'])}")
  elif args.cmd == "logits":
    tokens = np.load(args.tokens)
    np.save(args.out, _logits(_load(args.model_dir), tokens))
  else:
    prompts = np.load(args.prompts)
    np.save(args.out, _generate(_load(args.model_dir), prompts, args.n))


if __name__ == "__main__":
  main()
