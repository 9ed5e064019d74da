"""The experiment runner and its command-line binary."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment

SMALL = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=4, rounds=4, local_epochs=1,
                         batch_size=16, lr=0.1, model="mlp", eval_every=2,
                         eval_batch_size=100)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_writes_results_and_learns(tmp_path):
  cfg = dataclasses.replace(SMALL, output_dir=str(tmp_path))
  summary = run_experiment(cfg, progress=False)
  records = io.read_jsonl(tmp_path / "rounds.jsonl")
  assert [r["round"] for r in records] == [1, 2, 3, 4]
  assert all("accuracy" in r for r in records if r["round"] % 2 == 0)
  assert "accuracy" not in records[0]
  with open(tmp_path / "summary.json") as f:
    on_disk = json.load(f)
  assert on_disk["final_accuracy"] == summary["final_accuracy"]
  assert summary["final_accuracy"] > 0.5  # 10 classes: chance is 0.1
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_resume_reproduces_uninterrupted_run(tmp_path):
  full = run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path / "a")),
                        progress=False)
  part = dataclasses.replace(SMALL, output_dir=str(tmp_path / "b"), rounds=2)
  run_experiment(part, progress=False)
  resumed = run_experiment(dataclasses.replace(part, rounds=4), progress=False)
  a = io.read_jsonl(tmp_path / "a" / "rounds.jsonl")
  b = io.read_jsonl(tmp_path / "b" / "rounds.jsonl")
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(a) == strip(b)
  assert resumed["final_accuracy"] == full["final_accuracy"]


def test_resume_refuses_another_configuration(tmp_path):
  run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path), rounds=1),
                 progress=False)
  with pytest.raises(ValueError, match="another configuration"):
    run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path), lr=0.2),
                   progress=False)


@pytest.mark.parametrize("kw,msg", [
    (dict(clients_per_round=7), "clients_per_round"),
    (dict(partition="dirichlet", alpha=0.0), "alpha must be > 0"),
    (dict(partition="zipf"), "unknown partition"),
    (dict(aggregator="krumm"), "unknown aggregator"),
    (dict(model="vgg"), "unknown model"),
    (dict(engine="pmap"), "unknown engine"),
    (dict(optimizer="lamb"), "unknown client optimizer"),
    (dict(rounds=0), "rounds"),
    (dict(dataset="nosuchdata"), "nosuchdata"),
    (dict(dataset="fashion_mnist", data_dir="/nonexistent"), "dataset-fashion-mnist"),
    (dict(conv_impl="fft"), "conv_impl"),
])
def test_bad_config_fails_with_a_message(kw, msg):
  with pytest.raises((ValueError, FileNotFoundError), match=msg):
    dataclasses.replace(SMALL, **kw).validate()


def _run_binary(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "experiments.run", *args],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def test_binary_rejects_bad_flags_before_compiling():
  r = _run_binary("--dataset=synthetic", "--num_clients=5",
                  "--clients_per_round=9", "--aggregator=fedavg")
  assert r.returncode == 2
  assert "clients_per_round must be between 1 and num_clients=5" in r.stderr
  r = _run_binary("--dataset=fashion_mnist", "--data_dir=/nonexistent")
  assert r.returncode == 2
  assert "apt-get install dataset-fashion-mnist" in r.stderr


def test_binary_runs_with_flagfile(tmp_path):
  flagfile = tmp_path / "t.flags"
  flagfile.write_text("\n".join([
      "--dataset=synthetic", "--partition=dirichlet", "--alpha=1.0",
      "--num_clients=5", "--clients_per_round=5", "--rounds=2",
      "--batch_size=16", "--model=mlp", f"--output_dir={tmp_path / 'out'}"]))
  r = _run_binary(f"--flagfile={flagfile}")
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["rounds"] == 2
  assert np.isfinite(summary["final_accuracy"])
