"""fedjax_sparse.cluster.hdbscan against scikit-learn's HDBSCAN and the numpy
walk-through of fedjax_sparse/testing/aggregator_refs.py (``np_hdbscan``).

One compilation for every matrix: matrices are padded to ``N_MAX`` points
with ``valid``, and the parameters are traced. Matrices come from clustered
random points (so that clusters exist, some with duplicate points, i.e.
zero distances) and fully random symmetric matrices, ``K`` in [5, 40].
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import HDBSCAN

from fedjax_sparse.cluster import hdbscan
from fedjax_sparse.testing import aggregator_refs as refs
from tests.helpers import same_partition

N_MAX = 40
_hdbscan = jax.jit(hdbscan)


def _matrix(rs, kind):
  n = int(rs.randint(5, N_MAX + 1))
  if kind == "random":
    a = rs.rand(n, n)
    dist = (a + a.T) / 2
  else:
    n_blobs = int(rs.randint(1, 5))
    centres = rs.uniform(-10, 10, (n_blobs, 3))
    pts = (centres[rs.randint(0, n_blobs, n)]
           + rs.randn(n, 3) * rs.uniform(0.3, 2.0))
    if kind == "duplicates":
      pts[: n // 3] = pts[0]
    dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
  np.fill_diagonal(dist, 0.0)
  return dist.astype(np.float32)


def _run(dist, mcs, ms, allow_single):
  n = dist.shape[0]
  big = np.full((N_MAX, N_MAX), 3.0, np.float32)  # junk that valid must hide
  big[:n, :n] = dist
  out = np.asarray(_hdbscan(jnp.asarray(big), mcs, ms, jnp.bool_(allow_single),
                            jnp.asarray(np.arange(N_MAX) < n)))
  assert np.all(out[n:] == -1)
  return out[:n]


def _sklearn(dist, mcs, ms, allow_single):
  return HDBSCAN(metric="precomputed", min_cluster_size=int(mcs),
                 min_samples=int(ms), allow_single_cluster=allow_single,
                 copy=True).fit(dist.astype(np.float64)).labels_


def test_flame_setting_matches_sklearn_on_50_matrices():
  # FLAME's parameters: min_cluster_size = K // 2 + 1, min_samples = 2
  # (scikit-learn's convention), allow_single_cluster=True.
  rs = np.random.RandomState(2022)
  kinds = ["points"] * 25 + ["random"] * 20 + ["duplicates"] * 5
  agree = 0
  for kind in kinds:
    dist = _matrix(rs, kind)
    mcs = dist.shape[0] // 2 + 1
    got = _run(dist, mcs, 2, True)
    ref = _sklearn(dist, mcs, 2, True)
    assert np.sum(got >= 0) >= mcs, got  # FLAME always keeps a majority
    agree += same_partition(got, ref)
  assert agree == len(kinds), f"{agree}/{len(kinds)} agree with scikit-learn"


def test_general_parameters_match_sklearn_without_ties():
  # min_samples <= 2 and distinct distances: no two tree edges tie, so the
  # labels must equal scikit-learn's (both values of allow_single_cluster).
  rs = np.random.RandomState(7)
  for t in range(40):
    dist = _matrix(rs, ("points", "random")[t % 2])
    n = dist.shape[0]
    mcs = int(rs.randint(2, n // 2 + 2))
    ms = int(rs.randint(1, 3))
    allow = bool(t % 4 < 2)
    got = _run(dist, mcs, ms, allow)
    ref = _sklearn(dist, mcs, ms, allow)
    assert same_partition(got, ref), (t, n, mcs, ms, allow, ref, got)
    assert same_partition(refs.np_hdbscan(dist, mcs, ms, allow), ref)


def test_ties_follow_the_numpy_walk_through():
  # min_samples >= 3 makes equal tree edges common; scikit-learn's unstable
  # argsort may order them differently (its labels then differ in a few
  # percent of such matrices), the stable order is the numpy reference's.
  rs = np.random.RandomState(11)
  for t in range(30):
    dist = _matrix(rs, ("points", "random")[t % 2])
    n = dist.shape[0]
    mcs = int(rs.randint(2, n // 2 + 2))
    ms = int(rs.randint(3, 7))
    allow = bool(t % 3 == 0)
    got = _run(dist, mcs, ms, allow)
    ref = refs.np_hdbscan(dist, mcs, ms, allow)
    assert same_partition(got, ref), (t, n, mcs, ms, allow, ref, got)


def test_hand_computed_line():
  # 1-D points 0, 1, 2.5, 3.3 and 20; single linkage (min_samples = 1):
  # merges at 0.8 {2.5, 3.3}, 1 {0, 1}, 1.5 (the four), 16.7 (all).
  # min_cluster_size = 3: the root loses 20 at lambda = 1/16.7, then the
  # four fall apart at 1/1.5 into pieces of 2; no split, so no cluster
  # unless the root may be one, and then it holds the four points that
  # left it last.
  x = np.array([0.0, 1.0, 2.5, 3.3, 20.0])
  dist = np.abs(x[:, None] - x[None]).astype(np.float32)
  np.testing.assert_array_equal(_run(dist, 3, 1, False), [-1] * 5)
  np.testing.assert_array_equal(_run(dist, 3, 1, True), [0, 0, 0, 0, -1])
  # min_cluster_size = 2: the split at 1.5 gives {0, 1} and {2.5, 3.3},
  # stabilities 2 (1 - 1/1.5) = 0.67 and 2 (1/0.8 - 1/1.5) = 1.17. Without
  # the root as a candidate they are the clusters; with it, the root's
  # 1/16.7 + 4/1.5 = 2.73 beats their 1.83 and it is the one cluster.
  np.testing.assert_array_equal(_run(dist, 2, 1, False), [0, 0, 1, 1, -1])
  np.testing.assert_array_equal(_run(dist, 2, 1, True), [0, 0, 0, 0, -1])
  np.testing.assert_array_equal(_sklearn(dist, 2, 1, False), [0, 0, 1, 1, -1])
  np.testing.assert_array_equal(_sklearn(dist, 2, 1, True), [0, 0, 0, 0, -1])


def test_small_and_degenerate_inputs():
  # One point (scikit-learn refuses it): the single cluster when allowed.
  for allow, want in ((True, [0]), (False, [-1])):
    np.testing.assert_array_equal(
        np.asarray(hdbscan(jnp.zeros((1, 1)), 2, 1, allow)), want)
  # Two points, min_cluster_size 2: one cluster only as the root.
  two = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  np.testing.assert_array_equal(_run(two, 2, 1, True), [0, 0])
  np.testing.assert_array_equal(_run(two, 2, 1, False), [-1, -1])
  # NaN distances are infinitely far: that point is noise.
  x = np.array([0.0, 0.1, 0.3, 0.35, 5.0])
  dist = np.abs(x[:, None] - x[None]).astype(np.float32)
  dist[4, :4] = dist[:4, 4] = np.nan
  np.testing.assert_array_equal(_run(dist, 3, 2, True), [0, 0, 0, 0, -1])


@pytest.mark.parametrize("allow", [False, True])
def test_invalid_points_change_nothing(allow):
  rs = np.random.RandomState(3)
  dist = _matrix(rs, "points")
  n = dist.shape[0]
  perm = rs.permutation(N_MAX)  # valid points scattered among junk
  big = np.full((N_MAX, N_MAX), 0.01, np.float32)
  pos = np.sort(perm[:n])
  big[np.ix_(pos, pos)] = dist
  valid = np.zeros(N_MAX, bool)
  valid[pos] = True
  got = np.asarray(_hdbscan(jnp.asarray(big), 4, 2, jnp.bool_(allow),
                            jnp.asarray(valid)))
  assert np.all(got[~valid] == -1)
  assert same_partition(got[pos], _sklearn(dist, 4, 2, allow))
