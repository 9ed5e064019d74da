"""SignGuard (Xu et al., "Byzantine-robust Federated Learning through
Collaborative Malicious Gradient Filtering", ICDCS 2022, section IV and
Alg. 1; arXiv:2109.05872).

With ``K`` updates ``g_i`` (``global - local``), each round:

1. Norm-based filtering: ``med`` = the median of the norms ``||g_i||``
   (numpy's median: the mean of the two middle values for even ``K``);
   ``S1 = {i : L * med < ||g_i|| < R * med}``, ``L = 0.1``, ``R = 3.0``.
2. Sign-based clustering: on ``b = max(int(0.1 * d), 1)`` coordinates drawn
   from ``key`` (:func:`selected_coordinates`), each client's fractions of
   positive, zero and negative entries; each of the three columns divided
   by its largest value over the clients plus ``1e-8``. The ``K`` points in
   3-D are clustered by mean shift (:func:`fedjax_sparse.cluster.meanshift.
   mean_shift`, scikit-learn's algorithm inside jit) with scikit-learn's
   ``estimate_bandwidth(X, quantile=0.5, n_samples=50)``, ``bin_seeding=True``,
   ``cluster_all=False``, the setting of the authors' code (github.com/
   JianXu95/SignGuard, ``aggregators/signguard.py``) and of FLPoison.
   ``S2`` = the largest cluster (ties: the lowest label, i.e. numpy's
   ``argmax`` over the cluster sizes, as both codes take it).
   ``clustering="kmeans"`` clusters into two with k-means instead
   (:func:`fedjax_sparse.cluster.kmeans`: 10 k-means++ seedings from ``key``,
   the lowest inertia kept), as Blades does (which takes the fractions over
   all coordinates, unscaled, with scikit-learn's ``KMeans(n_clusters=2)``).
3. ``S = S1 ∩ S2``; if ``S`` is empty, every client with a finite update
   (the authors' code would average an empty set: NaN).
4. Output: the average over ``S`` of the updates clipped to the median norm,
   ``g_i * min(1, med / ||g_i||)`` (Alg. 1, line 12: clipping by the median
   of all the norms, accepted or not).

Choices (ours, each documented where the paper is silent or differs):

* The coordinates are a uniformly random subset of ``b`` distinct
  coordinates (:func:`._common.sample_coordinates`), a fresh one each round
  from ``key``. The authors' code and FLPoison take a random contiguous block
  of ``int(0.1 * d)`` coordinates instead (the block start uniform); a block
  holds one or two layers, a uniform subset samples every layer in
  proportion to its size.
* The average is :func:`~fedjax_sparse.aggregators.base.combine` of the
  clipped accepted updates, weighted by ``weights`` (the paper's plain mean
  over ``S`` is the case of unit weights), FLARE's Alg. 2 when uploads are
  sparse. The sign fractions and norms are taken of the zero-filled dense
  views (as FLAME's cosines): under sparsification a coordinate that a
  client did not upload counts as a zero sign, which is what its upload
  says about that coordinate.
* Rows with inf/nan (absent when ``ctx.finite_uploads``) take no part: they
  are in neither ``S1`` nor ``S2`` (label ``-1``), the median and the column
  maxima are over the other rows, and the bandwidth is estimated from those
  (the authors' code sets NaN entries to 0). A finite row whose norm exceeds
  the f32 range counts as ``+inf`` in the median (norms are computed from
  the rows scaled by their largest entry, :func:`._common.safe_norm`) and,
  if ever averaged, is clipped to 0.
* The clipping threshold is numpy's median, as the norm filter; the
  authors' code clips with ``torch.median``, the lower of the two middle
  norms for even ``K``.
* Bandwidth 0 (every finite client has the same features, e.g. ``K = 1``,
  or identical updates), which scikit-learn refuses: every group of
  identical feature points is one cluster; all identical, one cluster.
* Beyond 50 finite clients the bandwidth comes from the subsample that
  ``estimate_bandwidth`` draws (``RandomState(0)``), tabulated when tracing.
* The features are counts over ``b`` coordinates, i.e. lattice points (on
  a line when no entry is 0), and the bandwidth an average of their
  distances, so a distance can equal the bandwidth in exact arithmetic;
  then the last bit decides, float32 here, float64 in scikit-learn, and the
  clusters may differ (tests/aggregators/test_signguard.py met one such
  round in 15, at K = 8; scikit-learn's own labels there change when the
  bandwidth moves by 1e-6).

Acceptance is 1 for ``S``, 0 otherwise (1 for every finite client when ``S``
was empty). Diagnostics: ``cluster_labels int32[K]`` (-1: no cluster),
``num_clusters``, ``s1_size`` (``|S1|``), ``s2_size`` (``|S2|``),
``median_norm`` (``med``), ``bandwidth`` (0 for k-means) and ``fallback`` (1
when ``S`` was empty).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.flame import median_norm
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.cluster.kmeans import kmeans
from fedjax_sparse.cluster.meanshift import estimate_bandwidth, exact_div, mean_shift

Array = jax.Array

CLUSTERINGS = ("meanshift", "kmeans")


def num_selected(d: int, selection_fraction: float) -> int:
  """``b = max(int(selection_fraction * d), 1)``, at most ``d``."""
  return min(max(int(selection_fraction * d), 1), d)


def selected_coordinates(key: Array, d: int, selection_fraction: float) -> Array:
  """``i32[b]``: the coordinates the sign features are taken on.

  All ``d`` (in order) when ``b = d``, else the uniformly random subset of
  :func:`._common.sample_coordinates` drawn from ``key``, which is the key
  :func:`signguard`'s ``apply`` receives (k-means, if used, folds in 1).
  """
  b = num_selected(d, selection_fraction)
  if b == d:
    return jnp.arange(d, dtype=jnp.int32)
  return _common.sample_coordinates(key, d, b)


def sign_features(updates: Array, cols: Array, ok: Array) -> Array:
  """``f32[K, 3]`` SignGuard's features of the ``ok`` rows on ``cols``.

  Columns: the fractions of positive, zero and negative entries among
  ``updates[:, cols]``, each divided by its largest value over the ``ok``
  rows plus ``1e-8`` (in f32, as the authors' code). Rows that are not
  ``ok`` are 0.
  """
  sub = updates[:, cols]
  b = sub.shape[1]
  counts = jnp.stack([jnp.sum(sub > 0, axis=1), jnp.sum(sub == 0, axis=1),
                      jnp.sum(sub < 0, axis=1)], axis=1)
  frac = exact_div(counts.astype(jnp.float32), jnp.float32(b))
  frac = jnp.where(ok[:, None], frac, 0.0)
  top = jnp.max(frac, axis=0) + jnp.float32(1e-8)
  return jnp.where(ok[:, None], exact_div(frac, top[None, :]), 0.0)


def largest_cluster(labels: Array) -> Array:
  """``bool[K]``: members of the most populous label >= 0 (ties: lowest)."""
  k = labels.shape[0]
  sizes = jnp.sum(labels[None, :] == jnp.arange(k)[:, None], axis=1)
  return (labels == jnp.argmax(sizes)) & (labels >= 0) & (jnp.max(sizes) > 0)


@register("signguard")
def signguard(lower_bound: float = 0.1, upper_bound: float = 3.0,
              selection_fraction: float = 0.1, clustering: str = "meanshift",
              quantile: float = 0.5, n_samples: int = 50) -> Aggregator:
  """SignGuard: norm filter, sign clustering, median-norm clipping.

  Args:
    lower_bound: ``L``; clients with ``||g|| <= L * med`` are filtered out.
    upper_bound: ``R``; clients with ``||g|| >= R * med`` are filtered out.
    selection_fraction: share of the coordinates the sign features use.
    clustering: ``"meanshift"`` (the paper) or ``"kmeans"`` (two clusters,
      as Blades).
    quantile: ``estimate_bandwidth``'s quantile (the paper's code: 0.5).
    n_samples: ``estimate_bandwidth``'s subsample size (the paper's code:
      50).

  Returns:
    An :class:`Aggregator` (stateless; the coordinates are drawn from
    ``key``).
  """
  if not 0 <= lower_bound < upper_bound:
    raise ValueError("signguard: need 0 <= lower_bound < upper_bound, got "
                     f"lower_bound={lower_bound}, upper_bound={upper_bound}")
  if not 0 < selection_fraction <= 1:
    raise ValueError("signguard: selection_fraction must be in (0, 1], got "
                     f"{selection_fraction}")
  if clustering not in CLUSTERINGS:
    raise ValueError(f"signguard: clustering must be one of {CLUSTERINGS}, "
                     f"got {clustering!r}")
  if not 0 <= quantile <= 1 or n_samples < 1:
    raise ValueError("signguard: need quantile in [0, 1] and n_samples >= 1, "
                     f"got quantile={quantile}, n_samples={n_samples}")

  def apply(updates, masks, weights, key, ctx):
    k, d = updates.shape
    ok = _common.usable_rows(updates, ctx)
    norms = jnp.where(ok, _common.safe_norm(updates, axis=1), 0.0)
    # 1. Norm-based filtering.
    med = median_norm(norms, ok)
    s1 = ok & (norms > lower_bound * med) & (norms < upper_bound * med)
    # 2. Sign-based clustering.
    cols = selected_coordinates(key, d, selection_fraction)
    feats = sign_features(updates, cols, ok)
    if clustering == "meanshift":
      bandwidth = estimate_bandwidth(feats, quantile, n_samples, valid=ok)
      result = mean_shift(feats, bandwidth, ok)
      labels, n_clusters = result.labels, result.n_clusters
    elif k == 1:
      bandwidth = jnp.float32(0.0)
      labels = jnp.where(ok, 0, -1).astype(jnp.int32)
      n_clusters = jnp.sum(ok, dtype=jnp.int32)
    else:
      bandwidth = jnp.float32(0.0)
      labels = kmeans(feats, 2, jax.random.fold_in(key, 1), n_init=10,
                      valid=ok)[0]
      n_clusters = jnp.sum(jnp.any(labels[None, :] == jnp.arange(2)[:, None],
                                   axis=1), dtype=jnp.int32)
    s2 = largest_cluster(labels) & ok
    # 3. S = S1 ∩ S2, or every finite client if empty.
    benign = s1 & s2
    fallback = ~jnp.any(benign)
    benign = jnp.where(fallback, ok, benign)
    acceptance = benign.astype(jnp.float32)
    # 4. Mean of the accepted updates clipped to the median norm.
    gamma = jnp.where(norms > med, _common.divide(med, norms), 1.0)
    clipped = updates * gamma[:, None].astype(updates.dtype)
    update = _common.combine_accepted(clipped, masks, weights, acceptance,
                                      ctx.pack_size, ctx.finite_uploads)
    diagnostics = {"cluster_labels": labels, "num_clusters": n_clusters,
                   "s1_size": jnp.sum(s1, dtype=jnp.int32),
                   "s2_size": jnp.sum(s2, dtype=jnp.int32),
                   "median_norm": med, "bandwidth": bandwidth,
                   "fallback": fallback.astype(jnp.int32)}
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply, selection_escape="escape_ratio")
