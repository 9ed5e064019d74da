"""The shared pieces and the first rules, in numpy.

Coordinate masks (:func:`coord`), the masked weighted mean of FLARE's Alg. 2
(:func:`np_combine`), squared distances through the Gram matrix, and the
coordinate median, trimmed mean, Krum scores, RFA, centered clipping and
SafeSparse (FLARE Alg. 1), with the sign cosine and 1-D 2-means they use
(ALGORITHMS.md sections 2-3).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import DBSCAN


def coord(masks, d, pack_size):
  """``bool[K, n_packs]`` -> ``bool[K, d]`` per-coordinate masks."""
  return np.repeat(masks, pack_size, axis=1)[:, :d]


def np_combine(u, masks, w, a, pack_size, dtype=np.float64):
  """Weighted mean of the accepted rows (FLARE Alg. 2 with masks)."""
  u = np.asarray(u, dtype)
  w = np.asarray(w, dtype) * np.asarray(a, dtype)
  if masks is None:
    return (w @ u) / w.sum() if w.sum() > 0 else np.zeros(u.shape[1], dtype)
  cm = coord(masks, u.shape[1], pack_size)
  num = w @ np.where(cm, u, 0)
  den = w @ cm.astype(dtype)
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0)


def np_median(u, contrib=None):
  if contrib is None:
    return np.median(u, axis=0)
  return np.array([np.median(u[contrib[:, j], j]) if contrib[:, j].any() else 0.0
                   for j in range(u.shape[1])])


def np_trimmed(u, b=None, contrib=None, beta=None):
  if contrib is None:
    s = np.sort(u, axis=0)
    return s[b:len(u) - b].mean(0)
  out = []
  for j in range(u.shape[1]):
    v = np.sort(u[contrib[:, j], j])
    c = len(v)
    bj = math.floor(beta * c) if beta is not None else b
    bj = min(bj, max(c - 1, 0) // 2)
    out.append(v[bj:c - bj].mean() if c else 0.0)
  return np.array(out)


def np_sq_dists(u, dtype=np.float64):
  """``[K, K]`` squared distances ``||a||^2 + ||b||^2 - 2<a, b>`` after centring."""
  u = np.asarray(u, dtype)
  u = u - u.mean(0)
  g = u @ u.T
  sq = np.diag(g)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * g, 0)
  np.fill_diagonal(d2, 0)
  return d2


def np_krum_scores(u, f, dtype=np.float64):
  """Sum of the squared distances to the ``K - f - 2`` nearest others."""
  k = len(u)
  d2 = np_sq_dists(u, dtype)
  np.fill_diagonal(d2, np.inf)
  return np.sort(d2, axis=1)[:, :k - f - 2].sum(1)


def np_rfa(u, w, nu=0.1, iters=3, dtype=np.float64):
  u = np.asarray(u, dtype)
  alpha = w / w.sum()
  v = alpha @ u
  for _ in range(iters):
    beta = alpha / np.maximum(nu, np.linalg.norm(v - u, axis=1))
    v = beta @ u / beta.sum()
  return v


def np_cc(u, v, tau, iters):
  for _ in range(iters):
    z = u - v
    n = np.linalg.norm(z, axis=1)
    v = v + (np.minimum(1, tau / np.maximum(n, 1e-30))[:, None] * z).mean(0)
  return v


def np_sign_cos(s):
  n = np.linalg.norm(s, axis=1)
  g = s @ s.T
  den = n[:, None] * n[None]
  return np.where(den > 0, g / np.where(den > 0, den, 1), 0)


def np_two_means_high(x):
  s = np.sort(x)
  best, thr = np.inf, None
  for t in range(1, len(s)):
    if s[t - 1] == s[t]:
      continue
    sse = ((s[:t] - s[:t].mean()) ** 2).sum() + ((s[t:] - s[t:].mean()) ** 2).sum()
    if sse < best:
      best, thr = sse, s[t]
  return np.ones(len(x), bool) if thr is None else x >= thr


def np_safesparse(u, masks, beta=0.6, gamma=0.2, guard=False, pack_size=1,
                  dtype=np.float64):
  """FLARE Alg. 1 (Jaccard filter, sign cosine on overlaps, DBSCAN); acceptance."""
  k, d = u.shape
  m_packs = np.ones((k, 1), bool) if masks is None else masks
  mf = m_packs.astype(dtype)
  inter = mf @ mf.T
  size = mf.sum(1)
  union = size[:, None] + size[None] - inter
  jac = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
  score = (jac.sum(1) - np.diag(jac)) / (k - 1)
  kept = score >= (score.max() + score.min()) / 2 * beta
  cm = np.ones((k, d), bool) if masks is None else coord(masks, d, pack_size)
  s = (np.sign(u) * cm).astype(dtype)
  g = s @ s.T
  # ||s_i restricted to M_i & M_j||^2 = number of nonzero signs of i inside M_j.
  sq = np.abs(s) @ cm.T.astype(dtype)
  den = np.sqrt(sq * sq.T)
  cos = np.where(den > 0, g / np.where(den > 0, den, 1), 0)
  dist = np.clip(1 - cos, 0.0, 2.0)
  idx = np.flatnonzero(kept)
  m = len(idx)
  clustered = np.zeros(k, bool)
  if m >= 2:
    n = max(1, round(m * gamma))
    sub = dist[np.ix_(idx, idx)]
    kth = [np.sort(np.delete(sub[i], i))[min(n, m - 1) - 1] for i in range(m)]
    eps = float(np.mean(kth))
    labels = DBSCAN(eps=eps, min_samples=n, metric="precomputed").fit(sub).labels_
    inc = labels >= 0
    if guard and 2 * inc.sum() > m:
      largest = np.bincount(labels[inc]).argmax()
      inc = inc & (labels != largest)
    clustered[idx] = inc
  return kept & ~clustered
