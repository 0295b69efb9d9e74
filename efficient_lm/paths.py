"""Run directories that may be local or on Google Cloud Storage (gs://).

Every file a run writes or reads in its workdir goes through
`etils.epath.Path`, which reaches gs:// through fsspec's gcsfs. Object
stores differ from a disk in three ways that the helpers here absorb:
there is no rename-into-place (but an object appears whole or not at all
when its upload finishes, so a direct write is already atomic), no append
(an append is a read and a rewrite of the whole object), and no
directories (nothing to create before writing).
"""

from __future__ import annotations

import os
import re

from etils import epath

from efficient_lm.config import ConfigError

# Schemes a workdir may use: gs:// is the one tested (against a local GCS
# emulator, tests/test_remote_workdir.py). epath also knows s3://, az:// and
# hf://, but those are untested here, so they are refused rather than half
# supported.
REMOTE_SCHEMES = ("gs",)
# GCS bucket names: 3-222 characters of a-z, 0-9, '-', '_', '.', starting
# and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# Schemes that make `scheme:...` without `//` a mistyped URL, not a local
# directory that happens to have a colon in its name (`runs:v1`).
_URL_SCHEMES = ("gs", "s3", "az", "hf", "http", "https", "file")


class PathError(ConfigError):
  """A workdir given as a malformed or unsupported URL."""


def resolve(path: str | os.PathLike) -> epath.Path:
  """The workdir `path` as an epath.Path: gs://BUCKET/... as it is, a local
  path made absolute (orbax needs absolute paths; os.path.abspath would
  turn gs://b/x into <cwd>/gs:/b/x). PathError for a malformed URL."""
  text = os.fspath(path)
  m = _SCHEME.match(text)
  if m is None:  # a local path (a one-letter "scheme" is a Windows drive)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  scheme, rest = m.group(1), text[m.end() :]
  if not rest.startswith("//"):
    if not (rest.startswith("/") or scheme.lower() in _URL_SCHEMES):
      return epath.Path(os.path.abspath(os.path.expanduser(text)))
    raise PathError(
      f"workdir {text!r} is a malformed URL: expected "
      f"{scheme}://BUCKET/PATH (two slashes) or a local path"
    )
  if scheme not in REMOTE_SCHEMES:
    raise PathError(
      f"workdir {text!r} has the unsupported scheme "
      f"{scheme!r}: expected a local path or "
      "gs://BUCKET/PATH"
    )
  bucket = rest[2:].split("/", 1)[0]
  if not bucket:
    raise PathError(
      f"workdir {text!r} names no bucket: expected {scheme}://BUCKET/PATH"
    )
  if not _BUCKET.match(bucket):
    raise PathError(
      f"workdir {text!r} has no valid bucket name "
      f"({bucket!r}): expected gs://BUCKET/PATH with BUCKET "
      "3-222 characters of a-z, 0-9, '-', '_', '.'"
    )
  return epath.Path(text.rstrip("/"))


def is_remote(path: epath.PathLike) -> bool:
  return bool(_URL.match(os.fspath(path)))


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
  """Replaces `path` so that no reader sees it half-written."""
  path = epath.Path(path)
  if is_remote(path):  # an object is published whole when its upload ends
    _write(path, data)
    return
  tmp = path.with_name(path.name + ".tmp")
  _write(tmp, data)
  tmp.replace(path)


def append_text(path: epath.PathLike, text: str) -> None:
  """Appends `text` to `path` (created if missing).

  Object stores cannot append: the object is read and rewritten whole, so
  use this for small records written rarely (runs.jsonl, eval.jsonl), not
  for per-step logs. Two writers appending at once may lose one line
  there, as they cannot on a local disk.
  """
  path = epath.Path(path)
  if not is_remote(path):
    with path.open("a") as f:
      f.write(text)
    return
  old = path.read_text() if path.exists() else ""
  path.write_text(old + text)


def _write(path: epath.Path, data: str | bytes) -> None:
  if isinstance(data, bytes):
    path.write_bytes(data)
  else:
    path.write_text(data)
