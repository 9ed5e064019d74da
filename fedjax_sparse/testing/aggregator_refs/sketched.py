"""SparseFed and FetchSGD server rounds, in numpy (top-k and count sketch)."""

from __future__ import annotations

import numpy as np


def np_topk_mask(scores, k):
  """Exact top-k by magnitude, ties to the lower index."""
  order = np.argsort(-np.abs(scores), kind="stable")
  mask = np.zeros(len(scores), bool)
  mask[order[:k]] = True
  return mask


def np_sparsefed_round(u, momentum, error, k, rho=0.9):
  """One SparseFed server round without clipping: (delta, momentum, error)."""
  momentum = rho * momentum + u.mean(0)
  error = error + momentum
  sel = np.zeros(len(error), bool)
  sel[np.argpartition(-np.abs(error), k - 1)[:k]] = True
  delta = np.where(sel, error, 0)
  return delta, np.where(sel, 0, momentum), error - delta


def np_fmix32(h):
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def np_fetchsgd_round(u, s_mom, s_err, k, seeds, cols, rho=0.9):
  """One FetchSGD round (count sketch, zeroing the touched cells)."""
  d = u.shape[1]
  rows = len(seeds)
  i = np.arange(d, dtype=np.uint32)
  buckets, signs = [], []
  for j in range(rows):
    buckets.append((np_fmix32(i ^ seeds[j, 0]) % np.uint32(cols)).astype(np.int64))
    signs.append(1.0 - 2.0 * (np_fmix32(i ^ seeds[j, 1]) >> np.uint32(31)).astype(np.float32))
  mean = u.mean(0)
  table = np.stack([np.bincount(buckets[j], weights=signs[j] * mean, minlength=cols)
                    for j in range(rows)])
  s_mom = rho * s_mom + table
  s_err = s_err + s_mom
  est = np.median(np.stack([s_err[j][buckets[j]] * signs[j] for j in range(rows)]), axis=0)
  sel = np.zeros(d, bool)
  sel[np.argpartition(-np.abs(est), k - 1)[:k]] = True
  delta = np.where(sel, est, 0)
  touched = np.zeros((rows, cols), bool)
  for j in range(rows):
    touched[j, buckets[j][sel]] = True
  return delta, np.where(touched, 0, s_mom), np.where(touched, 0, s_err)
