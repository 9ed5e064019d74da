"""The experiment runner and its command-line binary."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment
from tests.helpers import FOUR_ROUND_RUN as SMALL
from tests.helpers import ROOT, run_and_resume


def test_run_writes_results_and_learns(tmp_path):
  cfg = dataclasses.replace(SMALL, output_dir=str(tmp_path))
  summary = run_experiment(cfg, progress=False)
  records = io.read_jsonl(tmp_path / "rounds.jsonl")
  assert [r["round"] for r in records] == [1, 2, 3, 4]
  assert all("accuracy" in r for r in records if r["round"] % 2 == 0)
  assert "accuracy" not in records[0]
  with open(tmp_path / "summary.json") as f:
    on_disk = json.load(f)
  assert on_disk["final_accuracy"] == summary["final_accuracy"]
  assert summary["final_accuracy"] > 0.5  # 10 classes: chance is 0.1
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_resume_reproduces_uninterrupted_run(tmp_path):
  full, resumed, _ = run_and_resume(SMALL, tmp_path)
  assert resumed["final_accuracy"] == full["final_accuracy"]


def test_resume_refuses_another_configuration(tmp_path):
  run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path), rounds=1),
                 progress=False)
  with pytest.raises(ValueError, match="another configuration"):
    run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path), lr=0.2),
                   progress=False)


@pytest.mark.parametrize("kw,msg", [
    (dict(clients_per_round=7), "clients_per_round"),
    (dict(partition="dirichlet", alpha=0.0), "alpha must be > 0"),
    (dict(partition="zipf"), "unknown partition"),
    (dict(aggregator="krumm"), "unknown aggregator"),
    (dict(model="vgg"), "unknown model"),
    (dict(engine="pmap"), "unknown engine"),
    (dict(optimizer="lamb"), "unknown client optimizer"),
    (dict(rounds=0), "rounds"),
    (dict(dataset="nosuchdata"), "nosuchdata"),
    (dict(dataset="fashion_mnist", data_dir="/nonexistent"), "dataset-fashion-mnist"),
    (dict(conv_impl="fft"), "conv_impl"),
    (dict(data_seed=-2), "data_seed"),
    (dict(lr_decay_at=1.5), "lr_decay_at must be in"),
    (dict(lr_decay_at=-0.25), "lr_decay_at must be in"),
    (dict(lr_decay_at=0.75, lr_decay_factor=0.0), "lr_decay_factor must be > 0"),
    (dict(lr_decay_factor=-1.0), "lr_decay_factor must be > 0"),
    (dict(model_width="1x2"), "model_width must be integers"),
    (dict(model_width="0"), "model_width entries must be >= 1"),
    (dict(model="cnn2", model_width="8"), "cnn2 width must be a sequence of 3"),
    (dict(attack="scaling", attack_args="space=model", malicious_fraction=0.4,
          update_mode="momentum"), "needs clients that upload models"),
])
def test_bad_config_fails_with_a_message(kw, msg):
  with pytest.raises((ValueError, FileNotFoundError), match=msg):
    dataclasses.replace(SMALL, **kw).validate()


def _run_binary(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "experiments.run", *args],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def test_binary_rejects_bad_flags_before_compiling():
  r = _run_binary("--dataset=synthetic", "--num_clients=5",
                  "--clients_per_round=9", "--aggregator=fedavg")
  assert r.returncode == 2
  assert "clients_per_round must be between 1 and num_clients=5" in r.stderr
  r = _run_binary("--dataset=fashion_mnist", "--data_dir=/nonexistent")
  assert r.returncode == 2
  assert "apt-get install dataset-fashion-mnist" in r.stderr


@pytest.mark.slow
def test_binary_runs_with_flagfile(tmp_path):
  flagfile = tmp_path / "t.flags"
  flagfile.write_text("\n".join([
      "--dataset=synthetic", "--partition=dirichlet", "--alpha=1.0",
      "--num_clients=5", "--clients_per_round=5", "--rounds=2",
      "--batch_size=16", "--model=mlp", f"--output_dir={tmp_path / 'out'}"]))
  r = _run_binary(f"--flagfile={flagfile}")
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["rounds"] == 2
  assert np.isfinite(summary["final_accuracy"])


# Targeted model poisoning against FedAvg, boosted: a large projection ball
# (FedAvg does not clip) and strong PGD steps make the attack succeed on the
# synthetic data, where an unattacked model gets none of the flipped labels.
TARGETED = dataclasses.replace(
    SMALL, clients_per_round=6, malicious_fraction=0.34, attack_start=1,
    attack="targeted_pgd", attack_args="clip_norm=100,lr=1.0,steps=20,aux_size=30",
    twin=True)


def test_targeted_accuracy_and_oif(tmp_path):
  from fedjax_sparse.simulation.experiment import build_data
  cfg = dataclasses.replace(TARGETED, output_dir=str(tmp_path))
  summary = run_experiment(cfg, progress=False)
  records = io.read_jsonl(tmp_path / "rounds.jsonl")
  evals = [r for r in records if "accuracy" in r]
  assert [r["round"] for r in evals] == [2, 4]
  n = int(np.sum(build_data(cfg).clients.counts))
  influence = cfg.num_malicious / cfg.num_clients
  for r in evals:
    assert 0.0 <= r["targeted_accuracy"] <= 1.0
    assert 0.0 <= r["twin_targeted_accuracy"] <= 1.0
    np.testing.assert_allclose(r["oif"],
                               r["targeted_accuracy"] * 30 / (influence * n),
                               rtol=1e-6)
  assert not any("oif" in r for r in records if "accuracy" not in r)
  # The 30 auxiliary test points are not part of the test accuracy.
  assert summary["test_size"] == len(build_data(cfg).y_test) - 30
  assert summary["final_targeted_accuracy"] == evals[-1]["targeted_accuracy"]
  assert summary["final_oif"] == evals[-1]["oif"]
  assert (summary["final_twin_targeted_accuracy"]
          == evals[-1]["twin_targeted_accuracy"])
  # The attack raises the targeted accuracy above the unattacked twin's.
  assert (summary["final_targeted_accuracy"]
          > summary["final_twin_targeted_accuracy"] + 0.5), summary


def test_targeted_auxiliary_set_is_test_points_disjoint_from_training():
  """The paper's auxiliary set (sparsefed.txt 3.2; ALGORITHMS.md section 8):
  test points, none of them in any client's training rows, left out of the
  test evaluation; the attack and the targeted accuracy share it."""
  from fedjax_sparse.simulation.experiment import Experiment
  cfg = dataclasses.replace(
      TARGETED, num_clients=12, clients_per_round=6, malicious_fraction=0.25,
      attack_args="clip_norm=100,lr=1.0,steps=2,aux_size=30,aux_seed=1")
  exp = Experiment(cfg)
  fd = exp.fd
  aux = exp.targeted_aux
  assert aux.test_index is not None and len(set(aux.test_index)) == 30
  np.testing.assert_array_equal(aux.x, fd.x_test[aux.test_index])
  np.testing.assert_array_equal(np.asarray(exp.x_aux), aux.x)
  np.testing.assert_array_equal(np.asarray(exp.y_aux), aux.y)
  assert np.all(aux.y != fd.y_test[aux.test_index])  # flipped labels
  # Disjoint from every client's training examples (the client index table).
  train_rows = set()
  for c in range(cfg.num_clients):
    for i in fd.clients.idx[c, :fd.clients.counts[c]]:
      train_rows.add(fd.x_train[i].tobytes())
  assert train_rows and not any(x.tobytes() in train_rows for x in aux.x)
  # The test evaluation leaves the auxiliary points out.
  assert exp.x_test.shape[0] == len(fd.y_test) - 30
  left = {x.tobytes() for x in np.asarray(exp.x_test)}
  assert not any(x.tobytes() in left for x in aux.x)
  # aux_source=train: the attackers' own training examples, the whole test
  # split evaluated (how the committed sparsefed_targeted runs were made).
  old = Experiment(dataclasses.replace(
      cfg, attack_args=cfg.attack_args + ",aux_source=train"))
  assert old.targeted_aux.test_index is None
  assert all(x.tobytes() in train_rows for x in old.targeted_aux.x)
  assert old.x_test.shape[0] == len(fd.y_test)
  with pytest.raises(ValueError, match="unknown aux_source"):
    dataclasses.replace(cfg, attack_args="aux_source=validation").validate()


def test_no_targeted_metrics_for_other_attacks():
  summary = run_experiment(dataclasses.replace(
      SMALL, rounds=2, malicious_fraction=0.34, attack_start=1, attack="ipm"),
      progress=False)
  assert "final_targeted_accuracy" not in summary
  assert "final_oif" not in summary
  assert "final_l1_to_twin" not in summary


def test_resume_accepts_fields_added_later_at_their_default(tmp_path):
  def drop_twin(out_dir):
    path = out_dir / "config.json"
    old = json.loads(path.read_text())
    del old["twin"]  # a run written before the field existed
    path.write_text(json.dumps(old))

  run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path / "a"),
                                     rounds=1), progress=False)
  drop_twin(tmp_path / "a")
  run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path / "a"),
                                     rounds=2), progress=False)
  assert [r["round"] for r in io.read_jsonl(tmp_path / "a" / "rounds.jsonl")] \
      == [1, 2]
  # The same old run cannot resume with the new field away from its default.
  drop_twin(tmp_path / "a")
  with pytest.raises(ValueError, match="another configuration.*twin"):
    run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path / "a"),
                                       rounds=3, twin=True), progress=False)


def test_data_seed_fixes_the_partition_and_nothing_else():
  from fedjax_sparse.simulation.experiment import build_data
  cfg = dataclasses.replace(SMALL, partition="dirichlet", alpha=0.5,
                            num_clients=6, min_samples=2)
  p0 = build_data(cfg).clients.idx
  assert not np.array_equal(build_data(dataclasses.replace(cfg, seed=1))
                            .clients.idx, p0)
  fixed = dataclasses.replace(cfg, seed=1, data_seed=0)
  assert fixed.effective_data_seed == 0 and cfg.effective_data_seed == 0
  assert np.array_equal(build_data(fixed).clients.idx, p0)
  # The other randomness still follows --seed.
  a = run_experiment(dataclasses.replace(cfg, rounds=1), progress=False)
  b = run_experiment(dataclasses.replace(fixed, rounds=1), progress=False)
  assert a["final_test_loss"] != b["final_test_loss"]


def test_lr_decay_round_from_the_fraction_of_rounds():
  assert SMALL.lr_decay_round is None
  assert SMALL.round_config().lr_decay_round is None
  cfg = dataclasses.replace(SMALL, rounds=100, lr_decay_at=0.75,
                            lr_decay_factor=0.5)
  assert cfg.lr_decay_round == 75
  assert cfg.round_config().lr_decay_round == 75
  assert cfg.round_config().lr_decay_factor == 0.5
  # As written in decimal: 0.29 * 100 is 28.999999999999996 in floats.
  assert dataclasses.replace(cfg, lr_decay_at=0.29).lr_decay_round == 29
  assert dataclasses.replace(cfg, rounds=10, lr_decay_at=0.75).lr_decay_round == 7
  assert dataclasses.replace(cfg, lr_decay_at=1.0).lr_decay_round == 100


@pytest.mark.slow
def test_lr_decay_in_both_loops_and_no_extension_on_resume(tmp_path):
  """The schedule acts in run_experiment and in the seed-batched loop alike
  (the same round losses), changes nothing before its round, and a run
  with a schedule cannot be resumed with other rounds (they place it)."""
  from fedjax_sparse.simulation.multi_seed import run_seeds
  base = dataclasses.replace(SMALL, clients_per_round=6, rounds=4,
                             client_devices=1)
  decayed = dataclasses.replace(base, lr_decay_at=0.5, lr_decay_factor=0.1,
                                output_dir=str(tmp_path / "a"))
  run_experiment(decayed, progress=False)
  plain = run_experiment(base, progress=False)
  losses = [r["loss"] for r in io.read_jsonl(tmp_path / "a" / "rounds.jsonl")]
  batched = run_seeds(dataclasses.replace(decayed, output_dir=""), [0],
                      mode="map")[0]
  np.testing.assert_allclose(batched["round_losses"], losses, rtol=1e-5)
  plain_losses = run_seeds(base, [0], mode="map")[0]["round_losses"]
  # Round index 2 = round 3 is the first with the smaller lr: its clients
  # train more slowly (their mean loss differs) and so on.
  np.testing.assert_allclose(losses[:2], plain_losses[:2], rtol=1e-5)
  assert all(abs(a - b) > 1e-6 for a, b in zip(losses[2:], plain_losses[2:]))
  with pytest.raises(ValueError, match="another configuration.*rounds"):
    run_experiment(dataclasses.replace(decayed, rounds=6), progress=False)
  assert plain["final_accuracy"] is not None


def test_binary_help_describes_every_config_flag():
  r = _run_binary("--helpfull")  # absl exits 1 after printing the help
  names = [f.name for f in dataclasses.fields(ExperimentConfig)]
  for name in names:
    assert f"--{name}:" in r.stdout or f"--[no]{name}:" in r.stdout, name
    # No flag falls back to its bare name as help.
    assert f"--{name}: {name}\n" not in r.stdout, name
  assert "--lr_decay_at: Step decay" in r.stdout


@pytest.mark.parametrize("attack,args,space", [
    ("scaling", "space=model", "model"), ("scaling", "", "update"),
    ("gna", "space=model", "model"), ("ipm", "", None)])
def test_round_records_say_which_threat_model_ran(tmp_path, attack, args, space):
  cfg = dataclasses.replace(SMALL, output_dir=str(tmp_path), rounds=2,
                            attack=attack, attack_args=args,
                            malicious_fraction=0.34, attack_start=1)
  run_experiment(cfg, progress=False)
  for rec in io.read_jsonl(tmp_path / "rounds.jsonl"):
    assert rec.get("attack_space") == space


@pytest.mark.slow
def test_model_width_sets_the_hidden_layers(tmp_path):
  """--model_width=100: the hybrid paper's MLP of about 80k parameters."""
  import jax
  from fedjax_sparse.simulation.experiment import Experiment
  cfg = dataclasses.replace(SMALL, output_dir=str(tmp_path), rounds=1,
                            model_width="100")
  summary = run_experiment(cfg, progress=False)
  kernels = [a.shape for a in jax.tree.leaves(Experiment(cfg).variables["params"])
             if a.ndim == 2]
  assert len(kernels) == 2 and kernels[0][1] == 100 and kernels[1][0] == 100
  d_in, classes = kernels[0][0], kernels[1][1]
  assert summary["num_params"] == d_in * 100 + 100 + 100 * classes + classes
