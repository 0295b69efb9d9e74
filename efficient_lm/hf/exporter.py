"""A run's newest good checkpoint -> a Hugging Face model directory.

The architecture is the imported one (the run's provenance) or chosen by
the model's switches (families.choose); a model with no equivalent is
refused in one line before anything is written. Tensors are pulled off the
devices one at a time and written in shards of at most `shard_size` bytes
(more than one: model-0000i-of-0000n.safetensors and
model.safetensors.index.json, as save_pretrained names them), everything
first into a temporary directory beside `out`, renamed into place at the
end, so a failed export leaves no half-written model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

import jax
import numpy as np
from etils import epath
from safetensors.numpy import save_file

from efficient_lm import paths, runs
from efficient_lm.hf import families, weights
from efficient_lm.hf.errors import ConvertError
from efficient_lm.hf.importer import INDEX, SINGLE, TOKENIZER
from efficient_lm.training.fingerprints import flat
from efficient_lm.training.workdir import PROVENANCE

_UNITS = {
  "": 1,
  "B": 1,
  "KB": 10**3,
  "MB": 10**6,
  "GB": 10**9,
  "KIB": 2**10,
  "MIB": 2**20,
  "GIB": 2**30,
}


def parse_size(text: str) -> int:
  """'5GB' -> 5 * 10**9 (KB/MB/GB decimal, KiB/MiB/GiB binary, or bytes)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  unit = m and m.group(2).upper()
  if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
    raise ConvertError(
      f"--shard_size={text!r}: expected a positive size such as 5GB, "
      "500MB, 2GiB or a number of bytes"
    )
  return int(float(m.group(1)) * _UNITS[unit])


def _source(workdir: str) -> dict[str, Any]:
  """The run's provenance source when it came from Hugging Face."""
  path = epath.Path(workdir) / PROVENANCE
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  source = record.get("source") if isinstance(record, dict) else None
  if isinstance(source, dict) and source.get("from") == "huggingface":
    return source
  return {}


def _check_out(out: epath.Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConvertError(
      f"--out={out} exists and is not empty: export writes a new directory"
    )


def _tensors(run: runs.LoadedRun, table: list[weights.Tensor]):
  """(name, numpy tensor in HF layout), one at a time; every parameter
  must have a name (the model builds nothing we would drop)."""
  params = flat(run.params)
  for t in table:
    if t.key not in params:
      raise ConvertError(
        f"tensor {t.name!r}: the run's model has no parameter {t.key!r}"
      )
  covered = {(t.key, t.slot) for t in table}
  for key, leaf in params.items():
    stacked = key.startswith("stack.")
    for r in range(leaf.shape[0]) if stacked else [None]:
      if (key, r) not in covered:
        raise ConvertError(
          f"parameter {key!r} has no Hugging Face tensor in this architecture"
        )
  for t in table:
    leaf = params[t.key]
    x = leaf if t.slot is None else leaf[t.slot]
    yield t.name, t.to_hf(np.asarray(jax.device_get(x)))


def _write_shards(tmp: epath.Path, tensors, shard_size: int) -> list[str]:
  """Shards of at most shard_size bytes (a larger tensor alone in its
  own); returns the files written, save_pretrained's names."""
  written: list[tuple[str, list[str]]] = []
  shard: dict[str, np.ndarray] = {}
  size = 0

  def flush():
    name = f"shard-{len(written)}.safetensors"
    save_file(shard, os.fspath(tmp / name), metadata={"format": "pt"})
    written.append((name, list(shard)))

  for name, x in tensors:
    if shard and size + x.nbytes > shard_size:
      flush()
      shard, size = {}, 0
    shard[name] = x
    size += x.nbytes
  if shard or not written:
    flush()
  n = len(written)
  if n == 1:
    (tmp / written[0][0]).rename(tmp / SINGLE)
    return [SINGLE]
  weight_map, files = {}, []
  for i, (name, names) in enumerate(written):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    (tmp / name).rename(tmp / final)
    files.append(final)
    weight_map.update({k: final for k in names})
  total = sum(os.path.getsize(tmp / f) for f in files)
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return files


def export_run(workdir: str, out: str, *, shard_size: int = 5 * 10**9) -> str:
  """Writes `out`; returns its resolved path."""
  dest = paths.resolve(out)
  _check_out(dest)
  try:
    run = runs.load_run(workdir)
  except runs.ERRORS as e:
    raise ConvertError(str(e)) from None
  source = _source(run.workdir)
  fam = families.choose(run.config.model, source.get("architecture"))
  table = weights.tensor_map(run.config.model, fam)
  base = (
    source.get("config")
    if source.get("architecture") == fam.architecture
    else None
  )
  hf = families.hf_config(run.config.model, fam, base)
  tok = run.tokenizer
  if base is None:
    hf.update(
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )
  hf_json = getattr(tok, "hf_json", None)
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
  try:
    _write_shards(tmp, _tensors(run, table), shard_size)
    (tmp / "config.json").write_text(
      json.dumps(hf, indent=2, sort_keys=True) + "\n"
    )
    gen = {
      k: hf[k]
      for k in ("bos_token_id", "eos_token_id", "pad_token_id")
      if hf.get(k) is not None
    }
    if gen:
      (tmp / "generation_config.json").write_text(
        json.dumps(gen, indent=2, sort_keys=True) + "\n"
      )
    if hf_json is not None:
      (tmp / TOKENIZER).write_text(hf_json)
    else:
      print(
        f"note: the run's tokenizer ({type(tok).__name__}) has no Hugging "
        f"Face tokenizer.json; none written to {dest}",
        file=sys.stderr,
      )
    umask = os.umask(0)
    os.umask(umask)
    for f in [tmp, *tmp.iterdir()]:  # mkdtemp made it private
      os.chmod(f, (0o777 if f == tmp else 0o666) & ~umask)
    if dest.exists():
      dest.rmdir()  # empty, checked above
    tmp.rename(dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.fspath(dest)
