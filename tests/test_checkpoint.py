"""Checkpointer: round trips, retention, and falling back past bad steps."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficient_lm.training.checkpoint import (
  CheckpointError,
  Checkpointer,
  is_committed,
  read_latest,
)

CONFIG = {"model": {"num_layers": 2, "embed_dim": 16}, "train": {"seed": 0}}


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _state(mesh: Mesh, offset: float = 0.0) -> dict:
  """A small train-state-like pytree; `offset` makes distinct versions."""

  def put(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

  w_DF = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) + offset
  return {
    "params": {
      "w": put(w_DF, P("data", "model")),
      "b": put(jnp.full((8,), offset, jnp.bfloat16), P("model")),
      # int keys, as in nnx.State.to_pure_dict() for layer lists
      "layers": {0: {"scale": put(jnp.ones(4) + offset, P())}},
    },
    "opt_state": (put(w_DF * 0.5, P("data", "model")), {}),
    "step": put(jnp.int32(7), P()),
  }


def _abstract(state: dict) -> dict:
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )


def _assert_same(a: dict, b: dict) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, steps, keep=5, **kw) -> Checkpointer:
  ckpt = Checkpointer(directory, every_steps=1, keep=keep, **kw)
  for step in steps:
    assert ckpt.save(
      step, _state(_mesh(), step), data_state={"pos": step}, config=CONFIG
    )
  ckpt.wait()
  return ckpt


def _data_files(step_dir):
  return sorted(
    os.path.join(d, f)
    for d, _, files in os.walk(os.path.join(step_dir, "state"))
    for f in files
    if os.sep + "d" + os.sep in os.path.join(d, f)
  )


def _our_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("checkpoint:")]


def test_round_trip_sharded_with_requested_shardings(tmp_path):
  mesh = _mesh()
  state = _state(mesh, 1.0)
  with Checkpointer(tmp_path, every_steps=5, keep=3) as ckpt:
    assert ckpt.save(
      10, state, data_state={"pos": 123, "epoch": 1}, config=CONFIG
    )
  # Restore in a fresh Checkpointer with other shardings than were saved.
  abstract = _abstract(state)
  other = NamedSharding(mesh, P("model", "data"))
  abstract["params"]["w"] = jax.ShapeDtypeStruct(
    (16, 8), jnp.float32, sharding=other
  )
  with Checkpointer(tmp_path, every_steps=5, keep=3) as ckpt:
    step, restored, data_state = ckpt.restore_latest(abstract)
    assert ckpt.saved_config() == CONFIG
    assert ckpt.latest_step() == 10
  assert step == 10
  assert data_state == {"pos": 123, "epoch": 1}
  _assert_same(restored, state)
  for got, want in zip(
    jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True
  ):
    assert got.sharding == want.sharding
  assert restored["params"]["w"].sharding == other
  assert list(restored["params"]["layers"]) == [0]


def test_empty_directory_restores_none(tmp_path):
  with Checkpointer(tmp_path / "ckpt", every_steps=1, keep=1) as ckpt:
    assert ckpt.restore_latest(_abstract(_state(_mesh()))) is None
    assert ckpt.latest_step() is None and ckpt.saved_config() is None


def test_should_save_and_keep_last_k(tmp_path):
  ckpt = Checkpointer(tmp_path, every_steps=2, keep=2)
  saved = [
    s
    for s in range(1, 9)
    if ckpt.save(s, _state(_mesh()), data_state={}, config={})
  ]
  assert saved == [2, 4, 6, 8]
  assert not ckpt.save(8, _state(_mesh()), force=True)  # already there
  assert ckpt.save(9, _state(_mesh()), force=True)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["8", "9"]


@pytest.mark.parametrize("async_save", [True, False])
def test_save_then_wait_commits(tmp_path, async_save):
  ckpt = Checkpointer(tmp_path, every_steps=1, keep=2, async_save=async_save)
  assert ckpt.save(3, _state(_mesh()), data_state={"pos": 3}, config=CONFIG)
  if not async_save:  # a synchronous save is on disk when save() returns
    assert is_committed(tmp_path / "3")
  ckpt.wait()
  assert is_committed(tmp_path / "3")
  assert ckpt.latest_step() == 3
  ckpt.close()


def _truncate_data(step_dir):
  for f in _data_files(step_dir):
    os.truncate(f, os.path.getsize(f) // 2)


def _delete_data(step_dir):
  os.remove(_data_files(step_dir)[0])


def _flip_bytes(step_dir):  # tiny arrays: hits OCDBT's checked metadata
  for f in _data_files(step_dir):
    raw = bytearray(open(f, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(f, "wb").write(raw)


def _uncommitted(step_dir):  # as if killed before orbax's commit record
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))


def _truncate_iterator_state(step_dir):
  os.truncate(os.path.join(step_dir, "data", "process_0.json"), 3)


# Failed tensorstore reads leave callbacks aimed at orbax's closed event
# loop; they surface as unraisable "Event loop is closed" noise only.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "damage",
  [
    _truncate_data,
    _delete_data,
    _flip_bytes,
    _uncommitted,
    _truncate_iterator_state,
  ],
)
def test_bad_latest_falls_back_and_is_kept(tmp_path, capfd, damage):
  _save_steps(tmp_path, [1, 2, 3]).close()
  damage(str(tmp_path / "3"))
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    step, restored, data_state = ckpt.restore_latest(_abstract(_state(_mesh())))
    assert ckpt.latest_step() == 2
  assert (step, data_state) == (2, {"pos": 2})
  _assert_same(restored, _state(_mesh(), 2))
  lines = _our_lines(capfd.readouterr().err)
  assert len(lines) == 1, lines
  assert "step 3" in lines[0] and "3.corrupt" in lines[0]
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt"]


@pytest.fixture
def fresh_noise_hooks(monkeypatch):
  """read_noise as if no read had failed yet in this process; the hooks it
  installs are undone afterwards."""
  import logging
  import threading

  from efficient_lm.training import read_noise

  for name in ("excepthook", "unraisablehook"):
    monkeypatch.setattr(sys, name, getattr(sys, name))
  monkeypatch.setattr(threading, "excepthook", threading.excepthook)
  asyncio_log = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_log, "filters", list(asyncio_log.filters))
  monkeypatch.setattr(read_noise, "_noise_contained", False)
  return read_noise


def test_failed_read_noise_is_contained_before_the_first_read(
  tmp_path, monkeypatch, fresh_noise_hooks
):
  """Issue #23: a bad step's "Event loop is closed" tracebacks can fire
  while its metadata is still being read (generate printed them 3 runs in
  7): both readers contain them before reading any step."""
  from efficient_lm.training import checkpoint, checkpoint_read

  _save_steps(tmp_path, [1]).close()
  seen = []

  def spy(*args):
    seen.append(fresh_noise_hooks._noise_contained)
    return None, None, "bad"

  monkeypatch.setattr(checkpoint_read, "_read_step", spy)
  with pytest.raises(CheckpointError):
    read_latest(tmp_path, lambda config: {})
  monkeypatch.setattr(fresh_noise_hooks, "_noise_contained", False)

  def try_restore(self, *args):
    seen.append(fresh_noise_hooks._noise_contained)
    return None, None, "bad"

  monkeypatch.setattr(checkpoint.Checkpointer, "_try_restore", try_restore)
  monkeypatch.setattr(checkpoint.Checkpointer, "_set_aside", lambda *a: None)
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    with pytest.raises(CheckpointError):
      ckpt.restore_latest(_abstract(_state(_mesh())))
  assert seen == [True, True]


def _tree_bytes(root) -> dict[str, bytes | None]:
  out = {}
  for d, _, files in os.walk(root):
    out[os.path.relpath(d, root)] = None
    for f in files:
      out[os.path.relpath(os.path.join(d, f), root)] = open(
        os.path.join(d, f), "rb"
      ).read()
  return out


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "damage", [_truncate_data, _delete_data, _flip_bytes, _uncommitted]
)
def test_read_latest_skips_a_bad_step_and_changes_nothing(
  tmp_path, capfd, damage
):
  _save_steps(tmp_path, [1, 2, 3]).close()
  damage(str(tmp_path / "3"))
  before = _tree_bytes(tmp_path)
  wanted = {"params": _abstract(_state(_mesh()))["params"]}  # no opt_state
  step, config, state = read_latest(tmp_path, lambda config: wanted)
  assert (step, config) == (2, CONFIG)
  assert set(state) == {"params"}
  _assert_same(state, {"params": _state(_mesh(), 2)["params"]})
  assert _tree_bytes(tmp_path) == before
  [line] = _our_lines(capfd.readouterr().err)
  assert "step 3" in line and "left as it is" in line


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_read_latest_with_nothing_usable_names_the_directory(tmp_path):
  _save_steps(tmp_path, [1, 2]).close()
  for step in (1, 2):
    _truncate_data(str(tmp_path / str(step)))
  before = _tree_bytes(tmp_path)
  wanted = _abstract(_state(_mesh()))
  with pytest.raises(
    CheckpointError,
    match=f"no usable checkpoint in {tmp_path}: all 2 are partial or corrupt",
  ):
    read_latest(tmp_path, lambda config: wanted)
  assert _tree_bytes(tmp_path) == before


def test_silent_bit_flip_is_caught_by_fingerprint(tmp_path, capfd):
  # zstd chunks carry no checksum: this flip restores without any error.
  mesh = _mesh()

  def state(offset):
    w = jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256) + offset
    return {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model")))}

  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state(step))
  largest = max(_data_files(str(tmp_path / "2")), key=os.path.getsize)
  raw = bytearray(open(largest, "rb").read())
  raw[len(raw) // 3] ^= 0x10
  open(largest, "wb").write(raw)
  step, _, restored = read_latest(tmp_path, lambda c: _abstract(state(0)))
  assert step == 1
  _assert_same(restored, state(1))
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    step, restored, _ = ckpt.restore_latest(_abstract(state(0)))
  assert step == 1
  _assert_same(restored, state(1))
  lines = _our_lines(capfd.readouterr().err)
  assert len(lines) == 2  # read_latest's, then restore_latest's
  assert all("'w' does not match its fingerprint" in x for x in lines)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_all_bad_raises_naming_the_directory(tmp_path, capfd):
  _save_steps(tmp_path, [1, 2]).close()
  for step in (1, 2):
    _truncate_data(str(tmp_path / str(step)))
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    with pytest.raises(CheckpointError, match=str(tmp_path)):
      ckpt.restore_latest(_abstract(_state(_mesh())))
    assert len(_our_lines(capfd.readouterr().err)) == 2
    assert sorted(os.listdir(tmp_path)) == ["1.corrupt", "2.corrupt"]
    # A rerun starts fresh but says where the bad checkpoints went.
    assert ckpt.restore_latest(_abstract(_state(_mesh()))) is None
    assert "2.corrupt" in capfd.readouterr().err


def test_shape_mismatch_is_an_error_not_corruption(tmp_path):
  _save_steps(tmp_path, [1]).close()
  mesh = _mesh()
  abstract = _abstract(_state(mesh))
  abstract["params"]["w"] = jax.ShapeDtypeStruct(
    (32, 8), jnp.float32, sharding=NamedSharding(mesh, P("data", "model"))
  )
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    with pytest.raises(CheckpointError) as err:
      ckpt.restore_latest(abstract)
  message = str(err.value)
  assert "\n" not in message
  assert "params.w" in message and "(16, 8)" in message
  assert "(32, 8)" in message
  assert os.listdir(tmp_path) == ["1"]


def test_dtype_and_tree_mismatch_name_the_key(tmp_path):
  _save_steps(tmp_path, [1]).close()
  ckpt = Checkpointer(tmp_path, every_steps=1, keep=5)
  abstract = _abstract(_state(_mesh()))
  abstract["params"]["b"] = jax.ShapeDtypeStruct(
    (8,), jnp.float32, sharding=abstract["step"].sharding
  )
  with pytest.raises(CheckpointError, match=r"params\.b.*bfloat16.*float32"):
    ckpt.restore_latest(abstract)
  abstract = _abstract(_state(_mesh()))
  abstract["params"]["extra"] = abstract["step"]
  with pytest.raises(CheckpointError, match=r"params\.extra.*no such entry"):
    ckpt.restore_latest(abstract)
  ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_saving_again_after_fallback(tmp_path, capfd):
  _save_steps(tmp_path, [1, 2, 3]).close()
  _truncate_data(str(tmp_path / "3"))
  abstract = _abstract(_state(_mesh()))
  with Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    assert ckpt.restore_latest(abstract)[0] == 2
    # Training resumes from 2 and reaches step 3 again, with new values.
    assert ckpt.save(
      3, _state(_mesh(), 30.0), data_state={"pos": 30}, config=CONFIG
    )
    ckpt.wait()
    step, restored, data_state = ckpt.restore_latest(abstract)
    assert (step, data_state) == (3, {"pos": 30})
    _assert_same(restored, _state(_mesh(), 30.0))
    _truncate_data(str(tmp_path / "3"))
    assert ckpt.restore_latest(abstract)[0] == 2
    assert ckpt.save(4, _state(_mesh(), 4.0), force=True)
  assert sorted(os.listdir(tmp_path)) == [
    "1",
    "2",
    "3.corrupt",
    "3.corrupt-1",
    "4",
  ]
  assert len(_our_lines(capfd.readouterr().err)) == 2


def test_orbax_tmp_dirs_are_ignored(tmp_path, capfd):
  _save_steps(tmp_path, [1]).close()
  # What a process killed mid-save leaves behind (orbax's naming).
  tmp_dir = tmp_path / "2.orbax-checkpoint-tmp-1790000000000000"
  (tmp_dir / "state").mkdir(parents=True)
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.restore_latest(_abstract(_state(_mesh())))[0] == 1
  assert not _our_lines(capfd.readouterr().err)
  assert tmp_dir.exists()


def test_non_json_state_fails_at_save(tmp_path):
  with Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
    with pytest.raises(TypeError, match="data_state"):
      ckpt.save(1, _state(_mesh()), data_state={"rng": np.zeros(2)})


def test_checkpoint_config_of_another_model_is_refused(tmp_path, capfd):
  _save_steps(tmp_path, [1]).close()
  abstract = _abstract(_state(_mesh()))
  # The arrays fit, but the checkpoint says it holds another model.
  tampered = {**CONFIG, "model": {**CONFIG["model"], "num_layers": 3}}
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    with pytest.raises(
      CheckpointError,
      match=(
        r"checkpoint 1 .* holds another model: model\.num_layers=2 there, "
        r"3 in this run's config"
      ),
    ):
      ckpt.restore_latest(abstract, config=tampered)
    # A changed schedule is allowed, in one line saying what changed.
    longer = {**CONFIG, "train": {"seed": 0, "steps": 9}, "name": "x"}
    assert (
      ckpt.restore_latest(abstract, config={**CONFIG, "train": {"seed": 5}})[0]
      == 1
    )
    assert ckpt.restore_latest(abstract, config=longer)[0] == 1
  lines = _our_lines(capfd.readouterr().err)
  assert lines == [
    "checkpoint: resuming step 1 with a changed config: train.seed 0 -> 5"
  ]
  assert os.listdir(tmp_path) == ["1"]


def test_model_change_is_named_by_a_parameter_not_a_moment(tmp_path):
  _save_steps(tmp_path, [1]).close()
  mesh = _mesh()
  abstract = _abstract(_state(mesh))
  # A wider model: the parameter and its optimizer moment both change.
  wide = jax.ShapeDtypeStruct(
    (32, 8), jnp.float32, sharding=NamedSharding(mesh, P("data", "model"))
  )
  abstract["params"]["w"] = wide
  abstract["opt_state"] = (wide, {})
  with Checkpointer(tmp_path, every_steps=1, keep=5) as ckpt:
    with pytest.raises(CheckpointError, match=r"key 'params\.w'"):
      ckpt.restore_latest(abstract)


_RESTORE_TRUNCATED = """
import os, sys
import jax, jax.numpy as jnp
from efficient_lm.training.checkpoint import Checkpointer
# Many arrays, each in its own chunk files: many failing async reads.
state = {f"w{i}": jax.random.normal(jax.random.key(i), (64, 256))
         for i in range(48)}
d = sys.argv[1]
with Checkpointer(d, every_steps=1, keep=5) as ckpt:
  for step in (1, 2):
    ckpt.save(step, state)
for root, _, files in os.walk(os.path.join(d, "2", "state")):
  for f in files:
    path = os.path.join(root, f)
    if os.sep + "d" + os.sep in path and os.path.getsize(path) > 4096:
      os.truncate(path, os.path.getsize(path) // 2)
abstract = jax.tree.map(
  lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
with Checkpointer(d, every_steps=1, keep=5) as ckpt:
  print(ckpt.restore_latest(abstract)[0])
"""


def test_failed_async_reads_leave_one_line(tmp_path):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.path.dirname(os.path.dirname(__file__)),
  )
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", _RESTORE_TRUNCATED, str(tmp_path / "ckpt")],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["1"]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  [line] = lines
  assert line.startswith("checkpoint: step 2 in ") and "2.corrupt" in line
