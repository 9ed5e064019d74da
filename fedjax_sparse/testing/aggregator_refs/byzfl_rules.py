"""ByzFL's rules as plain loops: MDA, MoNNA, Meamed, CAF, SMEA (aggregators)
and ARC (a pre-aggregator).

Rows with inf/nan are "unusable": they are ranked last or weighted 0, as
our rules treat them (tests/aggregators/test_byzfl_rules.py).
"""

from __future__ import annotations

import math

import numpy as np

from fedjax_sparse.testing.aggregator_refs.core import np_sq_dists


def _np_usable(u, dtype):
  """``(rows f[K, d] with unusable rows zeroed, bool[K] rows without inf/nan)``."""
  u = np.asarray(u, dtype)
  ok = np.all(np.isfinite(u), axis=1)
  return np.where(ok[:, None], u, 0), ok


def np_usable_sq_dists(u, dtype=np.float64):
  """``(d2, ok)``: squared distances (``inf`` to and from rows with inf/nan,
  0 on the diagonal) and the usable rows."""
  x, ok = _np_usable(u, dtype)
  d2 = np.full((len(x), len(x)), np.inf, dtype)
  d2[np.ix_(ok, ok)] = np_sq_dists(x[ok], dtype)
  np.fill_diagonal(d2, 0)
  return d2, ok


def _np_first_min(candidates, key):
  """The first candidate of smallest ``key`` (ties to the earlier one)."""
  best, best_key = None, None
  for c in candidates:
    kc = key(c)
    if best is None or kc < best_key:
      best, best_key = c, kc
  return best


def _np_indicator(k, idx, ok):
  sel = np.zeros(k)
  sel[list(idx)] = 1.0
  return np.where(ok, sel, 0.0)


def _np_nearest(d2, i, m):
  """Row ``i`` and its ``m - 1`` nearest rows (distance, then index)."""
  return sorted(range(len(d2)), key=lambda j: (-1.0 if j == i else d2[i, j], j))[:m]


def np_mda(u, f, max_subsets=65536, dtype=np.float64):
  """MDA (El Mhamdi et al., 2020): ``(selection f[K], exact)``.

  Every ``(K - f)``-subset in ``itertools.combinations`` order (or, beyond
  ``max_subsets`` subsets, the ``K`` nearest-neighbour sets), ranked by the
  number of unusable rows, then by the largest squared distance among the
  others; the first best.
  """
  import itertools
  d2, ok = np_usable_sq_dists(u, dtype)
  k = len(d2)
  m = k - f

  def key(s):
    good = [i for i in s if ok[i]]
    diam = d2[np.ix_(good, good)].max() if good else 0.0
    return (len(s) - len(good), diam)

  exact = math.comb(k, m) <= max_subsets
  cands = (itertools.combinations(range(k), m) if exact
           else [_np_nearest(d2, i, m) for i in range(k)])
  return _np_indicator(k, _np_first_min(cands, key), ok), exact


def np_monna(u, f, pivot=0, dtype=np.float64):
  """MoNNA (Farhadkhani et al., 2023): selection ``f[K]`` of the ``K - f``
  nearest rows of the pivot (itself first). ``pivot=None``, or an unusable
  pivot row: the usable row with the smallest ``(K - f)``-th nearest
  distance (the first on ties)."""
  d2, ok = np_usable_sq_dists(u, dtype)
  k = len(d2)
  m = k - f
  centre = _np_first_min(range(k),
                         lambda i: (not ok[i], np.sort(d2[i])[m - 1]))
  p = pivot if pivot is not None and ok[pivot] else centre
  return _np_indicator(k, _np_nearest(d2, p, m), ok)


def np_meamed(u, f):
  """Meamed (Xie et al., 2018): per coordinate, the mean of the finite values
  among the ``K - f`` closest to the median (NaN as ``+inf``; at equal
  distance the smaller value first)."""
  x = np.asarray(u, np.float64)
  k, d = x.shape
  out = np.zeros(d)
  for j in range(d):
    col = np.where(np.isnan(x[:, j]), np.inf, x[:, j])
    s = np.sort(col)
    med = s[(k - 1) // 2] if k % 2 else 0.5 * s[k // 2 - 1] + 0.5 * s[k // 2]

    def dist(v, med=med):
      r = abs(v - med)
      return np.inf if np.isnan(r) else r

    chosen = sorted(col, key=lambda v: (dist(v), v))[:k - f]
    vals = [v for v in chosen if np.isfinite(v)]
    out[j] = np.mean(vals) if vals else 0.0
  return out


def _np_top_eig(g, c):
  """Top eigenpair of the ``c``-weighted covariance from the Gram matrix
  ``g = X X^T``: ``(lambda_max, proj)`` with ``proj_i = <x_i - mu_c, v>``."""
  k = len(g)
  p = c / c.sum()
  centre = np.eye(k) - np.outer(np.ones(k), p)  # rows x_i - mu_c
  a = centre @ g @ centre.T
  sc = np.sqrt(c)
  evals, evecs = np.linalg.eigh(sc[:, None] * a * sc[None, :])
  lam = max(evals[-1], 0.0)
  proj = a @ (sc * evecs[:, -1]) / np.sqrt(lam) if lam > 0 else np.zeros(k)
  return lam / c.sum(), proj


def np_caf(u, f, tau_max_over="active", max_passes=100000, dtype=np.float64):
  """CAF (Allouah et al., 2025): ``(c of the chosen pass, lambda_max)``.

  The loop of the paper with the exact top eigenpair; rows with inf/nan
  start at weight 0. ``tau_max_over="active"`` takes ``tau_max`` over the
  rows still weighted (our rule), ``"all"`` over all rows (ByzFL's loop,
  which also stops when ``tau_max = 0`` gives nan weights). The output is
  ``np_combine(u, None, ones, c)``.
  """
  x, ok = _np_usable(u, dtype)
  k = len(x)
  x = x - x[ok].mean(0) if ok.any() else x
  g = x @ x.T
  c = ok.astype(np.float64)
  best_c, best_lam, passes = c.copy(), np.inf, 0
  while c.sum() > k - 2 * f and passes < max_passes:
    lam, proj = _np_top_eig(g, c)
    passes += 1
    if lam < best_lam:
      best_c, best_lam = c.copy(), lam
    tau = proj ** 2
    tau_max = tau[c > 0].max() if tau_max_over == "active" else tau.max()
    if not tau_max > 0:
      break
    c = c * np.clip(1 - tau / tau_max, 0, 1)
  if passes == 0:
    best_lam = _np_top_eig(g, c)[0] if c.sum() > 0 else 0.0
  return best_c, best_lam


def np_smea(u, f, max_subsets=5000, dtype=np.float64):
  """SMEA (Allouah et al., 2023): ``(selection f[K], exact)``.

  Every ``(K - f)``-subset in ``itertools.combinations`` order, ranked by the
  number of unusable rows, then by the top eigenvalue of its usable rows'
  covariance; the first best. Beyond ``max_subsets`` subsets, ``f`` greedy
  removals by the same ranking (the lower index on ties).
  """
  import itertools
  x, ok = _np_usable(u, dtype)
  k = len(x)
  m = k - f
  x = x - x[ok].mean(0) if ok.any() else x
  g = x @ x.T

  def key(s):
    good = [i for i in s if ok[i]]
    if not good:
      return (len(s), 0.0)
    n = len(good)
    centre = np.eye(n) - 1.0 / n
    lam = np.linalg.eigvalsh(centre @ g[np.ix_(good, good)] @ centre)[-1]
    return (len(s) - n, max(lam, 0.0) / n)

  if math.comb(k, m) <= max_subsets:
    best = _np_first_min(itertools.combinations(range(k), m), key)
    return _np_indicator(k, best, ok), True
  keep = list(range(k))
  for _ in range(f):
    drop = _np_first_min(keep, lambda i: key([j for j in keep if j != i]))
    keep.remove(drop)
  return _np_indicator(k, keep, ok), False


def np_arc(u, f):
  """ARC (Allouah et al., 2024): the ``2 f (K - f) // K`` largest rows
  clipped to the largest norm left (rows with inf/nan: norm ``inf``)."""
  x = np.array(u, np.float64)
  k = len(x)
  n_clip = 2 * f * (k - f) // k
  norms = np.array([np.linalg.norm(r) if np.all(np.isfinite(r)) else np.inf
                    for r in x])
  order = np.argsort(norms, kind="stable")
  bound = norms[order[k - n_clip - 1]]
  for i in order[k - n_clip:]:
    if norms[i] > bound:
      x[i] = x[i] * (bound / norms[i])
  return x
