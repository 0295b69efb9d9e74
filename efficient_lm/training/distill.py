"""Distillation's teacher: another run, frozen, beside the student.

`load_teacher(cfg, mesh, tokenizer)` reads the newest good checkpoint of
`train.distill.teacher` (any run: trained here, imported, pruned, bigger;
read-only, as runs.load_run reads one) onto the student's mesh, its
parameters sharded by the same rules table (sharding.RULES) from its own
logical axes. Its model config is the teacher run's own; the student's
sequence length and mesh are checked against it. The teacher's tokenizer
must be the student's (data.tokenizers.identity).

The teacher is an input of the jitted steps, never part of the train
state: no gradients, no optimizer state, not in the checkpoints. A resume
re-reads it from its run, and `<workdir>/teacher.json` (its path, step and
a fingerprint of its parameters, written when the run starts) makes a
resume refuse a teacher that changed since.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
from etils import epath
from flax import nnx

from efficient_lm import config as config_lib
from efficient_lm import data as data_lib
from efficient_lm import paths, sharding
from efficient_lm.config import Config, ConfigError
from efficient_lm.data.tokenizers import identity
from efficient_lm.training import checkpoint, fingerprints, losses
from efficient_lm.training import state as state_lib
from efficient_lm.training import step as step_lib
from efficient_lm.training.workdir import TOKENIZER

TEACHER_RECORD = "teacher.json"


def _logits(graphdef: nnx.GraphDef, variables: Any, batch: dict) -> jax.Array:
  """The teacher's logits as it predicts in evaluation (causal routing)."""
  model = nnx.merge(graphdef, variables["params"], variables["model_state"])
  logits_BTV, _ = model(
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    causal_routing=True,
  )
  return logits_BTV


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher. `variables` = {"params", "model_state"} (pure dicts,
  placed by `shardings`); `logits(variables, batch)` is its forward pass."""

  workdir: str
  step: int
  config: Config
  graphdef: nnx.GraphDef
  variables: dict[str, Any]
  shardings: dict[str, Any]
  fingerprint: str

  @property
  def logits(self) -> Callable[[Any, dict], jax.Array]:
    return functools.partial(_logits, self.graphdef)

  @property
  def record(self) -> dict[str, Any]:
    """What teacher.json holds: which teacher, at which step, which weights."""
    return {
      "workdir": self.workdir,
      "step": self.step,
      "fingerprint": self.fingerprint,
    }


def objective(cfg: Config, tokenizer: data_lib.Tokenizer) -> losses.Distill:
  d = cfg.train.distill
  return losses.Distill(
    alpha=d.alpha,
    temperature=d.temperature,
    vocab_size=tokenizer.vocab_size,
    z_loss=cfg.train.z_loss,
  )


def _describe(tok_identity: dict[str, Any]) -> str:
  return f"{tok_identity['kind']} with {tok_identity['vocab_size']} ids"


def load_teacher(
  cfg: Config, mesh: jax.sharding.Mesh, tokenizer: data_lib.Tokenizer
) -> Teacher:
  """`cfg.train.distill.teacher`'s newest good checkpoint on `mesh`.
  ConfigError (one line) if it is not a run, its tokenizer is not
  `tokenizer`, or its model cannot run on this mesh and sequence length."""
  name = cfg.train.distill.teacher
  where = f"train.distill.teacher={name!r}"
  path = paths.resolve(name)
  if not path.is_dir() or not checkpoint.step_numbers(path / "checkpoints"):
    raise ConfigError(
      f"{where}: {path} is not a training run with a saved checkpoint "
      "(no checkpoints/<step> in it)"
    )
  if not (path / TOKENIZER).is_file():
    raise ConfigError(
      f"{where}: {path} has no {TOKENIZER}, so its tokenizer cannot be "
      "compared with this run's"
    )
  try:
    theirs = identity(data_lib.load_tokenizer(path / TOKENIZER))
  except data_lib.DataError as e:
    raise ConfigError(f"{where}: {e}") from None
  ours = identity(tokenizer)
  if theirs != ours:
    same = theirs["kind"] == ours["kind"]
    raise ConfigError(
      f"{where}: the teacher's tokenizer ({_describe(theirs)}) is not this "
      f"run's ({_describe(ours)}"
      f"{', another vocabulary' if same else ''}); distillation needs the "
      "same tokenizer"
    )
  built: dict[str, Any] = {}

  def abstract_for(saved: dict[str, Any]):
    tcfg = _teacher_config(saved, cfg, where, tokenizer.vocab_size)
    built["cfg"], built["model"] = tcfg, state_lib.abstract_state(tcfg, mesh)
    return built["model"].abstract

  step, _, state = checkpoint.read_latest(path / "checkpoints", abstract_for)
  model = built["model"]
  digest = hashlib.sha256(
    json.dumps(fingerprints.of(state), sort_keys=True).encode()
  ).hexdigest()[:16]
  return Teacher(
    workdir=str(path),
    step=step,
    config=built["cfg"],
    graphdef=model.graphdef,
    variables={"params": state["params"], "model_state": state["model_state"]},
    shardings=model.shardings,
    fingerprint=digest,
  )


def _teacher_config(
  saved: dict[str, Any], cfg: Config, where: str, vocab: int
) -> Config:
  """The student's config with the teacher's model (its checkpoint's)."""
  model = dict(saved.get("model", {}))
  if model.get("kind") == "funnel_encoder":
    raise ConfigError(
      f"{where}: the teacher is a funnel_encoder (bidirectional, trained by "
      "MLM), which predicts no next token; distil from a causal model"
    )
  d = cfg.to_dict()
  d["model"] = model
  d["train"]["objective"] = "next_token"  # the teacher only predicts
  try:
    tcfg = config_lib.from_config_dict(d)
  except ConfigError as e:
    raise ConfigError(
      f"{where}: the teacher's model on this run's mesh and data: {e}"
    ) from None
  if tcfg.model.vocab_size < vocab:
    raise ConfigError(
      f"{where}: the teacher's model.vocab_size={tcfg.model.vocab_size} is "
      f"smaller than the tokenizer's {vocab} ids"
    )
  return tcfg


def check_record(workdir: str, teacher: Teacher, *, resuming: bool) -> None:
  """ConfigError (one line) if a run `resuming` from its checkpoints
  distilled from another teacher than `teacher` (teacher.json)."""
  path = epath.Path(workdir) / TEACHER_RECORD
  if not (resuming and path.exists()):
    return
  old = json.loads(path.read_text())
  if old == teacher.record:
    return
  same_place = (old.get("workdir"), old.get("step")) == (
    teacher.workdir,
    teacher.step,
  )
  now = (
    "other weights at that step"
    if same_place
    else f"{teacher.workdir} step {teacher.step}"
  )
  raise ConfigError(
    f"this run distils from {old.get('workdir')} step {old.get('step')} "
    f"({TEACHER_RECORD}), but the teacher is now {now}: a resume keeps its "
    "teacher (restore that run, or use another --workdir)"
  )


def write_record(workdir: str, teacher: Teacher, *, start: int) -> None:
  """Records `teacher` when the run starts (or resumes without a record:
  it was not distilling before)."""
  path = epath.Path(workdir) / TEACHER_RECORD
  if start == 0 or not path.exists():
    paths.write_atomic(path, json.dumps(teacher.record, indent=2) + "\n")


def jit_train_step(
  model: state_lib.AbstractModel,
  teacher: Teacher,
  make: Callable[..., Callable],
  state_sh: Any,
) -> jax.stages.Wrapped:
  """The train step `make(teacher=...)` builds, jitted as
  (state, batch, teacher variables) with the teacher placed as it is and
  only the state donated."""
  mesh = model.mesh
  return jax.jit(
    sharding.under_mesh(mesh, make(teacher=teacher.logits)),
    in_shardings=(state_sh, sharding.batch_sharding(mesh), teacher.shardings),
    out_shardings=(state_sh, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def jit_eval_step(
  model: state_lib.AbstractModel, obj: losses.Objective, teacher: Teacher
) -> Callable:
  """state.jit_eval_step with the teacher: (params, model_state, global
  batch) -> replicated sums, `sums["kl"]` among them."""
  mesh = model.mesh
  jitted = jax.jit(
    sharding.under_mesh(
      mesh, step_lib.make_eval_step(model.graphdef, obj, teacher.logits)
    ),
    in_shardings=(
      model.shardings["params"],
      model.shardings["model_state"],
      sharding.batch_sharding(mesh),
      teacher.shardings,
    ),
    out_shardings=sharding.replicated(mesh),
  )
  return lambda params, model_state, batch: jitted(
    params, model_state, batch, teacher.variables
  )
