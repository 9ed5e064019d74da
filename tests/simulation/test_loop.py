"""The one run loop (fedjax_sparse/simulation/loop.py): a seed batch records
every metric a separate run records, with the same values."""

import dataclasses

import numpy as np
import pytest

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import (ExperimentConfig, build_data,
                                                 run_experiment)
from fedjax_sparse.simulation.multi_seed import run_seeds

SMALL = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=8,
                         clients_per_round=8, rounds=2, local_epochs=1,
                         batch_size=16, lr=0.1, model="mlp", eval_every=1,
                         eval_batch_size=100, client_devices=1,
                         malicious_fraction=0.25, attack_start=1,
                         data_seed=0)


@pytest.mark.parametrize("fields", [
    # Escape ratios of the rule and the unattacked twin.
    dict(attack="ipm", aggregator="median", twin=True),
    # Targeted accuracy and OIF on the auxiliary set.
    pytest.param(dict(attack="targeted_pgd", aggregator="fedavg",
                      attack_args="aux_size=10,steps=2"),
                 marks=pytest.mark.slow),
])
def test_seed_batch_records_what_separate_runs_record(tmp_path, fields):
  cfg = dataclasses.replace(SMALL, **fields)
  fd = build_data(cfg)
  seeds = [0, 1]
  dirs = [str(tmp_path / f"b{s}") for s in seeds]
  sums = run_seeds(cfg, seeds, fd=fd, mode="map", output_dirs=dirs)
  for s, d, got in zip(seeds, dirs, sums):
    ref_dir = tmp_path / f"r{s}"
    ref = run_experiment(dataclasses.replace(cfg, seed=s,
                                             output_dir=str(ref_dir)),
                         progress=False, fd=fd)
    want = io.read_jsonl(str(ref_dir / "rounds.jsonl"))
    have = io.read_jsonl(f"{d}/rounds.jsonl")
    assert [sorted(r) for r in have] == [sorted(r) for r in want]
    for h, w in zip(have, want):
      for k, v in w.items():
        if k == "seconds":
          continue
        if isinstance(v, float):
          np.testing.assert_allclose(h[k], v, rtol=1e-4, atol=1e-6,
                                     err_msg=k)
        else:
          assert h[k] == v, k
    extra = {"round_losses", "seeds_per_step", "seed_batch"}
    assert set(got) - extra == set(ref)
    for k in set(ref) - {"config", "compile_seconds", "wall_seconds",
                         "median_round_seconds", "startup_seconds"}:
      if isinstance(ref[k], float):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-6,
                                   err_msg=k)
      else:
        assert got[k] == ref[k], k
  assert any(k.startswith("escape_ratio") or k == "targeted_accuracy"
             for k in have[-1])
