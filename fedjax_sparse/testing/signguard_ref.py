"""Numpy + scikit-learn reference of SignGuard (test oracle).

Follows Alg. 1 of Xu et al. (ICDCS 2022) as the authors' code runs it
(``sklearn.cluster.estimate_bandwidth`` and ``MeanShift``), with the
choices of :mod:`fedjax_sparse.aggregators.signguard` that the paper leaves
open: the coordinates are given (``cols``), rows with inf/nan take no part,
an empty ``S`` falls back to every finite row, the mean is weighted and
sparse-aware (FLARE Alg. 2), and bandwidth 0 (which scikit-learn refuses)
makes each group of identical feature points a cluster. Norms and the mean
are float64; the sign features are float32, as in the authors' code.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn.cluster import KMeans, MeanShift, estimate_bandwidth

from fedjax_sparse.testing.aggregator_refs import np_combine


def sign_features(updates, cols, ok) -> np.ndarray:
  """``f32[K, 3]``: scaled fractions of positive, zero, negative entries."""
  sub = np.asarray(updates)[:, np.asarray(cols)]
  b = np.float32(sub.shape[1])
  frac = np.stack([(sub > 0).sum(1), (sub == 0).sum(1), (sub < 0).sum(1)],
                  axis=1).astype(np.float32) / b
  frac = np.where(ok[:, None], frac, np.float32(0))
  feats = frac / (frac.max(axis=0) + np.float32(1e-8))
  return np.where(ok[:, None], feats, np.float32(0)).astype(np.float32)


def _identical_groups(x: np.ndarray) -> np.ndarray:
  """Bandwidth 0: one cluster per distinct point, by (size, point) descending."""
  keys = [tuple(row) for row in x.tolist()]
  sizes = {key: keys.count(key) for key in keys}
  order = sorted(sizes, key=lambda key: (sizes[key], key), reverse=True)
  return np.array([order.index(key) for key in keys], int)


def cluster_labels(feats: np.ndarray, ok: np.ndarray, clustering: str,
                   quantile: float, n_samples: int,
                   bandwidth_scale: float = 1.0) -> tuple[np.ndarray, float]:
  """``(labels int[K], bandwidth)`` of the ``ok`` rows (-1 elsewhere).

  ``bandwidth_scale`` multiplies the estimated bandwidth (tests use
  ``1 +- 1e-6`` to tell float ties from errors: the sign features lie on a
  lattice, so a distance can equal the bandwidth in exact arithmetic and
  the last bit of either decides).
  """
  labels = np.full(len(feats), -1, int)
  x = feats[ok]
  if len(x) == 0:
    return labels, 0.0
  if clustering == "kmeans":
    if len(x) == 1:
      labels[ok] = 0
    else:
      labels[ok] = KMeans(n_clusters=2, random_state=0, n_init=10).fit(x).labels_
    return labels, 0.0
  bandwidth = float(estimate_bandwidth(x, quantile=quantile,
                                       n_samples=n_samples)) * bandwidth_scale
  if bandwidth == 0.0:
    labels[ok] = _identical_groups(x)
  else:
    labels[ok] = MeanShift(bandwidth=bandwidth, bin_seeding=True,
                           cluster_all=False).fit(x).labels_
  return labels, bandwidth


def clipped_mean(updates, masks: Optional[np.ndarray], weights, benign,
                 median_norm: float, pack_size: int = 1) -> np.ndarray:
  """Step 4: the mean of the ``benign`` rows clipped to ``median_norm``."""
  u = np.asarray(updates, np.float64)
  benign = np.asarray(benign, bool)
  norms = np.linalg.norm(np.where(benign[:, None], u, 0.0), axis=1)
  gamma = np.where(norms > median_norm,
                   median_norm / np.where(norms > 0, norms, 1.0), 1.0)
  clipped = np.where(benign[:, None], u * gamma[:, None], 0.0)
  return np_combine(clipped, masks, weights, benign.astype(np.float64),
                    pack_size)


def signguard_ref(updates, masks: Optional[np.ndarray], weights, cols,
                  pack_size: int = 1, lower_bound: float = 0.1,
                  upper_bound: float = 3.0, clustering: str = "meanshift",
                  quantile: float = 0.5, n_samples: int = 50,
                  bandwidth_scale: float = 1.0) -> dict:
  """SignGuard on the coordinates ``cols`` (``bandwidth_scale``: see
  :func:`cluster_labels`).

  Returns:
    ``{"update": f64[d], "acceptance": f64[K], "labels": int[K], "s1":
    bool[K], "s2": bool[K], "median_norm": float, "bandwidth": float,
    "fallback": bool}``.
  """
  u32 = np.asarray(updates, np.float32)
  u = u32.astype(np.float64)
  ok = np.isfinite(u).all(axis=1)
  norms = np.where(ok, np.linalg.norm(np.where(ok[:, None], u, 0.0), axis=1), 0.0)
  med = float(np.median(norms[ok])) if ok.any() else 0.0
  s1 = ok & (norms > lower_bound * med) & (norms < upper_bound * med)
  feats = sign_features(u32, cols, ok)
  labels, bandwidth = cluster_labels(feats, ok, clustering, quantile, n_samples,
                                     bandwidth_scale)
  sizes = [np.sum(labels == c) for c in range(labels.max() + 1)]
  s2 = (labels == int(np.argmax(sizes))) & ok if sizes else np.zeros_like(ok)
  benign = s1 & s2
  fallback = not benign.any()
  if fallback:
    benign = ok
  update = clipped_mean(u, masks, weights, benign, med, pack_size)
  return {"update": update, "acceptance": benign.astype(np.float64),
          "labels": labels, "s1": s1, "s2": s2, "median_norm": med,
          "bandwidth": bandwidth, "fallback": fallback}
