"""The sweep's finished check and report: tables of the new metrics and
detection, --report_only."""

import dataclasses
import os
import subprocess
import sys

import pytest

from experiments import sweep
from fedjax_sparse.simulation import io
from tests.helpers import SWEEP_BASE as BASE
from tests.helpers import ROOT, parse_sweep_flags


# ------------------------------------------------------- finished check --


def _write_summary(cell, config=None, **values):
  os.makedirs(cell.dir, exist_ok=True)
  config = sweep._config_dict(cell.config) if config is None else config
  io.atomic_write_json(os.path.join(cell.dir, "summary.json"),
                       {"config": config, "rounds": cell.config.rounds,
                        **values})


def test_finished_tolerates_fields_added_since_the_run(tmp_path):
  base = dataclasses.replace(BASE, output_dir=str(tmp_path))
  plain, scaffold = sweep.make_cells(base, aggregators=["fedavg", "scaffold"])
  for cell in (plain, scaffold):
    old = sweep._config_dict(cell.config)
    del old["scaffold"]  # a run from before the field existed
    old["retired_field"] = 3  # a field that no longer exists
    _write_summary(cell, old, final_accuracy=0.5)
  # Missing counts as the default (False): equal for the plain cell only.
  assert sweep.finished(plain)
  assert not sweep.finished(scaffold)
  rows = sweep.write_report([plain, scaffold], str(tmp_path))["rows"]
  assert [r["status"] for r in rows] == ["done", "missing"]
  # A saved value that differs is still another configuration.
  changed = sweep._config_dict(plain.config)
  changed["lr"] = 0.5
  _write_summary(plain, changed, final_accuracy=0.5)
  assert not sweep.finished(plain)
  assert not sweep.same_config(None, plain.config)


# ----------------------------------------------------------- new tables --


def _fake_run(cell, attacked, tpr, fpr, **extra):
  acc = 0.8 - 0.1 * attacked
  _write_summary(cell, final_accuracy=acc, best_accuracy=acc,
                 mean_tpr=tpr if attacked else None,
                 mean_fpr=fpr if attacked else None, **extra)
  io.write_jsonl(os.path.join(cell.dir, "rounds.jsonl"), [
      {"round": r, "accuracy": acc,
       **({"targeted_accuracy": 0.1 * r} if "final_targeted_accuracy" in extra
          else {})} for r in (1, 2, 3)])


def test_report_tables_of_new_metrics_and_detection(tmp_path):
  base = dataclasses.replace(BASE, output_dir=str(tmp_path))
  cells = sweep.make_cells(base, attacks=["none", "ipm", "semantic_backdoor"],
                           aggregators=["fedavg", "median", "fedprox"],
                           malicious_fractions=[0.34], seeds=[0, 1])
  for cell in cells:
    attacked = cell.attack != "none"
    extra = {}
    if cell.attack == "semantic_backdoor":
      extra = {"final_asr": 0.5, "final_targeted_accuracy": 0.25,
               "final_oif": 1.5}
    if attacked:
      extra["final_l1_to_twin"] = 12.0 + cell.seed
    median = cell.defence == "median"
    _fake_run(cell, attacked, 0.75 if median else 0.0,
              0.125 if median else 0.0, **extra)
  report = sweep.write_report(cells, str(tmp_path))
  md = (tmp_path / "results.md").read_text()
  header = "| attack \\ defence | fedavg | median | fedprox |"
  assert md.count(header) == 5  # accuracy, ASR, targeted, OIF, L1
  for title in ("# Final targeted accuracy", "# Final outsized impact factor",
                "# Final L1 distance to the unattacked twin",
                "# Detection: mean TPR / FPR", "# Defence presets"):
    assert title in md, title
  targeted = md.split("# Final targeted accuracy")[1].split("\n# ")[0]
  assert ("| semantic_backdoor | 0.2500 ± 0.0000 | 0.2500 ± 0.0000 | "
          "0.2500 ± 0.0000 |") in targeted
  assert "| ipm |" not in targeted  # only the attacks that report it
  l1 = md.split("# Final L1 distance")[1].split("\n# ")[0]
  assert "| ipm | 12.5 ± 0.5 | 12.5 ± 0.5 | 12.5 ± 0.5 |" in l1
  detection = md.split("# Detection")[1].split("\n# ")[0]
  assert "| attack \\ defence | median |" in detection  # fedavg flags nobody
  assert "| ipm | 0.7500 / 0.1250 |" in detection
  assert "| none |" not in detection
  assert "- fedprox: aggregator='fedavg', prox_mu=0.01" in md
  csv_lines = (tmp_path / "results.csv").read_text().splitlines()
  assert ",final_asr,final_l1_to_twin,final_twin_accuracy," \
         "final_targeted_accuracy,final_oif,mean_tpr," in csv_lines[0]
  assert any(line.startswith("semantic_backdoor__fedprox__") and
             ",semantic_backdoor,fedprox," in line for line in csv_lines)
  assert {r["aggregator"] for r in report["rows"]} == {"fedavg", "median",
                                                       "fedprox"}
  curve = sweep._mean_curve([io.read_jsonl(os.path.join(c.dir, "rounds.jsonl"))
                             for c in cells if c.attack == "semantic_backdoor"])
  assert curve[-1]["targeted_accuracy"] == pytest.approx(0.3)
  assert (tmp_path / "curves_semantic_backdoor.png").stat().st_size > 0


def test_report_leaves_out_tables_without_values(tmp_path):
  base = dataclasses.replace(BASE, output_dir=str(tmp_path))
  cells = sweep.make_cells(base, attacks=["none", "ipm"],
                           aggregators=["fedavg"], malicious_fractions=[0.34])
  for cell in cells:
    _fake_run(cell, cell.attack != "none", 0.0, 0.0)
  md = sweep.write_report(cells, str(tmp_path))["markdown"]
  for title in ("attack success", "targeted", "impact factor", "L1",
                "Detection", "presets"):
    assert title not in md, title


def test_report_only_binary_with_presets(tmp_path):
  argv = ["--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
          "--rounds=3", "--attack_start=1",
          "--attacks=none,ipm", "--malicious_fractions=0.34",
          "--aggregators=fedavg,scaffold,fp", "--presets=fp:prox_mu=0.05",
          f"--output_dir={tmp_path}"]
  cells = sweep.cells_from_flags(parse_sweep_flags(*argv))
  for cell in cells:
    _fake_run(cell, cell.attack != "none", 0.0, 0.0)
  r = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", *argv, "--report_only"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "| attack \\ defence | fedavg | scaffold | fp |" in r.stdout
  md = (tmp_path / "results.md").read_text()
  assert "6/6 cells finished" in md
  assert "- fp: aggregator='fedavg', prox_mu=0.05" in md
