"""Pictures of runs (matplotlib: `pip install -e .[plot]`).

  python -m efficient_lm.plot curves --workdir=runs/a --workdir=runs/b \
      --out=loss.png
  python -m efficient_lm.plot routing --workdir=runs/mod --text="def f(x):" \
      --out=routing.png

`curves` draws each run's training loss (and eval loss, dashed) against
steps and against training FLOPs: steps x batch x seq_len x the layer
plan's training FLOPs per token (models/flops.py, dense_tile convention,
capacity-aware for routed models), so runs of different cost compare at
equal compute. `routing` draws which tokens of `--text` each routed block
(MoD) or recursion step (MoR) processes, as a heatmap over the text (as in
the MoD paper's figure), with the causal decision the model samples with.
"""

from __future__ import annotations

import argparse
import json
import sys


def read_metrics(workdir: str) -> tuple[list, list]:
  """(train rows, eval rows) of <workdir>/metrics.jsonl: (step, loss)."""
  path = _workdir(workdir) / "metrics.jsonl"
  if not path.exists():
    raise ValueError(
      f"--workdir={workdir}: no metrics.jsonl (not a run "
      "directory, or it has not logged a step yet)"
    )
  train, evals = {}, {}
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if "loss" in rec:
      train[rec["step"]] = rec["loss"]  # a resumed run's rows win
    if "eval_loss" in rec:
      evals[rec["step"]] = rec["eval_loss"]
  return sorted(train.items()), sorted(evals.items())


def flops_per_step(workdir: str) -> float:
  """Training FLOPs of one step of the run, from its saved config."""
  from efficient_lm import config as config_lib
  from efficient_lm.models import flops as flops_lib

  path = _workdir(workdir) / "config.json"
  if not path.exists():
    raise ValueError(f"--workdir={workdir}: no config.json")
  cfg = config_lib.from_config_dict(json.loads(path.read_text()))
  per_token = flops_lib.flops_per_token(cfg.model, cfg.data.seq_len)["train"]
  return per_token * cfg.train.batch_size * cfg.data.seq_len


def _workdir(workdir: str):
  """`workdir` as an epath.Path (local or gs://); PathError if malformed."""
  from efficient_lm import paths

  return paths.resolve(workdir)


def curves(workdirs: list[str], out: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, wd in enumerate(workdirs):
    train, evals = read_metrics(wd)
    per_step = flops_per_step(wd)
    label = _workdir(wd).name
    color = f"C{i}"
    for ax, scale in ((by_step, 1.0), (by_flops, per_step)):
      if train:
        s, l = zip(*train, strict=True)
        ax.plot([x * scale for x in s], l, color=color, label=label)
      if evals:
        s, l = zip(*evals, strict=True)
        ax.plot(
          [x * scale for x in s],
          l,
          "o--",
          color=color,
          ms=3,
          label=f"{label} (eval)",
        )
  by_step.set_xlabel("step")
  by_flops.set_xlabel("training FLOPs (model, dense_tile)")
  by_flops.set_xscale("log")
  by_flops.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  for ax in (by_step, by_flops):
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
  by_step.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def routing(workdir: str, text: str, out: str, max_tokens: int) -> None:
  import numpy as np
  import jax.numpy as jnp
  from efficient_lm import runs

  run = runs.load_run(workdir)
  ids = run.tokenizer.encode(text)[:max_tokens]
  if not ids:
    raise ValueError("--text is empty after tokenisation")
  tokens = jnp.asarray([ids], jnp.int32)
  pos = jnp.arange(len(ids), dtype=jnp.int32)[None]
  seg = jnp.ones_like(tokens)
  model = run.model()
  # The decoder has it; a funnel or hourglass model does not.
  routing_decisions = getattr(model, "routing_decisions", None)
  if routing_decisions is None:
    raise ValueError(
      f"{workdir}: a {type(model).__name__} model has no routed layers"
    )
  decisions = routing_decisions(tokens, pos, seg)
  names = list(decisions)
  grid = np.stack([np.asarray(decisions[n][0], np.float32) for n in names])
  pieces = [run.tokenizer.decode([i]) for i in ids]
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  width = max(6.0, 0.18 * len(ids))
  fig, ax = plt.subplots(figsize=(width, 0.45 * len(names) + 1.2))
  ax.imshow(
    grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest"
  )
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xticks(
    range(len(ids)),
    [repr(p)[1:-1] or " " for p in pieces],
    fontsize=7,
    rotation=90,
  )
  kind = run.config.model.routing.kind
  ax.set_title(
    f"{_workdir(workdir).name}: tokens "
    f"each routed {'recursion step' if kind == 'mor' else 'block'}"
    " processes (causal decision, step "
    f"{run.step}); processed {grid.mean():.0%}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m efficient_lm.plot")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("curves", help="loss vs steps and vs training FLOPs")
  c.add_argument("--workdir", action="append", required=True)
  c.add_argument("--out", default="loss.png")
  r = sub.add_parser("routing", help="which tokens each routed layer runs")
  r.add_argument("--workdir", required=True)
  r.add_argument("--text", required=True)
  r.add_argument("--out", default="routing.png")
  r.add_argument("--max_tokens", type=int, default=160)
  args = p.parse_args(argv)
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    sys.exit("error: plotting needs matplotlib: pip install -e '.[plot]'")
  from efficient_lm import runs

  try:
    if args.command == "curves":
      curves(args.workdir, args.out)
    else:
      routing(args.workdir, args.text, args.out, args.max_tokens)
  except (ValueError, *runs.ERRORS) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
