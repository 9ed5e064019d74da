"""GAS, DnC, FLTrust, LASA and FLGuardian, in numpy.

The rules that score clients on parts of the update (coordinate groups,
random coordinate subsets, layers) or against a server update
(tests/aggregators/test_extra.py).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import KMeans

from fedjax_sparse.testing.aggregator_refs.core import (
    np_combine, np_krum_scores, np_sq_dists, np_trimmed)


def np_gas(u, w, p, base, f, perm, dtype=np.float64):
  """GAS over the coordinate permutation ``perm``: (update, acceptance, scores)."""
  k, d = u.shape
  size = -(-d // p)
  scores = np.zeros(k)
  for g in range(p):
    cols = perm[g * size:(g + 1) * size]
    if not len(cols):
      continue
    sub = np.asarray(u[:, cols], dtype)
    krum = np_krum_scores(sub, f, dtype)
    if base == "krum":
      agg = sub[np.argmin(krum)]
    else:
      sel = np.argsort(krum, kind="stable")[:k - 2 * f]
      agg = np_trimmed(sub[sel], min(f, (len(sel) - 1) // 2))
    scores += np.linalg.norm(sub - agg, axis=1)
  accept = np.zeros(k)
  accept[np.argsort(scores, kind="stable")[:k - f]] = 1
  return np_combine(u, None, w, accept, 1, dtype), accept, scores


def np_dnc(u, w, f, cols_list, c=1.0, dtype=np.float64):
  k = len(u)
  good = np.ones(k, bool)
  for cols in cols_list:
    sub = np.asarray(u[:, cols], dtype)
    centred = sub - sub.mean(0)
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    scores = (centred @ v) ** 2
    keep = np.zeros(k, bool)
    keep[np.argsort(scores, kind="stable")[:k - int(c * f)]] = True
    good &= keep
  return np_combine(u, None, w, good.astype(float), 1, dtype), good


def np_fltrust(u, g0, dtype=np.float64):
  """(update, trust): ReLU cosine trust, rows rescaled to ||g0||."""
  u = np.asarray(u, dtype)
  g0 = np.asarray(g0, dtype)
  norms = np.linalg.norm(u, axis=1)
  cos = (u @ g0) / (norms * np.linalg.norm(g0))
  trust = np.maximum(cos, 0)
  update = (trust / norms) @ u * (np.linalg.norm(g0) / trust.sum())
  return update, trust


def np_lasa(u, slices, sparsity=0.3, lm=1.0, ld=1.0, dtype=np.float64):
  """(update, acceptance); ``slices``: the layers' slices of the flat vector."""
  u = np.asarray(u, dtype)
  d = u.shape[1]
  norms = np.linalg.norm(u, axis=1)
  med = np.median(norms)
  u = u * np.minimum(1, med / norms)[:, None]
  n_keep = math.ceil(sparsity * d)
  if n_keep < d:
    thr = np.partition(np.abs(u), d - n_keep, axis=1)[:, d - n_keep]
    u = np.where(np.abs(u) >= thr[:, None], u, 0)

  def mz(x):
    return (x - np.median(x)) / x.std() if x.std() > 0 else np.zeros_like(x)

  out, kept_all = [], []
  for sl in slices:
    xl = u[:, sl]
    s = np.sign(xl)
    rho = 0.5 * (1 + s.sum(1) / np.maximum(np.abs(s).sum(1), 1e-30))
    kept = (np.abs(mz(np.linalg.norm(xl, axis=1))) <= lm) & (np.abs(mz(rho)) <= ld)
    if not kept.any():
      kept[:] = True
    out.append(xl[kept].mean(0))
    kept_all.append(kept)
  return np.concatenate(out), np.mean(kept_all, axis=0)


def np_flguardian_trust(u, slices, dtype=np.float64):
  """Per layer: 2-means on cosine and normalised distance; trust = benign share."""
  u = np.asarray(u, dtype)
  benign = []
  for sl in slices:
    xl = u[:, sl]
    n = np.linalg.norm(xl, axis=1)
    cos = xl @ xl.T / (n[:, None] * n[None])
    dist = np.sqrt(np_sq_dists(xl, dtype))
    feats = np.concatenate([cos, dist / dist.max()], axis=1)
    labels = KMeans(n_clusters=2, n_init=10, random_state=0).fit(feats).labels_
    big = np.argmax(np.bincount(labels, minlength=2))
    benign.append(labels == big)
  return np.mean(benign, axis=0)
