"""The attack x defence sweep binary: grid, checks, resume, seed batches."""

import dataclasses
import glob
import os
import shutil
import subprocess
import sys

import pytest

from experiments import sweep
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import run_experiment
from tests.helpers import SWEEP_BASE as BASE
from tests.helpers import ROOT, parse_sweep_flags


def test_grid_names_aliases_and_the_none_attack():
  cells = sweep.make_cells(
      dataclasses.replace(BASE, output_dir="out"),
      attacks=["none", "lfa", "ipm"], aggregators=["fedavg", "cm"],
      malicious_fractions=[0.2, 0.4], seeds=[0, 1],
      attack_args_by_name={"ipm": "eps=0.5"})
  # "none" runs once per defence and seed whatever the fractions are.
  assert len(cells) == 2 * 2 * (1 + 2 * 2)
  names = [c.name for c in cells]
  assert len(set(names)) == len(names)
  assert "none__fedavg__mf0__dense__seed0" in names
  assert "label_flip__median__mf0.4__dense__seed1" in names
  cell = next(c for c in cells if c.name == "ipm__median__mf0.2__dense__seed0")
  assert cell.config.attack_args == "eps=0.5"
  assert cell.config.output_dir == os.path.join("out", cell.name)
  assert all(c.config.malicious_fraction == 0 for c in cells if c.attack == "none")
  sweep.check_cells(cells)


@pytest.mark.parametrize("argv,msg", [
    (["--attacks=none,ipmm"], "unknown attack 'ipmm'"),
    (["--aggregators=fedavg,krumm"], "unknown aggregator 'krumm'"),
    (["--malicious_fractions=0.2,x"], "takes numbers"),
    (["--topk_ratios=0.1,0.5"], "set --sparsify=topk"),
    (["--attacks=ipm", "--malicious_fractions=0.0"], "needs malicious clients"),
    (["--attacks=ipm", "--malicious_fractions=0.3",
      "--attack_args_by_name=ipm:epsilon=1"], "cannot build attack 'ipm'"),
    (["--aggregators=trimmed_mean", "--aggregator_args_by_name=trimmed_mean:beta=0.7"],
     "beta must be in"),
    (["--attack_args_by_name=ipm"], "name:k=v"),
])
def test_bad_flags_fail_before_running(argv, msg):
  fv = parse_sweep_flags("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
              "--output_dir=unused", *argv)
  with pytest.raises(ValueError, match=msg):
    sweep.check_cells(sweep.cells_from_flags(fv))


@pytest.mark.parametrize("path", sorted(glob.glob(
    os.path.join(ROOT, "experiments", "configs", "*_sweep.flags"))))
def test_paper_flagfiles_parse_and_validate(path):
  cells = sweep.cells_from_flags(parse_sweep_flags(f"--flagfile={path}"))
  assert len(cells) >= 10
  assert len({c.attack for c in cells}) >= 2
  assert len({c.defence for c in cells}) >= 5
  sweep.check_cells(cells, check_data=False)  # no data, nothing compiled


def test_flagfiles_cover_each_paper():
  names = {os.path.basename(p) for p in glob.glob(
      os.path.join(ROOT, "experiments", "configs", "*_sweep.flags"))}
  assert {"flare_sweep.flags", "hybrid_sweep.flags", "sparsefed_sweep.flags",
          "class_aware_sweep.flags"} <= names


def test_binary_rejects_bad_names_with_a_message(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--dataset=synthetic",
       "--num_clients=6", "--clients_per_round=4", "--attacks=none,nosuch",
       f"--output_dir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert "unknown attack 'nosuch'" in r.stderr
  assert not os.listdir(tmp_path)  # nothing ran


def _strip(records):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
def test_sweep_runs_reports_skips_and_resumes(tmp_path):
  base = dataclasses.replace(BASE, output_dir=str(tmp_path))
  cells = sweep.make_cells(base, attacks=["none", "ipm"],
                           aggregators=["fedavg", "median"],
                           malicious_fractions=[0.34])
  assert len(cells) == 4
  sweep.check_cells(cells)
  status = sweep.run_cells(cells, log=lambda *_: None)
  assert set(status.values()) == {"ran"}
  report = sweep.write_report(cells, str(tmp_path))
  for name in ("results.csv", "results.md", "heatmap.png", "curves_none.png",
               "curves_ipm.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  csv_lines = (tmp_path / "results.csv").read_text().splitlines()
  assert csv_lines[0].startswith("cell,status,attack,aggregator,malicious_fraction")
  assert len(csv_lines) == 5
  assert all(r["status"] == "done" and r["final_accuracy"] is not None
             for r in report["rows"])
  md = (tmp_path / "results.md").read_text()
  assert "| attack \\ defence | fedavg | median |" in md
  assert "| ipm |" in md and "| none |" in md
  assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

  # A killed cell: one finished round on disk, no summary.
  victim = next(c for c in cells if c.name.startswith("ipm__median"))
  reference = io.read_jsonl(os.path.join(victim.dir, "rounds.jsonl"))
  shutil.rmtree(victim.dir)
  # 2 of 3 rounds: a run shorter than attack_start (2) is refused.
  run_experiment(dataclasses.replace(victim.config, rounds=2), progress=False)
  os.unlink(os.path.join(victim.dir, "summary.json"))
  partial = io.read_jsonl(os.path.join(victim.dir, "rounds.jsonl"))
  assert [r["round"] for r in partial] == [1, 2]
  assert sweep.write_report(cells, str(tmp_path))["rows"][
      cells.index(victim)]["status"].startswith("partial")

  others = [c for c in cells if c is not victim]
  mtimes = {c.name: os.stat(os.path.join(c.dir, "summary.json")).st_mtime_ns
            for c in others}
  status = sweep.run_cells(cells, log=lambda *_: None)
  assert status == {**{c.name: "skipped" for c in others}, victim.name: "ran"}
  assert mtimes == {c.name: os.stat(os.path.join(c.dir, "summary.json")).st_mtime_ns
                    for c in others}
  resumed = io.read_jsonl(os.path.join(victim.dir, "rounds.jsonl"))
  assert resumed[:2] == partial  # rounds 1 and 2 kept, not run again
  assert _strip(resumed) == _strip(reference)
  rows = sweep.write_report(cells, str(tmp_path))["rows"]
  assert all(r["status"] == "done" for r in rows)


@pytest.mark.parametrize("name", [
    "sparsefed_targeted.flags", "flare_sweep_cifar10.flags",
    "hybrid_sweep_cifar10.flags", "sparsefed_targeted_cifar10.flags",
    "class_aware_sweep_cifar10.flags"])
def test_reproduction_flagfiles_parse_and_validate(name):
  path = os.path.join(ROOT, "experiments", "configs", name)
  cwd = os.getcwd()
  os.chdir(ROOT)  # nested --flagfile paths are relative to the repo root
  try:
    cells = sweep.cells_from_flags(parse_sweep_flags(f"--flagfile={path}"))
  finally:
    os.chdir(cwd)
  assert len({c.attack for c in cells}) >= 2
  assert len({c.defence for c in cells}) >= 4
  sweep.check_cells(cells, check_data=False)
  if "cifar10" in name:
    assert all(c.config.dataset == "tfds:cifar10" for c in cells)
    assert all(c.config.model == "resnet20" for c in cells)


# ------------------------------------------------------------ seed batches --


@pytest.mark.slow
def test_batch_seeds_equal_separate_runs_and_resume(tmp_path):
  """--batch_seeds: the seeds of a cell train in one step, shard mode over
  the 2 host devices, each cell directory as a separate run of the same
  configuration (the seeds share the data partition) writes it; a killed
  batch resumes from its checkpoint and ends as an uninterrupted one."""
  base = dataclasses.replace(BASE, output_dir=str(tmp_path / "batched"),
                             client_devices=1)
  cells = sweep.share_data_seed(sweep.make_cells(
      base, attacks=["none", "ipm"], aggregators=["median"],
      malicious_fractions=[0.34], seeds=[3, 4]))
  assert {c.config.data_seed for c in cells} == {3}
  logs = []
  status = sweep.run_cells(cells, log=logs.append, batch_seeds=True,
                           seed_mode="shard")
  assert set(status.values()) == {"ran"}
  assert sum("2 seeds together" in m for m in logs) == 4
  for cell in cells:
    got = io.read_jsonl(os.path.join(cell.dir, "rounds.jsonl"))
    summary = sweep._read_json(os.path.join(cell.dir, "summary.json"))
    assert summary["seed_batch"] == {"seeds": [3, 4], "mode": "shard"}
    ref_dir = str(tmp_path / "separate" / cell.name)
    run_experiment(dataclasses.replace(cell.config, output_dir=ref_dir),
                   progress=False)
    want = io.read_jsonl(os.path.join(ref_dir, "rounds.jsonl"))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
      assert g.keys() <= w.keys()
      for k in ("loss", "accuracy", "test_loss", "update_norm", "tpr", "fpr"):
        if w.get(k) is not None:
          assert abs(g[k] - w[k]) <= 1e-5 * max(1.0, abs(w[k])), (cell.name, k)
  assert sweep.run_cells(cells, log=lambda *_: None, batch_seeds=True) == {
      c.name: "skipped" for c in cells}

  # A batch killed after 2 of 3 rounds: its checkpoint and 2 rounds on disk.
  ipm = [c for c in cells if c.attack == "ipm"]
  reference = {c.name: io.read_jsonl(os.path.join(c.dir, "rounds.jsonl"))
               for c in ipm}
  for c in ipm:
    shutil.rmtree(c.dir)
  short = [dataclasses.replace(c, config=dataclasses.replace(c.config,
                                                             rounds=2))
           for c in ipm]
  sweep.run_cells(short, log=lambda *_: None, batch_seeds=True)
  for c in ipm:
    os.unlink(os.path.join(c.dir, "summary.json"))
  partial = {c.name: io.read_jsonl(os.path.join(c.dir, "rounds.jsonl"))
             for c in ipm}
  status = sweep.run_cells(cells, log=lambda *_: None, batch_seeds=True)
  assert status == {c.name: "ran" if c.attack == "ipm" else "skipped"
                    for c in cells}
  for c in ipm:
    resumed = io.read_jsonl(os.path.join(c.dir, "rounds.jsonl"))
    assert resumed[:2] == partial[c.name]  # not run again
    assert _strip(resumed) == _strip(reference[c.name])


@pytest.mark.slow
def test_batch_seeds_runs_unbatchable_cells_one_by_one(tmp_path):
  # hsa builds its mask from each seed's initial model: no seed batch (the
  # twin, unbatchable once, now batches).
  base = dataclasses.replace(BASE, output_dir=str(tmp_path), twin=True,
                             client_devices=1, attack_args="mask_method=random")
  cells = sweep.share_data_seed(sweep.make_cells(
      base, attacks=["hsa"], aggregators=["fedavg"],
      malicious_fractions=[0.34], seeds=[0, 1]))
  logs = []
  assert set(sweep.run_cells(cells, log=logs.append,
                             batch_seeds=True).values()) == {"ran"}
  assert not any("together" in m for m in logs)
  for c in cells:
    summary = sweep._read_json(os.path.join(c.dir, "summary.json"))
    assert "seed_batch" not in summary and "final_l1_to_twin" in summary
