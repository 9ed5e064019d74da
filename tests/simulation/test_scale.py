"""Scale: the client axis over devices and processes, and seed-batched
sweeps (100,000-client populations: test_scale_population.py).

The device-count tests run in subprocesses: the number of host CPU devices is
fixed when JAX starts, and this test process already has two (conftest.py).
"""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_sparse import data as data_lib
from fedjax_sparse.simulation import distributed
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import (Experiment, ExperimentConfig,
                                                 run_experiment)
from fedjax_sparse.simulation.multi_seed import SeedBatch, run_seeds

# The repository's root (not tests.helpers.ROOT: the workers below import
# this module before jax.distributed.initialize, and tests.helpers runs JAX).
ROOT = pathlib.Path(__file__).resolve().parents[2]

SMALL = ExperimentConfig(dataset="synthetic", num_clients=20,
                         clients_per_round=10, rounds=2, local_steps=2,
                         batch_size=8, lr=0.1, engine="vmap", attack_start=1,
                         eval_every=1, client_devices=1)

# Sharded-vs-unsharded cases: aggregators that average, take order
# statistics, select clients, and cluster sparse masks, plus an update attack.
CASES = {
    "fedavg": {},
    "median": dict(aggregator="median"),
    "multi_krum": dict(aggregator="multi_krum", num_byzantine=2),
    "safesparse": dict(aggregator="safesparse", sparsify="topk",
                       topk_ratio=0.5),
    "alie": dict(aggregator="median", attack="alie", malicious_fraction=0.2),
}


def _small_fd(num_clients=20):
  return data_lib.build("synthetic", num_clients, "iid", num_train=400,
                        num_test=50, input_shape=(6,), seed=0)


def _run_rounds(cfg, fd, rounds):
  """Final flat params and per-round loss and acceptance of ``rounds`` rounds."""
  exp = Experiment(cfg, fd=fd)
  state = exp.init_state()
  losses, acceptance = [], []
  for _ in range(rounds):
    state, m = exp.round_step(state, exp.data)
    losses.append(float(m["loss"]))
    acceptance.append(np.asarray(m["acceptance"]))
  return (np.asarray(ravel_pytree(state.params)[0]), np.array(losses),
          np.stack(acceptance))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             PYTHONPATH=os.pathsep.join(
                 [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  return env


def _call(fn: str, *args, devices: int):
  """Runs ``test_scale.<fn>(*args)`` in a fresh Python with ``devices``
  host CPU devices; returns the Popen."""
  code = f"from tests.simulation import test_scale; test_scale.{fn}(*{args!r})"
  return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                          env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout):
  """Waits for every process; kills all of them past ``timeout`` seconds."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    for p in procs:
      p.communicate()
    pytest.fail(f"subprocesses still running after {timeout} s; killed")
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


# ---------------------------------------------------------------------------
# 1. Sharded client axis == unsharded.


def sharding_worker(out_path, cases):
  """Subprocess body: ``cases`` maps a case to its device counts."""
  assert len(jax.devices()) == 8, jax.devices()
  fd = _small_fd()
  res = {}
  for name, devices in cases.items():
    for dev in devices:
      cfg = dataclasses.replace(SMALL, client_devices=dev, **CASES[name])
      p, loss, acc = _run_rounds(cfg, fd, SMALL.rounds)
      res[f"{name}/{dev}/params"] = p
      res[f"{name}/{dev}/loss"] = loss
      res[f"{name}/{dev}/acceptance"] = acc
  np.savez(out_path, **res)


def _check_sharded(tmp_path, cases, timeout):
  out = tmp_path / "sharded.npz"
  _wait([_call("sharding_worker", str(out), cases, devices=8)], timeout)
  with np.load(out) as z:
    for name, devices in cases.items():
      assert devices[0] == 1
      for dev in devices[1:]:
        for what in ("params", "loss"):
          np.testing.assert_allclose(
              z[f"{name}/{dev}/{what}"], z[f"{name}/1/{what}"], atol=1e-5,
              rtol=1e-5, err_msg=f"{name} on {dev} devices: {what}")
        # Selections (Krum, SafeSparse, the median's attack) are identical.
        np.testing.assert_array_equal(z[f"{name}/{dev}/acceptance"],
                                      z[f"{name}/1/acceptance"])


@pytest.mark.slow
def test_sharded_rounds_agree_with_unsharded(tmp_path):
  """K=10 clients over 8 devices (padded to 16) and over 4 (padded to 12)."""
  _check_sharded(tmp_path, {"fedavg": (1, 8), "alie": (1, 4)}, timeout=150)


@pytest.mark.slow
def test_sharded_rounds_agree_every_case(tmp_path):
  _check_sharded(tmp_path, {name: (1, 4, 8) for name in CASES}, timeout=600)


# ---------------------------------------------------------------------------
# 2. Two processes (multi-host on one machine) == one process.


def distributed_worker(process_id, port, out_dir):
  """Subprocess body: one of 2 processes, 2 CPU devices each."""
  info = distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                                process_id=process_id,
                                initialization_timeout=40)
  assert info == {"process_index": process_id, "process_count": 2,
                  "local_devices": 2, "devices": 4}, info
  from fedjax_sparse.simulation import devices
  mesh = distributed.global_client_mesh(0)
  assert mesh.size == 4 and {d.process_index for d in mesh.devices} == {0, 1}
  out = pathlib.Path(out_dir) / f"proc{process_id}"
  out.mkdir(parents=True, exist_ok=True)
  # One output directory for both: they write one checkpoint together.
  cfg = dataclasses.replace(SMALL, client_devices=0,
                            output_dir=str(pathlib.Path(out_dir) / "shared"))
  # The client axis over the devices of both processes (see
  # distributed.global_client_mesh; devices.client_mesh is process-local).
  with mock.patch.object(devices, "client_mesh",
                         distributed.global_client_mesh):
    summary = run_experiment(cfg, progress=False, fd=_small_fd())
  (out / "result.json").write_text(json.dumps(
      {"mesh": [d.id for d in mesh.devices], "summary": summary}))


def _checkpoint_params(path):
  return io.checkpoint_arrays(str(path))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  procs = [_call("distributed_worker", pid, port, str(tmp_path), devices=2)
           for pid in (0, 1)]
  _wait(procs, timeout=90)
  ref_dir = tmp_path / "ref"
  ref = run_experiment(dataclasses.replace(SMALL, output_dir=str(ref_dir)),
                       progress=False, fd=_small_fd())
  ref_ckpt = _checkpoint_params(ref_dir / "checkpoint")
  for pid in (0, 1):
    got = json.loads((tmp_path / f"proc{pid}" / "result.json").read_text())
    assert len(got["mesh"]) == 4
    for k in ("final_test_loss", "final_accuracy", "uplink_bits_total"):
      np.testing.assert_allclose(got["summary"][k], ref[k], rtol=1e-5)
    ckpt = _checkpoint_params(tmp_path / "shared" / "checkpoint")
    assert ckpt.keys() == ref_ckpt.keys()
    for k in ckpt:
      np.testing.assert_allclose(ckpt[k], ref_ckpt[k], atol=1e-5, rtol=1e-5,
                                 err_msg=f"process {pid}, {k}")


@pytest.mark.slow
def test_binary_distributed_flag_two_processes(tmp_path):
  """experiments.run --distributed: both processes finish, process 0
  reports. (The client axis spans both processes once devices.client_mesh
  uses the global devices; until then each process runs every client.)"""
  port = _free_port()
  args = ["--dataset=synthetic", "--num_clients=8", "--clients_per_round=4",
          "--rounds=2", "--local_steps=2", "--batch_size=8",
          "--client_devices=0", "--distributed",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.run", *args, f"--process_id={pid}",
       f"--output_dir={tmp_path / str(pid)}"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for pid in (0, 1)]
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "final_accuracy" in outs[0][0]
  assert "final_accuracy" not in outs[1][0]
  a, b = (json.loads((tmp_path / str(pid) / "summary.json").read_text())
          for pid in (0, 1))
  assert a["final_test_loss"] == pytest.approx(b["final_test_loss"], rel=1e-6)


def test_initialize_needs_all_three_addressing_arguments():
  with pytest.raises(ValueError, match="all of coordinator_address"):
    distributed.initialize("127.0.0.1:1234")
  with pytest.raises(ValueError, match="process_id must be in"):
    distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)


def test_global_client_mesh_single_process():
  mesh = distributed.global_client_mesh(0)
  assert mesh.axis_names == ("clients",)
  assert mesh.size == jax.device_count()
  with pytest.raises(ValueError, match="only"):
    distributed.global_client_mesh(jax.device_count() + 1)


# ---------------------------------------------------------------------------
# 3. Seed-batched sweeps.


@pytest.mark.slow
def test_run_seeds_matches_separate_runs(tmp_path):
  """Random malicious sets differ per seed (stacked data), ALIE attacks,
  and the client axis is split over 2 devices under the seed batching."""
  cfg = dataclasses.replace(SMALL, rounds=3, attack="alie",
                            malicious_fraction=0.2, malicious_mode="random",
                            client_devices=2)
  fd = _small_fd()
  seeds = [3, 7]
  batch = SeedBatch(cfg, seeds, fd, mode="map")
  assert batch.data_axes.malicious == 0 and batch.data_axes.x is None
  sums = run_seeds(cfg, seeds, fd=fd, batch=batch)
  for s, got in zip(seeds, sums):
    out = tmp_path / str(s)
    ref = run_experiment(dataclasses.replace(cfg, seed=s, output_dir=str(out)),
                         progress=False, fd=fd)
    ref.pop("config")
    for k in ("final_test_loss", "final_accuracy", "uplink_bits_total",
              "mean_tpr", "mean_fpr"):
      np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5,
                                 err_msg=k)
    losses = [r["loss"] for r in map(json.loads, (out / "rounds.jsonl")
                                     .read_text().splitlines())]
    np.testing.assert_allclose(got["round_losses"], losses, rtol=1e-5)
    assert got["config"]["seed"] == s and got["seeds_per_step"] == 2
  # vmap over the seeds (shard_map under vmap): the same runs.
  vmapped = run_seeds(cfg, seeds, fd=fd, mode="vmap")
  for got, want in zip(vmapped, sums):
    np.testing.assert_allclose(got["round_losses"], want["round_losses"],
                               rtol=1e-5)
    np.testing.assert_allclose(got["final_test_loss"], want["final_test_loss"],
                               rtol=1e-5)


@pytest.mark.slow
def test_run_seeds_shard_mode_matches_map_mode():
  """Seeds split over the 2 host devices (each device maps its own seeds,
  the client axis kept whole) give the runs of the single-device map mode;
  the mesh takes the most devices that divide S."""
  cfg = dataclasses.replace(SMALL, rounds=2, attack="ipm",
                            malicious_fraction=0.2, malicious_mode="random",
                            aggregator="median", client_devices=2)
  fd = _small_fd()
  seeds = [0, 1, 2, 5]
  shard = SeedBatch(cfg, seeds, fd, mode="shard")
  assert shard.mesh.shape["seeds"] == 2
  got = run_seeds(cfg, seeds, fd=fd, batch=shard)
  want = run_seeds(cfg, seeds, fd=fd, mode="map")
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["round_losses"], w["round_losses"], rtol=1e-5)
    np.testing.assert_allclose(g["final_test_loss"], w["final_test_loss"],
                               rtol=1e-5)
    assert g["mean_tpr"] == w["mean_tpr"]
  assert len({g["final_test_loss"] for g in got}) == len(seeds)
  # Three seeds do not split over two devices: one device runs them all.
  assert SeedBatch(cfg, [0, 1, 2], fd, mode="shard").mesh.shape["seeds"] == 1
  with pytest.raises(ValueError, match="unknown mode"):
    SeedBatch(cfg, seeds, fd, mode="pmap")


def test_run_seeds_refuses_seed_dependent_attacks():
  cfg = dataclasses.replace(SMALL, attack="hsa", malicious_fraction=0.2)
  with pytest.raises(ValueError, match="separately"):
    SeedBatch(cfg, [0, 1], _small_fd())
  with pytest.raises(ValueError, match="distinct"):
    SeedBatch(SMALL, [1, 1], _small_fd())
