"""What a new researcher hit from a fresh clone.

Each test is one of those traps: an attack that silently never started, a
top-k ratio that silently did nothing, detection rates of rounds without an
attack, names the single-run binary did not know, curves hidden under each
other, report text that did not match the grid, rounds.jsonl rewritten whole
every round; and the progress display the sweep lacked.
"""

import copy
import dataclasses
import os

from absl import flags
import pytest

from experiments import run as run_lib
from experiments import sweep
from fedjax_sparse import aggregators as aggregators_lib
from fedjax_sparse import attacks as attacks_lib
from fedjax_sparse.simulation import flag_checks
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation import plots
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment
from fedjax_sparse.simulation.round import RoundConfig

SMALL = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=4, rounds=3, local_epochs=1,
                         batch_size=16, lr=0.1, model="mlp", eval_every=1,
                         eval_batch_size=100, client_devices=1)


# ------------------------------------------------- an attack that never ran --


def test_an_attack_that_would_never_start_is_refused():
  cfg = dataclasses.replace(SMALL, attack="ipm", malicious_fraction=0.34,
                            attack_start=10, rounds=10)
  cfg.validate(check_data=False)  # round 10 is the last: it attacks once
  with pytest.raises(ValueError, match=r"--attack_start=11 is after the last "
                     r"round \(--rounds=10\)"):
    dataclasses.replace(cfg, attack_start=11).validate(check_data=False)
  # Without an attack the start is irrelevant.
  dataclasses.replace(SMALL, attack_start=11, rounds=10).validate(
      check_data=False)


def test_detection_rates_only_in_attacked_rounds(tmp_path):
  cfg = dataclasses.replace(SMALL, attack="ipm", malicious_fraction=0.34,
                            attack_start=3, aggregator="multi_krum",
                            num_byzantine=1, clients_per_round=6,
                            output_dir=str(tmp_path))
  summary = run_experiment(cfg, progress=False)
  records = io.read_jsonl(str(tmp_path / "rounds.jsonl"))
  assert [r["attack_active"] for r in records] == [False, False, True]
  for r in records[:2]:
    assert r["tpr"] is None and r["fpr"] is None
  assert records[2]["tpr"] is not None and records[2]["fpr"] is not None
  assert summary["attack_rounds"] == 1
  assert summary["mean_tpr"] == records[2]["tpr"]
  clean = run_experiment(dataclasses.replace(SMALL, rounds=1), progress=False)
  assert clean["attack_rounds"] is None


# -------------------------------------------- settings that do nothing --


def test_topk_ratio_out_of_range_is_refused_whatever_the_sparsifier():
  for sparsify in ("none", "topk"):
    with pytest.raises(ValueError, match="topk_ratio must be in"):
      RoundConfig(4, 4, sparsify=sparsify, topk_ratio=1.5).validate()
    with pytest.raises(ValueError, match="pack_size"):
      RoundConfig(4, 4, sparsify=sparsify, pack_size=0).validate()


def test_flags_without_effect_are_errors_or_warnings():
  errors, warnings = flag_checks.ineffective(
      SMALL, {"topk_ratio", "alpha", "lr", "server_momentum"})
  assert errors == ["--topk_ratio has no effect without --sparsify=topk (the "
                    "configuration has --sparsify=none)"]
  assert any(w.startswith("--alpha has no effect") for w in warnings)
  assert any(w.startswith("--server_momentum") for w in warnings)
  assert not any("--lr " in m for m in errors + warnings)
  used = dataclasses.replace(SMALL, sparsify="topk", partition="dirichlet",
                             server_optimizer="momentum")
  assert flag_checks.ineffective(
      used, {"topk_ratio", "alpha", "server_momentum"}) == ([], [])


def _parse(*argv):
  fv = copy.deepcopy(flags.FLAGS)
  fv(["sweep", *argv])
  return fv


def test_sweep_flags_no_cell_uses_are_caught():
  fv = _parse("--dataset=synthetic", "--topk_ratios=0.1", "--attacks=ipm",
              "--malicious_fraction=0.34", "--output_dir=/x")
  errors, _ = sweep.ineffective_flags(sweep.cells_from_flags(fv), fv)
  assert errors == ["--topk_ratio has no effect without --sparsify=topk (the "
                    "configuration has --sparsify=none)"]
  # --malicious_fraction is used by the ipm cells, not by the none cells.
  fv = _parse("--dataset=synthetic", "--attacks=none,ipm",
              "--malicious_fraction=0.34", "--output_dir=/x")
  errors, warnings = sweep.ineffective_flags(sweep.cells_from_flags(fv), fv)
  assert errors == [] and not any("malicious_fraction" in w for w in warnings)
  fv = _parse("--dataset=synthetic", "--attacks=none", "--alpha=0.3",
              "--partition=iid", "--output_dir=/x")
  _, warnings = sweep.ineffective_flags(sweep.cells_from_flags(fv), fv)
  assert [w.split(" ")[0] for w in warnings] == ["--alpha"]


# ---------------------------------------------------------- names --


def test_aliases_work_everywhere():
  assert aggregators_lib.get("cm") is aggregators_lib.get("median")
  assert aggregators_lib.get("TM") is aggregators_lib.get("trimmed_mean")
  assert attacks_lib.get_data_attack("lfa") is attacks_lib.get_data_attack(
      "label_flip")
  cfg = dataclasses.replace(SMALL, aggregator="cm", attack="LFA")
  assert (cfg.aggregator, cfg.attack) == ("median", "label_flip")
  with pytest.raises(ValueError, match="aliases: cm=median"):
    aggregators_lib.get("no_such_rule")


def test_help_lists_the_names():
  for name in aggregators_lib.names():
    assert name in run_lib.AGGREGATOR_NAMES
  for name in attacks_lib.names():
    assert name in run_lib.ATTACK_NAMES
  assert "cm=median" in flags.FLAGS["aggregator"].help
  assert "lfa=label_flip" in flags.FLAGS["attacks"].help


# ------------------------------------------------------- plots, report --


def test_identical_curves_are_labelled_and_styled_apart():
  a = ((1, 0.5), (2, 0.6))
  labels = plots._curve_labels({"safesparse": a, "fedavg": a,
                                "median": ((1, 0.4), (2, 0.7))})
  assert labels == {"safesparse": "safesparse", "fedavg": "fedavg (= safesparse)",
                    "median": "median"}
  styles = [plots._style(i) for i in range(4)]
  assert len({(s["linestyle"], s["marker"]) for s in styles}) == 4


def test_panel_titles_say_the_none_row_has_no_attackers():
  assert sweep._panel_title(0.4, 0.5, True) == (
      "malicious fraction 0.4 (none row: no attackers), top-k 0.5")
  assert sweep._panel_title(0.4, "", False) == "malicious fraction 0.4, dense"


def _fake_cell(cell, acc):
  os.makedirs(cell.dir, exist_ok=True)
  recs = [{"round": r, "loss": 1.0, "seconds": 0.1, "update_norm": 1.0,
           "uplink_bits": 1.0, "downlink_bits": 1.0, "accuracy": acc}
          for r in range(1, cell.config.rounds + 1)]
  io.write_jsonl(os.path.join(cell.dir, "rounds.jsonl"), recs)
  io.atomic_write_json(os.path.join(cell.dir, "config.json"),
                       sweep._config_dict(cell.config))
  io.atomic_write_json(os.path.join(cell.dir, "summary.json"),
                       {"final_accuracy": acc, "rounds": cell.config.rounds,
                        "config": sweep._config_dict(cell.config)})


def test_report_mentions_the_none_row_only_when_there_is_one(tmp_path):
  base = dataclasses.replace(SMALL, output_dir=str(tmp_path),
                             malicious_fraction=0.34, attack_start=1)
  cells = sweep.make_cells(base, ["ipm"], ["fedavg", "median"])
  for c in cells:
    _fake_cell(c, 0.5)
  md = sweep.write_report(cells, str(tmp_path))["markdown"]
  assert "none row" not in md
  cells = sweep.make_cells(base, ["none", "ipm"], ["fedavg"])
  for c in cells:
    _fake_cell(c, 0.5)
  md = sweep.write_report(cells, str(tmp_path))["markdown"]
  assert "The none row (no attackers) is the clean baseline" in md
  assert "(none row: no attackers)" in md


# --------------------------------------------------- rounds.jsonl --


def test_each_round_appends_its_record(tmp_path, monkeypatch):
  writes = []
  real = io.append_jsonl
  monkeypatch.setattr(io, "append_jsonl",
                      lambda p, recs: (writes.append(len(recs)), real(p, recs)))
  cfg = dataclasses.replace(SMALL, output_dir=str(tmp_path))
  run_experiment(cfg, progress=False)
  assert writes == [1, 1, 1]
  assert [r["round"] for r in io.read_jsonl(str(tmp_path / "rounds.jsonl"))
          ] == [1, 2, 3]


def test_a_torn_last_line_is_skipped_and_resumed_over(tmp_path):
  cfg = dataclasses.replace(SMALL, output_dir=str(tmp_path),
                            checkpoint_every=2)
  run_experiment(dataclasses.replace(cfg, rounds=2), progress=False)
  path = tmp_path / "rounds.jsonl"
  full = run_experiment(dataclasses.replace(cfg, output_dir=str(
      tmp_path / "ref")), progress=False)
  # A kill in the middle of round 3's append: half a line, no newline.
  with open(path, "a") as f:
    f.write('{"round": 3, "lo')
  assert [r["round"] for r in io.read_jsonl(str(path))] == [1, 2]
  resumed = run_experiment(cfg, progress=False)
  recs = io.read_jsonl(str(path))
  assert [r["round"] for r in recs] == [1, 2, 3]
  assert path.read_text().endswith("}\n")
  assert resumed["final_accuracy"] == full["final_accuracy"]
  # A bad line that is not the last is still an error naming the file.
  path.write_text('{"round": 1}\n{"rou\n{"round": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    io.read_jsonl(str(path))


# ------------------------------------------------------- progress --


def test_sweep_shows_one_progress_bar_with_eta(tmp_path, capsys):
  base = dataclasses.replace(SMALL, output_dir=str(tmp_path), rounds=2)
  cells = sweep.make_cells(base, ["none"], ["fedavg", "median"])
  _fake_cell(cells[0], 0.5)  # finished before: counted as done
  lines = []
  status = sweep.run_cells(cells, overall_progress=True, log=lines.append)
  assert status == {cells[0].name: "skipped", cells[1].name: "ran"}
  err = capsys.readouterr().err
  assert "sweep" in err and "4/4" in err
  assert cells[1].name in err  # the current cell is named
  assert len(lines) == 2
