"""Load a run, read the calibration batches, apply the operations in
order, write the new run."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_lm import data as data_lib
from efficient_lm import paths, runs
from efficient_lm.surgery import convert, importance, prune
from efficient_lm.surgery.model import Surgery
from efficient_lm.surgery.prune import SurgeryError

_KEYS = ("inputs", "targets", "positions", "segment_ids")


def check_supported(run: runs.LoadedRun) -> None:
  m = run.config.model
  if m.kind != "decoder":
    raise SurgeryError(
      f"model.kind={m.kind!r}: surgery handles decoders only (not the "
      "funnel encoder or the hourglass)"
    )
  if m.routing.kind != "none":
    raise SurgeryError(
      f"model.routing.kind={m.routing.kind!r}: surgery handles unrouted "
      "decoders only (not mixture-of-depths or -recursions)"
    )
  if jax.tree.leaves(run.model_state):
    raise SurgeryError("the model has non-trainable state; not supported")


def calibration_batches(
  run: runs.LoadedRun, overrides: list[str], tokens: int
) -> tuple[list[dict], dict[str, Any]]:
  """The first batches of the eval split (of the data the overrides
  name) holding at least `tokens` tokens (batch_size x seq_len each)."""
  cfg = run.config
  data = dataclasses.replace(cfg.data, **runs.parse_overrides(overrides))
  per_batch = cfg.train.batch_size * data.seq_len
  n = -(-tokens // per_batch)
  it = data_lib.make_iterator(
    data,
    "eval",
    global_batch_size=cfg.train.batch_size,
    seed=run.data_seed,
    tokenizer=run.tokenizer,
    num_epochs=1,
  )
  batches = [
    {k: jnp.asarray(b[k]) for k in _KEYS} for b in itertools.islice(it, n)
  ]
  if not batches:
    raise SurgeryError("the calibration data holds no batch")
  info = {
    "data_source": data.source,
    "data_path": data.path,
    "seq_len": data.seq_len,
    "eval_fraction": data.eval_fraction,
    "batches": len(batches),
    "tokens": len(batches) * per_batch,
    "real_tokens": int(sum(np.sum(b["segment_ids"] > 0) for b in batches)),
  }
  return batches, info


def _kv_groups(s: Surgery) -> list[int]:
  return [lay["attn"]["k_DGK"].shape[1] for lay in s.layers]


def _line(name: str, before: dict, after: dict) -> str:
  def num(key, fmt):
    return f"{fmt(before[key])} -> {fmt(after[key])}"

  return (
    f"surgery: {name}: params {num('params', '{:,}'.format)}, "
    f"FLOPs/token {num('flops_per_token', '{:,.0f}'.format)}, "
    f"KV cache bytes/token {num('kv_bytes_per_token', '{:,}'.format)}, "
    f"calibration loss {num('loss', '{:.4f}'.format)}"
  )


def _parse_conversions(
  s: Surgery, args: argparse.Namespace, model_keys: dict, num_layers: int
) -> dict[str, Any]:
  """The conversions' arguments, checked before anything is computed
  (`num_layers`: the count the layer drop leaves)."""
  out: dict[str, Any] = {}
  for section, flag in convert.MODEL_SECTIONS.items():
    if model_keys[section] and getattr(args, flag) is None:
      raise SurgeryError(
        f"--config.model.{section}.* keys are for --{flag}; it is not given"
      )
  if args.hourglass_factor is not None and args.to_hourglass is None:
    raise SurgeryError("--hourglass_factor is for --to_hourglass")
  if args.to_hourglass is not None and args.to_mor is not None:
    raise SurgeryError(
      "--to_hourglass and --to_mor: give one (mixture-of-recursions routes "
      "a plain decoder's layers)"
    )
  if args.to_gqa is not None:
    out["to_gqa"] = convert.parse_count(args.to_gqa, "to_gqa")
    convert.check_gqa(s, out["to_gqa"])
  if args.to_attention is not None:
    if num_layers == s.num_layers:  # the config checks, nothing computed
      convert.to_attention(s, args.to_attention, model_keys["attention"])
  if args.to_mla is not None:
    out["to_mla"] = convert.parse_count(args.to_mla, "to_mla")
    convert.check_mla(s, out["to_mla"])
  if args.to_hourglass is not None:
    out["to_hourglass"] = convert.parse_hourglass(args.to_hourglass, num_layers)
    factor = 2 if args.hourglass_factor is None else args.hourglass_factor
    if factor < 1:
      raise SurgeryError(f"--hourglass_factor={factor}: expected >= 1")
    out["hourglass_factor"] = factor
  if args.to_mor is not None:
    out["to_mor"] = convert.parse_count(args.to_mor, "to_mor")
    if num_layers == s.num_layers:  # the fit and the config (host arrays)
      convert.to_mor(s, out["to_mor"], model_keys["routing"])
  if args.to_moe is not None:
    if args.to_hourglass is not None or args.to_mor is not None:
      raise SurgeryError(
        "--to_moe with --to_hourglass or --to_mor: experts go into a plain "
        "decoder's layers only"
      )
    out["to_moe"] = convert.parse_count(args.to_moe, "to_moe")
    convert.moe_config(s.cfg, out["to_moe"], model_keys["moe"])
  return out


def apply(
  s: Surgery,
  args: argparse.Namespace,
  batches: list[dict],
  log: Callable[[str], None],
  model_keys: dict | None = None,
) -> tuple[Surgery, list[dict]]:
  """The operations of `args` in order (layers, heads, FFN, width, then
  the conversions: GQA, attention kind, MLA, hourglass or MoR) -> (the
  new model, one provenance record per operation). `model_keys`: the
  --config.model.attention.* / routing.* values (convert.split_overrides)."""
  model_keys = model_keys or {k: {} for k in convert.MODEL_SECTIONS}
  records = []
  # Parse every operation's arguments before the first one runs.
  drop = (
    None
    if args.drop_layers is None
    else prune.parse_drop(args.drop_layers, s.num_layers)
  )
  heads = None if args.heads is None else prune.parse_keep(args.heads, "heads")
  ffn = None if args.ffn is None else prune.parse_keep(args.ffn, "ffn")
  if heads is not None:  # refused before anything is computed
    prune.check_heads(s)
    prune.heads_keep(s, [np.zeros(g) for g in _kv_groups(s)], heads)
  if ffn is not None:
    if not all("gate_DF" in lay["mlp"] for lay in s.layers):
      raise SurgeryError("--ffn: every layer needs a dense gated MLP")
    widths = [lay["mlp"]["gate_DF"].shape[1] for lay in s.layers]
    prune.ffn_keep([np.zeros(w) for w in widths], ffn, args.ffn_per_layer)
  width = None
  if args.width is not None:
    width = prune.check_width(s, prune.parse_keep(args.width, "width"))
  if drop is None:
    remaining = s.num_layers
  else:
    remaining = s.num_layers - (drop if isinstance(drop, int) else len(drop))
  conv = _parse_conversions(s, args, model_keys, remaining)
  before = s.measure(batches)

  def done(op, args_, new, extra):
    nonlocal before
    after = new.measure(batches)
    log(_line(op, before, after))
    records.append(
      {"op": op, "args": args_, "before": before, "after": after, **extra}
    )
    before = after
    return new

  if drop is not None:
    crit = args.layer_criterion
    if isinstance(drop, int):
      scores = importance.layer_scores(s, batches, crit)
      dropped = sorted(int(i) for i in np.argsort(scores, kind="stable")[:drop])
      extra = {"scores": [float(v) for v in scores]}
    else:
      dropped, extra = drop, {}
    s = done(
      "drop_layers",
      {"drop_layers": args.drop_layers, "layer_criterion": crit},
      prune.drop_layers(s, dropped),
      {"dropped": dropped, **extra},
    )
  if heads is not None:
    crit = args.head_criterion
    scores = importance.head_scores(s, batches, crit, args.seed)
    kept = prune.heads_keep(s, scores, heads)
    s = done(
      "heads",
      {"heads": args.heads, "head_criterion": crit, "seed": args.seed},
      prune.prune_heads(s, kept),
      {
        "kept_groups": [k.tolist() for k in kept],
        "importance": prune.summary(scores, kept),
      },
    )
  if ffn is not None:
    crit = args.ffn_criterion
    scores = importance.ffn_scores(s, batches, crit, args.seed)
    kept = prune.ffn_keep(scores, ffn, args.ffn_per_layer)
    s = done(
      "ffn",
      {
        "ffn": args.ffn,
        "ffn_criterion": crit,
        "ffn_per_layer": args.ffn_per_layer,
        "seed": args.seed,
      },
      prune.prune_ffn(s, kept),
      {
        "widths": [len(k) for k in kept],
        "importance": prune.summary(scores, kept),
      },
    )
  if width is not None:
    scores = importance.width_scores(s, batches)
    kept = prune.width_keep(scores, width)
    s = done(
      "width",
      {"width": args.width},
      prune.prune_width(s, kept),
      {
        "kept_channels": kept.tolist(),
        "importance": prune.summary([scores], [kept])[0],
      },
    )
  if "to_gqa" in conv:
    s = done(
      "to_gqa",
      {"to_gqa": conv["to_gqa"]},
      convert.to_gqa(s, conv["to_gqa"]),
      {},
    )
  if args.to_attention is not None:
    keys = model_keys["attention"]
    s = done(
      "to_attention",
      {"to_attention": args.to_attention, "attention": keys},
      convert.to_attention(s, args.to_attention, keys),
      {},
    )
  if "to_mla" in conv:
    new, errors = convert.to_mla(s, conv["to_mla"], batches)
    for e in errors:
      log(
        f"surgery: to_mla: layer {e['layer']}: key error "
        f"{e['key_error']:.4f}, latent error {e['latent_error']:.4f}"
      )
    s = done(
      "to_mla",
      {"to_mla": conv["to_mla"]},
      new,
      {"reconstruction": errors},
    )
  if "to_hourglass" in conv:
    k, m = conv["to_hourglass"]
    s = done(
      "to_hourglass",
      {
        "to_hourglass": args.to_hourglass,
        "hourglass_factor": conv["hourglass_factor"],
      },
      convert.to_hourglass(s, k, m, conv["hourglass_factor"]),
      {"stages": [k, m - k, s.num_layers - m]},
    )
  if "to_mor" in conv:
    keys = model_keys["routing"]
    s = done(
      "to_mor",
      {"to_mor": conv["to_mor"], "routing": keys},
      convert.to_mor(s, conv["to_mor"], keys),
      {},
    )
  return s, records


def run(
  args: argparse.Namespace, overrides: list[str], log: Callable[[str], None]
) -> str:
  """The CLI's work: nothing is written before every check has passed."""
  out = paths.resolve(args.out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise SurgeryError(f"--out={args.out} exists and is not empty")
  overrides, model_keys = convert.split_overrides(overrides)
  runs.parse_overrides(overrides)
  src = runs.load_run(args.workdir, devices=jax.local_devices()[:1])
  check_supported(src)
  batches, calib = calibration_batches(src, overrides, args.calibration_tokens)
  s = Surgery.of(src.config, src.params)
  s, records = apply(s, args, batches, log, model_keys)
  cfg, params, model_state = s.cfg, s.params(), src.model_state
  if args.to_moe is not None:  # last: surgery's measures are dense-only
    experts = convert.parse_count(args.to_moe, "to_moe")
    cfg, params, model_state = convert.to_moe(
      cfg, params, experts, model_keys["moe"], args.seed
    )
    before = sum(int(np.size(a)) for a in jax.tree.leaves(s.params()))
    after = sum(int(np.size(a)) for a in jax.tree.leaves(params))
    log(
      f"surgery: to_moe: params {before:,} -> {after:,} "
      f"({experts} experts per MoE layer, each a copy of its dense MLP)"
    )
    records.append(
      {
        "op": "to_moe",
        "args": {"to_moe": experts, "moe": model_keys["moe"]},
        "before": {"params": before},
        "after": {"params": after},
      }
    )
  provenance = {
    "tool": "efficient_lm.surgery",
    "source_workdir": src.workdir,
    "source_step": src.step,
    "calibration": calib,
    "operations": records,
  }
  return runs.write_run(
    args.out,
    cfg,
    params,
    model_state,
    src.tokenizer,
    provenance,
    devices=jax.local_devices()[: cfg.mesh.size],
  )
