"""Multi-host runs: one process per host, the client axis over every device.

JAX runs multi-host programs as one Python process per host (a TPU pod
slice's VMs, the nodes of a GPU cluster, or several processes on one machine),
all executing the same program. :func:`initialize` connects them through
``jax.distributed.initialize``; afterwards ``jax.devices()`` lists the devices
of every process and a mesh over them (:func:`global_client_mesh`) splits the
round step's client axis across hosts. Every process holds the whole dataset
and the replicated server state, so each computes the same round; only the
local training of the sampled clients is divided up.

On CPU the cross-process collectives go through Gloo
(``jax_cpu_collectives_implementation``), which this module selects when no
implementation has been chosen.

Typical use, before any JAX operation::

  from fedjax_sparse.simulation import distributed
  distributed.initialize()        # TPU pods, SLURM, Open MPI: auto-detected
  distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax


def _select_cpu_collectives() -> None:
  """Picks Gloo for cross-process CPU collectives unless one is chosen."""
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:  # older JAX without the option
    return
  if current in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               *,
               local_device_ids: Optional[Sequence[int]] = None,
               initialization_timeout: int = 300) -> dict:
  """Connects this process to the others of a multi-host run.

  A thin wrapper of ``jax.distributed.initialize``: with no arguments the
  cluster is detected from the environment (Cloud TPU pod slices, SLURM,
  Open MPI, Kubernetes); otherwise give all three of ``coordinator_address``
  (``"host:port"`` of process 0), ``num_processes`` and ``process_id``.
  Calling it again after a successful call does nothing.

  Must run before any JAX operation (like
  :func:`fedjax_sparse.simulation.devices.use_cpu_devices`, which may be
  called before it to split each host's CPU into several devices).

  Args:
    coordinator_address: ``"host:port"`` of process 0, or None to detect.
    num_processes: number of processes, or None to detect.
    process_id: this process's index in ``[0, num_processes)``, or None.
    local_device_ids: devices this process owns (e.g. one GPU per process),
      or None for all of the host's.
    initialization_timeout: seconds to wait for every process to connect
      before failing (so a missing process cannot hang the others forever).

  Returns:
    ``{"process_index", "process_count", "local_devices", "devices"}``.

  Raises:
    ValueError: some but not all of the three addressing arguments given.
    RuntimeError: JAX was already initialised by an operation.
  """
  given = [a is not None for a in (coordinator_address, num_processes,
                                   process_id)]
  if any(given) and not all(given):
    raise ValueError("give all of coordinator_address, num_processes and "
                     "process_id, or none of them (to detect the cluster)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got "
                     f"{process_id}")
  if not jax.distributed.is_initialized():
    _select_cpu_collectives()
    try:
      jax.distributed.initialize(
          coordinator_address=coordinator_address,
          num_processes=num_processes, process_id=process_id,
          local_device_ids=local_device_ids,
          initialization_timeout=initialization_timeout)
    except RuntimeError as e:
      if "before" in str(e) or "already" in str(e):
        raise RuntimeError(
            "fedjax_sparse.simulation.distributed.initialize() must run "
            "before any JAX operation (call it first thing in main)") from e
      raise
  return {"process_index": jax.process_index(),
          "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(),
          "devices": jax.device_count()}


def is_coordinator() -> bool:
  """Whether this is process 0 (the one that should write results)."""
  return jax.process_index() == 0


def global_client_mesh(num_devices: int = 0):
  """A 1-D mesh named ``"clients"`` over the devices of every process.

  The multi-host counterpart of
  :func:`fedjax_sparse.simulation.devices.client_mesh` (which uses the
  local devices only). Devices are ordered process by process, so each
  process's clients are contiguous.

  Args:
    num_devices: devices to use, 0 for all. In a multi-process run every
      process must take part, so it must be a multiple of the number of
      processes; the same number of devices is taken from each.

  Returns:
    A :class:`jax.sharding.Mesh` with axis ``"clients"``.
  """
  import numpy as np
  from jax.sharding import Mesh
  procs = jax.process_count()
  total = jax.device_count()
  n = num_devices or total
  if n > total:
    raise ValueError(f"client_devices={n} but the run has only {total} "
                     "devices over all processes")
  if n % procs:
    raise ValueError(f"client_devices={n} must be a multiple of the "
                     f"{procs} processes (every process takes part)")
  per = n // procs
  devices = []
  for p in range(procs):
    mine = sorted((d for d in jax.devices() if d.process_index == p),
                  key=lambda d: d.id)
    if len(mine) < per:
      raise ValueError(f"process {p} has {len(mine)} devices, fewer than the "
                       f"{per} client_devices={n} asks of each")
    devices.extend(mine[:per])
  return Mesh(np.array(devices), ("clients",))
