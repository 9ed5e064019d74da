"""RFA and Bulyan as their papers define them, against numpy oracles.

RFA (Pillutla et al., 2022): the weighted geometric median by smoothed
Weiszfeld from the coordinate-wise median, with a relative-objective stopping
rule (fedjax_sparse/aggregators/rfa.py). Bulyan (El Mhamdi et al., 2018):
iterated Krum, then per coordinate the mean of the ``theta - 2f`` values
closest to the median (fedjax_sparse/aggregators/bulyan.py). The oracles are
in fedjax_sparse/testing/aggregator_refs.py. Inputs are tiny so that the file runs in seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators import _distances
from fedjax_sparse.aggregators import bulyan as bulyan_lib
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.metrics.escape import selection_escape_metrics
from fedjax_sparse.testing import byzfl as byzfl_loader
from fedjax_sparse.testing import aggregator_refs as refs
from tests.helpers import KEY, jitted_agg


def run(name, u, weights=None, f=0, malicious=None, **hp):
  """The rule's outputs; with ``malicious``, its diagnostics also hold the
  selection escape ratio the round step adds."""
  agg, apply = jitted_agg(name, **hp)
  u = jnp.asarray(u, jnp.float32)
  k, d = u.shape
  w = jnp.ones((k,)) if weights is None else jnp.asarray(weights, jnp.float32)
  mal = None if malicious is None else jnp.asarray(malicious, bool)
  ctx = AggContext(round=jnp.int32(0), malicious=mal, num_byzantine=f,
                   num_clients=k)
  out, _ = apply(agg.init(d), u, None, w, KEY, ctx)
  diagnostics = dict(out.diagnostics)
  if mal is not None:
    diagnostics.update(selection_escape_metrics(agg, out.acceptance, mal))
  return (np.asarray(out.update), np.asarray(out.acceptance),
          jax.tree.map(np.asarray, diagnostics))


def _spread(x):
  """RMS distance of the rows to their mean."""
  x = np.asarray(x, np.float64)
  return np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean())


# ---------------------------------------------------------------- RFA


@pytest.mark.parametrize("seed", [0, 1])
def test_rfa_is_the_smoothed_weiszfeld_of_the_paper(seed):
  rs = np.random.RandomState(seed)
  u = rs.randn(10, 24).astype(np.float32)
  u[:2] += 30.0
  w = rs.uniform(0.5, 2.0, 10).astype(np.float32)
  got, acc, diag = run("rfa", u, w)
  steps = int(diag["num_iters"])
  # The same steps in float64 (nu = 1e-6 from the median), and the same
  # stopping decision.
  z, beta, _ = refs.np_rfa_weiszfeld(u, w, max_iter=steps, tol=0.0)
  np.testing.assert_allclose(got, z, atol=1e-6)
  np.testing.assert_allclose(acc, beta, atol=1e-6)
  assert refs.np_rfa_weiszfeld(u, w)[2] == steps < 100
  # ...which is the weighted geometric median (Weiszfeld to convergence,
  # and scipy on the objective) up to a small fraction of the spread.
  gm = refs.np_geometric_median(u, w)
  assert np.linalg.norm(got - gm) < 1e-2 * _spread(u[2:])
  a = w / w.sum()
  g = lambda z: (a * np.linalg.norm(u.astype(np.float64) - z, axis=1)).sum()
  best = optimize.minimize(g, np.median(u, 0), method="BFGS").fun
  assert g(got) <= best * (1 + 1e-5)
  np.testing.assert_allclose(diag["objective"], g(got), rtol=1e-5)


def test_rfa_is_robust_to_huge_rows():
  rs = np.random.RandomState(3)
  u = rs.randn(10, 1000).astype(np.float32)
  honest = u[4:].copy()
  spread = _spread(honest)  # about sqrt(1000)
  u[:4] = 1e6
  gm = refs.np_geometric_median(u)
  got, _, _ = run("rfa", u)
  assert np.linalg.norm(got - gm) < spread
  # The earlier rule (3 steps from the mean) ends far away.
  old, _, _ = run("rfa", u, variant="fixed_steps")
  assert np.linalg.norm(old - gm) > 1e4 * spread
  # One row at 1e30: finite, within the honest cloud.
  u = rs.randn(10, 1000).astype(np.float32)
  u[0] = 1e30
  got, acc, diag = run("rfa", u)
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(acc))
  assert np.linalg.norm(got - u[1:].mean(0)) < _spread(u[1:])
  assert acc[0] < 1e-20
  assert np.abs(run("rfa", u, variant="fixed_steps")[0]).max() > 1e20


def test_rfa_zero_weight_rows_have_no_influence():
  rs = np.random.RandomState(4)
  u = rs.randn(9, 24).astype(np.float32)
  w = rs.uniform(0.5, 2.0, 9).astype(np.float32)
  expect, acc_expect, _ = run("rfa", u, w)
  for bad in (np.nan, np.inf, 1e30, 0.0):
    ux = np.insert(u, [2, 5], bad, axis=0)
    wx = np.insert(w, [2, 5], 0.0)
    got, acc, _ = run("rfa", ux, wx)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(acc[[2, 6]], 0.0)
    np.testing.assert_allclose(np.delete(acc, [2, 6]), acc_expect, rtol=1e-5,
                               atol=1e-8)
  # A non-finite row with a positive weight gets weight 0 too.
  ux = np.insert(u, 0, np.nan, axis=0)
  got, acc, _ = run("rfa", ux, np.insert(w, 0, 1.0))
  np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
  assert acc[0] == 0


def test_rfa_options():
  rs = np.random.RandomState(5)
  u = rs.randn(10, 24).astype(np.float32)
  w = rs.uniform(0.5, 2.0, 10).astype(np.float32)
  # max_iter = 0 returns the start.
  np.testing.assert_allclose(run("rfa", u, w, max_iter=0)[0], np.median(u, 0),
                             atol=1e-6)
  # ByzFL 0.0.11's GeometricMedian(nu=0.1, T=3): unweighted, from zeros.
  got = run("rfa", u, variant="fixed_steps", init="zeros")[0]
  expect = refs.np_rfa_weiszfeld(u, np.ones(10), nu=0.1, max_iter=3, tol=0.0,
                                 init="zeros")[0]
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  for hp, match in [({"variant": "nope"}, "variant"), ({"num_iters": 3}, "max_iter"),
                    ({"nu": 0.0}, "nu"), ({"init": "nope"}, "init"),
                    ({"tol": -1.0}, "tol")]:
    with pytest.raises(ValueError, match=match):
      agg_lib.get("rfa")(**hp)


def test_rfa_against_byzfl():
  byzfl = byzfl_loader.load()
  if byzfl is None:
    pytest.skip("ByzFL not installed")
  rs = np.random.RandomState(6)
  u = rs.randn(10, 24).astype(np.float32)
  got = run("rfa", u, variant="fixed_steps", init="zeros")[0]
  np.testing.assert_allclose(got, byzfl.GeometricMedian(nu=0.1, T=3)(u),
                             rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Bulyan


@pytest.mark.parametrize("k,f,seed", [(11, 2, 0), (15, 3, 1), (7, 1, 2), (5, 0, 3)])
def test_bulyan_is_iterated_krum_then_mean_around_median(k, f, seed):
  rs = np.random.RandomState(seed)
  u = rs.randn(k, 30).astype(np.float32)
  u[: f] += 3.0 * rs.randn(f, 30).astype(np.float32)  # some spread-out rows
  expect, sel = refs.np_bulyan(u, f)
  got, acc, diag = run("bulyan", u, f=f)
  np.testing.assert_array_equal(np.flatnonzero(acc), np.sort(sel))
  np.testing.assert_allclose(got, expect, atol=1e-6)
  assert diag["beta"] == k - 4 * f
  np.testing.assert_allclose(diag["scores"], refs.np_krum_scores(u, f), rtol=1e-4)
  if f:  # the selection order, step by step
    order = jax.jit(lambda x: bulyan_lib.iterated_krum(
        _distances.pairwise_sq_dists(x)[0], f, k - 2 * f)[0])(jnp.asarray(u))
    np.testing.assert_array_equal(np.asarray(order), sel)


def test_bulyan_stage_two_is_the_literal_rule():
  rs = np.random.RandomState(7)
  for theta, beta in [(9, 5), (8, 4), (7, 1), (6, 6)]:
    # Huge values, distinct (equal distances to the median are the one
    # place where the rule and a sort by |x - m| may differ: see below).
    x = rs.randn(theta, 200).astype(np.float32)
    huge = rs.rand(theta, 200) < 0.15
    x[huge] = (1e30 * np.sign(rs.randn(huge.sum())) * (1 + rs.rand(huge.sum())))
    x[rs.rand(theta, 200) < 0.02] = -np.inf
    got, _ = jax.jit(bulyan_lib.closest_to_median_mean, static_argnums=1)(
        jnp.asarray(x), beta)
    expect = refs.np_mean_around_median(x.astype(np.float64), beta)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
  # Ties at the window's edge (ours): the lower window wins.
  x = jnp.asarray([[0.0], [1.0], [2.0]])
  np.testing.assert_allclose(bulyan_lib.closest_to_median_mean(x, 2)[0], [0.5])


def test_bulyan_escape_ratios():
  rs = np.random.RandomState(8)
  k, f, d = 11, 2, 40
  u = rs.randn(k, d).astype(np.float32)
  mal = np.zeros(k, bool)
  mal[[1, 4, 9]] = True
  u[mal] = u[~mal].mean(0) + 0.3 * rs.randn(3, d).astype(np.float32)
  plain, _, _ = run("bulyan", u, f=f)
  got, acc, diag = run("bulyan", u, f=f, malicious=mal)
  np.testing.assert_array_equal(got, plain)  # the diagnostic changes nothing
  _, sel = refs.np_bulyan(u, f)
  np.testing.assert_allclose(diag["escape_ratio_selection"], mal[sel].sum() / 3)
  x = u[sel].astype(np.float64)
  beta = len(sel) - 2 * f
  idx = np.argsort(np.abs(x - np.median(x, 0)), axis=0, kind="stable")[:beta]
  kept = mal[sel][idx].sum()
  np.testing.assert_allclose(diag["escape_ratio_trim"], kept / (mal[sel].sum() * d),
                             rtol=1e-6)
  assert 0 < diag["escape_ratio_trim"] < 1


def test_bulyan_size_check_and_fast_variant():
  u = np.random.RandomState(9).randn(10, 8).astype(np.float32)
  with pytest.raises(ValueError, match=r"4f \+ 3.*K=10, f=2.*bulyan_fast"):
    run("bulyan", u, f=2)
  with pytest.raises(ValueError, match="bulyan_fast"):
    agg_lib.get("bulyan")(mask_aware=True)
  assert {"bulyan", "bulyan_fast", "rfa"} <= set(agg_lib.names())
  # The one-shot variant still runs at K = 10, f = 2 (Multi-Krum + TM).
  got, acc, _ = run("bulyan_fast", u, f=2)
  sel = np.argsort(refs.np_krum_scores(u, 2), kind="stable")[:6]
  np.testing.assert_array_equal(np.flatnonzero(acc), np.sort(sel))
  np.testing.assert_allclose(got, refs.np_trimmed(u[sel], 2), atol=1e-6)
