"""Robust aggregators: the registry, numpy references from the formulas, and
order statistics (properties every rule shares: test_shared_properties.py;
SafeSparse on sparse populations: test_safesparse.py).

Shapes are fixed (K = 10 clients, d = 24, packs of 3) so that every rule
compiles once per variant; compiled functions are cached in tests/helpers.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators import _order_stats
from fedjax_sparse.testing.aggregator_refs import (np_cc, np_krum_scores, np_median, np_rfa, np_sign_cos,
                             np_trimmed, np_two_means_high)
from tests.helpers import (KEY, agg_ctx, aggregator_data, coord_mask,
                           jitted_rule, np_combine, np_safesparse, run_rule)
from tests.helpers import AGG_D as D, AGG_F as F, AGG_K as K

# ---------------------------------------------------------------- registry


def test_registry_names_and_errors():
  for name in ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "rfa",
               "centered_clipping", "signsgd", "fedsign", "robust_dpfl",
               "safesparse"]:
    assert name in agg_lib.names()
  assert agg_lib.pre_names() == ["arc", "bucketing", "clip", "nnm"]
  with pytest.raises(ValueError,
                     match="known pre-aggregators: arc, bucketing, clip, nnm"):
    agg_lib.get_pre("nope")
  u, _, _ = aggregator_data(0)
  with pytest.raises(ValueError, match="K - f - 2"):
    run_rule("krum", u, ctx=agg_ctx(f=8))
  with pytest.raises(ValueError, match="2b < K"):
    run_rule("trimmed_mean", u, ctx=agg_ctx(f=5))
  with pytest.raises(ValueError, match="beta"):
    agg_lib.get("trimmed_mean")(beta=0.5)


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("sparse", [False, True])
def test_median_reference(sparse):
  u, masks, w = aggregator_data(1, sparse=sparse)
  np.testing.assert_allclose(run_rule("median", u, masks, w)[0], np.median(u, 0), atol=1e-6)
  u9 = u[:9]  # odd K
  np.testing.assert_allclose(run_rule("median", u9)[0], np.median(u9, 0), atol=1e-6)
  if sparse:
    got = run_rule("median", u, masks, w, mask_aware=True)[0]
    np.testing.assert_allclose(got, np_median(u, coord_mask(masks)), atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_trimmed_mean_reference(sparse):
  u, masks, w = aggregator_data(2, sparse=sparse)
  got, acc, diag, _ = run_rule("trimmed_mean", u, masks, w)
  np.testing.assert_allclose(got, np_trimmed(u, F), atol=1e-6)
  assert diag["b"] == F and np.all(acc == 1)
  got = run_rule("trimmed_mean", u, masks, w, beta=0.1)[0]
  np.testing.assert_allclose(got, np_trimmed(u, 1), atol=1e-6)
  if sparse:
    cm = coord_mask(masks)
    got = run_rule("trimmed_mean", u, masks, w, mask_aware=True)[0]
    np.testing.assert_allclose(got, np_trimmed(u, F, cm), atol=1e-6)
    got = run_rule("trimmed_mean", u, masks, w, mask_aware=True, beta=0.25)[0]
    np.testing.assert_allclose(got, np_trimmed(u, None, cm, beta=0.25), atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_krum_and_multi_krum_reference(sparse):
  u, masks, w = aggregator_data(3, sparse=sparse)
  scores = np_krum_scores(u, F)
  got, acc, diag, _ = run_rule("krum", u, masks, w)
  np.testing.assert_allclose(diag["scores"], scores, rtol=1e-4)
  best = np.argmin(scores)
  np.testing.assert_array_equal(acc, np.eye(K)[best])
  np.testing.assert_allclose(got, np_combine(u, masks, w, np.eye(K)[best]), atol=1e-6)
  for m in (None, 3):
    got, acc, _, _ = run_rule("multi_krum", u, masks, w, m=m)
    sel = np.zeros(K)
    sel[np.argsort(scores)[:K - F if m is None else m]] = 1
    np.testing.assert_array_equal(acc, sel)
    np.testing.assert_allclose(got, np_combine(u, masks, w, sel), atol=1e-5)


def test_krum_distances_survive_a_large_common_offset():
  # ||a||^2 + ||b||^2 - 2ab loses everything in f32 at offset 1e4 unless the
  # rows are centred first.
  u, _, _ = aggregator_data(4)
  shifted = u + 1e4
  _, _, diag, _ = run_rule("krum", shifted)
  np.testing.assert_allclose(diag["scores"], np_krum_scores(u, F), rtol=2e-3)


@pytest.mark.parametrize("tol", [0.0, 1e-2, math.inf])
def test_krum_distances_on_both_centring_paths(tol, monkeypatch):
  # TOL = 0 keeps the mean-centred Gram matrix whenever the rows are finite,
  # inf always recomputes around a medoid (a central row; _distances.medoid).
  from fedjax_sparse.aggregators import _distances
  monkeypatch.setattr(_distances, "TOL", tol)
  # A fresh function: jit caches traces per function, and TOL is read when
  # tracing.
  dists = jax.jit(lambda x: _distances.pairwise_sq_dists(x))
  rs = np.random.RandomState(14)
  u = rs.randn(K, 3000).astype(np.float32) + 50.0
  if tol > 0:
    # A far row drags the mean: the default TOL falls back to the median
    # (TOL = 0 would lose about 1% of the benign distances here).
    u[3] *= 30.0
  u64 = u.astype(np.float64)
  expect = ((u64[:, None] - u64[None]) ** 2).sum(-1)
  d2, ok = dists(jnp.asarray(u))
  np.testing.assert_allclose(d2, expect, rtol=2e-4, atol=1e-3)
  assert np.all(ok)
  # Non-finite rows (here in more than half of one coordinate) are
  # infinitely far; the finite rows keep their distances.
  u[[1, 5]] = np.inf
  u[:, 0] = np.nan
  u[[0, 2, 4, 6, 8], 0] = 1.0
  bad = np.isin(np.arange(K), [1, 3, 5, 7, 9])
  d2, ok = dists(jnp.asarray(u))
  np.testing.assert_array_equal(ok, ~bad)
  good = np.flatnonzero(~bad)
  u64 = u[good].astype(np.float64)
  expect = ((u64[:, None] - u64[None]) ** 2).sum(-1)
  np.testing.assert_allclose(np.asarray(d2)[np.ix_(good, good)], expect,
                             rtol=2e-4, atol=1e-3)
  assert np.all(np.isinf(np.asarray(d2)[bad][:, good]))


@pytest.mark.parametrize("sparse", [False, True])
def test_bulyan_reference(sparse):
  u, masks, w = aggregator_data(5, sparse=sparse)
  scores = np_krum_scores(u, F)
  sel = np.argsort(scores)[:K - 2 * F]
  b = min(F, (len(sel) - 1) // 2)
  got, acc, _, _ = run_rule("bulyan_fast", u, masks, w)
  np.testing.assert_array_equal(np.flatnonzero(acc), np.sort(sel))
  np.testing.assert_allclose(got, np_trimmed(u[sel], b), atol=1e-6)
  if sparse:
    got = run_rule("bulyan_fast", u, masks, w, mask_aware=True)[0]
    np.testing.assert_allclose(got, np_trimmed(u[sel], b, coord_mask(masks)[sel]), atol=1e-6)


def test_rfa_reference():
  u, _, w = aggregator_data(6)
  u[:2] += 30.0
  # The earlier rule (3 steps from the mean, nu = 0.1); the paper's
  # converged rule is tested in test_robust_defs.py.
  got, acc, _, _ = run_rule("rfa", u, weights=w, variant="fixed_steps")
  np.testing.assert_allclose(got, np_rfa(u, w), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(acc.sum(), 1.0, rtol=1e-5)
  got = run_rule("rfa", u, weights=w, variant="fixed_steps", num_iters=10)[0]
  np.testing.assert_allclose(got, np_rfa(u, w, iters=10), rtol=1e-4, atol=1e-5)


def test_centered_clipping_reference_and_state():
  u, _, _ = aggregator_data(7)
  init, _ = jitted_rule("centered_clipping", num_iters=2, tau=0.5)
  state = init(D)
  v = np.zeros(D)
  for _ in range(3):  # the reference is the previous aggregate
    got, _, _, state = run_rule("centered_clipping", u, state=state, num_iters=2, tau=0.5)
    v = np_cc(u, v, 0.5, 2)
    np.testing.assert_allclose(got, v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state, got)


@pytest.mark.parametrize("sparse", [False, True])
def test_signsgd_reference(sparse):
  u, masks, w = aggregator_data(8, sparse=sparse)
  got = run_rule("signsgd", u, masks, w)[0]
  np.testing.assert_array_equal(got, np.sign(np.sign(u).sum(0)))
  got = run_rule("signsgd", u, masks, w, scale=1e-3)[0]
  np.testing.assert_allclose(got, 1e-3 * np.sign(np.sign(u).sum(0)))


@pytest.mark.parametrize("sparse", [False, True])
def test_fedsign_reference(sparse):
  u, masks, w = aggregator_data(9, sparse=sparse)
  u[:3] = np.abs(u[:3])  # a coordinated sign pattern, high density
  cos = np_sign_cos(np.sign(u))
  density = (cos.sum(1) - np.diag(cos)) / (K - 1)
  honest = (density <= density.mean()).astype(float)
  got, acc, diag, _ = run_rule("fedsign", u, masks, w)
  np.testing.assert_allclose(diag["density"], density, atol=1e-6)
  np.testing.assert_array_equal(acc, honest)
  assert not acc[:3].any()
  np.testing.assert_allclose(got, np_combine(u, masks, w, honest), atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_robust_dpfl_reference(sparse):
  u, masks, w = aggregator_data(10, sparse=sparse)
  u[:3] += 2.0  # larger mean update = lower mean parameters
  if sparse:
    u = u * coord_mask(masks)
  g = np.random.RandomState(0).randn(D).astype(np.float32)
  keep = np_two_means_high(-u.mean(1))
  got, acc, diag, _ = run_rule("robust_dpfl", u, masks, w,
                               ctx=agg_ctx(global_params=jnp.asarray(g)))
  np.testing.assert_array_equal(acc, keep.astype(float))
  np.testing.assert_allclose(diag["scores"], g.mean() - u.mean(1), atol=1e-5)
  np.testing.assert_allclose(got, np_combine(u, masks, w, keep), atol=1e-6)
  # Without global_params the shift drops out: same decision.
  np.testing.assert_array_equal(run_rule("robust_dpfl", u, masks, w)[1], acc)
  keep_u = np_two_means_high(u.mean(1))
  np.testing.assert_array_equal(run_rule("robust_dpfl", u, masks, w, score="update")[1],
                                keep_u.astype(float))


@pytest.mark.parametrize("seed", range(6))
def test_safesparse_reference(seed):
  sparse = seed % 3 != 0
  u, masks, w = aggregator_data(100 + seed, sparse=sparse)
  rs = np.random.RandomState(seed)
  # A coordinated group: shared mask and sign pattern (plus noise).
  if sparse:
    masks[:3] = masks[0]
    u = u * coord_mask(masks)
  u[:3] = np.abs(u[:3]) * np.sign(u[0] + 1e-3) + 0.01 * rs.randn(3, D)
  if sparse:
    u = u * coord_mask(masks)
  for guard in (False, True):
    expect = np_safesparse(u, masks, guard=guard)
    got, acc, _, _ = run_rule("safesparse", u, masks, w, guard=guard)
    np.testing.assert_array_equal(acc, expect.astype(float))
    np.testing.assert_allclose(got, np_combine(u, masks, w, expect), atol=1e-6)


def _mixed_reference(u, masks, w, groups):
  """Group averages as _common.mix defines them (weighted, per pack)."""
  rows = [np_combine(u, masks, w, np.isin(np.arange(len(u)), g).astype(float))
          for g in groups]
  mixed_masks = None if masks is None else np.stack([masks[g].any(0) for g in groups])
  return np.stack(rows), mixed_masks


@pytest.mark.parametrize("sparse", [False, True])
def test_bucketing_reference(sparse):
  u, masks, w = aggregator_data(11, sparse=sparse)
  s = 3
  perm = np.asarray(jax.random.permutation(jax.random.split(KEY)[0], K))
  groups = [perm[i:i + s] for i in range(0, K, s)]
  mixed, _ = _mixed_reference(u, masks, w, groups)
  got, acc, diag, _ = run_rule("median", u, masks, w, pre=(("bucketing", (("s", s),)),))
  np.testing.assert_allclose(got, np.median(mixed, 0), atol=1e-6)
  for b, g in enumerate(groups):
    assert np.all(diag["bucket"][g] == b)
  # A selection base: acceptance flows back to the clients of a bucket.
  got, acc, diag, _ = run_rule("krum", u, masks, w, pre=(("bucketing", (("s", 2),)),),
                               ctx=agg_ctx(f=1))
  assert acc.sum() == 2
  assert len(set(diag["bucket"][acc > 0].tolist())) == 1


@pytest.mark.parametrize("sparse", [False, True])
def test_nnm_reference(sparse):
  u, masks, w = aggregator_data(12, sparse=sparse)
  d2 = ((u[:, None].astype(np.float64) - u[None]) ** 2).sum(-1)
  groups = [np.argsort(d2[i], kind="stable")[:K - F] for i in range(K)]
  mixed, mixed_masks = _mixed_reference(u, masks, w, groups)
  got = run_rule("median", u, masks, w, pre=(("nnm", ()),))[0]
  np.testing.assert_allclose(got, np.median(mixed, 0), atol=1e-5)
  got, acc, _, _ = run_rule("multi_krum", u, masks, w, pre=(("nnm", ()),))
  sel = np.zeros(K)
  sel[np.argsort(np_krum_scores(mixed, F))[:K - F]] = 1
  np.testing.assert_array_equal(acc, sel)
  np.testing.assert_allclose(got, np_combine(mixed, mixed_masks, w, sel), atol=1e-5)


def test_compose_order():
  u, _, w = aggregator_data(13)
  a = agg_lib.compose(agg_lib.get("median")(), [("nnm", {}), ("bucketing", {"s": 2})])
  b = agg_lib.get_pre("nnm")(agg_lib.get_pre("bucketing")(agg_lib.get("median")(), s=2))
  out_a, _ = jax.jit(a.apply)((), jnp.asarray(u), None, jnp.asarray(w), KEY, agg_ctx())
  out_b, _ = jax.jit(b.apply)((), jnp.asarray(u), None, jnp.asarray(w), KEY, agg_ctx())
  np.testing.assert_allclose(out_a.update, out_b.update)


# ---------------------------------------------------------------- order stats


@pytest.mark.parametrize("k", [1, 2, 3, 7, 16, 25, 33])
def test_sorting_network_sorts(k):
  rs = np.random.RandomState(k)
  x = rs.randn(k, 5).astype(np.float32)
  x[rs.rand(k, 5) < 0.2] = np.nan
  rows = _order_stats.sort_rows(jnp.asarray(x))
  expect = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
  np.testing.assert_array_equal(np.stack([np.asarray(r) for r in rows]), expect)
  # 0-1 principle on small k: all binary inputs.
  if k <= 16:
    bits = ((np.arange(2**k)[None, :] >> np.arange(k)[:, None]) & 1).astype(np.float32)
    rows = _order_stats.sort_rows(jnp.asarray(bits))
    np.testing.assert_array_equal(np.stack([np.asarray(r) for r in rows]),
                                  np.sort(bits, axis=0))


def test_order_stat_helpers():
  from fedjax_sparse.aggregators import _common
  rs = np.random.RandomState(0)
  # Chunked Gram (d > 2 chunks) against numpy.
  a = rs.randn(3, 40000).astype(np.float32)
  b = rs.randn(4, 40000).astype(np.float32)
  np.testing.assert_allclose(jax.jit(_common.gram)(a, b), a.astype(np.float64) @ b.T,
                             rtol=1e-4, atol=1e-2)
  x = np.array([[1.0, np.inf, -0.0], [2.0, 3.0, np.nan]], np.float32)
  np.testing.assert_array_equal(_order_stats.sum_rows(jnp.asarray(x)), x.sum(0))
  np.testing.assert_array_equal(_order_stats.materialize(jnp.asarray(x[1])), x[1])
  # Above MAX_NETWORK_ROWS the rules fall back to jnp.sort.
  k = _order_stats.MAX_NETWORK_ROWS + 3
  y = rs.randn(k, 4).astype(np.float32)
  np.testing.assert_allclose(_order_stats.coordinate_median(jnp.asarray(y)),
                             np.median(y, 0), atol=1e-6)
