"""A trained run, loaded read-only for evaluation and generation; a new
run written from given weights.

  run = runs.load_run("runs/tiny")       # newest good checkpoint
  model = run.model()                    # nnx module, params restored
  ids = run.tokenizer.encode("def f(")
  result = runs.evaluate(run)            # loss, ppl, bits/byte on eval
  runs.write_run("runs/ported", cfg, params, model_state, tok,
                 {"from": "..."})        # a run at step 0: train resumes it

load_run writes, renames and locks nothing in the workdir, so a run that
is still training there is undisturbed, and a copy of a run on a read-only
disk loads too. Callers catch `runs.ERRORS` and print the one-line message.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import itertools
import json
import math
import socket
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from efficient_lm import config as config_lib
from efficient_lm import data as data_lib
from efficient_lm import models, paths, sharding
from efficient_lm.config import Config, ConfigError, DataConfig
from efficient_lm.config.schemes import Scheme, parse_scheme
from efficient_lm.models import quantization
from efficient_lm.data import DataError, Tokenizer
from efficient_lm.training import checkpoint, loop
from efficient_lm.training import state as state_lib
from efficient_lm.training.checkpoint import Checkpointer, CheckpointError
from efficient_lm.training.fingerprints import flat
from efficient_lm.training.workdir import (
  CONFIG,
  PROVENANCE,
  TOKENIZER,
  WorkdirLock,
  write_config,
)


class RunError(ValueError):
  """The directory is not a trained run (or holds no checkpoint yet)."""


# Every error load_run raises for bad input; each message is one line.
ERRORS = (RunError, ConfigError, DataError, CheckpointError)


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """What load_run read.

  `config` is the checkpoint's config with the data overrides applied and
  a mesh fitted to this host; `tokenizer` the one the run trained with;
  `step` the checkpoint's; `params` and `model_state` are pure dicts
  sharded over `mesh`; `eval_step` is the jitted evaluation step
  (params, model_state, global batch) -> sums (training/step.py) and
  `data_seed` the run's data seed. No optimizer and no train step are
  built.
  """

  workdir: str
  config: Config
  tokenizer: Tokenizer
  step: int
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  eval_step: Callable
  data_seed: int
  params: Any
  model_state: Any

  def model(self) -> nnx.Module:
    """The model with the restored parameters (a fresh module each call)."""
    return nnx.merge(self.graphdef, self.params, self.model_state)

  @property
  def variables(self) -> nnx.State:
    """Params and model state as one nnx.State, as `nnx.split(model)`
    gives it: `nnx.merge(run.graphdef, run.variables)` is the model."""
    return nnx.state(self.model())


def load_run(
  workdir: str,
  *,
  overrides: Sequence[str] = (),
  devices: Sequence[Any] | None = None,
  quantize: str | None = None,
) -> LoadedRun:
  """Loads the newest good checkpoint of `workdir`, read-only.

  The parameters and model state come from the newest committed checkpoint
  whose arrays read back intact (older ones are tried in turn, and a bad
  one is left where it is); the optimizer state is not read. The config is
  the one saved in that checkpoint. `overrides` are command-line strings
  `--config.data.<key>=<value>` (another data set, say); any other key is a
  ConfigError. `devices` (default: this process's; one process, no
  jax.distributed) form a data-parallel mesh, keeping the run's
  `mesh.tensor` where it divides their number, and using as many of them
  as divide `train.batch_size`. `quantize`: a scheme (config/schemes.py)
  applied to the loaded weights (`quantize_run`).
  """
  parse_overrides(overrides)  # bad input fails before anything is read
  if quantize is not None:
    scheme = parse_scheme(quantize, "quantize")
    return quantize_run(
      load_run(workdir, overrides=overrides, devices=devices), scheme
    )
  # Local: made absolute (orbax needs that); gs://: as it is.
  path = paths.resolve(workdir)
  workdir = str(path)
  ckpt_dir = path / "checkpoints"
  if not path.is_dir():
    raise RunError(f"workdir {workdir} does not exist")
  if not (ckpt_dir.is_dir() or (path / CONFIG).is_file()):
    raise RunError(
      f"{workdir} is not a training run (no checkpoints/ and no {CONFIG})"
    )
  if not checkpoint.step_numbers(ckpt_dir):
    raise RunError(
      f"workdir {workdir} has no committed checkpoint to load (none saved yet)"
    )
  devices = list(jax.local_devices() if devices is None else devices)
  built: dict[str, Any] = {}

  def abstract_for(saved: dict[str, Any]):
    cfg = _fitted(saved, overrides, len(devices))
    mesh = sharding.make_mesh(cfg.mesh, devices[: cfg.mesh.size])
    model = state_lib.abstract_state(cfg, mesh)
    built.update(saved=saved, cfg=cfg, model=model)
    return model.abstract

  step, _, state = checkpoint.read_latest(ckpt_dir, abstract_for)
  cfg, model = built["cfg"], built["model"]
  # The run's own data config (before overrides) made its tokenizer.
  saved_data = config_lib.from_config_dict(built["saved"]).data
  tok = _tokenizer(workdir, saved_data)
  if tok.vocab_size > cfg.model.vocab_size:
    raise DataError(
      f"the tokenizer of {workdir} has {tok.vocab_size} ids, more than its "
      f"model.vocab_size={cfg.model.vocab_size}"
    )
  return LoadedRun(
    workdir=workdir,
    config=cfg,
    tokenizer=tok,
    step=step,
    mesh=model.mesh,
    graphdef=model.graphdef,
    eval_step=state_lib.jit_eval_step(model, state_lib.objective(cfg, tok)),
    data_seed=model.keys.data_seed,
    params=state["params"],
    model_state=state["model_state"],
  )


def quantize_run(run: LoadedRun, scheme: Scheme) -> LoadedRun:
  """`run` with its layers' weights quantized by `scheme` (qwix PTQ,
  models/quantization.py): integer (or fp8) values and scales in `params`,
  `config.model.quantization` recording the scheme, and the eval step of
  that model. ConfigError (one line) if the run is already quantized, the
  device cannot run the scheme, or int4's group does not divide a weight.
  """
  done = run.config.model.quantization
  if done:
    raise ConfigError(
      f"{run.workdir} is already quantized (model.quantization={done!r}); "
      "quantize its float source run instead"
    )
  quantization.check_device(scheme, run.mesh.devices.flat[0])
  cfg = dataclasses.replace(
    run.config,
    model=dataclasses.replace(run.config.model, quantization=str(scheme)),
    train=dataclasses.replace(run.config.train, quantization=""),
  )
  # The group size is checked abstractly, before any weight is touched.
  model = state_lib.abstract_state(cfg, run.mesh)
  qmodel = quantization.quantize(run.model(), scheme, seq_len=cfg.data.seq_len)
  _, params, model_state = nnx.split(qmodel, nnx.Param, models.ModelState)
  placed = jax.device_put(
    {
      "params": _fitting("params", params, model.params),
      "model_state": _fitting("model_state", model_state, model.model_state),
    },
    model.shardings,
  )
  return _as_model(run, cfg, model, **placed)


def without_qat(run: LoadedRun) -> LoadedRun:
  """`run` as a float model: a quantization-aware run's (train.quantization)
  weights evaluated without the simulated quantization; any other run as
  it is."""
  if not run.config.train.quantization:
    return run
  cfg = dataclasses.replace(
    run.config, train=dataclasses.replace(run.config.train, quantization="")
  )
  return _as_model(run, cfg, state_lib.abstract_state(cfg, run.mesh))


def _as_model(run: LoadedRun, cfg: Config, model: Any, **arrays) -> LoadedRun:
  """`run` as the model `cfg` describes (`model`: its abstract state): its
  config, graph and eval step, and any of params / model_state given."""
  return dataclasses.replace(
    run,
    config=cfg,
    graphdef=model.graphdef,
    eval_step=state_lib.jit_eval_step(
      model, state_lib.objective(cfg, run.tokenizer)
    ),
    **arrays,
  )


def write_run(
  workdir: str,
  cfg: Config,
  params: Any,
  model_state: Any,
  tokenizer: Tokenizer | None = None,
  provenance: Mapping[str, Any] | None = None,
  *,
  devices: Sequence[Any] | None = None,
) -> str:
  """Writes a new run directory at step 0 holding the given weights.

  The directory is what a training run of `cfg` leaves: config.json,
  tokenizer.json, checkpoints/0 (the train state as a fresh run starts
  it, with these weights: `params`, `model_state`, step 0; the fresh
  optimizer state and data position are not written, the training loop
  makes them on resume under the config it is given), and
  provenance.json: {"written_by", "time", "host", "step": 0, "source":
  `provenance`}, where `provenance` is the caller's free-form JSON dict
  saying where the weights came from. `python -m efficient_lm.train` with
  the same model config then continues it from step 0, and load_run
  (evaluate, generate) reads it. Returns the workdir's resolved path.

  `params` and `model_state`: the model's nnx.State (`nnx.split(model,
  nnx.Param, models.ModelState)`) or its pure dict (`nnx.to_pure_dict`),
  numpy or jax arrays, with exactly the keys, shapes and dtypes that
  `cfg.model` builds (nothing is cast; a model without model state takes
  {}). `tokenizer`: None builds `cfg.data`'s, the one `train` rebuilds
  and records; give another only if it is the same. `devices` (default:
  the first `cfg.mesh.size` of this process's) hold the state while it is
  written; one process, no jax.distributed.

  RunError (one line) if `workdir` exists and is not an empty directory,
  or if the weights do not fit the model; then nothing is written.
  """
  path = paths.resolve(workdir)
  workdir = str(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise RunError(
      f"workdir {workdir} exists and is not empty: write_run only makes "
      "new runs (use another --workdir)"
    )
  source = dict(provenance or {})
  try:
    json.dumps(source)
  except (TypeError, ValueError) as e:
    raise RunError(f"provenance is not JSON-serializable: {e}") from None
  tok = loop.make_tokenizer(cfg) if tokenizer is None else tokenizer
  if tok.vocab_size > cfg.model.vocab_size:
    raise DataError(
      f"the tokenizer has {tok.vocab_size} ids, more than "
      f"model.vocab_size={cfg.model.vocab_size}"
    )
  devices = list(jax.local_devices() if devices is None else devices)
  t = loop.build_trainer(cfg, devices[: cfg.mesh.size], tokenizer=tok)
  weights = {
    k: _fitting(k, given, t.abstract_state[k])
    for k, given in (("params", params), ("model_state", model_state))
  }
  # Weights only, no optimizer state: train's restore recomputes the fresh
  # one, optimizer.init(params), bit for bit (loop._restore_or_init), and
  # writing it here would triple an import's memory (benchmarks/
  # import_memory.py). Already placed arrays are not copied.
  state = {
    **jax.device_put(weights, {k: t.state_shardings[k] for k in weights}),
    "step": jax.device_put(np.zeros((), np.int32), t.state_shardings["step"]),
  }
  # No data position either: train starts a fresh iterator for a
  # weights-only step 0 under its own data config (loop._restore_or_init),
  # so tokenizing the corpus here to record one would be wasted.
  data_state: dict[str, Any] = {}
  record = {
    "written_by": "efficient_lm.runs.write_run",
    "time": _now(),
    "host": socket.gethostname(),
    "step": 0,
    "source": source,
  }
  if not paths.is_remote(path):  # object stores have no directories
    path.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(workdir):
    _write_files(path, cfg, state, data_state, tok, record)
  return workdir


def _write_files(path, cfg: Config, state, data_state, tok, record) -> None:
  """checkpoints/0 in the training loop's layout, then the run's files."""
  with Checkpointer(
    path / "checkpoints",
    every_steps=cfg.checkpoint.every_steps,
    keep=cfg.checkpoint.keep,
    async_save=False,
  ) as ckpt:
    ckpt.save(0, state, data_state=data_state, config=cfg.to_dict(), force=True)
    ckpt.wait()
  data_lib.save_tokenizer(tok, path / TOKENIZER)
  write_config(path, cfg.to_dict())
  paths.write_atomic(
    path / PROVENANCE, json.dumps(record, indent=2, sort_keys=True)
  )


def _fitting(what: str, given: Any, wanted: Any) -> Any:
  """`given` (an nnx.State or pure dict) as a tree shaped like `wanted`
  (pure dict of ShapeDtypeStructs); RunError naming the first key whose
  presence, shape or dtype differs."""
  if isinstance(given, nnx.State):
    given = nnx.to_pure_dict(given)
  have, want = flat(given), flat(wanted)
  for key in sorted(have.keys() | want.keys()):
    if key not in have or key not in want:
      side = "is missing" if key not in have else "is not in the model"
      raise RunError(f"{what} key {key!r} {side}")
    a, b = have[key], want[key]
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
      raise RunError(f"{what} key {key!r}: {type(a).__name__}, not an array")
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
      raise RunError(
        f"{what} key {key!r}: given {tuple(a.shape)} {a.dtype}, the model "
        f"has {tuple(b.shape)} {b.dtype}"
      )
  treedef = jax.tree.structure(wanted)
  return jax.tree.unflatten(treedef, [have[k] for k in want])


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def evaluate(run: LoadedRun, num_batches: int | None = None) -> dict[str, Any]:
  """One pass over the eval split of `run.config.data`: every held-out (token,
  next token) pair once, or only the first `num_batches` batches (the
  ones the training loop's evaluation reads, so its eval_loss compares).

  Returns `loss` (mean NLL per target token, nats), `ppl` (exp(loss)),
  `bpb` (bits per byte: loss / ln 2 * tokens / bytes, where bytes are the
  UTF-8 bytes the target tokens stand for, `tokenizer.bytes_per_id()`:
  byte tokenizer, the non-special targets; char, the UTF-8 length of each
  target character; SentencePiece and Hugging Face, of each target piece
  (data/hf_tokenizer.py); None if that is 0), `tokens_per_sec` (target
  tokens over the pass's wall time; the step is compiled before the clock
  starts), the counts, the data evaluated on, and the model's aux entries
  as `eval_<name>`.
  """
  if num_batches is not None and num_batches < 1:
    raise ConfigError(
      f"num_batches={num_batches}: expected >= 1 (or None: "
      "the whole eval split)"
    )
  cfg = run.config
  state = {"params": run.params, "model_state": run.model_state}
  it = data_lib.make_iterator(
    cfg.data,
    "eval",
    global_batch_size=cfg.train.batch_size,
    seed=run.data_seed,
    tokenizer=run.tokenizer,
    num_epochs=1,
  )
  start = it.get_state()
  jax.block_until_ready(
    run.eval_step(  # compile outside the timed pass
      run.params, run.model_state, sharding.host_to_global(run.mesh, next(it))
    )
  )
  it.set_state(start)
  bytes_V = run.tokenizer.bytes_per_id()
  count = {"batches": 0, "tokens": 0, "bytes": 0}

  def counted(batches):
    for batch in batches:
      targets = batch["targets"][batch["segment_ids"] > 0]
      count["batches"] += 1
      count["tokens"] += targets.size
      count["bytes"] += int(bytes_V[targets].sum())
      yield batch

  t0 = time.perf_counter()
  metrics = loop.evaluate_batches(
    run.eval_step, run.mesh, state, counted(itertools.islice(it, num_batches))
  )
  seconds = time.perf_counter() - t0
  loss = metrics.pop("eval_loss")
  tokens, num_bytes = count["tokens"], count["bytes"]
  return {
    "time": _now(),
    "workdir": run.workdir,
    "step": run.step,
    "data_source": cfg.data.source,
    "data_path": cfg.data.path,
    "eval_fraction": cfg.data.eval_fraction,
    "seq_len": cfg.data.seq_len,
    "batch_size": cfg.train.batch_size,
    "num_batches": count["batches"],
    "num_tokens": tokens,
    "num_bytes": num_bytes,
    "loss": loss,
    "ppl": _perplexity(loss),
    "bpb": loss / math.log(2) * tokens / num_bytes if num_bytes else None,
    "tokens_per_sec": tokens / seconds,
    "seconds": seconds,
    **metrics,
  }


def evaluate_quantized(
  run: LoadedRun, scheme: str, num_batches: int | None = None
) -> dict[str, Any]:
  """`evaluate` of `run` quantized by `scheme` (`quantize_run`), with the
  float weights evaluated on the same batches: the quantized result plus
  `quantize` (the scheme), `float_loss`, `float_bpb`, `loss_delta` and
  `bpb_delta` (quantized - float) and `param_bytes` / `float_param_bytes`
  (parameters and model state, measured from the arrays:
  quantization.param_bytes), `quantized_bytes` / `float_quantized_bytes`
  (the quantized weights alone: values and scales, and the same weights
  in float; quantization.quantized_bytes)."""
  qrun = quantize_run(run, parse_scheme(scheme, "quantize"))
  base = evaluate(run, num_batches)
  out = evaluate(qrun, num_batches)
  bpb = None if out["bpb"] is None else out["bpb"] - base["bpb"]
  qbytes, fbytes = quantization.quantized_bytes(qrun.params, run.params)
  return {
    **out,
    "quantize": qrun.config.model.quantization,
    "float_loss": base["loss"],
    "float_bpb": base["bpb"],
    "loss_delta": out["loss"] - base["loss"],
    "bpb_delta": bpb,
    "param_bytes": quantization.param_bytes((qrun.params, qrun.model_state)),
    "float_param_bytes": quantization.param_bytes(
      (run.params, run.model_state)
    ),
    "quantized_bytes": qbytes,
    "float_quantized_bytes": fbytes,
  }


def _perplexity(loss: float) -> float:
  try:
    return math.exp(loss)
  except OverflowError:
    return math.inf


def _tokenizer(workdir: str, saved_data: DataConfig) -> Tokenizer:
  path = epath.Path(workdir) / TOKENIZER
  if path.exists():
    return data_lib.load_tokenizer(path)
  print(
    f"warning: {workdir} has no {TOKENIZER} (trained before it was "
    f"saved): rebuilding data.tokenizer={saved_data.tokenizer!r} from the "
    "run's data config",
    file=sys.stderr,
    flush=True,
  )
  return data_lib.make_tokenizer(saved_data)


def _fitted(
  saved: dict[str, Any], overrides: Sequence[str], num_devices: int
) -> Config:
  """The saved config with `overrides` applied and a mesh for this host."""
  d = copy.deepcopy(saved)
  for key, value in parse_overrides(overrides).items():
    d["data"][key] = value
  tensor = d["mesh"]["tensor"]
  if num_devices % tensor:
    tensor = 1
  data = math.gcd(num_devices // tensor, d["train"]["batch_size"])
  d["mesh"] = {"data": data, "fsdp": 1, "tensor": tensor}
  return config_lib.from_config_dict(d, device_count=data * tensor)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
  """`--config.data.<key>=<value>` strings -> {key: value}, each value
  parsed by the type of its DataConfig field (`None` clears data.path)."""
  hints = typing.get_type_hints(DataConfig)
  out = {}
  for text in overrides:
    name, eq, value = text.partition("=")
    key = name.removeprefix("--config.")
    if not (name.startswith("--config.") and eq):
      raise ConfigError(f"override {text!r}: expected --config.data.KEY=VALUE")
    section, _, field = key.partition(".")
    if section != "data":
      raise ConfigError(
        f"{text}: only data.* keys can be overridden for a "
        "trained run (the model, training and mesh are the "
        "run's)"
      )
    if field not in hints:
      raise ConfigError(
        f"{text}: unknown key data.{field}; known data keys: "
        f"{', '.join(sorted(hints))}"
      )
    if field == "tokenizer":
      raise ConfigError(
        f"{text}: the model was trained with the run's "
        f"tokenizer, which {TOKENIZER} records"
      )
    out[field] = parse_value(text, value, hints[field])
  return out


_EXPECTED = {int: "an int", float: "a float", bool: "true or false"}


def parse_value(text: str, value: str, tp: Any) -> Any:
  """`value` of the override `text` as the config field type `tp`: bool,
  int, float, None for an Optional, a comma list for a tuple; strings
  and Literals as given (config validation checks those). ConfigError
  (one line) when it does not parse."""
  args = typing.get_args(tp)
  if value == "None" and type(None) in args:
    return None
  if typing.get_origin(tp) is tuple:
    items = [v.strip() for v in value.split(",") if v.strip()]
    return tuple(parse_value(text, v, args[0]) for v in items)
  if type(None) in args:  # Optional[X]
    tp = next(a for a in args if a is not type(None))
  try:
    if tp is bool:
      return {"true": True, "false": False}[value.lower()]
    if tp in (int, float):
      return tp(value)
  except (KeyError, ValueError):
    raise ConfigError(f"{text}: expected {_EXPECTED[tp]}") from None
  return value
