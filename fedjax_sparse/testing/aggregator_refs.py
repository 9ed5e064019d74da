"""Numpy references of the aggregation rules (test oracles and benchmark baselines).

Each function follows the formulas of ALGORITHMS.md sections 2-4 with plain
numpy (scikit-learn for DBSCAN and k-means). The tests call them on tiny
inputs (``dtype=np.float64``, the default, for exactness); the benchmark
(benchmarks/aggregators.py) calls the same functions at scale with
``dtype=np.float32``, the precision of the jitted rules. Distances go through
Gram matrices so that K up to 100 at d = 700k fits in memory.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import DBSCAN, KMeans


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


# ------------------------------------------------- RFA and Bulyan as published


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


def np_hdbscan(dist, min_cluster_size, min_samples=None,
               allow_single_cluster=False):
  """HDBSCAN* labels, step by step as scikit-learn computes them.

  A plain walk-through of fedjax_sparse/cluster/hdbscan.py (whose docstring
  numbers the steps): core distances, mutual reachability, Prim's tree with
  scikit-learn's edge records, single linkage, condensed tree, stability,
  excess of mass, labels. The only departure from scikit-learn: the tree's
  edges are sorted stably (scikit-learn's default argsort is not stable, which
  changes labels only between edges of equal weight).
  """
  d = np.array(dist, np.float64)
  n = len(d)
  np.fill_diagonal(d, 0.0)
  ms = min_cluster_size if min_samples is None else min_samples
  ms = min(max(ms, 1), n)
  mcs = max(min_cluster_size, 2)
  core = np.sort(d, axis=1)[:, ms - 1]
  mr = np.maximum(np.maximum(core[:, None], core[None, :]), d)

  edges = []
  in_tree = np.zeros(n, bool)
  reach = np.full(n, np.inf)
  current = 0
  for _ in range(n - 1):
    in_tree[current] = True
    reach = np.where(in_tree, np.inf, np.minimum(reach, mr[current]))
    new = min(j for j in range(n) if not in_tree[j]
              and reach[j] == min(reach[~in_tree]))
    edges.append((current, new, reach[new]))
    current = new
  edges.sort(key=lambda e: e[2])

  comp = list(range(n))
  size = [1] * n
  hierarchy = []
  for a, b, w in edges:
    ca, cb = comp[a], comp[b]
    node = n + len(hierarchy)
    hierarchy.append((ca, cb, w))
    size.append(size[ca] + size[cb])
    comp = [node if c in (ca, cb) else c for c in comp]

  root = 2 * n - 2
  owner = {root: root}
  fell = {}
  parent, birth = {root: None}, {root: np.inf}
  for node in range(root, n - 1, -1):
    left, right, w = hierarchy[node - n]
    if node in owner:
      c = owner[node]
      if size[left] >= mcs and size[right] >= mcs:
        for ch in (left, right):
          owner[ch] = ch
          parent[ch], birth[ch] = c, w
      else:
        for ch in (left, right):
          if size[ch] >= mcs:
            owner[ch] = c
          else:
            fell[ch] = (c, w)
    else:
      for ch in (left, right):
        fell[ch] = fell[node]

  def lam(x):
    return np.inf if x == 0 else 1.0 / x

  birth_lam = {c: (0.0 if c == root else lam(birth[c])) for c in parent}
  stab = {c: 0.0 for c in parent}
  for p in range(n):
    c, w = fell[p]
    stab[c] += lam(w) - birth_lam[c]
  for c in parent:
    if parent[c] is not None:
      stab[parent[c]] += (birth_lam[c] - birth_lam[parent[c]]) * size[c]

  children = {c: [x for x in parent if parent[x] == c] for c in parent}
  keep = {}
  for c in sorted(parent):
    if c == root and not allow_single_cluster:
      keep[c] = False
      continue
    sub = sum(stab[x] for x in children[c])
    keep[c] = not sub > stab[c]
    if not keep[c]:
      stab[c] = sub

  def chosen(c):
    path = []
    while c is not None:
      path.append(c)
      c = parent[c]
    kept = [x for x in reversed(path) if keep[x]]
    return kept[0] if kept else None

  reps = [chosen(fell[p][0]) for p in range(n)]
  if root in reps:
    last = min([w for c, w in fell.values() if c == root]
               + [birth[c] for c in parent if parent[c] == root])
    reps = [r if r != root or fell[p][1] <= last else None
            for p, r in enumerate(reps)]
  names = {}
  for r in reps:
    if r is not None and r not in names:
      names[r] = len(names)
  return np.array([-1 if r is None else names[r] for r in reps])


def np_cosine_distances(u, dtype=np.float64):
  """``1 - cos(u_i, u_j)`` (0 similarity for a zero row), clipped to [0, 2]."""
  u = np.asarray(u, dtype)
  n = np.linalg.norm(u, axis=1)
  x = u / np.where(n > 0, n, 1)[:, None]
  return np.clip(1 - x @ x.T, 0.0, 2.0)


def np_flame(u, w, lamb=0.0, min_samples=2, noise=None, masks=None,
             pack_size=1, dist=None, dtype=np.float64):
  """FLAME (Nguyen et al., 2022, Alg. 1): ``(update, acceptance, S_t)``.

  scikit-learn's HDBSCAN on the cosine distances (``dist``, or
  :func:`np_cosine_distances` of ``u``; ``min_cluster_size = K//2 + 1``,
  ``allow_single_cluster=True``), clipping of the kept rows to the median
  norm, weighted mean (FLARE's Alg. 2 with ``masks``), plus
  ``lamb * S_t * noise``.
  """
  from sklearn.cluster import HDBSCAN
  u = np.asarray(u, dtype)
  k = len(u)
  if k == 1:
    kept = np.ones(1, bool)
  else:
    if dist is None:
      dist = np_cosine_distances(u, dtype)
    labels = HDBSCAN(metric="precomputed", min_cluster_size=max(k // 2 + 1, 2),
                     min_samples=min(min_samples, k), allow_single_cluster=True,
                     copy=True).fit(np.asarray(dist, np.float64)).labels_
    kept = labels >= 0
  norms = np.linalg.norm(u, axis=1)
  s_t = np.median(norms)
  gamma = np.where(norms > s_t, s_t / np.where(norms > 0, norms, 1), 1.0)
  out = np_combine(u * gamma[:, None], masks, w, kept.astype(dtype),
                   pack_size, dtype)
  if noise is not None:
    out = out + lamb * s_t * np.asarray(noise, dtype)
  return out, kept.astype(dtype), s_t


def np_foolsgold(history, u, w, kappa=1.0, dtype=np.float64):
  """FoolsGold (Fung et al., 2020, Alg. 1) on the updated histories.

  Returns ``(update, alpha)``: the authors' reference code
  (DistributedSystemsGroup/FoolsGold) step by step, with the history rows
  ``history`` (already holding this round's updates).
  """
  h = np.asarray(history, dtype)
  k = len(h)
  n = np.linalg.norm(h, axis=1)
  x = h / np.where(n > 0, n, 1)[:, None]
  cs = x @ x.T - np.eye(k)
  maxcs = cs.max(1)
  for i in range(k):
    for j in range(k):
      if i != j and maxcs[i] < maxcs[j]:
        cs[i, j] *= maxcs[i] / maxcs[j]
  wv = np.clip(1 - cs.max(1), 0, 1)
  if wv.max() > 0:
    wv = wv / wv.max()
  wv[wv == 1] = 0.99
  with np.errstate(divide="ignore"):
    wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
  wv = np.clip(np.nan_to_num(wv, nan=0.0, posinf=1.0, neginf=0.0), 0, 1)
  return np_combine(u, None, w, wv, 1, dtype), wv


def np_rlr(u, masks, w, theta, eta=1.0, pack_size=1, dtype=np.float64):
  """RLR (Ozdayi et al., 2021): ``eta * sign_lr * weighted mean``.

  ``sign_lr = 1`` where ``|sum_i sign(u_i)| >= theta`` over the clients that
  sent the coordinate, else ``-1``; the mean is FLARE's Alg. 2 with masks.
  """
  u = np.asarray(u, dtype)
  k, d = u.shape
  s = np.sign(u)
  if masks is not None:
    s = s * coord(masks, d, pack_size)
  votes = np.abs(s.sum(0))
  lr = np.where(votes >= theta, eta, -eta).astype(dtype)
  return lr * np_combine(u, masks, w, np.ones(k), pack_size, dtype)


# ------------------------------------------- ByzFL's rules: MDA, MoNNA, Meamed,
# CAF, SMEA (aggregators) and ARC (a pre-aggregator), as plain loops.


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
