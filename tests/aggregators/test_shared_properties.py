"""Properties every registered aggregator has: permutation invariance,
agreement on identical inputs, finite output with f bad rows, breakdown.

The shapes and helpers of test_references.py (tests/helpers.py).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# Under the names the tests use: Hypothesis derives a test's examples from its
# source, so new names would draw other examples.
from tests.helpers import AGG_D as D, AGG_F as F, AGG_K as K
from tests.helpers import agg_ctx as _ctx, aggregator_data as _data
from tests.helpers import coord_mask as _coord, run_rule as run


# (name, hyperparameters, pre-aggregators) of every registered variant.
ALL_RULES = [
    ("median", {}, ()),
    ("median", {"mask_aware": True}, ()),
    ("trimmed_mean", {}, ()),
    ("trimmed_mean", {"mask_aware": True}, ()),
    ("krum", {}, ()),
    ("multi_krum", {}, ()),
    ("bulyan", {"f": 1}, ()),  # the paper's rule needs K >= 4f + 3
    ("bulyan_fast", {}, ()),
    ("rfa", {}, ()),
    ("centered_clipping", {}, ()),
    ("signsgd", {}, ()),
    ("fedsign", {}, ()),
    ("robust_dpfl", {}, ()),
    ("safesparse", {}, ()),  # guard on by default
    ("safesparse", {"guard": False}, ()),  # the paper's literal rule
    ("median", {}, (("nnm", ()),)),
]


def _rule_id(rule):
  name, hp, pre = rule
  return "-".join([name] + [f"{k}={v}" for k, v in hp.items()] + [p for p, _ in pre])


@pytest.mark.parametrize("rule", ALL_RULES, ids=_rule_id)
@pytest.mark.parametrize("sparse", [False, True])
def test_permutation_invariance(rule, sparse):
  name, hp, pre = rule
  u, masks, w = _data(20, sparse=sparse)
  u[:3] = np.abs(u[:3]) * (_coord(masks)[:3] if sparse else 1)  # some structure
  perm = np.random.RandomState(1).permutation(K)
  out1, acc1, _, _ = run(name, u, masks, w, pre=pre, **hp)
  out2, acc2, _, _ = run(name, u[perm], None if masks is None else masks[perm],
                         w[perm], pre=pre, **hp)
  np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc1[perm], acc2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ALL_RULES + [("median", {}, (("bucketing", ()),))],
                         ids=_rule_id)
def test_identical_inputs_give_the_common_value(rule):
  name, hp, pre = rule
  c = 0.05 * np.random.RandomState(3).randn(D).astype(np.float32)  # ||c|| < tau
  u = np.tile(c, (K, 1))
  _, _, w = _data(0)
  got = run(name, u, None, w, pre=pre, **hp)[0]
  if name == "signsgd":
    np.testing.assert_array_equal(got, np.sign(c))
  elif name == "safesparse" and hp.get("guard") is False:
    # Literal rule: all distances 0, one cluster of everyone, all excluded.
    np.testing.assert_array_equal(got, 0.0)
  else:
    np.testing.assert_allclose(got, c, rtol=1e-5, atol=1e-7)


ROBUST = [r for r in ALL_RULES] + [("median", {}, (("bucketing", ()),))]


@pytest.mark.parametrize("rule", ROBUST, ids=_rule_id)
@pytest.mark.parametrize("bad", ["inf", "nan", "huge", "mixed"])
def test_finite_output_with_f_bad_rows(rule, bad):
  name, hp, pre = rule
  u, _, w = _data(21)
  rows = np.random.RandomState(2).choice(K, F, replace=False)
  value = {"inf": np.inf, "nan": np.nan, "huge": 1e30, "mixed": -np.inf}[bad]
  u[rows] = value
  if bad == "mixed":
    u[rows[0], ::2] = np.nan
    u[rows[1]] = -1e30
  got, acc, _, _ = run(name, u, None, w, pre=pre, **hp)
  assert np.all(np.isfinite(got)), got
  assert np.all(np.isfinite(acc))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(0, 4),
       scale=st.sampled_from([1e-3, 1.0, 1e6, 1e30]))
def test_coordinatewise_breakdown(seed, n_bad, scale):
  # K = 10, n_bad <= 4 < K/2 arbitrary outliers per coordinate.
  rs = np.random.RandomState(seed)
  u = rs.randn(K, D).astype(np.float32)
  bad = rs.choice(K, n_bad, replace=False)
  u[bad] = (rs.randn(n_bad, D) * scale).astype(np.float32)
  benign = np.delete(u, bad, axis=0)
  lo, hi = benign.min(0), benign.max(0)
  for name, hp in [("median", {}), ("trimmed_mean", {})]:
    got = run(name, u, ctx=_ctx(f=max(n_bad, 0)), **hp)[0]
    assert np.all((got >= lo - 1e-6) & (got <= hi + 1e-6)), name


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(1, 2),
       scale=st.sampled_from([10.0, 1e3, 1e30]))
def test_krum_bulyan_breakdown(seed, n_bad, scale):
  # K = 11 >= 4f + 3 with f = 2; outliers anywhere far from the benign cloud.
  rs = np.random.RandomState(seed)
  u = rs.randn(11, D).astype(np.float32)
  bad = rs.choice(11, n_bad, replace=False)
  direction = rs.randn(n_bad, D)
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  u[bad] = (u.mean(0) + scale * np.sqrt(D) * direction).astype(np.float32)
  benign = np.delete(u, bad, axis=0)
  lo, hi = benign.min(0), benign.max(0)
  for name in ("krum", "bulyan"):
    got, acc, _, _ = run(name, u, ctx=_ctx(f=2, k=11))
    assert np.all((got >= lo - 1e-6) & (got <= hi + 1e-6)), name
    assert not acc[bad].any()
