"""experiments/reproduce.py: a committed cell rerun from its config.json."""

import dataclasses
import json

import pytest

from experiments import reproduce
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import run_experiment
from tests.helpers import TWO_ROUND_RUN as SMALL


def test_compare_records():
  old = [{"round": 1, "loss": 0.5, "seconds": 1.0, "attack_active": False,
          "tpr": 0.5}]
  new = {"round": 1, "loss": 0.5, "seconds": 9.0, "attack_active": False,
         "tpr": None}
  assert reproduce.compare_records(old, [new]) is None
  off = dict(new, loss=0.5000001)
  assert "loss" in reproduce.compare_records(old, [off])
  assert reproduce.compare_records(old, [off], rtol=1e-5) is None
  assert "missing" in reproduce.compare_records(old, [{"round": 1,
                                                       "loss": 0.5}])
  assert "rounds" in reproduce.compare_records(old, [])


@pytest.mark.slow
def test_a_cell_reproduces_and_a_changed_one_does_not(tmp_path):
  cell = tmp_path / "cell"
  run_experiment(dataclasses.replace(SMALL, output_dir=str(cell)),
                 progress=False)
  assert reproduce.reproduce(str(cell)) is None
  # A renamed rule reruns under its new name (here: another rule).
  assert reproduce.reproduce(str(cell), renamed={"fedavg": "median"})
  recs = io.read_jsonl(str(cell / "rounds.jsonl"))
  recs[1]["loss"] += 1e-3
  io.write_jsonl(str(cell / "rounds.jsonl"), recs)
  assert "round 2: loss" in reproduce.reproduce(str(cell))
  assert reproduce.reproduce(str(cell), max_rounds=1) is None
  saved = json.loads((cell / "config.json").read_text())
  assert reproduce.config_of(str(cell)).rounds == saved["rounds"]


@pytest.mark.slow  # _with_missing is tested below in the default run
def test_arguments_of_cells_made_before_they_existed(tmp_path):
  cell = tmp_path / "cell"
  cfg = dataclasses.replace(SMALL, aggregator="rfa", rounds=1,
                            aggregator_args="variant=fixed_steps",
                            output_dir=str(cell))
  run_experiment(cfg, progress=False)
  saved = json.loads((cell / "config.json").read_text())
  saved["aggregator_args"] = ""  # as written before the argument existed
  io.atomic_write_json(str(cell / "config.json"), saved)
  assert reproduce.reproduce(str(cell), aggregator_args_by_name={
      "rfa": "variant=fixed_steps"}) is None


def test_missing_keys_are_added_and_saved_ones_kept():
  assert reproduce._with_missing("", "variant=fixed_steps") == (
      "variant=fixed_steps")
  assert reproduce._with_missing("aux_size=500,steps=5",
                                 "aux_source=train,steps=9") == (
      "aux_size=500,steps=5,aux_source=train")
  assert reproduce._with_missing("a=1", None) == "a=1"


def test_shortened_keeps_the_attack_and_the_decay_round():
  cfg = dataclasses.replace(SMALL, rounds=100, attack="label_flip",
                            malicious_fraction=0.25, attack_start=10,
                            lr_decay_at=0.75)
  short = reproduce.shortened(cfg, 3)
  assert short.rounds == 10  # up to the attack's first round
  assert short.lr_decay_round == 10  # past the compared rounds: no decay
  clean = dataclasses.replace(cfg, attack="none", malicious_fraction=0.0)
  assert reproduce.shortened(clean, 3).rounds == 3
  with pytest.raises(ValueError, match="decay at round 75"):
    reproduce.shortened(cfg, 80)
  assert reproduce.shortened(cfg, 200) == cfg
