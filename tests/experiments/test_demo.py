"""The ``make demo`` showcase: its grid, report files, table and resume."""

import dataclasses
import os
import subprocess
import sys

import pytest

from experiments import demo
from tests.helpers import ROOT

TINY = dataclasses.replace(
    demo.DEMO, dataset="synthetic", data_dir=None, partition="iid",
    num_clients=6, clients_per_round=6, rounds=2, batch_size=16,
    attack_start=2, malicious_fraction=0.34, map_batch_size=3,
    eval_batch_size=100)


def test_demo_setting_is_the_showcase():
  cfg = demo.DEMO
  assert (cfg.dataset, cfg.model, cfg.num_clients, cfg.clients_per_round,
          cfg.partition, cfg.alpha) == ("fashion_mnist", "mlp", 20, 20,
                                        "dirichlet", 1.0)
  assert (cfg.sparsify, cfg.topk_ratio) == ("topk", 0.5)
  assert (cfg.malicious_fraction, cfg.malicious_mode) == (0.4, "first")
  assert 1 < cfg.attack_start < cfg.rounds
  assert {"none", "ipm", "scaling", "boosted_update"} <= set(demo.ATTACKS)
  # The papers' threat model for scaling; the adaptive row beside it.
  assert "space=model" in demo.ATTACK_ARGS["scaling"]
  assert set(demo.ATTACK_NOTES) == {"scaling", "boosted_update"}
  assert {"fedavg", "safesparse"} <= set(demo.DEFENCES)


@pytest.mark.slow
def test_run_demo_prints_the_table_writes_the_report_and_resumes(tmp_path):
  out = str(tmp_path / "demo")
  attacks, defences = ["none", "ipm"], ["fedavg", "safesparse"]
  lines = []
  result = demo.run_demo(TINY, out, attacks, defences, log=lines.append)
  assert len(result["cells"]) == 4
  assert set(result["status"].values()) == {"ran"}
  for name in ["results.csv", "results.md", "heatmap.png", "curves_none.png",
               "curves_ipm.png"]:
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert result["cells"][2].config.attack_args == demo.ATTACK_ARGS["ipm"]

  # The printed table: a row per attack, a column per defence.
  header = "| attack \\ defence | fedavg | safesparse |"
  assert header in lines
  rows = lines[lines.index(header) + 2:][:len(attacks)]
  assert [r.split("|")[1].strip() for r in rows] == attacks
  for r in rows:
    accs = [float(v) for v in r.strip("|").split("|")[1:]]
    assert len(accs) == len(defences) and all(0 <= a <= 1 for a in accs)
  assert "\n".join([header, lines[lines.index(header) + 1], *rows]) == (
      result["table"])
  assert any(l.startswith("wall time ") for l in lines)
  assert any(l.startswith("median seconds per round: fedavg ") for l in lines)
  assert set(result["summaries"]) == {c.name for c in result["cells"]}

  # A second call skips every finished cell.
  mtimes = {c.name: os.stat(os.path.join(c.dir, "summary.json")).st_mtime_ns
            for c in result["cells"]}
  again = demo.run_demo(TINY, out, attacks, defences, log=lambda _: None)
  assert set(again["status"].values()) == {"skipped"}
  assert again["table"] == result["table"]
  assert mtimes == {
      c.name: os.stat(os.path.join(c.dir, "summary.json")).st_mtime_ns
      for c in again["cells"]}

  # Another setting in the same folder starts that cell afresh.
  lines = []
  third = demo.run_demo(dataclasses.replace(TINY, lr=0.01), out, ["none"],
                        ["fedavg"], log=lines.append)
  assert list(third["status"].values()) == ["ran"]
  assert any("starting it afresh" in l for l in lines)


def test_missing_fashion_mnist_exits_2_before_running(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "experiments.demo",
       f"--data_dir={tmp_path / 'nothing'}",
       f"--output_dir={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert "error:" in r.stderr and "dataset-fashion-mnist" in r.stderr
  assert not os.path.exists(tmp_path / "out")
