"""RFA and Bulyan as published, in numpy.

The geometric median run to convergence, RFA's smoothed Weiszfeld as our
rule runs it, and Bulyan's iterated Krum and mean around the median
(tests/aggregators/test_robust_defs.py).
"""

from __future__ import annotations

import numpy as np

from fedjax_sparse.testing.aggregator_refs.core import np_sq_dists


def np_geometric_median(u, w=None, iters=100000, tol=1e-13):
  """Weighted geometric median in float64, Weiszfeld run to convergence.

  Usable rows: finite with positive weight. Started from their
  coordinate-wise median; stops when a step moves the iterate by less than
  ``tol`` times its scale. Distances are floored at 1e-300 (no smoothing to
  speak of).
  """
  u = np.asarray(u, np.float64)
  w = np.ones(len(u)) if w is None else np.asarray(w, np.float64)
  keep = np.all(np.isfinite(u), axis=1) & (w > 0)
  x, a = u[keep], w[keep] / w[keep].sum()
  z = np.median(x, axis=0)
  for _ in range(iters):
    dist = np.maximum(np.linalg.norm(x - z, axis=1), 1e-300)
    b = a / dist
    z_new = b @ x / b.sum()
    step = np.linalg.norm(z_new - z)
    z = z_new
    if step <= tol * max(1.0, np.abs(z).max()):
      break
  return z


def np_rfa_weiszfeld(u, w, nu=1e-6, max_iter=100, tol=1e-6, init="median",
                     dtype=np.float64):
  """Smoothed Weiszfeld as rules/rfa.py runs it: ``(z, acceptance, steps)``.

  ``beta_i = alpha_i / max(nu, ||z - u_i||)``, ``z = sum beta_i u_i / sum
  beta_i``; stop after ``max_iter`` steps or when ``|g_prev - g| <= tol * g``
  (``tol > 0``), ``g(z) = sum_i alpha_i ||z - u_i||``. Rows with inf/nan or
  weight <= 0 are dropped; ``init`` is the median or weighted mean of the
  others, or zeros.
  """
  u = np.asarray(u, dtype)
  w = np.asarray(w, dtype)
  keep = np.all(np.isfinite(u), axis=1) & (w > 0)
  x = np.where(keep[:, None], u, 0)
  alpha = np.where(keep, w, 0)
  alpha = alpha / alpha.sum()
  if init == "median":
    z = np.median(u[keep], axis=0)
  elif init == "mean":
    z = alpha @ x
  else:
    z = np.zeros(u.shape[1], dtype)

  def dists(z):
    return np.sqrt((((x - z) / max(1.0, np.abs(x).max())) ** 2).sum(1)) * max(
        1.0, np.abs(x).max())

  dist = dists(z)
  obj = (alpha * dist).sum()
  beta = alpha
  steps = 0
  while steps < max_iter:
    beta = alpha / np.maximum(nu, dist)
    z = beta @ x / beta.sum()
    dist = dists(z)
    obj_new = (alpha * dist).sum()
    steps += 1
    done = tol > 0 and abs(obj - obj_new) <= tol * obj_new
    obj = obj_new
    if done:
      break
  return z, beta / beta.sum(), steps


def np_iterated_krum(u, f, dtype=np.float64, rtol=1e-5):
  """Bulyan's stage 1: Krum ``K - 2f`` times on a shrinking pool.

  Krum on a pool of ``n'`` scores each member by its squared distances to
  its ``max(n' - f - 2, 1)`` nearest other members; the lowest score moves
  to the selection. Scores within a relative ``rtol`` of the lowest are
  tied: then the smaller sum of squared distances to the whole pool wins,
  then the lower index. Returns the selection order.
  """
  k = len(u)
  d2 = np_sq_dists(u, dtype)
  d2 = 0.5 * (d2 + d2.T)
  pool = list(range(k))
  selected = []
  for _ in range(k - 2 * f):
    n = len(pool)
    m = max(n - f - 2, 1)
    scores, spreads = [], []
    for i in pool:
      others = sorted(d2[i, j] for j in pool if j != i)
      scores.append(sum(others[:m]))
      spreads.append(sum(others))
    low = min(scores)
    tied = [s <= low + rtol * low for s in scores]
    best = pool[int(np.argmin(np.where(tied, spreads, np.inf)))]
    selected.append(best)
    pool.remove(best)
  return np.array(selected)


def np_mean_around_median(x, beta):
  """Per coordinate, the mean of the ``beta`` values closest to the median
  (literally: a stable sort of ``|x - median|``, the first ``beta``)."""
  med = np.median(x, axis=0)
  idx = np.argsort(np.abs(x - med), axis=0, kind="stable")[:beta]
  return np.take_along_axis(x, idx, axis=0).mean(0)


def np_bulyan(u, f, dtype=np.float64):
  """Bulyan (El Mhamdi et al., 2018): ``(aggregate, selection order)``."""
  sel = np_iterated_krum(u, f, dtype)
  x = np.asarray(u, dtype)[sel]
  return np_mean_around_median(x, len(sel) - 2 * f), sel
