"""The sweep's defence presets and per-defence fields (--presets,
--aggregator_fields_by_name)."""

import dataclasses
import os

import pytest

from experiments import sweep
from fedjax_sparse.simulation.experiment import ExperimentConfig
from tests.helpers import SWEEP_BASE as BASE
from tests.helpers import ROOT, parse_sweep_flags


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
  fv = parse_sweep_flags("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
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
  fv = parse_sweep_flags("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
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
    cells = sweep.cells_from_flags(parse_sweep_flags(f"--flagfile={flagfile}"))
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
      cells = sweep.cells_from_flags(parse_sweep_flags(
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
  fv = parse_sweep_flags("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4",
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
