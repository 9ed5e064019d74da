"""Python sweep configs (``--config``, ml_collections) and the sweeps package."""

import copy
import dataclasses
import os
import subprocess
import sys

from absl import flags
import ml_collections
import pytest

from experiments import sweep
from fedjax_sparse import sweeps
from fedjax_sparse.simulation.experiment import ExperimentConfig, parse_kwargs
from fedjax_sparse.sweeps import config as config_lib
from tests.helpers import ROOT

CONFIGS = os.path.join(ROOT, "experiments", "configs")
SMALL = ("--dataset=synthetic", "--num_clients=6", "--clients_per_round=4")
# ml_collections loads config files with the deprecated load_module().
pytestmark = pytest.mark.filterwarnings(
    "ignore:the load_module:DeprecationWarning")


def _parse(*argv):
  """Flags parsed into a copy of FLAGS, ``--config`` overrides included."""
  fv = copy.deepcopy(flags.FLAGS)
  # ml_collections defines the --config.<key> flags into the FlagValues the
  # config flag was defined in and reads them from sys.argv: point both at
  # this copy and these arguments.
  fv["config"].flag_values = fv
  fv["config"]._sys_argv = ["sweep", *argv]
  fv(["sweep", *argv])
  return fv


def _same_cells(a, b):
  assert [c.name for c in a] == [c.name for c in b]
  for x, y in zip(a, b):
    assert dataclasses.asdict(x.config) == dataclasses.asdict(y.config), x.name
    assert (x.preset, x.preset_fields, x.defence_fields) == (
        y.preset, y.preset_fields, y.defence_fields), x.name
  assert a == b


@pytest.mark.parametrize("flagfile,config", [
    ("flare_sweep.flags", "flare.py"),
    ("hybrid_paper_fmnist.flags", "hybrid_paper_fmnist.py"),
])
def test_config_makes_the_flagfiles_cells(flagfile, config):
  by_flags = _parse(f"--flagfile={os.path.join(CONFIGS, flagfile)}")
  by_config = _parse(f"--config={os.path.join(CONFIGS, 'sweeps', config)}")
  cells = sweep.cells_from_flags(by_config)
  _same_cells(sweep.cells_from_flags(by_flags), cells)
  assert sweep.ineffective_flags(cells, by_config) == sweep.ineffective_flags(
      cells, by_flags)
  sweep.check_cells(cells, check_data=False)
  # The text the committed cells hold, ':' and ',' inside a value and all.
  if config.startswith("hybrid"):
    hsa = next(c for c in cells if c.attack == "hsa")
    assert hsa.config.attack_args == ("mask_method=force_plus,delta=0.005,"
                                      "caps=last_dense:0.25,fresh_batches=true")


def test_config_overrides_on_the_command_line():
  fv = _parse(f"--config={os.path.join(CONFIGS, 'sweeps', 'flare.py')}",
              "--config.attacks=none,ipm", "--config.seeds=0,1",
              "--config.base.rounds=10", "--config.output_dir=runs/small",
              "--config.attack_args.scaling.space=update",
              "--eval_batch_size=500")  # a field the config leaves alone
  cells = sweep.cells_from_flags(fv)
  assert len(cells) == 2 * 8 * 2
  assert {c.attack for c in cells} == {"none", "ipm"}
  assert {c.seed for c in cells} == {0, 1}
  assert all(c.config.rounds == 10 and c.config.eval_batch_size == 500
             for c in cells)
  assert cells[0].dir == os.path.join("runs/small", cells[0].name)
  assert fv.config.attack_args.scaling.space == "update"


@pytest.mark.parametrize("argv,msg", [
    (["--attacks=ipm"], r"--attacks and --config both set the grid: set "
                        r"attacks in the config file or override it with "
                        r"--config.attacks="),
    (["--attack_args_by_name=ipm:eps=4"],
     "override it with --config.attack_args="),
    (["--presets="], "--presets and --config both set the grid"),
    (["--rounds=3"], r"--rounds and --config \(base.rounds\) both set rounds: "
                     r"override the config with --config.base.rounds="),
    (["--output_dir=x"], "--config.output_dir="),
])
def test_config_and_flags_setting_one_thing_fail(argv, msg):
  fv = _parse(f"--config={os.path.join(CONFIGS, 'sweeps', 'flare.py')}",
              *argv)
  with pytest.raises(ValueError, match=msg):
    sweep.cells_from_flags(fv)


def test_python_values_equal_the_flag_text():
  base = ExperimentConfig(dataset="synthetic", num_clients=6,
                          clients_per_round=4, output_dir="unused")
  fv = _parse(*SMALL, "--output_dir=unused", "--attacks=none,lfa",
              "--malicious_fractions=0.34",
              "--aggregators=fedavg,fedprox,tm_prox,tm_plain",
              "--presets=fedprox:prox_mu=0.1;"
              "tm_prox:aggregator=tm,aggregator_args=f=1,beta=0.1,prox_mu=0.5;"
              "tm_plain:aggregator=trimmed_mean,aggregator_args='beta=0.2'",
              "--aggregator_args_by_name=tm_prox:beta=0.3;trimmed_mean:beta=0.4",
              "--attack_args_by_name=lfa:mapping=circular",
              "--aggregator_fields_by_name=fedavg:server_optimizer=momentum,"
              "server_momentum=0.8;tm_plain:weighted=false")
  config = {
      "attacks": ("none", "lfa"), "malicious_fractions": (0.34,),
      "aggregators": ("fedavg", "fedprox", "tm_prox", "tm_plain"),
      "presets": {
          "fedprox": {"prox_mu": 0.1},
          "tm_prox": {"aggregator": "tm",
                      "aggregator_args": {"f": 1, "beta": 0.1},
                      "prox_mu": 0.5},
          "tm_plain": {"aggregator": "trimmed_mean",
                       "aggregator_args": {"beta": 0.2}}},
      "aggregator_args": {"tm_prox": {"beta": 0.3},
                          "trimmed_mean": {"beta": 0.4}},
      "attack_args": {"lfa": {"mapping": "circular"}},
      "aggregator_fields": {
          "fedavg": {"server_optimizer": "momentum", "server_momentum": 0.8},
          "tm_plain": {"weighted": False}},
  }
  cells = sweeps.cells_from_config(config, base)
  _same_cells(sweep.cells_from_flags(fv), cells)
  # As a ConfigDict, whose keys are sorted: the same cells, the fields of
  # a defence's entry listed in sorted order.
  sorted_cells = sweeps.cells_from_config(ml_collections.ConfigDict(config),
                                          base)
  assert [(c.name, c.config) for c in sorted_cells] == [
      (c.name, c.config) for c in cells]
  assert [sorted(c.defence_fields) for c in cells] == [
      list(c.defence_fields) for c in sorted_cells]
  sweep.check_cells(cells)


def test_args_text_reads_back():
  args = {"caps": "last_dense:0.25,first_conv:0.2", "fresh_batches": True,
          "delta": 0.005, "k": 3, "mode": "4", "shape": (2, 3), "x": None}
  text = config_lib.args_text(args, "w")
  assert text == ("caps=last_dense:0.25,first_conv:0.2,fresh_batches=True,"
                  "delta=0.005,k=3,mode='4',shape=(2, 3),x=None")
  assert parse_kwargs(text) == args
  assert config_lib.args_text("eps=4", "w") == "eps=4"  # text kept as is
  with pytest.raises(ValueError, match="does not read back"):
    config_lib.args_text({"a": "x,b=1"}, "w")
  with pytest.raises(ValueError, match="bad argument name"):
    config_lib.args_text({"a b": 1}, "w")


@pytest.mark.parametrize("config,msg", [
    ({"seed": (0,)}, r"unknown key\(s\) seed; the keys are: base, attacks"),
    ({"base": {"roundz": 3}}, "unknown field 'roundz'; valid fields: .*rounds"),
    ({"base": {"output_dir": "x"}}, "set config.output_dir instead"),
    ({"base": {"rounds": "ten"}}, "config.base.rounds takes an integer"),
    ({"base": {"model": 3}}, "config.base.model takes a string"),
    ({"seeds": ("a",)}, "config.seeds takes a tuple of integers"),
    ({"seeds": (0.5,)}, "config.seeds takes a tuple of integers"),
    ({"malicious_fractions": ("x",)}, "takes a tuple of numbers"),
    ({"attack_args": {"ipm": 4}}, "config.attack_args.ipm takes"),
    ({"attack_args": {"ipmm": {"eps": 4}}}, "unknown attack 'ipmm'"),
    ({"presets": {"p": {"prox_muu": 1}}}, "preset 'p': unknown field"),
])
def test_bad_configs_fail_with_a_message(config, msg):
  with pytest.raises(ValueError, match=msg):
    sweeps.cells_from_config(config, ExperimentConfig(dataset="synthetic"))


def test_the_binary_takes_a_config_file(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text(
      "import ml_collections\n\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.base = dict(dataset='synthetic', num_clients=6,\n"
      "                clients_per_round=4, rounds=3, attack_start=2)\n"
      "  c.attacks = ('none', 'ipm')\n"
      "  c.aggregators = ('fedavg',)\n"
      "  c.malicious_fractions = (0.34,)\n"
      "  c.seeds = (0,)\n"
      "  c.output_dir = 'unused'\n"
      "  return c\n")
  out = tmp_path / "out"
  r = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={path}",
       "--config.seeds=0,1", f"--config.output_dir={out}", "--report_only"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert f"4 cells into {out}" in r.stdout
  assert "ipm__fedavg__mf0.34__dense__seed1: missing" in (
      out / "results.md").read_text()


def test_the_package_is_the_binarys_library():
  for name in ("make_cells", "run_cells", "write_report", "check_cells",
               "finished", "same_config", "share_data_seed", "Cell"):
    assert getattr(sweep, name) is getattr(sweeps, name), name
  for path in ("grid", "tables", "config", "checks", "runner", "report"):
    with open(os.path.join(ROOT, "fedjax_sparse", "sweeps",
                           f"{path}.py")) as f:
      assert len(f.readlines()) < 400, path
