"""The attack x defence sweep binary: grid, checks, resume, report."""

import copy
import dataclasses
import glob
import os
import subprocess
import sys

from absl import flags
import pytest

from experiments import sweep
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                        clients_per_round=4, rounds=3, local_epochs=1,
                        batch_size=16, lr=0.1, model="mlp", eval_every=1,
                        eval_batch_size=100, attack_start=2)


def _parse(*argv):
  fv = copy.deepcopy(flags.FLAGS)
  fv(["sweep", *argv])
  return fv


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
  fv = _parse("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
              "--output_dir=unused", *argv)
  with pytest.raises(ValueError, match=msg):
    sweep.check_cells(sweep.cells_from_flags(fv))


@pytest.mark.parametrize("path", sorted(glob.glob(
    os.path.join(ROOT, "experiments", "configs", "*_sweep.flags"))))
def test_paper_flagfiles_parse_and_validate(path):
  cells = sweep.cells_from_flags(_parse(f"--flagfile={path}"))
  assert len(cells) >= 10
  assert len({c.attack for c in cells}) >= 2
  assert len({c.aggregator for c in cells}) >= 5
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
  for name in os.listdir(victim.dir):
    os.unlink(os.path.join(victim.dir, name))
  run_experiment(dataclasses.replace(victim.config, rounds=1), progress=False)
  os.unlink(os.path.join(victim.dir, "summary.json"))
  partial = io.read_jsonl(os.path.join(victim.dir, "rounds.jsonl"))
  assert [r["round"] for r in partial] == [1]
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
  assert resumed[0] == partial[0]  # round 1 kept, not run again
  assert _strip(resumed) == _strip(reference)
  rows = sweep.write_report(cells, str(tmp_path))["rows"]
  assert all(r["status"] == "done" for r in rows)
