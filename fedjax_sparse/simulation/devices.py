"""Host devices for the client axis.

On XLA:CPU one computation of small per-client matmuls keeps about one core
busy; splitting the CPU into one JAX device per core and sharding the client
axis over them (``RoundConfig.client_devices``) runs clients on every core
(``benchmarks/round_throughput.py``). The split must happen before JAX
initialises its backends, so binaries call :func:`use_cpu_devices` first thing.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import jax


# Under load, one CPU device's thread can reach a collective (the client
# split's all-gather) tens of seconds after the other; XLA aborts the process
# after 40 s by default. Known to jaxlib 0.10 (an unknown flag is fatal).
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds="
                       "3600", "--xla_cpu_collective_call_warn_stuck_timeout"
                       "_seconds=300")


def patient_collectives(xla_flags: str, jaxlib_version: str) -> str:
  """``xla_flags`` with the CPU collectives' abort put off to an hour, on
  jaxlib >= 0.10 and where the flags do not set it already."""
  try:
    major, minor = (int(x) for x in jaxlib_version.split(".")[:2])
  except ValueError:
    return xla_flags
  if (major, minor) < (0, 10):
    return xla_flags
  add = [f for f in PATIENT_COLLECTIVES if f.split("=")[0] not in xla_flags]
  return " ".join([xla_flags] + add).strip() if add else xla_flags


def use_cpu_devices(n: Optional[int] = None) -> int:
  """Asks for ``n`` host CPU devices (default: one per core).

  Only the CPU platform is affected. With several devices, XLA's abort of a
  collective that one device reaches late is put off to an hour
  (:func:`patient_collectives`). Must run before any JAX operation; if the
  backends are already initialised, the existing devices are kept and a
  warning says so.

  The environment variable ``FEDJAX_SPARSE_CPU_DEVICES`` overrides the
  default (e.g. ``1`` to rerun a cell made on one device: the per-device
  sums of the round metrics make a run bit for bit reproducible on the same
  number of devices, which ``summary.json`` records as ``devices``).

  Returns:
    The number of CPU devices JAX will use.
  """
  env = os.environ.get("FEDJAX_SPARSE_CPU_DEVICES", "")
  if n is None and env:
    if not env.isdigit() or int(env) < 1:
      raise ValueError(f"FEDJAX_SPARSE_CPU_DEVICES must be an integer >= 1, "
                       f"got {env!r}")
    n = int(env)
  n = n or os.cpu_count() or 1
  if n > 1:  # read when the backends start (no effect once they have)
    from importlib import metadata
    try:
      version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
      version = ""
    os.environ["XLA_FLAGS"] = patient_collectives(
        os.environ.get("XLA_FLAGS", ""), version)
  try:
    jax.config.update("jax_num_cpu_devices", int(n))
  except RuntimeError:
    have = len(jax.devices("cpu"))
    if have != n:
      warnings.warn(f"JAX is already initialised with {have} CPU devices; "
                    f"keeping them (asked for {n})")
    return have
  return int(n)


def client_mesh(num_devices: int):
  """A 1-D :class:`jax.sharding.Mesh` named ``"clients"`` over local devices.

  Args:
    num_devices: devices to use (0: all local devices of the default backend;
      in a multi-process run, all devices of all processes).
  """
  import numpy as np
  from jax.sharding import Mesh
  if jax.process_count() > 1:  # multi-host: split clients over every host
    from fedjax_sparse.simulation import distributed
    return distributed.global_client_mesh(num_devices)
  devices = jax.local_devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"client_devices={n} but only {len(devices)} devices are "
                     "available (on CPU, start the binary with more host "
                     "devices or lower --client_devices)")
  return Mesh(np.array(devices[:n]), ("clients",))
