"""What the scale benchmark's sections share: the setup, round timing,
child processes and the machine's description (:mod:`benchmarks.scale`)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

N_TRAIN = 60_000
K = 100
LOCAL_STEPS = 2
BATCH = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
  """Peak resident set size of this process so far (Linux: kB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def federated_data(num_clients: int, seed: int = 0):
  """FashionMNIST-shaped synthetic data over ``num_clients`` one-class
  clients, and the seconds the partition took."""
  from fedjax_sparse import data as data_lib
  import importlib
  partition_lib = importlib.import_module("fedjax_sparse.data.partition")
  train, test = data_lib.synthetic(num_train=N_TRAIN, num_test=1000,
                                   input_shape=(28, 28, 1), seed=seed)
  t0 = time.perf_counter()
  ci = partition_lib.one_class(train.y, num_clients, seed=seed,
                               allow_empty=num_clients > N_TRAIN)
  part_s = time.perf_counter() - t0
  fd = data_lib.FederatedData(
      x_train=train.x, y_train=train.y, clients=ci, x_test=test.x,
      y_test=test.y, x_val=train.x[:0], y_val=train.y[:0],
      num_classes=train.num_classes, name="synthetic")
  return fd, part_s


def experiment_config(num_clients, k=K, client_devices=1, rounds=10,
                      local_steps=LOCAL_STEPS):
  """The measured setup: the MLP, FedAvg, the ``map`` engine in chunks of
  10, no evaluation."""
  from fedjax_sparse.simulation.experiment import ExperimentConfig
  return ExperimentConfig(
      dataset="synthetic", num_clients=num_clients, clients_per_round=k,
      rounds=rounds, local_steps=local_steps, batch_size=BATCH, lr=0.05,
      engine="map", map_batch_size=10, client_devices=client_devices,
      eval_every=10**6)


def run_child(kind, devices, timeout, **kw):
  """Runs ``child_<kind>(**kw)`` of ``python -m benchmarks.scale`` in a
  fresh process with ``devices`` host CPU devices; returns its result."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "benchmarks.scale", f"--child={kind}",
         f"--child_args={json.dumps(kw)}"]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=timeout)
  if r.returncode:
    raise RuntimeError(f"{kind} {kw} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def machine():
  """Backend, CPU count and model, JAX version and platform."""
  import jax
  proc = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      proc = next((l.split(":", 1)[1].strip() for l in f
                   if l.startswith("model name")), proc)
  except OSError:
    pass
  return {"backend": jax.default_backend(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "processor": proc,
          "platform": platform.platform()}
