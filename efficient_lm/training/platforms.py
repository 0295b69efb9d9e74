"""Which jax backends a run may initialize.

With no JAX_PLATFORMS, jax tries every backend it knows, TPU first: when
libtpu is installed (the dev extra installs it for the ahead-of-time TPU
compile tests) a CPU-only machine loads it, and it prints lines that look
fatal (`Failed to find host bounds`, `TPU_WORKER_HOSTNAMES`, a source
location trace) before jax falls back to the CPU. The entry point calls
`cpu_only_if_no_accelerator()` before the first backend is made.
"""

from __future__ import annotations

import os


def _accelerator_present() -> bool:
  try:
    # jax's own PCI / device-node probes (what it uses to suggest plugins);
    # private, so any failure counts as "maybe present" and changes nothing.
    from jax._src import hardware_utils as hw
    return bool(hw.num_available_tpu_chips_and_device_id()[0]
                or hw.has_visible_nvidia_gpu()
                or hw.num_available_amd_gpus(stop_at=1))
  except Exception:  # noqa: BLE001
    return True


def cpu_only_if_no_accelerator() -> bool:
  """Restricts jax to the CPU when nothing else is attached; True if so.

  An explicit JAX_PLATFORMS (or jax_platforms) is left alone.
  """
  import jax
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return False
  if _accelerator_present():
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
