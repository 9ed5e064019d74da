"""The backdoor defences in numpy: HDBSCAN*, FLAME, FoolsGold and RLR.

:func:`np_hdbscan` walks through fedjax_sparse/cluster/hdbscan.py step by
step; FLAME uses scikit-learn's HDBSCAN
(tests/aggregators/test_backdoor.py, tests/cluster/test_hdbscan.py).
"""

from __future__ import annotations

import numpy as np

from fedjax_sparse.testing.aggregator_refs.core import coord, np_combine


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
