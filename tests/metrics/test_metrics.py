"""Metrics (ALGORITHMS.md section 7) and the attack success rate of runs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import metrics
from fedjax_sparse.attacks import dba_triggers, global_trigger
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import (Experiment, ExperimentConfig,
                                                 run_experiment)

LOGITS = np.array([[0.1, 0.9, 0.0, 0.3],    # ranking 1, 3, 0, 2
                   [2.0, 1.0, 3.0, 0.0],    # ranking 2, 0, 1, 3
                   [0.0, 0.2, 0.1, 0.5]],   # ranking 3, 1, 2, 0
                  np.float32)
LABELS = np.array([1, 0, 2], np.int32)


def test_top_k_accuracy_hand_computed():
  assert float(metrics.accuracy(LOGITS, LABELS)) == pytest.approx(1 / 3)
  assert float(metrics.top_k_accuracy(LOGITS, LABELS, 2)) == pytest.approx(2 / 3)
  assert float(metrics.top_k_accuracy(LOGITS, LABELS, 3)) == pytest.approx(1.0)
  # k beyond the number of classes: every example counts as correct.
  assert float(metrics.top_k_accuracy(LOGITS, LABELS, 10)) == 1.0
  mask = np.array([False, True, True])
  assert float(metrics.top_k_accuracy(LOGITS, LABELS, 2, mask)) == pytest.approx(0.5)
  np.testing.assert_array_equal(metrics.top_k_correct(LOGITS, LABELS, 2),
                                [True, True, False])
  jitted = jax.jit(metrics.top_k_accuracy, static_argnums=2)
  assert float(jitted(LOGITS, LABELS, 2)) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="k must be"):
    metrics.top_k_accuracy(LOGITS, LABELS, 0)


def test_attack_success_rate_hand_computed():
  # predictions 1, 2, 3; target 2 -> one of three.
  assert float(metrics.attack_success_rate(LOGITS, 2)) == pytest.approx(1 / 3)
  assert float(metrics.attack_success_rate(LOGITS, jnp.array([1, 2, 0]))) == (
      pytest.approx(2 / 3))
  assert float(metrics.attack_success_rate(LOGITS, 2, [False, True, False])) == 1.0


def test_backdoor_eval_set_follows_the_attack_configuration():
  x = np.zeros((5, 8, 8, 1), np.float32)
  x[0, 7, 7, 0] = 2.0  # the maximum of x: the value of a value=None trigger
  y = np.array([0, 1, 2, 0, 3], np.int32)
  xs, ys = metrics.backdoor_eval_set("pixel_backdoor", {}, x, y)
  mask = global_trigger(dba_triggers((8, 8, 1))).mask
  assert xs.shape == (3, 8, 8, 1)  # the non-target samples (label != 0)
  np.testing.assert_array_equal(ys, [0, 0, 0])
  assert np.all(xs[:, mask, 0] == 2.0) and np.all(xs[:, ~mask, 0] == 0.0)
  xs, ys = metrics.backdoor_eval_set("dba", {"target_label": 2}, x, y)
  np.testing.assert_array_equal(ys, [2, 2, 2, 2])
  assert np.all(xs[:, mask, 0] == 2.0)
  # Semantic backdoor: the source-class samples, labelled with the target.
  xs, ys = metrics.backdoor_eval_set("semantic_backdoor",
                                     {"source": 0, "target": 3}, x, y)
  assert xs.shape[0] == 2
  np.testing.assert_array_equal(ys, [3, 3])
  with pytest.raises(ValueError, match="not a backdoor attack"):
    metrics.backdoor_eval_set("ipm", {}, x, y)


def test_detection_rates_hand_computed():
  acceptance = jnp.array([1.0, 0.0, 0.5, -1.0, 0.0])
  malicious = jnp.array([True, True, False, False, False])
  d = metrics.detection(acceptance, malicious)
  # flagged (acceptance <= 0): clients 1, 3, 4 -> TP = 1 of 2, FP = 2 of 3.
  assert (int(d.flagged_malicious), int(d.flagged_benign)) == (1, 2)
  assert (int(d.num_malicious), int(d.num_benign)) == (2, 3)
  assert float(d.tpr) == pytest.approx(0.5)
  assert float(d.fpr) == pytest.approx(2 / 3)
  tpr, fpr = jax.jit(metrics.detection_rates)(acceptance, jnp.zeros(5, bool))
  assert math.isnan(float(tpr)) and float(fpr) == pytest.approx(3 / 5)


def test_outsized_impact_factor_hand_computed():
  # sparsefed.txt B.1.6: 10 of 1000 agents (I = 0.01) over n = 50000 points
  # are "entitled" to 500 points; poisoning 50 of them is an OIF of 0.1.
  assert metrics.influence(10, 1000) == pytest.approx(0.01)
  assert metrics.outsized_impact_factor(50, 10, 1000, 50000) == pytest.approx(0.1)
  assert metrics.outsized_impact_factor(500, 10, 1000, 50000) == pytest.approx(1.0)
  assert float(metrics.outsized_impact_factor(jnp.float32(1000), 10, 1000, 50000)
               ) == pytest.approx(2.0)
  assert metrics.outsized_impact_factor(5, 0, 1000, 50000) == math.inf
  assert math.isnan(metrics.outsized_impact_factor(0, 0, 1000, 50000))
  with pytest.raises(ValueError):
    metrics.outsized_impact_factor(1, 1, 10, 0)


def test_l1_distance_hand_computed():
  a = jnp.array([1.0, -2.0, 3.0])
  assert float(metrics.l1_distance(a, jnp.zeros(3))) == 6.0
  assert float(metrics.l1_distance(a, a)) == 0.0
  assert float(metrics.l1_distance(a, jnp.array([0.5, 0.0, 3.0]))) == 2.5
  with pytest.raises(ValueError, match="shape"):
    metrics.l1_distance(a, jnp.zeros(4))


def test_communication_totals_hand_computed():
  records = [{"uplink_bits": 100.0, "downlink_bits": 640.0},
             {"uplink_bits": 50.0, "downlink_bits": 640.0}, {}]
  t = metrics.communication_totals(records)
  assert t == {"uplink_bits_total": 150.0, "downlink_bits_total": 1280.0,
               "total_bits": 1430.0, "rounds": 3}
  dense = metrics.dense_uplink_bits(d=10, clients_per_round=2, rounds=3)
  assert dense == 32 * 10 * 2 * 3
  assert metrics.compression_ratio(480.0, dense) == pytest.approx(4.0)
  assert metrics.bits_to_megabytes(8e6) == 1.0


SMALL = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=4, rounds=2, local_epochs=1,
                         batch_size=16, lr=0.1, model="mlp", eval_every=1,
                         eval_batch_size=100, malicious_fraction=0.34,
                         attack_start=1)


def test_experiment_asr_matches_the_metric_on_the_model_logits():
  exp = Experiment(dataclasses.replace(SMALL, attack="dba",
                                       attack_args="target_label=3"))
  assert exp.has_asr
  state = exp.init_state()
  xs, ys = metrics.backdoor_eval_set("dba", {"target_label": 3},
                                     exp.fd.x_test, exp.fd.y_test)
  logits = exp.model.apply({"params": state.params, **state.model_state},
                           jnp.asarray(xs), train=False)
  assert exp.asr_state(state) == pytest.approx(
      float(metrics.attack_success_rate(logits, 3)), abs=1e-6)
  assert not Experiment(dataclasses.replace(SMALL, attack="ipm")).has_asr


def test_backdoor_runs_record_asr(tmp_path):
  cfg = dataclasses.replace(SMALL, attack="pixel_backdoor",
                            output_dir=str(tmp_path))
  summary = run_experiment(cfg, progress=False)
  records = io.read_jsonl(tmp_path / "rounds.jsonl")
  assert all(0.0 <= r["asr"] <= 1.0 for r in records)
  assert summary["final_asr"] == records[-1]["asr"]
