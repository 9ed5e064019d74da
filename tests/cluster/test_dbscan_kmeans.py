"""Tests for fedjax_sparse.cluster: DBSCAN and k-means against scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import DBSCAN, KMeans

from fedjax_sparse.cluster import core_points, dbscan, kmeans, two_means_1d

N_MAX = 40
# One compilation for every test matrix: padded to N_MAX, traced eps/min_samples.
_dbscan = jax.jit(dbscan)
_core = jax.jit(core_points)
_kmeans = jax.jit(kmeans, static_argnames=("k", "num_iters", "init", "n_init"))
_two_means = jax.jit(two_means_1d)


def _same_partition(a, b):
  """True when label vectors a and b induce the same partition."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    return False
  pairs = set(zip(a.tolist(), b.tolist()))
  return (len(pairs) == len(set(a.tolist())) == len(set(b.tolist())))


def _random_distances(rs):
  n = int(rs.randint(5, N_MAX + 1))
  n_blobs = int(rs.randint(1, 5))
  centres = rs.uniform(-10, 10, (n_blobs, 2))
  pts = centres[rs.randint(0, n_blobs, n)] + rs.randn(n, 2) * rs.uniform(0.3, 2.0)
  if rs.rand() < 0.3:  # scattered outliers
    pts[: n // 4] = rs.uniform(-15, 15, (n // 4, 2))
  if rs.rand() < 0.1:  # duplicates: zero distances, ties at eps
    pts[n // 2:] = pts[0]
  dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).astype(np.float32)
  eps = np.float32(rs.uniform(0.2, 3.0))
  min_samples = int(rs.randint(1, 9))
  return dist, eps, min_samples


def _padded(dist):
  n = dist.shape[0]
  big = np.full((N_MAX, N_MAX), 7.0, np.float32)  # junk the mask must hide
  big[:n, :n] = dist
  valid = np.arange(N_MAX) < n
  return big, valid


def test_dbscan_matches_sklearn_on_random_matrices():
  rs = np.random.RandomState(1234)
  n_exact = 0
  for _ in range(250):
    dist, eps, ms = _random_distances(rs)
    n = dist.shape[0]
    ref = DBSCAN(eps=float(eps), min_samples=ms, metric="precomputed").fit(dist)
    big, valid = _padded(dist)
    got = np.asarray(_dbscan(big, eps, ms, valid))
    assert np.all(got[n:] == -1)
    got = got[:n]
    ref_core = np.zeros(n, bool)
    ref_core[ref.core_sample_indices_] = True
    core = np.asarray(_core(big, eps, ms, valid))[:n]
    np.testing.assert_array_equal(core, ref_core)
    # Identical noise set, identical partition of the core points.
    np.testing.assert_array_equal(got == -1, ref.labels_ == -1)
    assert _same_partition(got[ref_core], ref.labels_[ref_core])
    # Stronger (see the module docstring): the labels are scikit-learn's.
    n_exact += int(np.array_equal(got, ref.labels_))
  assert n_exact == 250


def test_dbscan_labels_are_numbered_by_smallest_core_index():
  # Two blobs {3, 4} and {0, 1, 2} (indices), plus noise 5.
  pts = np.array([10.0, 10.1, 10.2, 0.0, 0.1, 50.0])
  dist = np.abs(pts[:, None] - pts[None]).astype(np.float32)
  labels = np.asarray(_dbscan(jnp.asarray(dist), 0.5, 2))
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, -1])


def test_dbscan_border_point_takes_first_cluster():
  # Line: cores at 0,1 (cluster A) and 3,4 (cluster B); point 2 is a border
  # point of both; scikit-learn gives it to the cluster expanded first.
  pts = np.array([0.0, 0.9, 2.0, 3.1, 4.0, 0.05, 4.05])
  dist = np.abs(pts[:, None] - pts[None]).astype(np.float32)
  ref = DBSCAN(eps=1.15, min_samples=3, metric="precomputed").fit(dist).labels_
  got = np.asarray(_dbscan(jnp.asarray(dist), 1.15, 3))
  np.testing.assert_array_equal(got, ref)


def test_dbscan_nan_and_constant_distances():
  dist = np.ones((6, 6), np.float32)
  np.fill_diagonal(dist, 0)
  # Everything within eps of everything: one cluster.
  np.testing.assert_array_equal(np.asarray(dbscan(jnp.asarray(dist), 1.0, 3)), 0)
  # NaN distances are never neighbours.
  dist[:] = np.nan
  np.testing.assert_array_equal(np.asarray(dbscan(jnp.asarray(dist), 1.0, 2)), -1)


def _blobs(rs, k, n_per, dim, sep=20.0):
  centres = rs.randn(k, dim) * sep
  x = np.concatenate([c + rs.randn(n_per, dim) for c in centres])
  return x.astype(np.float32)


@pytest.mark.parametrize("init", ["kmeans++", "farthest"])
def test_kmeans_matches_sklearn_on_separable_blobs(init):
  rs = np.random.RandomState(7)
  for trial in range(6):
    k = 2 + trial % 2 * 2  # 2 or 4: two compilations
    x = _blobs(rs, k, 8, 3)
    ref = KMeans(n_clusters=k, n_init=4, random_state=0).fit(x)
    labels, centres = _kmeans(jnp.asarray(x), k=k, key=jax.random.PRNGKey(trial),
                              init=init, n_init=4)
    assert _same_partition(labels, ref.labels_)
    # Centres are the cluster means.
    for c in range(k):
      np.testing.assert_allclose(centres[c], x[np.asarray(labels) == c].mean(0),
                                 rtol=1e-4, atol=1e-4)


def test_kmeans_1d_input_and_errors():
  x = jnp.array([0.0, 0.1, 0.2, 9.0, 9.1])
  labels, centres = kmeans(x, 2, jax.random.PRNGKey(0), init="farthest")
  assert _same_partition(labels, [0, 0, 0, 1, 1])
  assert centres.shape == (2, 1)
  with pytest.raises(ValueError, match="init"):
    kmeans(x, 2, jax.random.PRNGKey(0), init="random")
  with pytest.raises(ValueError, match="k must be"):
    kmeans(x, 6, jax.random.PRNGKey(0))


@pytest.mark.parametrize("init", ["kmeans++", "farthest", "maximin"])
def test_kmeans_valid_clusters_only_the_valid_points(init):
  rs = np.random.RandomState(3)
  x = _blobs(rs, 2, 5, 3)
  valid = np.ones(10, bool)
  valid[[1, 7]] = False
  noisy = x.copy()
  noisy[1] = 1e6  # far away, but not valid: no seed, no centre moves
  noisy[7] = -1e6
  labels, centres = _kmeans(jnp.asarray(noisy), k=2, key=jax.random.PRNGKey(0),
                            init=init, valid=jnp.asarray(valid))
  labels = np.asarray(labels)
  np.testing.assert_array_equal(labels[~valid], -1)
  assert _same_partition(labels[valid], [0] * 4 + [1] * 4)
  for c in range(2):
    np.testing.assert_allclose(centres[c], x[labels == c].mean(0), rtol=1e-5,
                               atol=1e-5)


def _brute_two_means(x):
  s = np.sort(x)
  best, best_t = np.inf, None
  for t in range(1, len(s)):
    if s[t - 1] == s[t]:
      continue
    sse = ((s[:t] - s[:t].mean()) ** 2).sum() + ((s[t:] - s[t:].mean()) ** 2).sum()
    if sse < best - 1e-12:
      best, best_t = sse, t
  return None if best_t is None else (x >= s[best_t]).astype(int)


def test_two_means_1d_is_the_optimal_split():
  rs = np.random.RandomState(3)
  for _ in range(50):
    x = (rs.randn(12) * rs.choice([1e-3, 1.0, 1e3])).astype(np.float64)
    x = x.astype(np.float32).astype(np.float64)
    ref = _brute_two_means(x)
    labels, centres = _two_means(jnp.asarray(x, jnp.float32))
    np.testing.assert_array_equal(np.asarray(labels), ref)
    np.testing.assert_allclose(centres, [x[ref == 0].mean(), x[ref == 1].mean()],
                               rtol=1e-4)


def test_two_means_1d_matches_sklearn_on_separable_scores():
  rs = np.random.RandomState(5)
  for _ in range(5):
    x = np.concatenate([rs.randn(7) * 0.1, 3 + rs.randn(5) * 0.1]).astype(np.float32)
    rs.shuffle(x)
    ref = KMeans(n_clusters=2, n_init=4, random_state=0).fit(x[:, None]).labels_
    labels, _ = _two_means(jnp.asarray(x))
    assert _same_partition(labels, ref)
    assert np.asarray(labels)[np.argmax(x)] == 1  # 1 = the higher cluster


def test_two_means_1d_invalid_and_degenerate():
  x = jnp.array([1.0, jnp.nan, 1.1, jnp.inf, 5.0, 5.2, 1e30])
  labels, _ = _two_means(x, valid=jnp.array([1, 1, 1, 1, 1, 1, 0], bool))
  np.testing.assert_array_equal(np.asarray(labels), [0, -1, 0, -1, 1, 1, -1])
  labels, centres = _two_means(jnp.full((4,), 2.5))
  np.testing.assert_array_equal(np.asarray(labels), 1)
  np.testing.assert_allclose(centres, [2.5, 2.5])
  # Huge but finite scores do not overflow the squared errors.
  labels, _ = _two_means(jnp.array([1e30, 1.1e30, -3e38, -2.9e38]))
  np.testing.assert_array_equal(np.asarray(labels), [1, 1, 0, 0])
