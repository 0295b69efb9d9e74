"""A Hugging Face model directory -> a run at step 0 (runs.write_run).

Everything is checked before anything is read in bulk or written: the
architecture and config keys (families.py), the tokenizer, every tensor's
presence and shape against the model the config builds (weights.py), the
workdir. Then the tensors stream one at a time (`safe_open` per tensor, so
the file's mapped pages are let go as soon as a tensor is copied out), each
laid out as ours and placed in its sharding on the mesh: a stacked layer
parameter is allocated once on the devices and filled slot by slot by a
donated update, so the host holds the parameters placed so far plus about
one tensor.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import SafetensorError, safe_open

from efficient_lm import config as config_lib
from efficient_lm import paths, runs, sharding
from efficient_lm.data import HFTokenizer
from efficient_lm.hf import families, weights
from efficient_lm.hf.errors import ConvertError
from efficient_lm.training import state as state_lib
from efficient_lm.training.fingerprints import flat

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.json"
_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

# Fine-tuning defaults of an imported run (the CLI's --config.train.* and
# --config.data.* override them when `train` continues it).
TRAIN = {
  "steps": 1000,
  "batch_size": 8,
  "learning_rate": 2e-5,
  "end_learning_rate": 2e-6,
  "warmup_steps": 50,
  "weight_decay": 0.0,
  "eval_every": 200,
}


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def read_json(path: epath.Path, what: str) -> dict[str, Any]:
  try:
    value = json.loads(path.read_text())
  except FileNotFoundError:
    raise ConvertError(f"{path} does not exist ({what})") from None
  except (OSError, ValueError) as e:
    raise ConvertError(f"{path}: not readable JSON ({_one_line(e)})") from None
  if not isinstance(value, dict):
    raise ConvertError(f"{path}: expected a JSON object")
  return value


class Checkpoint:
  """The tensors of a Hugging Face directory: name -> (file, dtype, shape),
  read from the safetensors headers only."""

  def __init__(self, hf_dir: epath.Path):
    self.dir = hf_dir
    index = hf_dir / INDEX
    if index.exists():
      weight_map = read_json(index, "the shard index").get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ConvertError(f"{index}: no weight_map")
      files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE).exists():
      weight_map, files = None, [SINGLE]
    else:
      raise ConvertError(
        f"{hf_dir} has neither {SINGLE} nor {INDEX} (only safetensors "
        "checkpoints are read)"
      )
    self.files = files
    self.tensors: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for name in files:
      path = hf_dir / name
      if not path.exists():
        raise ConvertError(f"{path} does not exist (named in {INDEX})")
      try:
        with safe_open(os.fspath(path), framework="numpy") as f:
          for key in f.keys():
            sl = f.get_slice(key)
            self.tensors[key] = (name, sl.get_dtype(), tuple(sl.get_shape()))
      except (SafetensorError, OSError) as e:
        raise ConvertError(
          f"{path}: not a readable safetensors file ({_one_line(e)})"
        ) from None
    if weight_map is not None:
      for key, name in weight_map.items():
        if self.tensors.get(key, (None,))[0] != name:
          raise ConvertError(
            f"{INDEX} puts tensor {key!r} in {name}, which does not hold it"
          )

  def dtype(self, name: str) -> str:
    return self.tensors[name][1]

  def read(self, name: str) -> np.ndarray:
    file, dtype, _ = self.tensors[name]
    path = self.dir / file
    try:
      with safe_open(os.fspath(path), framework="numpy") as f:
        x = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise ConvertError(f"{path}: tensor {name!r}: {_one_line(e)}") from None
    return np.asarray(x).view(_DTYPES[dtype])


def _check_tensors(ckpt: Checkpoint, table: list[weights.Tensor], tie: bool):
  want = {t.name: t for t in table}
  have = ckpt.tensors
  missing = [n for n in want if n not in have]
  if missing:
    raise ConvertError(
      f"tensor {missing[0]!r} is missing from the checkpoint"
      + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
    )
  extra = [
    n
    for n in have
    if n not in want
    and not weights.is_non_parameter(n)
    and not (tie and n == "lm_head.weight")
  ]
  if extra:
    raise ConvertError(
      f"unexpected tensor {extra[0]!r} in {have[extra[0]][0]} (the config "
      "builds no parameter for it)"
      + (f"; {len(extra) - 1} more unexpected" if len(extra) > 1 else "")
    )
  for t in table:
    _, dtype, shape = have[t.name]
    if shape != t.shape:
      raise ConvertError(
        f"tensor {t.name!r} has shape {list(shape)}, the config expects "
        f"{list(t.shape)}"
      )
    if dtype not in _DTYPES:
      raise ConvertError(
        f"tensor {t.name!r} has dtype {dtype}: expected one of "
        f"{', '.join(_DTYPES)}"
      )
  if tie and "lm_head.weight" in have:
    shape = have["lm_head.weight"][2]
    if shape != want["model.embed_tokens.weight"].shape:
      raise ConvertError(
        f"tensor 'lm_head.weight' has shape {list(shape)} in a tied model "
        "(tie_word_embeddings): expected the embedding's"
      )


def _param_dtype(ckpt: Checkpoint, dtype: str | None) -> str:
  if dtype is not None:
    return families.dtype_name(dtype, "--dtype")
  stored = ckpt.dtype("model.embed_tokens.weight")
  if stored == "F16":
    raise ConvertError(
      "the checkpoint is float16, which we do not train in: give "
      "--dtype=float32 or --dtype=bfloat16"
    )
  return _NAMES[stored]


def run_config(
  hf: dict[str, Any], fam: families.Family, param_dtype: str, tokenizer: str
) -> config_lib.Config:
  d = config_lib.default_config_dict().to_dict()
  d["name"] = f"hf-{fam.model_type}"
  model = families.model_keys(hf, fam, param_dtype)
  d["model"]["attention"].update(model.pop("attention"))
  d["model"].update(model)
  d["data"]["tokenizer"] = tokenizer
  d["data"]["seq_len"] = min(1024, int(hf.get("max_position_embeddings", 1024)))
  d["train"].update(TRAIN)
  d["checkpoint"]["every_steps"] = 200
  try:
    return config_lib.from_config_dict(d, device_count=jax.device_count())
  except config_lib.ConfigError as e:
    raise ConvertError(
      f"{fam.architecture} config maps to a model we cannot build: {e}"
    ) from None


@functools.cache
def _setter(out: NamedSharding):
  """(stacked, slot value, r) -> stacked with slot r replaced, in place."""
  return jax.jit(
    lambda buf, x, r: jax.lax.dynamic_update_index_in_dim(buf, x, r, 0),
    donate_argnums=0,
    out_shardings=out,
  )


def _zeros(sds: jax.ShapeDtypeStruct) -> jax.Array:
  return jax.jit(
    functools.partial(jnp.zeros, sds.shape, sds.dtype),
    out_shardings=sds.sharding,
  )()


def _slot_sharding(s: NamedSharding) -> NamedSharding:
  return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))


def load_params(
  ckpt: Checkpoint, table: list[weights.Tensor], abstract: Any, dtype: str
) -> Any:
  """The parameters of `abstract` (pure dict of sharded
  ShapeDtypeStructs) filled from the checkpoint, one tensor at a time."""
  want = flat(abstract)
  np_dtype = jnp.dtype(dtype)
  for t in table:
    if t.key not in want:
      raise ConvertError(
        f"tensor {t.name!r}: the model this config builds has no parameter "
        f"{t.key!r}"
      )
  covered = {(t.key, t.slot) for t in table}
  for key, sds in want.items():
    stacked = key.startswith("stack.")
    for r in range(sds.shape[0]) if stacked else [None]:
      if (key, r) not in covered:
        raise ConvertError(
          f"parameter {key!r} (slot {r}) has no Hugging Face tensor"
        )
  placed: dict[str, jax.Array] = {}
  for t in table:
    sds = want[t.key]
    x = t.to_ours(ckpt.read(t.name))
    if x.dtype != np_dtype:
      x = x.astype(np_dtype)
    if t.slot is None:
      placed[t.key] = jax.device_put(x, sds.sharding)
      continue
    if t.key not in placed:
      placed[t.key] = _zeros(sds)
    piece = jax.device_put(x, _slot_sharding(sds.sharding))
    placed[t.key] = _setter(sds.sharding)(placed[t.key], piece, t.slot)
    del x, piece
  treedef = jax.tree.structure(abstract)
  return jax.tree.unflatten(treedef, [placed[k] for k in want])


def _check_tied_head(ckpt: Checkpoint, tie: bool) -> None:
  if tie and "lm_head.weight" in ckpt.tensors:
    head = ckpt.read("lm_head.weight")
    if not np.array_equal(head, ckpt.read("model.embed_tokens.weight")):
      raise ConvertError(
        "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' "
        "in a tied model (tie_word_embeddings=true): an untied head needs "
        "tie_word_embeddings=false"
      )


def import_checkpoint(
  hf_dir: str, workdir: str, *, dtype: str | None = None
) -> str:
  """Writes the run; returns the workdir's resolved path."""
  src = paths.resolve(hf_dir)
  if not src.is_dir():
    raise ConvertError(f"--hf={hf_dir}: not a directory")
  dest = paths.resolve(workdir)
  if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
    raise ConvertError(
      f"workdir {dest} exists and is not empty: import writes new runs only"
    )
  config_path = src / "config.json"
  hf = read_json(config_path, "the model's config")
  fam = families.family_of(hf)
  ckpt = Checkpoint(src)
  param_dtype = _param_dtype(ckpt, dtype)
  tok_path = src / TOKENIZER
  if not tok_path.exists():
    raise ConvertError(f"{tok_path} does not exist (the model's tokenizer)")
  cfg = run_config(hf, fam, param_dtype, os.fspath(tok_path))
  table = weights.tensor_map(cfg.model, fam)
  _check_tensors(ckpt, table, cfg.model.tie_embeddings)
  tok = HFTokenizer(os.fspath(tok_path))
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConvertError(
      f"{tok_path} has {tok.vocab_size} ids, more than the model's "
      f"vocab_size={cfg.model.vocab_size}"
    )
  _check_tied_head(ckpt, cfg.model.tie_embeddings)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[: cfg.mesh.size])
  model = state_lib.abstract_state(cfg, mesh)
  params = load_params(ckpt, table, model.params, param_dtype)
  provenance = {
    "from": "huggingface",
    "source": os.fspath(src),
    "architecture": fam.architecture,
    "config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest(),
    "files": ckpt.files,
    "checkpoint_dtype": _NAMES[ckpt.dtype("model.embed_tokens.weight")],
    "config": hf,
  }
  return runs.write_run(
    workdir, cfg, params, {}, tok, provenance, devices=jax.devices()
  )
