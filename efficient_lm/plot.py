"""Pictures of runs (matplotlib: `pip install -e .[plot]`).

  python -m efficient_lm.plot curves --workdir=runs/a --workdir=runs/b \
      --out=loss.png
  python -m efficient_lm.plot routing --workdir=runs/mod --text="def f(x):" \
      --out=routing.png

`curves` draws each run's training loss (and eval loss, dashed) against
steps and against training FLOPs: steps x batch x seq_len x the layer
plan's training FLOPs per token (models/flops.py, dense_tile convention,
capacity-aware for routed models), so runs of different cost compare at
equal compute. The loss is the run's objective's (next-token or MLM
cross-entropy); runs of different objectives name theirs in the legend.
`routing` draws which tokens of `--text` each routed block (MoD) or
recursion step (MoR) processes, as a heatmap over the text (as in the MoD
paper's figure), with the causal decision the model samples with.

Both run on the CPU alone where no accelerator is attached (the rule of
train, evaluate and generate: cpu_runtime.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

# train.objective -> what its loss is, for the axis and the legend.
OBJECTIVES = {
  "next_token": "next-token CE",
  "mlm": "MLM CE on the masked tokens",
}


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


def _config(workdir: str):
  """The run's saved Config."""
  from efficient_lm import config as config_lib

  path = _workdir(workdir) / "config.json"
  if not path.exists():
    raise ValueError(f"--workdir={workdir}: no config.json")
  return config_lib.from_config_dict(json.loads(path.read_text()))


def flops_per_step(workdir: str) -> float:
  """Training FLOPs of one step of the run, from its saved config."""
  from efficient_lm.models import flops as flops_lib

  cfg = _config(workdir)
  per_token = flops_lib.flops_per_token(cfg.model, cfg.data.seq_len)["train"]
  return per_token * cfg.train.batch_size * cfg.data.seq_len


def _workdir(workdir: str):
  """`workdir` as an epath.Path (local or gs://); PathError if malformed."""
  from efficient_lm import paths

  return paths.resolve(workdir)


def _check_out(out: str) -> None:
  """A one-line ValueError before any work if `out` cannot be written."""
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise ValueError(f"--out={out}: directory {parent} does not exist")


def _save(fig, out: str) -> None:
  try:
    fig.savefig(out, dpi=120)
  except OSError as e:  # not writable, a directory, ...
    raise ValueError(f"--out={out}: {e.strerror or e}") from None


def curves(workdirs: list[str], out: str):
  """Draws the runs' curves into `out`; returns the figure."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  _check_out(out)
  runs = [
    (wd, read_metrics(wd), _config(wd).train.objective) for wd in workdirs
  ]
  objectives = {objective for _, _, objective in runs}
  fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, (wd, (train, evals), objective) in enumerate(runs):
    per_step = flops_per_step(wd)
    label = _workdir(wd).name
    if len(objectives) > 1:  # losses of different objectives: say which
      label = f"{label} ({OBJECTIVES.get(objective, objective)})"
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
  if len(objectives) == 1:
    [objective] = objectives
    ylabel = f"loss ({OBJECTIVES.get(objective, objective)})"
  else:
    ylabel = "loss (each run's objective: not comparable)"
  for ax in (by_step, by_flops):
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
  by_step.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, out)
  return fig


def routing(workdir: str, text: str, out: str, max_tokens: int):
  """Draws the routing heatmap of `text` into `out`; returns the figure."""
  import numpy as np
  import jax.numpy as jnp
  from efficient_lm import runs

  _check_out(out)
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
  unit = "recursion step" if run.config.model.routing.kind == "mor" else "block"
  title = (
    f"{_workdir(workdir).name}: tokens each routed {unit} processes (causal "
    f"decision, step {run.step}); processed {grid.mean():.0%}"
  )
  fig = routing_figure(grid, names, pieces, title=title, unit=unit)
  _save(fig, out)
  return fig


def routing_figure(grid, names: list[str], pieces: list[str], *, title, unit):
  """The heatmap: one row per routed layer (`names`), one column per token
  (`pieces`, its text); `grid[row, col]` 1 where the layer processes it."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  width = max(6.0, 0.18 * len(pieces))
  fig, ax = plt.subplots(figsize=(width, 0.45 * len(names) + 1.8))
  ax.imshow(
    grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest"
  )
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xticks(
    range(len(pieces)),
    [repr(p)[1:-1] or " " for p in pieces],
    fontsize=7,
    rotation=90,
  )
  ax.set_xlabel(
    f"dark cell: the {unit} processes that token; white: the token skips it",
    fontsize=8,
  )
  # About 11 characters of 9-point text per inch: wrap within the figure.
  fig.suptitle(textwrap.fill(title, int(width * 11)), fontsize=9)
  fig.tight_layout()
  return fig


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
    sys.exit(
      "error: plotting needs matplotlib: .venv/bin/pip install -e '.[plot]'"
    )
  from efficient_lm import cpu_runtime, runs

  cpu_runtime.use_cpu_only_without_accelerator()  # keeps libtpu's noise out
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
