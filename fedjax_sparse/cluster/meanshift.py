"""Fixed-shape, jittable mean shift with a flat kernel (scikit-learn's).

Mean shift (Comaniciu and Meer, "Mean shift: a robust approach toward
feature space analysis", TPAMI 2002) as SignGuard's sign clustering uses it
(Xu et al., ICDCS 2022, Alg. 1; :mod:`fedjax_sparse.aggregators.signguard`):
``MeanShift(bandwidth=estimate_bandwidth(X, quantile=0.5, n_samples=50),
bin_seeding=True, cluster_all=False)``. For ``n`` up to a few hundred points
in a few dimensions, every step is an ``O(n^2 p)`` computation over
fixed-shape arrays (``n`` seeds with a validity mask), and reproduces
scikit-learn's ``sklearn/cluster/_mean_shift.py`` (1.9) step by step:

1. :func:`estimate_bandwidth`: the mean over the points of the distance to
   their ``max(int(n * quantile), 1)``-th nearest point, the point itself
   included. With ``n_samples`` and more points than that, scikit-learn
   subsamples ``RandomState(0).permutation(n)[:n_samples]``; the number of
   valid points is traced, so the permutations of every possible count are
   tabulated when tracing and the same subsample is taken.
2. Seeds (``get_bin_seeds``, ``min_bin_freq = 1``): the distinct grid cells
   ``round(x / bandwidth)`` (half to even, as numpy), in the order of their
   first point, each seed at ``cell * bandwidth``; if there are as many cells
   as points (or ``bandwidth == 0``), the points themselves. Without
   ``bin_seeding``, the points.
3. Each seed climbs (``_mean_shift_single_seed``): ``m <- mean of the points
   within bandwidth of m`` (``||x - m||^2 <= bandwidth^2``, as scikit-learn's
   neighbour searches compare squared distances), stopping when
   ``||m_new - m_old|| <= 1e-3 * bandwidth`` or after ``max_iter + 1``
   means; a seed without any point in reach is dropped. Its intensity is
   the number of points within bandwidth of the last ``m_old``. All seeds
   climb together in one ``lax.while_loop``, each frozen once it stops.
4. Candidates with exactly the same centre are merged (scikit-learn keys a
   dict by the centre), sorted by ``(intensity, centre)`` descending
   (centres compared lexicographically), and swept in that order: a centre
   not yet removed removes every other centre within bandwidth.
5. Labels: the index (in that order) of the nearest kept centre, ties to the
   lower index; ``-1`` for a point farther than the bandwidth from it
   unless ``cluster_all``.

Differences from scikit-learn:

* Arithmetic is float32 with centres as masked sums over all points, where
  scikit-learn sums the neighbours in its tree's order (float64 for
  distances, float32 means for float32 data): centres and distances may
  differ in the last bits, which changes a label only when a distance, a
  shift or a grid coordinate is that close to its threshold.
* ``bandwidth == 0`` (scikit-learn refuses it): every point is a seed that
  stays where it is, so each group of identical points is one cluster (all
  points identical: one cluster), numbered by (size, point) descending.
* scikit-learn raises when no seed reaches a point; here every label is
  then ``-1`` (with bin seeds in up to 3 dimensions every seed is within
  ``0.87 * bandwidth`` of its points, so this needs ``p >= 4``).
* Invalid points (``valid``) take no part anywhere and get label ``-1``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST


class MeanShiftResult(NamedTuple):
  """What :func:`mean_shift` returns.

  Attributes:
    labels: ``int32[n]`` cluster of each point, ``-1`` for none.
    centres: ``f32[n, p]``; rows ``0 .. n_clusters - 1`` are the cluster
      centres in label order, the other rows 0.
    n_clusters: ``int32`` number of clusters.
  """

  labels: Array
  centres: Array
  n_clusters: Array


def _checked(x: Array, valid: Optional[Array]) -> tuple[Array, Array]:
  x = jnp.asarray(x, jnp.float32)
  chex.assert_rank(x, 2)
  n = x.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  chex.assert_shape(valid, (n,))
  return jnp.where(valid[:, None], x, 0.0), valid


def _sq_dists(a: Array, b: Array) -> Array:
  """``f32[n, m]`` squared distances from differences (exact 0 for equal rows)."""
  diff = a[:, None, :] - b[None, :, :]
  return jnp.sum(diff * diff, axis=-1)


def exact_div(num: Array, den: Array) -> Array:
  """``num / den`` rounded as IEEE division (numpy's).

  XLA:CPU turns a division by a broadcast value into a multiplication by
  its reciprocal, which differs from numpy in the last bit; the barrier
  keeps the divisor a full array.
  """
  den = lax.optimization_barrier(jnp.broadcast_to(den, num.shape))
  return num / den


@functools.lru_cache(maxsize=None)
def _subsample_table(n: int, n_samples: int) -> np.ndarray:
  """``bool[n + 1, n]``: row ``m`` marks the ranks (among ``m`` points) that
  ``estimate_bandwidth`` keeps: ``RandomState(0).permutation(m)[:n_samples]``
  for ``m > n_samples``, all ``m`` otherwise."""
  table = np.zeros((n + 1, n), bool)
  for m in range(n + 1):
    if m > n_samples:
      table[m, np.random.RandomState(0).permutation(m)[:n_samples]] = True
    else:
      table[m, :m] = True
  return table


def estimate_bandwidth(x: Array, quantile: float = 0.3,
                       n_samples: Optional[int] = None,
                       valid: Optional[Array] = None) -> Array:
  """scikit-learn's ``estimate_bandwidth(X, quantile, n_samples, random_state=0)``.

  Args:
    x: ``f32[n, p]`` points.
    quantile: in [0, 1]; 0.5 is the median of the pairwise distances.
    n_samples: ``None`` (all points) or the size of the subsample.
    valid: optional ``bool[n]``; only these points count (the subsample is
      drawn among them as scikit-learn would draw it from them alone).

  Returns:
    ``f32`` bandwidth (0 without valid points).
  """
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"estimate_bandwidth: quantile must be in [0, 1], got {quantile}")
  if n_samples is not None and n_samples < 1:
    raise ValueError(f"estimate_bandwidth: n_samples must be >= 1, got {n_samples}")
  x, valid = _checked(x, valid)
  n = x.shape[0]
  m = jnp.sum(valid, dtype=jnp.int32)
  if n_samples is not None and n > n_samples:
    rank = jnp.cumsum(valid, dtype=jnp.int32) - 1
    member = jnp.asarray(_subsample_table(n, n_samples))[m]
    valid = valid & member[jnp.clip(rank, 0, n - 1)]
    m = jnp.minimum(m, n_samples)
  neighbours = np.array([max(int(j * quantile), 1) for j in range(n + 1)],
                        np.int32)
  kth = jnp.asarray(neighbours)[m] - 1
  dist = jnp.sqrt(_sq_dists(x, x))
  dist = jnp.sort(jnp.where(valid[None, :], dist, jnp.inf), axis=1)
  far = jnp.take_along_axis(dist, jnp.broadcast_to(kth, (n, 1)), axis=1)[:, 0]
  total = jnp.sum(jnp.where(valid, far, 0.0))
  return jnp.where(m > 0, total / jnp.maximum(m, 1).astype(jnp.float32), 0.0)


def _bin_seeds(x: Array, valid: Array, bandwidth: Array) -> tuple[Array, Array]:
  """``get_bin_seeds(X, bandwidth, 1)``: ``(seeds f32[n, p], seed_valid bool[n])``."""
  n = x.shape[0]
  positive = bandwidth > 0
  cells = jnp.round(exact_div(x, jnp.where(positive, bandwidth, 1.0)))
  same = jnp.all(cells[:, None, :] == cells[None, :, :], axis=-1)
  earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)
  first = valid & ~jnp.any(same & earlier & valid[None, :], axis=1)
  as_points = (jnp.sum(first) == jnp.sum(valid)) | ~positive
  seeds = jnp.where(as_points, x, cells * bandwidth)
  return seeds, jnp.where(as_points, valid, first)


def _climb(x: Array, valid: Array, seeds: Array, seed_valid: Array,
           bandwidth: Array, max_iter: int) -> tuple[Array, Array, Array]:
  """All seeds' hill climbs: ``(centres, intensities, reached)``."""
  n = seeds.shape[0]
  bw2 = bandwidth * bandwidth
  stop = 1e-3 * bandwidth
  positive = bandwidth > 0
  xv = x.astype(jnp.float32)

  def cond(carry):
    return jnp.any(carry[3])

  def body(carry):
    mean, count, it, active, reached = carry
    within = (_sq_dists(mean, xv) <= bw2) & valid[None, :]
    cnt = jnp.sum(within, axis=1, dtype=jnp.int32)
    sums = jnp.matmul(within.astype(jnp.float32), xv, precision=_HIGHEST)
    new = exact_div(sums, jnp.maximum(cnt, 1).astype(jnp.float32)[:, None])
    new = jnp.where(positive, new, mean)  # bandwidth 0: the seed stays
    shift = jnp.sqrt(jnp.sum((new - mean) ** 2, axis=1))
    has = cnt > 0
    move = active & has
    done = ~has | (shift <= stop) | (it == max_iter)
    mean = jnp.where(move[:, None], new, mean)
    count = jnp.where(move, cnt, count)
    reached = reached | move
    it = jnp.where(active & ~done, it + 1, it)
    return mean, count, it, active & ~done, reached & ~(active & ~has)

  init = (seeds, jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32),
          seed_valid, jnp.zeros((n,), bool))
  mean, count, _, _, reached = lax.while_loop(cond, body, init)
  return mean, count, reached & seed_valid


def _lex_greater(a: Array, b: Array) -> Array:
  """``bool[n, m]``: ``tuple(a_i) > tuple(b_j)`` (Python's tuple order)."""
  gt = jnp.zeros((a.shape[0], b.shape[0]), bool)
  eq = jnp.ones_like(gt)
  for c in range(a.shape[1]):
    ac, bc = a[:, c][:, None], b[:, c][None, :]
    gt = gt | (eq & (ac > bc))
    eq = eq & (ac == bc)
  return gt


def mean_shift(x: Array, bandwidth: Array, valid: Optional[Array] = None, *,
               bin_seeding: bool = True, cluster_all: bool = False,
               max_iter: int = 300) -> MeanShiftResult:
  """scikit-learn's ``MeanShift(bandwidth, bin_seeding, cluster_all, max_iter)``.

  See the module docstring for the steps and the differences.

  Args:
    x: ``f32[n, p]`` finite points.
    bandwidth: ``f32`` scalar >= 0, e.g. from :func:`estimate_bandwidth`.
    valid: optional ``bool[n]``; only these points are clustered.
    bin_seeding: seeds on the grid of cells of side ``bandwidth`` (static).
    cluster_all: label every point with its nearest centre (static).
    max_iter: iterations per seed (static; ``max_iter + 1`` means at most).

  Returns:
    A :class:`MeanShiftResult`.
  """
  if max_iter < 0:
    raise ValueError(f"mean_shift: max_iter must be >= 0, got {max_iter}")
  x, valid = _checked(x, valid)
  n = x.shape[0]
  bandwidth = jnp.maximum(jnp.asarray(bandwidth, jnp.float32), 0.0)
  if bin_seeding:
    seeds, seed_valid = _bin_seeds(x, valid, bandwidth)
  else:
    seeds, seed_valid = x, valid
  centres, count, cand = _climb(x, valid, seeds, seed_valid, bandwidth, max_iter)
  # Exact duplicates: one dict entry (the last seed's, same intensity).
  same = jnp.all(centres[:, None, :] == centres[None, :, :], axis=-1)
  later = jnp.triu(jnp.ones((n, n), bool), k=1)
  cand = cand & ~jnp.any(same & later & cand[None, :], axis=1)
  # Sort by (intensity, centre) descending: rank = number of candidates above.
  above = ((count[:, None] > count[None, :])
           | ((count[:, None] == count[None, :]) & _lex_greater(centres, centres)))
  rank = jnp.sum(above & cand[:, None], axis=0, dtype=jnp.int32)
  slot = jnp.where(cand, rank, n)
  order_centres = jnp.zeros_like(centres).at[slot].set(centres, mode="drop")
  n_cand = jnp.sum(cand, dtype=jnp.int32)
  pos = jnp.arange(n, dtype=jnp.int32)
  bw2 = bandwidth * bandwidth
  near = _sq_dists(order_centres, order_centres) <= bw2

  def sweep(i, unique):
    removes = unique[i] & (i < n_cand)
    return jnp.where(removes, (unique & ~near[i]) | (pos == i), unique)

  unique = lax.fori_loop(0, n, sweep, pos < n_cand)
  label_of = jnp.cumsum(unique, dtype=jnp.int32) - 1
  n_clusters = jnp.sum(unique, dtype=jnp.int32)
  kept = jnp.zeros_like(centres).at[jnp.where(unique, label_of, n)].set(
      order_centres, mode="drop")
  d2 = jnp.where((pos < n_clusters)[None, :], _sq_dists(x, kept), jnp.inf)
  nearest = jnp.argmin(d2, axis=1).astype(jnp.int32)
  ok = valid & (n_clusters > 0)
  if not cluster_all:
    ok = ok & (jnp.sqrt(jnp.min(d2, axis=1)) <= bandwidth)
  labels = jnp.where(ok, nearest, -1).astype(jnp.int32)
  return MeanShiftResult(labels, kept, n_clusters)
