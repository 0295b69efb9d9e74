"""The training loop: restore-or-init, jitted steps, metrics, eval, saves.

Python here only does I/O: it feeds batches, reads each step's metrics one
step late (after the next step is dispatched, so the device never idles on
the host), writes logs, evaluates and saves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efficient_lm import data as data_lib
from efficient_lm.config import Config, ConfigError
from efficient_lm.models import transformer
from efficient_lm.training import metrics as metrics_lib
from efficient_lm.training import optim, sharding, step as step_lib
from efficient_lm.training.checkpoint import Checkpointer


class TrainingError(RuntimeError):
  """The run cannot continue (e.g. the loss became NaN)."""


@dataclasses.dataclass
class Trainer:
  """Everything built from the config before the first step runs."""
  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state_shardings: Any
  abstract_state: Any
  init_fn: Callable
  train_step: Callable
  eval_step: Callable
  flops_per_token: float
  param_count: dict[str, int]
  data_seed: int


def build_trainer(cfg: Config, devices=None) -> Trainer:
  """Model, shardings and jitted steps; no data and no I/O."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  # One seed, split once (DESIGN contract 6). Dropout / routing keys are
  # reserved for the models that use them.
  k_params, k_data, _k_dropout, _k_routing = jax.random.split(
    jax.random.key(cfg.train.seed), 4)
  data_seed = int(jax.random.randint(k_data, (), 0, 2**31 - 1))

  abstract_model = nnx.eval_shape(
    lambda: transformer.build(cfg.model, nnx.Rngs(params=k_params)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  optimizer = optim.make_optimizer(
    cfg.train, decay_mask=optim.decay_mask(abstract_params))
  schedule = optim.schedule(cfg.train)

  def init_fn():
    model = transformer.build(cfg.model, nnx.Rngs(params=k_params))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32)}

  param_sh = sharding.named(mesh, sharding.param_specs(abstract_params))
  abstract = jax.eval_shape(init_fn)
  replicated = sharding.replicated(mesh)
  opt_sh = optax_state_shardings(optimizer, abstract["opt_state"], param_sh,
                                 replicated)
  state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract, state_sh)

  batch_sh = sharding.batch_sharding(mesh)
  train_step = jax.jit(
    sharding.under_mesh(mesh, step_lib.make_train_step(
      graphdef, optimizer, schedule, cfg.train.z_loss)),
    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
    donate_argnums=(0,))
  eval_step = jax.jit(sharding.under_mesh(mesh,
                                          step_lib.make_eval_step(graphdef)),
                      in_shardings=(param_sh, batch_sh),
                      out_shardings=replicated)
  return Trainer(
    cfg=cfg, mesh=mesh, graphdef=graphdef,
    state_shardings=state_sh, abstract_state=abstract_state,
    init_fn=jax.jit(init_fn, out_shardings=state_sh),
    train_step=train_step, eval_step=eval_step,
    flops_per_token=transformer.flops_per_token(
      cfg.model, cfg.data.seq_len)["train"],
    param_count=transformer.param_count(cfg.model), data_seed=data_seed)


def optax_state_shardings(optimizer, abstract_opt_state, param_sh,
                          replicated):
  """Moments follow their parameter's sharding; scalars are replicated."""
  return optax.tree_map_params(
    optimizer, lambda _, s: s, abstract_opt_state, param_sh,
    transform_non_params=lambda _: replicated)


def make_tokenizer(cfg: Config):
  tok = data_lib.make_tokenizer(cfg.data)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
      f"{cfg.data.tokenizer!r} tokenizer's vocabulary ({tok.vocab_size})")
  return tok


def make_iterator(t: Trainer, tok, split: str):
  return data_lib.make_iterator(
    t.cfg.data, split=split, global_batch_size=t.cfg.train.batch_size,
    seed=t.data_seed, process_index=jax.process_index(),
    process_count=jax.process_count(), tokenizer=tok)


def evaluate(t: Trainer, it, start_state, params, num_batches: int) -> float:
  """Mean eval loss over the same first `num_batches` batches each time."""
  it.set_state(start_state)
  nll, tokens = 0.0, 0.0
  for _ in range(num_batches):
    out = t.eval_step(params, sharding.host_to_global(t.mesh, next(it)))
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
  return nll / max(tokens, 1.0)


class _SigtermFlag:
  """Turns SIGTERM into a flag checked between steps (preemption-safe)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run(cfg: Config, workdir: str, *,
        hooks: Sequence[Callable[[int], None]] = ()) -> dict[str, Any]:
  """Trains `cfg` in `workdir` (resuming if it holds a checkpoint)."""
  workdir = os.path.abspath(workdir)   # orbax needs absolute paths
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json())
  tok = make_tokenizer(cfg)
  t = build_trainer(cfg)
  train_it = make_iterator(t, tok, "train")
  # data.eval_fraction=0 means no held-out data: evaluation is skipped.
  eval_it = (make_iterator(t, tok, "eval") if cfg.data.eval_fraction > 0
             else None)
  eval_start = eval_it.get_state() if eval_it is not None else None
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      every_steps=cfg.checkpoint.every_steps,
                      keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save)
  restored = ckpt.restore_latest(t.abstract_state)
  if restored is None:
    state, start = t.init_fn(), 0
  else:
    start, state, data_state = restored
    train_it.set_state(data_state)
    if is_main:
      print(f"resumed from step {start} in {ckpt.directory}", file=sys.stderr)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  progress = _progress(cfg.train.steps, start, is_main)
  summary: dict[str, Any] = {"status": "completed", "start_step": start}
  pending = None           # (step, device metrics) not yet read
  window = {"t0": None, "steps": 0}
  timing = {"t_first": None, "steps_after_first": 0}
  last: dict[str, float] = {}

  def read(step_and_metrics):
    step, m = step_and_metrics
    host = {k: float(v) for k, v in jax.device_get(m).items()}
    if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
      raise TrainingError(
        f"loss={host['loss']} grad_norm={host['grad_norm']} at step {step}: "
        f"stopping; the last good checkpoint is step {ckpt.latest_step()} "
        f"in {ckpt.directory}")
    now = time.perf_counter()
    if timing["t_first"] is None:   # first step includes compilation
      timing["t_first"] = window["t0"] = now
    else:
      timing["steps_after_first"] += 1
      window["steps"] += 1
    last.update(host, step=step)
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      elapsed = now - window["t0"]
      n = max(window["steps"], 1)
      tput = metrics_lib.throughput(
        tokens=tokens_per_step * window["steps"], seconds=elapsed,
        flops_per_token=t.flops_per_token, num_devices=len(t.mesh.devices.flat),
        device=t.mesh.devices.flat[0]) if window["steps"] else {}
      record = {**host, "step_time": elapsed / n, **tput}
      writer.write(step, record)
      progress.set_postfix(loss=f"{host['loss']:.4f}",
                           tok_s=metrics_lib.human(
                             tput.get("tokens_per_sec", 0.0)))
      window.update(t0=now, steps=0)

  try:
    with _SigtermFlag() as sigterm:
      for step in range(start + 1, cfg.train.steps + 1):
        batch = sharding.host_to_global(t.mesh, next(train_it))
        state, m = t.train_step(state, batch)
        if pending is not None:
          read(pending)
        pending = (step, m)
        progress.update(1)
        is_eval = eval_it is not None and (
          step % cfg.train.eval_every == 0 or step == cfg.train.steps)
        must_save = (ckpt.should_save(step) or step == cfg.train.steps
                     or sigterm.raised)
        if is_eval or must_save:
          # Never save or evaluate a state whose update was not finite.
          read(pending)
          pending = None
        if is_eval:
          last["eval_loss"] = evaluate(t, eval_it, eval_start,
                                       state["params"],
                                       cfg.train.eval_batches)
          writer.write(step, {"eval_loss": last["eval_loss"]})
        if must_save:
          ckpt.save(step, state, data_state=train_it.get_state(),
                    config=cfg.to_dict(), force=True)
        for hook in hooks:
          hook(step)
        if sigterm.raised:
          summary["status"] = "preempted"
          break
      if pending is not None:
        read(pending)
  finally:
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()

  steps_timed = timing["steps_after_first"]
  elapsed_total = (time.perf_counter() - timing["t_first"]
                   if timing["t_first"] else 0.0)
  summary.update(
    final_step=int(last.get("step", start)),
    train_loss=last.get("loss"), eval_loss=last.get("eval_loss"),
    tokens_per_sec=(tokens_per_step * steps_timed / elapsed_total
                    if steps_timed else None),
    params=t.param_count, flops_per_token=t.flops_per_token,
    workdir=workdir, checkpoints=ckpt.directory,
    latest_checkpoint=ckpt.latest_step())
  if is_main:
    print(format_summary(summary), file=sys.stderr)
  return summary


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled,
              desc="train", unit="step", dynamic_ncols=True,
              file=sys.stderr)


def format_summary(s: dict[str, Any]) -> str:
  def f(x, fmt):
    return "n/a" if x is None else format(x, fmt)
  return (
    f"Run {s['status']} at step {s['final_step']} (started at "
    f"{s['start_step']}): final train loss {f(s['train_loss'], '.4f')}, "
    f"eval loss {f(s['eval_loss'], '.4f')}, "
    f"{f(s['tokens_per_sec'], ',.0f')} tokens/s; "
    f"{s['params']['total']:,} parameters "
    f"({s['params']['non_embedding']:,} non-embedding), "
    f"{metrics_lib.human(s['flops_per_token'])} training FLOPs/token. "
    f"Artifacts: {s['workdir']} (config.json, metrics.jsonl, tensorboard/), "
    f"checkpoints in {s['checkpoints']} (latest step "
    f"{s['latest_checkpoint']}).")

