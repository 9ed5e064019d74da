"""Attacks that know the defence: Fang et al.'s trimmed-mean/median and Krum
attacks (fedjax_sparse.attacks.fang) and the adaptive attacks on SafeSparse
(fedjax_sparse.attacks.mimicry; their unit tests: test_mimicry.py).
Tiny hand-computed cases, numpy oracles and one short end-to-end run per
attack."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators as G
from fedjax_sparse import attacks as A
from fedjax_sparse.aggregators.base import AggContext
from tests.helpers import (adaptive_ctx, malicious_rows, random_updates,
                           run_attack)

# ------------------------------------------------------------ contract ----

CASES = {
    "fang_trmean": {}, "fang_trmean@model": {"space": "model"}, "fang_krum": {},
    "mask_mimicry@own_alie": {"knowledge": "own", "values": "alie"},
    "sign_camouflage": {},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_malicious_rows_change_one_compile(case):
  name = case.split("@")[0]
  attack = A.get_update_attack(name)(**CASES[case])
  x = jnp.asarray(random_updates(7, 8, 0))
  apply = jax.jit(attack.apply)
  for idx in ([0, 3], [1, 2, 5], []):
    mal = jnp.asarray(malicious_rows(7, idx))
    out, _ = apply(attack.init(8), x, mal, jax.random.key(1), adaptive_ctx(8, 7))
    out = np.asarray(out)
    np.testing.assert_array_equal(np.any(out != np.asarray(x), axis=1), np.asarray(mal))
    assert np.all(np.isfinite(out))
  assert apply._cache_size() == 1


def test_registered_and_builder_accepts_arguments():
  for name in ("fang_trmean", "fang_krum", "mask_mimicry", "sign_camouflage"):
    assert A.is_update_attack(name)
  assert A.accepted_arguments("mask_mimicry") == ["values", "eps", "z", "knowledge",
                                                  "topk_ratio", "pack_size"]
  assert "disagree_on" in A.accepted_arguments("sign_camouflage")
  assert A.attack_space("fang_trmean", {"space": "model"}) == "model"
  with pytest.raises(ValueError, match="b must be > 1"):
    A.fang_trmean(b=1.0)
  with pytest.raises(ValueError, match="topk_ratio"):
    A.mask_mimicry(topk_ratio=0.0)
  with pytest.raises(ValueError, match="unknown knowledge"):
    A.mask_mimicry(knowledge="partial")
  with pytest.raises(ValueError, match="agree"):
    A.sign_camouflage(agree=1.5)
  with pytest.raises(ValueError, match="disagree_on"):
    A.sign_camouflage(disagree_on="random")


# --------------------------------------------------------- fang_trmean ----

# Benign rows 2-4. Per coordinate: mean sign s, the benign max / min, and the
# interval Fang et al. sample in (b = 2), worked out by hand:
#   0: values 1, 2, 3;    s = +1, min  1 > 0  -> [min/2, min] = [0.5, 1]
#   1: values -1, -2, -3; s = -1, max -1 <= 0 -> [max, max/2] = [-1, -0.5]
#   2: values 2, -1, 1;   s = +1, min -1 <= 0 -> [2 min, min]  = [-2, -1]
#   3: values -3, 1, -4;  s = -1, max  1 > 0  -> [max, 2 max]  = [1, 2]
_TR_X = np.array([[0, 0, 0, 0],
                  [2, 2, -2, -2],
                  [1, -1, 2, -3],
                  [2, -2, -1, 1],
                  [3, -3, 1, -4]], np.float32)
_TR_MAL = malicious_rows(5, [0, 1])


def test_fang_trmean_full_knowledge_hand_case():
  out = run_attack("fang_trmean", _TR_X, _TR_MAL)
  lo = np.array([0.5, -1.0, -2.0, 1.0])
  hi = np.array([1.0, -0.5, -1.0, 2.0])
  for row in out[:2]:
    assert np.all(row >= lo - 1e-6) and np.all(row <= hi + 1e-6)
  assert not np.array_equal(out[0], out[1])   # each attacker samples its own
  np.testing.assert_array_equal(out[2:], _TR_X[2:])
  # Every crafted value lies beyond the benign extremes, against s.
  g = _TR_X[2:]
  s = np.sign(g.mean(0))
  assert np.all(np.where(s > 0, out[:2] <= g.min(0), out[:2] >= g.max(0)))


def test_fang_trmean_partial_knowledge_hand_case():
  # Attackers' own rows 0, 1: m = [1, 1, -1, -1], sigma = sqrt(2) (ddof 1).
  out = run_attack("fang_trmean", _TR_X, _TR_MAL, knowledge="partial")
  r2 = math.sqrt(2.0)
  lo = np.array([1 - 4 * r2, 1 - 4 * r2, -1 + 3 * r2, -1 + 3 * r2])
  hi = np.array([1 - 3 * r2, 1 - 3 * r2, -1 + 4 * r2, -1 + 4 * r2])
  for row in out[:2]:
    assert np.all(row >= lo - 1e-5) and np.all(row <= hi + 1e-5)


def test_fang_trmean_model_space_matches_numpy():
  g0 = np.array([1.0, -0.5, 2.0, 0.25], np.float32)
  out = run_attack("fang_trmean", _TR_X, _TR_MAL, global_params=g0, b=3.0, space="model")
  w = g0[None, :] - _TR_X[2:].astype(np.float64)          # benign local models
  s = np.sign(w.mean(0) - g0)                              # the model's change
  wmax, wmin = w.max(0), w.min(0)
  lo = np.where(s < 0, wmax, np.where(wmin > 0, wmin / 3, 3 * wmin))
  hi = np.where(s < 0, np.where(wmax > 0, 3 * wmax, wmax / 3), wmin)
  for row in out[:2]:
    wp = g0 - row
    assert np.all(wp >= lo - 1e-5) and np.all(wp <= hi + 1e-5)


# ----------------------------------------------------------- fang_krum ----

def _np_krum_pick(pop, f):
  k = len(pop)
  d2 = ((pop[:, None] - pop[None]) ** 2).sum(-1)
  np.fill_diagonal(d2, np.inf)
  return int(np.argmin(np.sort(d2, 1)[:, :k - f - 2].sum(1)))


def _np_fang_krum(x, mal, f=None, threshold=1e-5):
  """Fang et al. section 4.2 as a numpy loop: the upper bound, then halving."""
  x = np.asarray(x, np.float64)
  k, c = len(x), int(mal.sum())
  f = c if f is None else f
  g = x[~mal]
  s = np.sign(g.mean(0))
  dist = np.sqrt(((g[:, None] - g[None]) ** 2).sum(-1))
  np.fill_diagonal(dist, np.inf)
  near = np.sort(dist, 1)[:, :k - c - 2].sum(1)
  lam = (near.min() / ((k - 2 * c - 1) * np.linalg.norm(s))
         + np.linalg.norm(g, axis=1).max() / np.linalg.norm(s))
  halvings = 0
  while lam >= threshold:
    pop = x.copy()
    pop[mal] = -lam * s
    if mal[_np_krum_pick(pop, f)]:
      return lam, s, halvings, True
    lam /= 2
    halvings += 1
  return lam, s, halvings, False


@pytest.mark.parametrize("seed", [1, 3, 7])
def test_fang_krum_matches_oracle_and_krum_selects_it(seed):
  x = random_updates(7, 6, seed)
  mal = malicious_rows(7, [1, 4])
  lam, s, halvings, found = _np_fang_krum(x, mal)
  assert found and halvings >= 2          # the bound alone is not selected
  out = run_attack("fang_krum", x, mal)
  np.testing.assert_allclose(out[1], -lam * s, rtol=1e-5)
  np.testing.assert_array_equal(out[1], out[4])
  krum = G.get("krum")(f=2)
  agg, _ = krum.apply(krum.init(6), jnp.asarray(out), None, jnp.ones(7),
                      jax.random.key(0), AggContext(round=jnp.int32(0), num_clients=7))
  assert np.asarray(agg.acceptance)[mal].sum() == 1
  # The halving stops at the first selected lambda: twice it was tried and
  # not selected.
  assert not A.krum_selects_crafted(
      *_krum_inputs(x, mal, 2 * lam, s), jnp.asarray(mal), 2)


def _krum_inputs(x, mal, lam, s):
  x = np.asarray(x, np.float64)
  pair = ((x[:, None] - x[None]) ** 2).sum(-1)
  crafted = ((x + lam * s) ** 2).sum(1)
  return jnp.asarray(pair, jnp.float32), jnp.asarray(crafted, jnp.float32)


def test_fang_krum_threshold_when_never_selected():
  # Seed 0: Krum (f = 2, K = 7) never picks the crafted copies; the loop
  # ends at the first lambda below the threshold, as the oracle does.
  x = random_updates(7, 6, 0)
  mal = malicious_rows(7, [1, 4])
  lam, s, _, found = _np_fang_krum(x, mal)
  assert not found and lam < 1e-5
  out = run_attack("fang_krum", x, mal)
  np.testing.assert_allclose(out[1], -lam * s, rtol=1e-4)


# ---------------------------------------------- end to end, experiment ----

@pytest.mark.slow  # the unit tests above cover each attack; kept for make test-all
def test_each_attack_end_to_end():
  from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment
  base = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=7,
                          clients_per_round=7, rounds=2, local_epochs=1,
                          batch_size=16, lr=0.1, model="mlp", model_width="8",
                          eval_every=2, eval_batch_size=100, attack_start=1,
                          malicious_fraction=0.29)
  for attack, aggregator, extra in [
      ("fang_trmean", "trimmed_mean", {}),
      ("fang_krum", "krum", {}),
      ("mask_mimicry", "safesparse",
       dict(sparsify="topk", topk_ratio=0.5, attack_args="topk_ratio=0.5")),
      ("sign_camouflage", "safesparse",
       dict(sparsify="topk", topk_ratio=0.5, attack_args="topk_ratio=0.5")),
  ]:
    cfg = dataclasses.replace(base, attack=attack, aggregator=aggregator, **extra)
    summary = run_experiment(cfg, progress=False)
    assert math.isfinite(summary["final_test_loss"]), (attack, summary)
