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
from efficient_lm.surgery import importance, prune
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


def apply(
  s: Surgery,
  args: argparse.Namespace,
  batches: list[dict],
  log: Callable[[str], None],
) -> tuple[Surgery, list[dict]]:
  """The operations of `args` in order (layers, heads, FFN) -> (the
  pruned model, one provenance record per operation)."""
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
  return s, records


def run(
  args: argparse.Namespace, overrides: list[str], log: Callable[[str], None]
) -> str:
  """The CLI's work: nothing is written before every check has passed."""
  out = paths.resolve(args.out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise SurgeryError(f"--out={args.out} exists and is not empty")
  runs.parse_overrides(overrides)
  src = runs.load_run(args.workdir, devices=jax.local_devices()[:1])
  check_supported(src)
  batches, calib = calibration_batches(src, overrides, args.calibration_tokens)
  s = Surgery.of(src.config, src.params)
  s, records = apply(s, args, batches, log)
  provenance = {
    "tool": "efficient_lm.surgery",
    "source_workdir": src.workdir,
    "source_step": src.step,
    "calibration": calib,
    "operations": records,
  }
  return runs.write_run(
    args.out,
    s.cfg,
    s.params(),
    src.model_state,
    src.tokenizer,
    provenance,
    devices=jax.local_devices()[: s.cfg.mesh.size],
  )
