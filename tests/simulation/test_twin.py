"""The unattacked twin trained in the same jitted step (ALGORITHMS.md s. 7)."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_sparse.simulation.experiment import Experiment
from fedjax_sparse.simulation.round import TwinState
from tests.helpers import FOUR_ROUND_RUN as SMALL
from tests.helpers import run_and_resume

ATTACKED = dataclasses.replace(SMALL, malicious_fraction=0.34, attack_start=1)


def _train(cfg, rounds):
  """Runs ``rounds`` rounds of ``cfg``; returns the state and the metrics."""
  exp = Experiment(cfg)
  state = exp.init_state()
  history = []
  for _ in range(rounds):
    state, metrics = exp.round_step(state, exp.data)
    history.append(jax.device_get(metrics))
  return exp, state, history


def _flat(state):
  return np.asarray(ravel_pytree(state.params)[0])


def test_without_attack_the_twin_is_bitwise_the_run():
  exp, state, history = _train(dataclasses.replace(SMALL, twin=True), 3)
  assert isinstance(state, TwinState)
  assert int(state.round) == 3
  assert [float(m["l1_to_twin"]) for m in history] == [0.0, 0.0, 0.0]
  for m in history:
    assert float(m["twin/loss"]) == float(m["loss"])
  np.testing.assert_array_equal(_flat(state.main), _flat(state.twin))
  assert exp.eval_state(state) == exp.eval_state(state.twin)


@pytest.fixture(scope="module")
def unattacked():
  """A separate run of ATTACKED's configuration with attack="none"."""
  ref_cfg = dataclasses.replace(ATTACKED,
                                num_byzantine=dataclasses.replace(
                                    ATTACKED, attack="ipm").byzantine)
  _, ref, ref_history = _train(ref_cfg, 3)
  return ref, ref_history


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["ipm", "label_flip"])
def test_twin_is_the_run_without_attackers(attack, unattacked):
  """Same seed, no attackers: the twin equals a separate attack="none" run."""
  ref, ref_history = unattacked
  cfg = dataclasses.replace(ATTACKED, attack=attack, twin=True)
  _, state, history = _train(cfg, 3)
  # The same clients were sampled in every round.
  for m, r in zip(history, ref_history):
    np.testing.assert_array_equal(m["clients"], r["clients"])
    np.testing.assert_allclose(m["twin/loss"], r["loss"], rtol=1e-6)
  assert sum(int(m["num_malicious"]) for m in history) > 0
  np.testing.assert_allclose(_flat(state.twin), _flat(ref), rtol=0, atol=1e-6)
  l1 = [float(m["l1_to_twin"]) for m in history]
  assert all(v > 0 for v in l1), l1
  np.testing.assert_allclose(
      l1[-1], np.sum(np.abs(_flat(state.main) - _flat(state.twin))),
      rtol=1e-5)


@pytest.mark.slow
def test_twin_records_summary_and_resume(tmp_path):
  cfg = dataclasses.replace(ATTACKED, attack="ipm", twin=True)
  full, resumed, a = run_and_resume(cfg, tmp_path)
  assert all(r["l1_to_twin"] > 0 and "twin_loss" in r for r in a)
  assert [("twin_accuracy" in r) for r in a] == [False, True, False, True]
  for s in (full, resumed):
    assert s["final_l1_to_twin"] == a[-1]["l1_to_twin"]
    assert s["final_twin_accuracy"] == a[-1]["twin_accuracy"]
  assert resumed["final_accuracy"] == full["final_accuracy"]


def test_no_twin_keys_without_the_twin():
  exp, state, history = _train(SMALL, 1)
  assert "l1_to_twin" not in history[0]
  with pytest.raises(ValueError, match="twin=True"):
    exp.twin_state(state)
