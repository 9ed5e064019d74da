"""The attack x defence sweep binary: grid, checks, resume, report."""

import copy
import dataclasses
import glob
import os
import shutil
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


# ---------------------------------------------------------------- presets --


def test_presets_name_their_cells_and_set_their_fields():
  cells = sweep.make_cells(
      dataclasses.replace(BASE, output_dir="out"), attacks=["none", "ipm"],
      aggregators=["fedavg", "FedProx", "scaffold", "cm"],
      malicious_fractions=[0.34])
  by_name = {c.name: c for c in cells}
  assert len(cells) == 2 * 4
  scaffold = by_name["ipm__scaffold__mf0.34__dense__seed0"]
  assert scaffold.config.scaffold is True
  assert scaffold.config.aggregator == "fedavg"
  assert scaffold.config.prox_mu == 0.0
  assert scaffold.defence == "scaffold" and scaffold.aggregator == "fedavg"
  assert scaffold.config.output_dir == os.path.join("out", scaffold.name)
  fedprox = by_name["none__fedprox__mf0__dense__seed0"]
  assert fedprox.config.prox_mu == 0.01 and not fedprox.config.scaffold
  plain = by_name["ipm__fedavg__mf0.34__dense__seed0"]
  assert plain.preset == "" and plain.defence == "fedavg"
  assert plain.config.prox_mu == 0.0 and not plain.config.scaffold
  assert "ipm__median__mf0.34__dense__seed0" in by_name  # aliases still work
  sweep.check_cells(cells)


def test_presets_flag_defines_overrides_and_takes_args_by_name():
  fv = _parse("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
              "--output_dir=unused", "--attacks=none",
              "--aggregators=fedavg,fedprox,tm_prox,tm_plain",
              "--presets=fedprox:prox_mu=0.1;"
              "tm_prox:aggregator=tm,aggregator_args=f=1,beta=0.1,prox_mu=0.5;"
              "tm_plain:aggregator=trimmed_mean,aggregator_args='beta=0.2'",
              "--aggregator_args_by_name="
              "tm_prox:beta=0.3;trimmed_mean:beta=0.4")
  cells = {c.defence: c for c in sweep.cells_from_flags(fv)}
  assert cells["fedprox"].config.prox_mu == 0.1  # the built-in replaced
  assert cells["fedprox"].config.aggregator == "fedavg"
  tm_prox = cells["tm_prox"].config
  assert tm_prox.aggregator == "trimmed_mean" and tm_prox.prox_mu == 0.5
  assert tm_prox.aggregator_args == "beta=0.3"  # the preset's own entry wins
  # Its own aggregator_args (commas kept, quotes dropped) before the rule's.
  assert cells["tm_plain"].config.aggregator_args == "beta=0.2"
  assert sweep.resolve_presets({"p": "aggregator=tm,aggregator_args=f=1,"
                                     "beta=0.1,prox_mu=0.5"})["p"] == {
      "aggregator": "trimmed_mean", "aggregator_args": "f=1,beta=0.1",
      "prox_mu": 0.5}
  assert [c.name for c in sweep.cells_from_flags(fv)][-1] == (
      "none__tm_plain__mf0__dense__seed0")
  sweep.check_cells(list(cells.values()))


@pytest.mark.parametrize("presets,msg", [
    ("p:prox_muu=0.1", r"preset 'p': unknown field 'prox_muu'; valid fields: "
                       r".*prox_mu.*scaffold"),
    ("p:seed=1", "an axis of the grid"),
    ("p:prox_mu=big", "field 'prox_mu' of preset 'p' takes a number"),
    ("p:scaffold=maybe", "takes true or false"),
    ("p:aggregator=nosuch", "preset 'p' names an unknown aggregator 'nosuch'"),
    ("median:prox_mu=0.1", "has an aggregator's name"),
    ("a__b:prox_mu=0.1", "bad preset name"),
    ("p", "name:field=value"),
])
def test_bad_presets_fail_before_running(presets, msg):
  fv = _parse("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
              "--output_dir=unused", "--aggregators=fedavg",
              f"--presets={presets}")
  with pytest.raises(ValueError, match=msg):
    sweep.cells_from_flags(fv)


def test_preset_args_by_name_needs_a_known_name():
  with pytest.raises(ValueError, match="presets: fedprox, scaffold"):
    sweep.make_cells(BASE, aggregators=["fedprox"],
                     aggregator_args_by_name={"fedproxx": "k=1"})


def _sparsefed_comparison(cells):
  """The server momentum of each SparseFed-comparison cell, wherever it is
  kept: the server optimizer's, or the rule's rho over an sgd server."""
  from fedjax_sparse.simulation.experiment import parse_kwargs
  out = {}
  for c in cells:
    cfg = c.config
    if cfg.aggregator in ("sparsefed", "fetchsgd"):
      assert cfg.server_optimizer == "sgd", c.name
      out[c.name] = parse_kwargs(cfg.aggregator_args)["rho"]
      assert cfg.round_config().server_optimizer == "sgd"
    else:
      assert cfg.server_optimizer == "momentum", c.name
      assert cfg.round_config().server_optimizer == "momentum"
      out[c.name] = cfg.round_config().server_momentum
  return out


def test_aggregator_fields_by_name_give_every_baseline_the_server_momentum(
    tmp_path):
  # The case: FedAvg and clipping get server momentum 0.9 from the
  # server optimizer, SparseFed its rho = 0.9 over an sgd server, written
  # either way round in a flagfile.
  for lines in (
      ["--aggregator_fields_by_name=fedavg:server_optimizer=momentum,"
       "server_momentum=0.9;clipping:server_optimizer=momentum,"
       "server_momentum=0.9"],
      ["--server_optimizer=momentum", "--server_momentum=0.9",
       "--aggregator_fields_by_name=sparsefed:server_optimizer=sgd"]):
    flagfile = tmp_path / "f.flags"
    flagfile.write_text("\n".join([
        "--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
        "--attacks=none,ipm", "--malicious_fractions=0.34",
        "--aggregators=fedavg,clipping,sparsefed",
        "--aggregator_args_by_name=clipping:clip_norm=5.0;"
        "sparsefed:k=0.1,clip_norm=5.0,rho=0.9",
        f"--output_dir={tmp_path / 'out'}", *lines]))
    cells = sweep.cells_from_flags(_parse(f"--flagfile={flagfile}"))
    assert len(cells) == 6
    assert set(_sparsefed_comparison(cells).values()) == {0.9}
    by = {c.defence: c for c in cells if c.attack == "ipm"}
    with_entry = (("fedavg", "clipping") if "fedavg:" in lines[0]
                  else ("sparsefed",))
    assert all(bool(c.defence_fields) == (d in with_entry)
               for d, c in by.items())
    assert by["fedavg"].name == "ipm__fedavg__mf0.34__dense__seed0"
    sweep.check_cells(cells)
  # The report lists the entries used.
  md = sweep.write_report(cells, str(tmp_path / "out"))["markdown"]
  assert "- sparsefed: server_optimizer='sgd'" in md


def test_sparsefed_flagfiles_share_server_momentum_09():
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for name in ("sparsefed_targeted.flags", "sparsefed_sweep.flags",
                 "sparsefed_targeted_cifar10.flags"):
      cells = sweep.cells_from_flags(_parse(
          f"--flagfile={os.path.join(ROOT, 'experiments', 'configs', name)}"))
      assert {c.config.aggregator for c in cells} >= {"fedavg", "sparsefed"}
      assert set(_sparsefed_comparison(cells).values()) == {0.9}, name
  finally:
    os.chdir(cwd)


def test_aggregator_fields_by_name_and_presets():
  cells = sweep.make_cells(
      BASE, aggregators=["fedavg", "fedprox", "scaffold", "p"],
      presets={"p": "aggregator=fedavg,server_momentum=0.5"},
      aggregator_fields_by_name={
          "fedavg": "server_optimizer=momentum,server_momentum=0.8",
          "scaffold": "server_momentum=0.7"})
  by = {c.defence: c.config for c in cells}
  assert (by["fedavg"].server_optimizer, by["fedavg"].server_momentum) == (
      "momentum", 0.8)
  # A preset takes its rule's entry, then its own fields, then its entry.
  assert (by["fedprox"].server_optimizer, by["fedprox"].server_momentum,
          by["fedprox"].prox_mu) == ("momentum", 0.8, 0.01)
  assert by["scaffold"].server_momentum == 0.7
  assert by["p"].server_momentum == 0.5
  assert by["p"].server_optimizer == "momentum"


@pytest.mark.parametrize("entry,msg", [
    ("fedavg:server_momentumm=0.9", "unknown field 'server_momentumm'; "
                                    "valid fields: .*server_momentum"),
    ("fedavg:seed=1", "an axis of the grid"),
    ("fedavg:aggregator=median", "--presets"),
    ("fedavg:aggregator_args=k=1", "--aggregator_args_by_name"),
    ("fedavg:server_momentum=big", "takes a number"),
    ("fedavg:server_momentum=0.9,server_momentum=0.8", "twice"),
    ("krumm:server_momentum=0.9", "names an unknown aggregator 'krumm'"),
    ("fedavg", "name:field=value"),
])
def test_bad_aggregator_fields_fail_before_running(entry, msg):
  fv = _parse("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
              "--output_dir=unused", "--aggregators=fedavg",
              f"--aggregator_fields_by_name={entry}")
  with pytest.raises(ValueError, match=msg):
    sweep.cells_from_flags(fv)


def test_server_momentum_reaches_the_round_config():
  cfg = dataclasses.replace(BASE, server_optimizer="momentum",
                            server_momentum=0.5)
  assert cfg.round_config().server_momentum == 0.5
  assert ExperimentConfig().server_momentum == 0.9
  with pytest.raises(ValueError, match="server_momentum must be in"):
    dataclasses.replace(cfg, server_momentum=1.0).validate(check_data=False)


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
  cells = sweep.cells_from_flags(_parse(*argv))
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


@pytest.mark.parametrize("name", [
    "sparsefed_targeted.flags", "flare_sweep_cifar10.flags",
    "hybrid_sweep_cifar10.flags", "sparsefed_targeted_cifar10.flags",
    "class_aware_sweep_cifar10.flags"])
def test_reproduction_flagfiles_parse_and_validate(name):
  path = os.path.join(ROOT, "experiments", "configs", name)
  cwd = os.getcwd()
  os.chdir(ROOT)  # nested --flagfile paths are relative to the repo root
  try:
    cells = sweep.cells_from_flags(_parse(f"--flagfile={path}"))
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
