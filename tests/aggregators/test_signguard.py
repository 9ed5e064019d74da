"""fedjax_sparse.cluster.meanshift against scikit-learn's MeanShift and
estimate_bandwidth, and fedjax_sparse.aggregators.signguard against the numpy
+ scikit-learn reference fedjax_sparse/testing/signguard_ref.py.

Mean shift runs on point sets padded to ``N_MAX`` rows with ``valid`` (junk
rows that the mask must hide), so that one compilation serves every ``K``.
"""

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import MeanShift
from sklearn.cluster import estimate_bandwidth as sk_estimate_bandwidth

from fedjax_sparse.aggregators import registry
from fedjax_sparse.aggregators import signguard as sg
from fedjax_sparse.cluster.meanshift import estimate_bandwidth, mean_shift
from fedjax_sparse.testing.signguard_ref import clipped_mean, signguard_ref
from tests.helpers import same_partition

N_MAX = 50

_mean_shift = jax.jit(mean_shift,
                      static_argnames=("bin_seeding", "cluster_all", "max_iter"))
_bandwidth = jax.jit(estimate_bandwidth, static_argnums=(1, 2))


def _points(rs, k, p=3):
  """A mixture of 2-4 Gaussian blobs in the unit cube plus uniform noise."""
  n_blobs = int(rs.randint(2, 5))
  centres = rs.uniform(0, 1, (n_blobs, p))
  x = centres[rs.randint(0, n_blobs, k)] + rs.randn(k, p) * rs.uniform(0.01, 0.12)
  n_noise = int(rs.randint(0, k // 4 + 1))
  x[:n_noise] = rs.uniform(0, 1, (n_noise, p))
  return x[rs.permutation(k)].astype(np.float32)


def _padded(x):
  k, p = x.shape
  big = np.full((N_MAX, p), 7.0, np.float32)  # junk that valid must hide
  big[:k] = x
  return jnp.asarray(big), jnp.asarray(np.arange(N_MAX) < k)


def _run_mean_shift(x, bandwidth, **kwargs):
  big, valid = _padded(x)
  out = _mean_shift(big, jnp.float32(bandwidth), valid, **kwargs)
  labels = np.asarray(out.labels)
  assert np.all(labels[len(x):] == -1)
  return labels[:len(x)], out


def _sklearn(x, bandwidth, bin_seeding=True, cluster_all=False):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Binning data failed ..."
    return MeanShift(bandwidth=bandwidth, bin_seeding=bin_seeding,
                     cluster_all=cluster_all).fit(x).labels_


def test_mean_shift_matches_sklearn_on_60_feature_sets():
  rs = np.random.RandomState(2109)
  same = exact = 0
  for t in range(60):
    x = _points(rs, [5, 10, 25, 50][t % 4])
    b = sk_estimate_bandwidth(x, quantile=0.5, n_samples=50)
    got, out = _run_mean_shift(x, b)
    ref = _sklearn(x, b)
    same += same_partition(got, ref)
    exact += np.array_equal(got, ref)
    assert int(out.n_clusters) == ref.max() + 1
  assert same == 60
  # Labels are numbered as scikit-learn numbers them (by intensity, centre),
  # which SignGuard's tie-break between equal clusters relies on.
  assert exact == 60


@pytest.mark.slow
def test_mean_shift_other_settings_match_sklearn():
  # Without bin seeding, with cluster_all, and in 2-D (other shapes).
  rs = np.random.RandomState(5)
  for t in range(6):
    x = _points(rs, [10, 25, 50][t % 3], p=2 if t % 2 else 3)
    b = sk_estimate_bandwidth(x, quantile=0.3)
    for bin_seeding, cluster_all in [(False, False), (True, True), (False, True)]:
      got, _ = _run_mean_shift(x, b, bin_seeding=bin_seeding,
                               cluster_all=cluster_all)
      ref = _sklearn(x, b, bin_seeding, cluster_all)
      assert np.array_equal(got, ref), (t, bin_seeding, cluster_all)


def test_mean_shift_on_uniform_points_and_few_iterations():
  # Uniform points: windows creep, so the stop threshold (1e-3 * bandwidth)
  # decides where some seeds stop (seed 0 changes its labels with 3e-2);
  # max_iter = 0 and 2 stop every seed after 1 and 3 means.
  for s in range(6):
    x = np.random.RandomState(s).uniform(0, 1, (50, 3)).astype(np.float32)
    b = sk_estimate_bandwidth(x, quantile=0.5)
    got, _ = _run_mean_shift(x, b)
    assert np.array_equal(got, _sklearn(x, b)), s
  for max_iter in (0, 2):
    got, _ = _run_mean_shift(x, b, bin_seeding=False, max_iter=max_iter)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ref = MeanShift(bandwidth=b, cluster_all=False,
                      max_iter=max_iter).fit(x).labels_
    assert np.array_equal(got, ref), max_iter


def test_mean_shift_bin_fallback_to_points():
  # As many grid cells as points: scikit-learn seeds from the points.
  x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], np.float32)
  got, _ = _run_mean_shift(x, 0.6)
  assert np.array_equal(got, _sklearn(x, 0.6))


@pytest.mark.parametrize("k", [5, 30, 50, 60, 80])
def test_estimate_bandwidth_matches_sklearn(k):
  # k > 50: scikit-learn subsamples RandomState(0).permutation(k)[:50];
  # the valid points are padded with junk rows to 100.
  rs = np.random.RandomState(k)
  x = _points(rs, k)
  big = np.full((100, 3), 9.0, np.float32)
  big[:k] = x
  got = float(_bandwidth(jnp.asarray(big), 0.5, 50, jnp.arange(100) < k))
  want = sk_estimate_bandwidth(x, quantile=0.5, n_samples=50)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got_all = float(_bandwidth(jnp.asarray(x), 0.3, None, None))
  np.testing.assert_allclose(got_all, sk_estimate_bandwidth(x, quantile=0.3),
                             rtol=1e-5)


def test_bandwidth_zero_is_one_cluster_per_group_of_identical_points():
  x = np.tile(np.float32([[0.3, 0.0, 0.7]]), (6, 1))
  assert float(_bandwidth(jnp.asarray(x), 0.5, 50, None)) == 0.0
  labels, out = _run_mean_shift(x, 0.0)
  assert np.all(labels == 0) and int(out.n_clusters) == 1
  assert np.all(np.isfinite(np.asarray(out.centres)))
  np.testing.assert_array_equal(np.asarray(out.centres)[0], x[0])
  # Two groups of duplicates (bandwidth 0 again): the larger is cluster 0.
  y = np.float32([[1, 0, 0]] * 2 + [[0, 0, 1]] * 3)
  assert float(_bandwidth(jnp.asarray(y), 0.5, 50, None)) == 0.0
  labels, out = _run_mean_shift(y, 0.0)
  np.testing.assert_array_equal(labels, [1, 1, 0, 0, 0])


def test_mean_shift_single_point_and_no_valid_point():
  labels, out = _run_mean_shift(np.float32([[0.2, 0.4, 0.1]]), 0.0)
  assert labels.tolist() == [0] and int(out.n_clusters) == 1
  out = _mean_shift(jnp.ones((N_MAX, 3)), jnp.float32(0.5),
                    jnp.zeros((N_MAX,), bool))
  assert np.all(np.asarray(out.labels) == -1) and int(out.n_clusters) == 0


# ---------------------------------------------------------------------------
# The rule.


def _ctx(k, pack_size=1, finite_uploads=False):
  # Only the static fields the rule reads.
  return types.SimpleNamespace(finite_uploads=finite_uploads, layout=None,
                               pack_size=pack_size, num_clients=k)


_JITTED = {}


def _apply(hparams, updates, masks, weights, key, ctx):
  """``signguard(**hparams)`` jitted once per configuration and context."""
  cache_key = (tuple(sorted(hparams.items())), ctx.num_clients, ctx.pack_size,
               ctx.finite_uploads)
  if cache_key not in _JITTED:
    agg = sg.signguard(**hparams)
    _JITTED[cache_key] = jax.jit(
        lambda u, m, w, kk: agg.apply((), u, m, w, kk, ctx)[0])
  return _JITTED[cache_key](updates, masks, weights, key)


def _updates(rs, k, d, n_bad):
  """Honest updates around a mostly positive mean, then attackers: flipped
  signs, scaled up, scaled down, random noise and zero-inflated rows."""
  mu = np.abs(rs.randn(d)) * rs.uniform(0.3, 1.0)
  u = mu + rs.randn(k, d) * rs.uniform(0.3, 1.2)
  kinds = rs.randint(0, 5, n_bad)
  for i, kind in enumerate(kinds):
    if kind == 0:
      u[i] = -u[i]
    elif kind == 1:
      u[i] *= rs.uniform(3.5, 20)
    elif kind == 2:
      u[i] *= rs.uniform(0.001, 0.05)
    elif kind == 3:
      u[i] = rs.randn(d) * np.linalg.norm(u[-1]) / np.sqrt(d)
    else:
      u[i] *= rs.rand(d) < 0.3
  return u.astype(np.float32)


def _check_against_ref(updates, masks, weights, key, pack_size=1, **hparams):
  """Asserts the rule equals the reference; returns ``(out, ref, tie)``.

  The sign features lie on a lattice (counts over ``b`` coordinates; with
  dense updates and no zeros, on a line), so a distance can equal the
  bandwidth in exact arithmetic, and float32 here and float64 in
  scikit-learn may then round to different sides. ``tie`` is True when the
  clusterings differ and scikit-learn's own labels change when the
  bandwidth moves by 1e-6 (relative): the instance is degenerate and the
  rounding decides. Then the rest of the rule is checked on the rule's own
  ``S`` (within ``S1``, clipped mean); the callers bound how often it
  happens.
  """
  k, d = updates.shape
  out = _apply(hparams, jnp.asarray(updates),
               None if masks is None else jnp.asarray(masks),
               jnp.asarray(weights), key, _ctx(k, pack_size))
  cols = np.asarray(sg.selected_coordinates(
      key, d, hparams.get("selection_fraction", 0.1)))
  diag = out.diagnostics
  acceptance = np.asarray(out.acceptance)
  ref = signguard_ref(updates, masks, weights, cols, pack_size, **hparams)
  tie = not same_partition(diag["cluster_labels"], ref["labels"])
  if tie:
    nearby = [signguard_ref(updates, masks, weights, cols, pack_size,
                            bandwidth_scale=s, **hparams)["labels"]
              for s in (1 - 1e-6, 1 + 1e-6)]
    assert not all(same_partition(ref["labels"], other) for other in nearby)
    assert not ref["fallback"] and np.all(acceptance <= ref["s1"])
    np.testing.assert_allclose(
        np.asarray(out.update),
        clipped_mean(updates, masks, weights, acceptance > 0,
                     ref["median_norm"], pack_size), rtol=2e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(acceptance, ref["acceptance"])
    np.testing.assert_allclose(np.asarray(out.update), ref["update"],
                               rtol=2e-5, atol=1e-6)
    assert int(diag["s2_size"]) == ref["s2"].sum()
    assert int(diag["fallback"]) == ref["fallback"]
  assert int(diag["s1_size"]) == ref["s1"].sum()
  np.testing.assert_allclose(float(diag["median_norm"]), ref["median_norm"],
                             rtol=1e-5)
  np.testing.assert_allclose(float(diag["bandwidth"]), ref["bandwidth"],
                             rtol=1e-5)
  return out, ref, tie


@pytest.mark.slow
def test_signguard_matches_reference_on_random_rounds():
  rs = np.random.RandomState(17)
  rejected = ties = 0
  for t in range(15):
    k = [8, 25, 60][t % 3]
    d = 300
    u = _updates(rs, k, d, n_bad=int(rs.randint(0, k // 2)))
    w = rs.uniform(0.5, 2.0, k).astype(np.float32)
    out, _, tie = _check_against_ref(u, None, w, jax.random.PRNGKey(t))
    rejected += int(k - np.asarray(out.acceptance).sum())
    ties += tie
  assert rejected > 0  # the attackers are not all let through
  assert ties <= 2  # one in these 15 rounds (a float tie at K = 8)


@pytest.mark.slow
def test_signguard_matches_reference_with_masks_and_nonfinite_rows():
  rs = np.random.RandomState(3)
  k, d, pack = 12, 240, 4
  for t in range(6):
    u = _updates(rs, k, d, n_bad=4)
    masks = rs.rand(k, d // pack) < 0.6
    u = np.where(np.repeat(masks, pack, axis=1), u, 0.0).astype(np.float32)
    u[5, 7] = np.nan
    u[9] = np.inf
    w = np.ones(k, np.float32)
    out, _, tie = _check_against_ref(u, masks, w, jax.random.PRNGKey(100 + t),
                                     pack_size=pack)
    assert not tie
    assert np.asarray(out.acceptance)[[5, 9]].sum() == 0
    assert np.all(np.isfinite(np.asarray(out.update)))


@pytest.mark.slow
def test_signguard_kmeans_matches_reference_on_separated_rounds():
  rs = np.random.RandomState(11)
  for t in range(4):
    u = _updates(rs, 10, 2000, n_bad=0)
    u[:3] = -u[:3]  # sign flippers: a clearly separate cluster
    assert not _check_against_ref(u, None, np.ones(10, np.float32),
                                  jax.random.PRNGKey(t), clustering="kmeans")[2]


@pytest.mark.parametrize("clustering", ["meanshift", "kmeans"])
def test_signguard_hand_computed(clustering):
  # Honest clients 0, 2, 4, 5 (positive entries, norms 2, 4, 3, 5), a huge
  # one (1: norm 200, positive) and a sign flipper (3: norm 3). Median 3.5,
  # so S1 drops client 1 (200 > 3 * 3.5). Features (all coordinates, d = 4):
  # five clients at (1, 0, 0), the flipper at (0, 0, 1); bandwidth =
  # sqrt(2) / 6 (the 3rd nearest of each point: 0 for the five, sqrt(2) for
  # the flipper), so mean shift finds the five (cluster 0) and the flipper
  # (cluster 1). S = {0, 2, 4, 5}, clipped to 3.5: 1, 2 * 3.5 / 4 = 1.75,
  # 1.5, 2.5 * 3.5 / 5 = 1.75 per coordinate, mean 1.5.
  u = np.float32([1.0, 100.0, 2.0, -1.5, 1.5, 2.5])[:, None] * np.ones(4, np.float32)
  hparams = {"selection_fraction": 1.0, "clustering": clustering}
  out = _apply(hparams, jnp.asarray(u), None, jnp.ones(6), jax.random.PRNGKey(0),
               _ctx(6))
  np.testing.assert_array_equal(np.asarray(out.acceptance), [1, 0, 1, 0, 1, 1])
  np.testing.assert_allclose(np.asarray(out.update), np.full(4, 1.5), rtol=1e-6)
  diag = out.diagnostics
  assert int(diag["s1_size"]) == 5 and int(diag["s2_size"]) == 5
  assert int(diag["num_clusters"]) == 2 and int(diag["fallback"]) == 0
  np.testing.assert_allclose(float(diag["median_norm"]), 3.5, rtol=1e-6)
  if clustering == "meanshift":
    np.testing.assert_allclose(float(diag["bandwidth"]), np.sqrt(2) / 6,
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(diag["cluster_labels"]),
                                  [0, 0, 0, 1, 0, 0])


def test_signguard_identical_and_zero_updates():
  # Identical updates: features identical, bandwidth 0, one cluster; every
  # client is kept and the output is the update.
  u = np.tile(np.float32([[0.5, -1.0, 0.0, 2.0]]), (5, 1))
  hparams = {"selection_fraction": 1.0}
  out = _apply(hparams, jnp.asarray(u), None, jnp.ones(5), jax.random.PRNGKey(1),
               _ctx(5))
  assert int(out.diagnostics["num_clusters"]) == 1
  assert float(out.diagnostics["bandwidth"]) == 0.0
  np.testing.assert_array_equal(np.asarray(out.acceptance), np.ones(5))
  np.testing.assert_allclose(np.asarray(out.update), u[0], rtol=1e-6)
  # All zero: the median norm is 0, S1 is empty, every client is kept, and
  # the output is 0 (no NaN).
  out = _apply(hparams, jnp.zeros((5, 4)), None, jnp.ones(5),
               jax.random.PRNGKey(1), _ctx(5))
  assert int(out.diagnostics["fallback"]) == 1
  np.testing.assert_array_equal(np.asarray(out.update), np.zeros(4))


def test_signguard_single_client():
  u = jnp.asarray([[0.3, -0.2, 0.0, 1.0, 4.0]])
  for clustering in ("meanshift", "kmeans"):
    out = _apply({"clustering": clustering}, u, None, jnp.ones(1),
                 jax.random.PRNGKey(2), _ctx(1))
    np.testing.assert_array_equal(np.asarray(out.acceptance), [1.0])
    np.testing.assert_allclose(np.asarray(out.update), u[0], rtol=1e-6)


def test_signguard_jit_compiles_once_and_is_permutation_invariant():
  rs = np.random.RandomState(8)
  u = _updates(rs, 20, 400, n_bad=6)
  agg = sg.signguard()
  ctx = _ctx(20, finite_uploads=True)
  fn = jax.jit(lambda uu, ww, kk: agg.apply((), uu, None, ww, kk, ctx)[0])
  key = jax.random.PRNGKey(4)
  out = fn(jnp.asarray(u), jnp.ones(20), key)
  perm = rs.permutation(20)
  out_p = fn(jnp.asarray(u[perm]), jnp.ones(20), key)
  assert fn._cache_size() == 1
  np.testing.assert_array_equal(np.asarray(out_p.acceptance),
                                np.asarray(out.acceptance)[perm])
  np.testing.assert_allclose(np.asarray(out_p.update), np.asarray(out.update),
                             rtol=1e-5, atol=1e-7)


def test_signguard_bounded_under_outliers_and_small_shapes():
  # Fewer than K/2 rows replaced by huge, non-finite or far rows: the output
  # is finite with norm at most the median norm, itself at most the largest
  # honest norm.
  rs = np.random.RandomState(21)
  k, d = 9, 6
  for bad in [np.full(d, 1e30), np.full(d, -1e30), np.full(d, np.nan),
              np.full(d, np.inf), np.r_[np.nan, np.ones(d - 1)],
              np.full(d, 1e18), -1e3 * np.ones(d)]:
    u = rs.randn(k, d).astype(np.float32)
    honest = np.linalg.norm(u[4:], axis=1).max()
    u[:4] = bad
    out = _apply({}, jnp.asarray(u), None, jnp.ones(k), jax.random.PRNGKey(0),
                 _ctx(k))
    assert np.all(np.isfinite(np.asarray(out.update)))
    assert np.all(np.asarray(out.acceptance)[:4] == 0)
    assert np.linalg.norm(np.asarray(out.update)) <= honest * (1 + 1e-5)
  for shape in [(2, 1), (2, 5), (3, 1)]:
    out = _apply({}, jnp.asarray(rs.randn(*shape), jnp.float32), None,
                 jnp.ones(shape[0]), jax.random.PRNGKey(0), _ctx(shape[0]))
    assert np.all(np.isfinite(np.asarray(out.update)))


def test_signguard_registered_and_bad_configuration():
  assert registry.get("signguard") is sg.signguard
  with pytest.raises(ValueError, match="clustering"):
    sg.signguard(clustering="dbscan")
  with pytest.raises(ValueError, match="lower_bound"):
    sg.signguard(lower_bound=3.0, upper_bound=0.1)
  with pytest.raises(ValueError, match="selection_fraction"):
    sg.signguard(selection_fraction=0.0)
