"""Optimal IPM/ALIE (fedjax_sparse/attacks/optimal.py): the line search
against a numpy transcription and ByzFL's Optimal_* attacks, and the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.attacks import AttackContext, get_update_attack
from fedjax_sparse.attacks.optimal import line_search
from fedjax_sparse.testing import byzfl as byzfl_loader

BYZFL = byzfl_loader.load()


def np_line_search(obj, start, delta, ratio, evals):
  """ByzFL's expansion and contraction phases, transcribed."""
  best_x, best_y = start, obj(start)
  left = evals - 1
  while left > 0:
    y = obj(best_x + delta)
    left -= 1
    if y > best_y:
      best_x, best_y = best_x + delta, y
      delta *= 2
    else:
      delta *= ratio
      break
  while left > 0:
    y = obj(best_x + delta)
    left -= 1
    if y > best_y:
      best_x, best_y = best_x + delta, y
    delta *= ratio
  return best_x


@pytest.mark.parametrize("peak", [0.3, 7.0, 55.0, -2.0])
def test_line_search_matches_the_transcription(peak):
  obj = lambda t: -(t - peak) ** 2  # noqa: E731
  got, _ = jax.jit(lambda: line_search(lambda t: -(t - peak) ** 2, 0.0, 10.0,
                                       0.8, 20))()
  np.testing.assert_allclose(float(got), np_line_search(obj, 0.0, 10.0, 0.8, 20),
                             rtol=1e-5, atol=1e-5)


def _run(name, rule, u, is_mal, f, **hp):
  agg = agg_lib.get(rule)(**({"f": f} if rule == "trimmed_mean" else {}))
  attack = get_update_attack(name)(aggregator=agg, num_byzantine=f, **hp)
  k, d = u.shape
  attack.init(d)
  ctx = AttackContext(round=jnp.int32(3), global_params=jnp.zeros((d,)),
                      weights=jnp.ones((k,)), num_clients=k)
  out, _ = jax.jit(lambda x: attack.apply((), x, jnp.asarray(is_mal),
                                          jax.random.PRNGKey(0), ctx))(
                                              jnp.asarray(u))
  return np.asarray(out)


@pytest.mark.skipif(BYZFL is None, reason="ByzFL not installed")
@pytest.mark.parametrize("name", ["optimal_ipm", "optimal_alie"])
@pytest.mark.parametrize("rule", ["nwfedavg", "median", "trimmed_mean"])
def test_against_byzfl(name, rule):
  rs = np.random.RandomState(4)
  k, f, d = 11, 3, 40
  honest = (rs.randn(k - f, d) + 1.0).astype(np.float32)
  u = np.concatenate([honest, rs.randn(f, d).astype(np.float32)])
  is_mal = np.arange(k) >= k - f
  got = _run(name, rule, u, is_mal, f)
  byz_agg = {"nwfedavg": BYZFL.Average(), "median": BYZFL.Median(),
             "trimmed_mean": BYZFL.TrMean(f=f)}[rule]
  cls = (BYZFL.Optimal_InnerProductManipulation if name == "optimal_ipm"
         else BYZFL.Optimal_ALittleIsEnough)
  want = cls(agg=byz_agg, pre_agg_list=[], f=f)(honest.astype(np.float64))
  np.testing.assert_allclose(got[is_mal], np.broadcast_to(want, (f, d)),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got[~is_mal], honest)


def test_the_search_sees_the_rule_and_the_sparsifier():
  rs = np.random.RandomState(1)
  k, f, d = 10, 3, 60
  u = (rs.randn(k, d) + 0.5).astype(np.float32)
  is_mal = np.arange(k) < f
  mean_attack = _run("optimal_ipm", "nwfedavg", u, is_mal, f)[0]
  median_attack = _run("optimal_ipm", "median", u, is_mal, f)[0]
  mu = u[~is_mal].mean(0)
  tau_mean = -float(mean_attack @ mu / (mu @ mu))
  tau_median = -float(median_attack @ mu / (mu @ mu))
  # Against the mean, farther is always better: the expansion never stops
  # (10 + 20 + ... up to the 20th evaluation); the median saturates sooner.
  assert tau_mean > 1e5 and tau_median < tau_mean
  sparse = _run("optimal_ipm", "median", u, is_mal, f, topk_ratio=0.5)[0]
  assert not np.allclose(sparse, median_attack)


def test_refuses_rules_it_cannot_simulate_and_bad_arguments():
  with pytest.raises(ValueError, match="aggregator"):
    get_update_attack("optimal_ipm")()
  attack = get_update_attack("optimal_alie")(aggregator=agg_lib.get("fltrust")())
  with pytest.raises(ValueError, match="cannot run the deployed rule"):
    attack.init(20)
  with pytest.raises(ValueError, match="ratio"):
    get_update_attack("optimal_ipm")(aggregator=agg_lib.get("median")(),
                                     ratio=0.3)
