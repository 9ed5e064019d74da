"""Escape ratios (hybrid_sparse_attack.txt 2.4; fedjax_sparse/metrics/escape.py)
against numpy.

The oracles sort every coordinate in numpy and count the malicious values
at the kept ranks. Ties are broken uniformly at random in the rules'
convention (see fedjax_sparse/metrics/escape.py); with heavy ties the
oracle averages over every tie-breaking order of the clients (all K!
permutations, K <= 6), which is that expectation exactly. Selection rules
only name their selection escape ratio (``Aggregator.selection_escape``);
the metric comes from their acceptance, as the round step computes it.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.metrics import escape
from tests.helpers import KEY, jitted_agg


def run(name, u, malicious=None, masks=None, f=2, pack_size=1, rule_only=False,
        **hp):
  """The rule's outputs; with ``malicious``, its diagnostics hold the
  selection escape ratio as the round step adds it (not with
  ``rule_only``)."""
  agg, apply = jitted_agg(name, **hp)
  u = jnp.asarray(u, jnp.float32)
  k, d = u.shape
  mal = None if malicious is None else jnp.asarray(malicious, bool)
  ctx = AggContext(round=jnp.int32(0), malicious=mal, pack_size=pack_size,
                   num_byzantine=f, num_clients=k)
  m = None if masks is None else jnp.asarray(masks, bool)
  out, _ = apply(agg.init(d), u, m, jnp.ones((k,)), KEY, ctx)
  diagnostics = dict(out.diagnostics)
  if mal is not None and not rule_only:
    diagnostics.update(escape.selection_escape_metrics(agg, out.acceptance,
                                                       mal))
  return (np.asarray(out.update), np.asarray(out.acceptance),
          jax.tree.map(np.asarray, diagnostics))


# ---------------------------------------------------------------- oracles


def _orders(k, exhaustive):
  """Tie-breaking priorities: all permutations (exact expectation) or identity."""
  if exhaustive:
    return [np.array(p) for p in itertools.permutations(range(k))]
  return [np.arange(k)]


def np_tm_escape(u, mal, b=None, contrib=None, beta=None, exhaustive=False):
  k, d = u.shape
  contrib = np.ones((k, d), bool) if contrib is None else contrib
  orders = _orders(k, exhaustive)
  kept_mal = 0.0
  for j in range(d):
    idx = np.flatnonzero(contrib[:, j])
    c = len(idx)
    if c == 0:
      continue
    bj = math.floor(beta * c) if beta is not None else b
    bj = min(bj, (c - 1) // 2)
    total = 0.0
    for prio in orders:
      order = idx[np.lexsort((prio[idx], u[idx, j]))]
      total += mal[order[bj:c - bj]].sum()
    kept_mal += total / len(orders)
  den = (mal[:, None] & contrib).sum()
  return kept_mal / den if den else 0.0


def np_cm_escape(u, mal, contrib=None, exhaustive=False):
  k, d = u.shape
  contrib = np.ones((k, d), bool) if contrib is None else contrib
  orders = _orders(k, exhaustive)
  count, cols = 0.0, 0
  for j in range(d):
    idx = np.flatnonzero(contrib[:, j])
    c = len(idx)
    if c == 0:
      continue
    cols += 1
    slots = [(c - 1) // 2, c // 2]
    hits = 0.0
    for prio in orders:
      order = idx[np.lexsort((prio[idx], u[idx, j]))]
      hits += float(mal[order[slots]].any())
    count += hits / len(orders)
  return count / cols if cols else 0.0


def np_krum_order(u, f):
  u = u.astype(np.float64)
  d2 = ((u[:, None] - u[None]) ** 2).sum(-1)
  k = len(u)
  scores = np.array([np.sort(np.delete(d2[i], i))[:k - f - 2].sum() for i in range(k)])
  return np.argsort(scores, kind="stable")


def _population(seed, k, d, n_mal, ties=False):
  rs = np.random.RandomState(seed)
  if ties:
    u = rs.randint(-2, 3, (k, d)).astype(np.float32)
  else:
    u = rs.randn(k, d).astype(np.float32)
  mal = np.zeros(k, bool)
  mal[rs.choice(k, n_mal, replace=False)] = True
  return u, mal


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("k", [10, 11])
def test_trimmed_mean_escape(k):
  u, mal = _population(k, k, 40, 3)
  # ALIE-like: the malicious clients send one vector inside the benign range.
  u[mal] = 0.3 * u[~mal].std(0)
  plain, _, _ = run("trimmed_mean", u)
  got, _, diag = run("trimmed_mean", u, mal)
  np.testing.assert_array_equal(got, plain)  # the diagnostic changes nothing
  np.testing.assert_allclose(diag["escape_ratio"], np_tm_escape(u, mal, b=2),
                             rtol=1e-6, atol=1e-7)
  # Distinct values: the exact count of malicious values at kept ranks.
  u2, mal2 = _population(k + 1, k, 40, 4)
  u2[mal2] += 1.5
  _, _, diag = run("trimmed_mean", u2, mal2, beta=0.2)
  np.testing.assert_allclose(diag["escape_ratio"],
                             np_tm_escape(u2, mal2, b=math.floor(0.2 * k)), rtol=1e-6)


@pytest.mark.parametrize("k", [5, 6])
def test_escape_with_ties_is_the_random_tie_break_expectation(k):
  u, mal = _population(20 + k, k, 30, 2, ties=True)
  _, _, diag = run("trimmed_mean", u, mal, f=1)
  np.testing.assert_allclose(diag["escape_ratio"],
                             np_tm_escape(u, mal, b=1, exhaustive=True), rtol=1e-5)
  _, _, diag = run("median", u, mal)
  np.testing.assert_allclose(diag["escape_ratio"],
                             np_cm_escape(u, mal, exhaustive=True), rtol=1e-5)


@pytest.mark.parametrize("k", [10, 11])
def test_median_escape(k):
  u, mal = _population(30 + k, k, 50, 4)
  u[mal] = np.median(u[~mal], 0) + 0.05 * np.random.RandomState(k).randn(4, 50)
  plain, _, _ = run("median", u)
  got, _, diag = run("median", u, mal)
  np.testing.assert_array_equal(got, plain)
  expect = np_cm_escape(u, mal)
  assert 0 < expect < 1
  np.testing.assert_allclose(diag["escape_ratio"], expect, rtol=1e-6)


def test_mask_aware_escape():
  k, d, p = 8, 24, 3
  u, mal = _population(50, k, d, 3)
  rs = np.random.RandomState(51)
  masks = rs.rand(k, d // p) < 0.6
  contrib = np.repeat(masks, p, axis=1)
  u = u * contrib
  for hp, b, beta in [({}, 2, None), ({"beta": 0.25}, None, 0.25)]:
    plain, _, _ = run("trimmed_mean", u, masks=masks, pack_size=p, mask_aware=True, **hp)
    got, _, diag = run("trimmed_mean", u, mal, masks=masks, pack_size=p,
                       mask_aware=True, **hp)
    np.testing.assert_array_equal(got, plain)
    np.testing.assert_allclose(diag["escape_ratio"],
                               np_tm_escape(u, mal, b, contrib, beta), rtol=1e-6)
  plain, _, _ = run("median", u, masks=masks, pack_size=p, mask_aware=True)
  got, _, diag = run("median", u, mal, masks=masks, pack_size=p, mask_aware=True)
  np.testing.assert_array_equal(got, plain)
  np.testing.assert_allclose(diag["escape_ratio"], np_cm_escape(u, mal, contrib),
                             rtol=1e-6)
  # The dense view (zeros off-mask) on the same data: ties at 0 everywhere.
  _, _, diag = run("median", u, mal)
  np.testing.assert_allclose(diag["escape_ratio"], _np_cm_dense_ties(u, mal), rtol=1e-5)


def _np_cm_dense_ties(u, mal):
  """Dense median escape with ties, by the closed form of the module docstring."""
  k, d = u.shape
  s = np.sort(u, axis=0)
  lo, hi = s[(k - 1) // 2], s[k // 2]
  total = 0.0
  for j in range(d):
    n_lo, m_lo = (u[:, j] == lo[j]).sum(), (mal & (u[:, j] == lo[j])).sum()
    n_hi, m_hi = (u[:, j] == hi[j]).sum(), (mal & (u[:, j] == hi[j])).sum()
    if k % 2:
      total += m_lo / n_lo
    elif lo[j] == hi[j]:
      total += 1 - math.comb(n_lo - m_lo, 2) / math.comb(n_lo, 2)
    else:
      total += 1 - (1 - m_lo / n_lo) * (1 - m_hi / n_hi)
  return total / d


@pytest.mark.parametrize("name", ["krum", "multi_krum"])
def test_krum_escape(name):
  k, f = 10, 2
  u, mal = _population(60, k, 20, 3)
  u[mal] = u[~mal].mean(0)  # central: Krum prefers them
  order = np_krum_order(u, f)
  m = 1 if name == "krum" else k - f
  selected = np.zeros(k, bool)
  selected[order[:m]] = True
  _, acc, diag = run(name, u, mal, f=f)
  np.testing.assert_array_equal(acc > 0, selected)
  np.testing.assert_allclose(diag["escape_ratio"], (selected & mal).sum() / mal.sum())
  assert diag["escape_ratio"] > 0


def test_bulyan_escape_both_stages():
  # The one-shot variant; the paper's rule: tests/aggregators/test_robust_defs.py.
  k, f = 11, 2
  u, mal = _population(70, k, 30, 3)
  u[mal[:]] = u[~mal].mean(0) + 0.4 * u[~mal].std(0)
  u[np.flatnonzero(mal)[0]] += 3.0  # one attacker stands out and is dropped
  order = np_krum_order(u, f)
  sel = order[:k - 2 * f]
  plain, _, _ = run("bulyan_fast", u, f=f)
  got, acc, diag = run("bulyan_fast", u, mal, f=f)
  np.testing.assert_array_equal(got, plain)
  np.testing.assert_array_equal(np.flatnonzero(acc), np.sort(sel))
  sel_mal = mal[sel]
  np.testing.assert_allclose(diag["escape_ratio_selection"], sel_mal.sum() / mal.sum())
  b = min(f, (len(sel) - 1) // 2)
  np.testing.assert_allclose(diag["escape_ratio_trim"],
                             np_tm_escape(u[sel], sel_mal, b=b), rtol=1e-6)
  assert 0 < diag["escape_ratio_selection"] < 1


@pytest.mark.slow
def test_no_attackers_and_no_flag():
  u, _ = _population(80, 10, 12, 0)
  none = np.zeros(10, bool)
  for name in ("median", "trimmed_mean", "krum", "multi_krum", "safesparse"):
    _, _, diag = run(name, u, none)
    assert diag["escape_ratio"] == 0.0, name
    assert "escape_ratio" not in run(name, u)[2], name
  for name, f in (("bulyan_fast", 2), ("bulyan", 1)):  # bulyan: K >= 4f + 3
    _, _, diag = run(name, u, none, f=f)
    assert diag["escape_ratio_selection"] == 0 and diag["escape_ratio_trim"] == 0


def test_safesparse_escape_is_the_accepted_share():
  u, mal = _population(90, 12, 30, 4)
  u[mal] = np.abs(u[mal])  # a coordinated sign pattern
  _, acc, diag = run("safesparse", u, mal)
  np.testing.assert_allclose(diag["escape_ratio"], ((acc > 0) & mal).sum() / mal.sum())


def np_selection_escape(acceptance, mal):
  """A numpy loop: accepted malicious clients / malicious clients."""
  n_mal = kept = 0
  for a, m in zip(acceptance, mal):
    if m:
      n_mal += 1
      kept += a > 0
  return kept / n_mal if n_mal else 0.0


def test_selection_escape_ratio_is_the_accepted_malicious_share():
  rs = np.random.RandomState(100)
  for k in (1, 5, 12):
    for _ in range(5):
      mal = rs.rand(k) < 0.4
      # 0/1 acceptance, soft weights and rejections with negative weights.
      acc = np.where(rs.rand(k) < 0.5, 0.0, rs.rand(k)).astype(np.float32)
      acc[rs.rand(k) < 0.2] = -1.0
      got = escape.selection_escape_ratio(jnp.asarray(acc), jnp.asarray(mal))
      np.testing.assert_allclose(got, np_selection_escape(acc, mal), rtol=1e-7)
  assert float(escape.selection_escape_ratio(jnp.ones(4), jnp.zeros(4, bool))) == 0


def test_selection_escape_is_computed_outside_the_rules():
  """Rules that select name their metric; they do not compute it (the
  ground truth is for the per-coordinate diagnostics only)."""
  u, mal = _population(95, 10, 20, 3)
  names = {"krum": "escape_ratio", "multi_krum": "escape_ratio",
           "safesparse": "escape_ratio", "flame": "escape_ratio",
           "mda": "escape_ratio", "monna": "escape_ratio",
           "smea": "escape_ratio", "bulyan": "escape_ratio_selection",
           "bulyan_fast": "escape_ratio_selection", "median": None,
           "trimmed_mean": None, "fedavg": None}
  for name, key in names.items():
    assert agg_lib.get(name)().selection_escape == key, name
    f = 1 if name == "bulyan" else 2
    _, acc, diag = run(name, u, mal, f=f, rule_only=True)
    assert "escape_ratio_selection" not in diag, name
    if key == "escape_ratio":
      assert "escape_ratio" not in diag, name
    metrics = escape.selection_escape_metrics(agg_lib.get(name)(), acc, mal)
    if key is None:
      assert metrics == {}, name
    else:
      np.testing.assert_allclose(metrics[key], np_selection_escape(acc, mal))
  # Pre-aggregators pass the name on.
  krum = agg_lib.get("krum")()
  for pre in ("bucketing", "nnm", "arc", "clip"):
    assert agg_lib.get_pre(pre)(krum).selection_escape == "escape_ratio", pre
