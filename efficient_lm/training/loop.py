"""The training loop: restore-or-init, jitted steps, metrics, eval, saves.

Python here only does I/O: it feeds batches, reads each step's metrics one
step late (after the next step is dispatched, so the device never idles on
the host), writes logs, evaluates and saves.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from etils import epath
from flax import nnx

from efficient_lm import data as data_lib
from efficient_lm import models, paths, sharding
from efficient_lm.config import Config, ConfigError
from efficient_lm.models import flops as flops_lib
from efficient_lm.training import console, distill, memory, optim
from efficient_lm.training import metrics as metrics_lib
from efficient_lm.training import state as state_lib
from efficient_lm.training import step as step_lib
from efficient_lm.training.checkpoint import Checkpointer
from efficient_lm.training.preemption import Preemption
from efficient_lm.training.train_log import TrainingError, TrainLog
from efficient_lm.training.workdir import TOKENIZER, WorkdirLock, record_start


@dataclasses.dataclass
class Trainer:
  """Everything built from the config before the first step runs."""

  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state_shardings: Any
  abstract_state: Any
  optimizer: optax.GradientTransformation
  init_fn: Callable
  train_step: jax.stages.Wrapped  # jitted: aot.py lowers it
  eval_step: Callable
  flops: dict[str, float]  # models.flops.flops_per_token
  param_count: dict[str, int]
  data_seed: int
  # train.objective='distill': the frozen teacher, the train step's third
  # argument (training/distill.py).
  teacher: distill.Teacher | None = None

  @property
  def flops_per_token(self) -> float:
    """Training FLOPs per token, dense_tile convention (MFU's)."""
    return self.flops["train"]

  @property
  def step_inputs(self) -> tuple[Any, ...]:
    """What `train_step(state, batch, *step_inputs)` takes after the batch:
    the teacher's variables when distilling, else nothing."""
    return () if self.teacher is None else (self.teacher.variables,)


def _fresh_state(optimizer, params, model_state) -> dict[str, Any]:
  """The train state before step 1: a fresh optimizer state, step 0."""
  return {
    "params": params,
    "model_state": model_state,
    "opt_state": optimizer.init(params),
    "step": jnp.zeros((), jnp.int32),
  }


def build_trainer(
  cfg: Config,
  devices=None,
  *,
  build_model: Callable = models.build,
  tokenizer: data_lib.Tokenizer | None = None,
) -> Trainer:
  """Model, optimizer, shardings and jitted steps; no data and no I/O.

  `build_model(model_cfg, rngs)` makes the model (tests pass their own).
  `tokenizer`: the run's (train.objective='mlm' reads its mask and special
  ids); None builds the tokenizer of `cfg.data` (the one I/O here, mlm
  only).
  """
  model = state_lib.abstract_state(
    cfg, sharding.make_mesh(cfg.mesh, devices), build_model=build_model
  )
  mesh = model.mesh
  optimizer = optim.make_optimizer(
    cfg.train,
    decay_mask=optim.decay_mask(
      model.param_vars, decay_embeddings=cfg.train.decay_embeddings
    ),
  )
  if cfg.train.objective in ("mlm", "distill") and tokenizer is None:
    tokenizer = make_tokenizer(cfg)
  teacher = None
  if cfg.train.objective == "distill":
    assert tokenizer is not None
    teacher = distill.load_teacher(cfg, mesh, tokenizer)
    objective = distill.objective(cfg, tokenizer)
  else:
    objective = state_lib.objective(cfg, tokenizer)

  def init_fn():
    _, params, model_state = nnx.split(
      model.build(), nnx.Param, models.ModelState
    )
    return _fresh_state(
      optimizer, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
    )

  abstract = jax.eval_shape(init_fn)
  replicated = sharding.replicated(mesh)
  state_sh = {
    **model.shardings,
    "opt_state": sharding.optax_state_shardings(
      optimizer, abstract["opt_state"], model.shardings["params"], mesh
    ),
    "step": replicated,
  }
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    state_sh,
  )
  make_step = functools.partial(
    step_lib.make_train_step,
    model.graphdef,
    optimizer,
    optim.schedule(cfg.train),
    objective,
    noise_key=model.keys.noise,
  )
  if teacher is None:
    train_step = jax.jit(
      sharding.under_mesh(mesh, make_step()),
      in_shardings=(state_sh, sharding.batch_sharding(mesh)),
      out_shardings=(state_sh, replicated),
      donate_argnums=(0,),
    )
    eval_step = state_lib.jit_eval_step(model, objective)
  else:
    train_step = distill.jit_train_step(model, teacher, make_step, state_sh)
    eval_step = distill.jit_eval_step(model, objective, teacher)
  return Trainer(
    cfg=cfg,
    mesh=mesh,
    graphdef=model.graphdef,
    state_shardings=state_sh,
    abstract_state=abstract_state,
    optimizer=optimizer,
    init_fn=jax.jit(init_fn, out_shardings=state_sh),
    train_step=train_step,
    eval_step=eval_step,
    flops=flops_lib.flops_per_token(cfg.model, cfg.data.seq_len),
    param_count=flops_lib.param_count(model.param_vars, cfg.model),
    data_seed=model.keys.data_seed,
    teacher=teacher,
  )


def start_state(t: Trainer, params: Any, model_state: Any) -> dict[str, Any]:
  """The train state of a run that starts from `params` and `model_state`
  (pure dicts shaped like `t.abstract_state`'s): those arrays as they are,
  a freshly initialised optimizer state and step 0, placed by
  `t.state_shardings`."""
  sh = t.state_shardings
  params = jax.device_put(params, sh["params"])
  model_state = jax.device_put(model_state, sh["model_state"])
  return jax.jit(
    lambda p, s: _fresh_state(t.optimizer, p, s), out_shardings=sh
  )(params, model_state)


def make_tokenizer(cfg: Config, run_copy: epath.PathLike | None = None):
  """`cfg.data`'s tokenizer, checked against the model's vocabulary;
  `run_copy`: the workdir's tokenizer.json (data.make_tokenizer)."""
  tok = data_lib.make_tokenizer(cfg.data, run_copy)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
      f"{cfg.data.tokenizer!r} tokenizer's vocabulary ({tok.vocab_size})"
    )
  if cfg.train.objective == "mlm" and tok.mask_id >= cfg.model.vocab_size:
    raise ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} does not cover the "
      f"{cfg.data.tokenizer!r} tokenizer's mask id {tok.mask_id} "
      f"(train.objective='mlm'): expected > {tok.mask_id}"
    )
  return tok


def make_iterator(t: Trainer, tok, split: data_lib.Split):
  return data_lib.make_iterator(
    t.cfg.data,
    split=split,
    global_batch_size=t.cfg.train.batch_size,
    seed=t.data_seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    tokenizer=tok,
  )


def evaluate(
  t: Trainer, it, start_state, state, num_batches: int
) -> dict[str, float]:
  """Eval metrics over the same first `num_batches` batches each time."""
  it.set_state(start_state)
  return evaluate_batches(
    t.eval_step, t.mesh, state, (next(it) for _ in range(num_batches))
  )


def evaluate_batches(
  eval_step: Callable, mesh: jax.sharding.Mesh, state, batches: Iterable[dict]
) -> dict[str, float]:
  """`eval_loss` (mean NLL per target token), `eval_<name>` for the
  objective's other per-token metrics (distillation: eval_kl, per token
  too) and for the model's aux entries (mean over batches) over the host
  `batches`, by the jitted `eval_step` (Trainer.eval_step,
  state.jit_eval_step) on `mesh`."""
  nll, tokens, sums, aux, n = 0.0, 0.0, {}, {}, 0
  for batch in batches:
    out = eval_step(
      state["params"],
      state["model_state"],
      sharding.host_to_global(mesh, batch),
    )
    out = jax.device_get(out)
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
    for k, v in out["sums"].items():
      sums[k] = sums.get(k, 0.0) + float(v)
    for k, v in out["aux"].items():
      aux[k] = aux.get(k, 0.0) + float(v)
    n += 1
  return {
    "eval_loss": nll / max(tokens, 1.0),
    **{f"eval_{k}": v / max(tokens, 1.0) for k, v in sums.items()},
    **{f"eval_{k}": v / max(n, 1) for k, v in aux.items()},
  }


def run(
  cfg: Config,
  workdir: str,
  *,
  hooks: Sequence[Callable[[int], None]] = (),
  overrides: Sequence[str] = (),
  build_model: Callable = models.build,
) -> dict[str, Any]:
  """Trains `cfg` in `workdir` (resuming if it holds a checkpoint).

  The workdir is locked for the run (WorkdirBusy if another run holds it);
  `overrides` (the command line's) go into its runs.jsonl record; `hooks`
  are called with each finished step; `build_model` replaces `models.build`
  (tests train their own modules through the real loop).
  """
  # Local: made absolute (orbax needs that); gs://: as it is. A malformed
  # URL fails here, before anything compiles or is written.
  path = paths.resolve(workdir)
  if not paths.is_remote(path):  # object stores have no directories
    path.mkdir(parents=True, exist_ok=True)
  workdir = str(path)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _run(cfg, workdir, hooks, overrides, build_model)


def _run(
  cfg: Config, workdir: str, hooks, overrides, build_model
) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  tok = make_tokenizer(cfg, epath.Path(workdir) / TOKENIZER)
  t = build_trainer(cfg, build_model=build_model, tokenizer=tok)
  problem = memory.fits_problem(
    t.abstract_state,
    t.mesh,
    num_params=t.param_count["total"],
    topology=cfg.topology,
  )
  if problem:  # before anything is allocated or written
    raise TrainingError(problem)
  train_it = make_iterator(t, tok, "train")
  ckpt = Checkpointer(
    epath.Path(workdir) / "checkpoints",
    every_steps=cfg.checkpoint.every_steps,
    keep=cfg.checkpoint.keep,
    async_save=cfg.checkpoint.async_save,
  )
  if t.teacher is not None:  # before a resume reads anything
    try:
      distill.check_record(
        workdir, t.teacher, resuming=ckpt.latest_step() is not None
      )
    except BaseException:
      ckpt.close()
      raise
  state, start = _restore_or_init(t, ckpt, train_it, is_main)
  if start >= cfg.train.steps:
    ckpt.close()
    return _already_complete(cfg, workdir, ckpt, start, is_main)
  if is_main:  # the run starts: only now does the workdir record it
    record_start(workdir, cfg.to_dict(), start_step=start, overrides=overrides)
    if t.teacher is not None:
      distill.write_record(workdir, t.teacher, start=start)
    data_lib.save_tokenizer(tok, epath.Path(workdir) / TOKENIZER)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, start_step=start)
  progress = console.Progress(cfg.train.steps, start, enabled=is_main)
  log = TrainLog(
    writer,
    progress,
    start=start,
    steps=cfg.train.steps,
    log_every=cfg.train.log_every,
    tokens_per_step=cfg.train.batch_size * cfg.data.seq_len,
    throughput=functools.partial(
      metrics_lib.throughput,
      flops_per_token=t.flops_per_token,
      visible_flops_per_token=t.flops["train_visible"],
      num_devices=len(t.mesh.devices.flat),
      device=t.mesh.devices.flat[0],
    ),
    checkpoint_note=lambda: console.no_good_checkpoint(
      ckpt.latest_step(), ckpt.directory
    ),
  )
  try:
    status = _train_steps(
      t, state, start, train_it, _evaluator(t, tok), ckpt, log, hooks
    )
  finally:
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  summary = {
    "status": status,
    "start_step": start,
    **log.summary(),
    "params": t.param_count,
    "flops_per_token": t.flops_per_token,
    "flops_per_token_visible": t.flops["train_visible"],
    "workdir": workdir,
    "checkpoints": ckpt.directory,
    "latest_checkpoint": ckpt.latest_step(),
  }
  if is_main:
    print(format_summary(summary), file=sys.stderr)
  return summary


def _restore_or_init(
  t: Trainer, ckpt: Checkpointer, train_it, is_main: bool
) -> tuple[Any, int]:
  """(state, step) of the newest good checkpoint (the data iterator set to
  its position), or of a fresh start at step 0."""
  try:
    restored = ckpt.restore_latest(t.abstract_state, config=t.cfg.to_dict())
  except BaseException:
    ckpt.close()
    raise
  if restored is None:
    return t.init_fn(), 0
  start, state, data_state = restored
  if "opt_state" not in state:
    # runs.write_run's weights-only step 0: the optimizer state and the
    # data position are a fresh run's, which train_it already is under this
    # run's data config (a fine-tuning of an imported model sets its own).
    fresh = start_state(t, state["params"], state["model_state"])
    state = {**fresh, "step": state["step"]}
  else:
    train_it.set_state(data_state)
  if is_main:
    print(f"resumed from step {start} in {ckpt.directory}", file=sys.stderr)
  return state, start


def _already_complete(
  cfg: Config, workdir: str, ckpt: Checkpointer, start: int, is_main: bool
) -> dict[str, Any]:
  if is_main:
    print(
      console.already_complete(
        start, cfg.train.steps, workdir, str(ckpt.directory)
      ),
      file=sys.stderr,
    )
  return {
    "status": "already_complete",
    "start_step": start,
    "final_step": start,
    "train_loss": None,
    "eval_loss": None,
    "tokens_per_sec": None,
    "workdir": workdir,
    "checkpoints": ckpt.directory,
    "latest_checkpoint": start,
  }


def _evaluator(t: Trainer, tok) -> Callable[[Any], dict] | None:
  """state -> the eval metrics of the loop's fixed eval batches; None when
  data.eval_fraction=0 (no held-out data: evaluation is skipped)."""
  if t.cfg.data.eval_fraction <= 0:
    return None
  it = make_iterator(t, tok, "eval")
  start = it.get_state()
  return lambda state: evaluate(t, it, start, state, t.cfg.train.eval_batches)


def _train_steps(
  t: Trainer, state, start: int, train_it, evaluator, ckpt, log, hooks
) -> str:
  """Steps start+1 .. train.steps, with their evaluations and saves;
  "completed", or "preempted" (saved where it stopped)."""
  cfg = t.cfg
  with Preemption() as preemption:
    for step in range(start + 1, cfg.train.steps + 1):
      batch = sharding.host_to_global(t.mesh, next(train_it))
      state, m = t.train_step(state, batch, *t.step_inputs)
      log.push(step, m)
      if evaluator is not None and (
        step % cfg.train.eval_every == 0 or step == cfg.train.steps
      ):
        log.flush()  # never evaluate or save a state that is not finite
        log.evaluated(step, evaluator(state))
      # Decided after the evaluation: a SIGTERM during it saves this step.
      # Every process decides the same (training/preemption.py).
      preempted = preemption.reached(step)
      if ckpt.should_save(step) or step == cfg.train.steps or preempted:
        log.flush()
        log.sync()  # a resume from this step finds all its rows
        ckpt.save(
          step,
          state,
          data_state=train_it.get_state(),
          config=cfg.to_dict(),
          force=True,
        )
      for hook in hooks:
        hook(step)
      if preempted:
        if jax.process_index() != 0:  # each host's log says where it stopped
          print(
            f"process {jax.process_index()}: preempted at step {step}, saved",
            file=sys.stderr,
            flush=True,
          )
        return "preempted"
    log.flush()
  return "completed"


def format_summary(s: dict[str, Any]) -> str:
  def f(x, fmt):
    return "n/a" if x is None else format(x, fmt)

  p = s["params"]
  active = (  # MoE: the parameters one token uses
    f", {p['active']:,} active"
    if p.get("active", p["total"]) < p["total"]
    else ""
  )

  return (
    f"Run {s['status']} at step {s['final_step']} (started at "
    f"{s['start_step']}): final train loss {f(s['train_loss'], '.4f')}, "
    f"eval loss {f(s['eval_loss'], '.4f')}, "
    f"{f(s['tokens_per_sec'], ',.0f')} tokens/s; "
    f"{s['params']['total']:,} parameters "
    f"({s['params']['non_embedding']:,} non-embedding{active}), "
    f"{metrics_lib.human(s['flops_per_token'])} training FLOPs/token "
    f"(dense_tile; {metrics_lib.human(s['flops_per_token_visible'])} "
    "visible). "
    f"Artifacts: {s['workdir']} (config.json, runs.jsonl, metrics.jsonl, "
    f"tensorboard/), "
    f"checkpoints in {s['checkpoints']} (latest step "
    f"{s['latest_checkpoint']})."
  )
