"""Fixed-shape, jittable HDBSCAN* on a precomputed distance matrix.

HDBSCAN* (Campello, Moulavi and Sander, "Density-based clustering based on
hierarchical density estimates", PAKDD 2013; McInnes, Healy and Astels,
"hdbscan: Hierarchical density based clustering", JOSS 2017) as FLAME's
model filter uses it (Nguyen et al., USENIX Security 2022, section 4.2;
:mod:`fedjax_sparse.aggregators.flame`). For ``n`` up to a few hundred
points, every step is an ``O(n^2)`` computation or a ``lax.fori_loop`` of
``n`` steps over fixed-shape arrays, and reproduces scikit-learn's
``HDBSCAN(metric="precomputed", cluster_selection_method="eom")`` (1.3 and
later) step by step:

1. Core distances: ``core_i`` = the distance from ``i`` to its
   ``min_samples``-th nearest point, ``i`` itself included (row ``i``
   sorted, entry ``min_samples - 1``; scikit-learn's convention: the
   ``hdbscan`` library's ``min_samples = m`` is scikit-learn's ``m + 1``).
2. Mutual reachability: ``mr_ij = max(core_i, core_j, d_ij)``.
3. Minimum spanning tree of ``mr`` by Prim's algorithm from the first
   point, the next point being the lowest index among the closest to the
   tree; like scikit-learn, each edge is recorded as (the point added just
   before, the point added, its distance to the tree), which yields the same
   single-linkage hierarchy as the true tree edges.
4. Single-linkage hierarchy: the edges sorted by weight (a stable sort), then
   merged in that order with a union-find; merge ``i`` creates node
   ``n + i`` with a left child, a right child, a distance and a size.
5. Condensed tree (top-down over the merges, root first): a node whose two
   children both hold at least ``min_cluster_size`` points splits its
   cluster into two new clusters born at ``lambda = 1 / distance``; a child
   below ``min_cluster_size`` falls out of the cluster at that ``lambda``
   with all its points; otherwise the big child continues the cluster.
6. Stability of a cluster ``C``: ``sum over the points and child clusters
   that leave C of (lambda_leave - lambda_birth(C)) * size``; the root is
   born at ``lambda = 0``.
7. Excess of mass: bottom-up, a cluster whose children's (already revised)
   stabilities sum to more than its own is replaced by them (its stability
   becomes that sum); otherwise it is selected and its descendants are not.
   The root is a candidate only with ``allow_single_cluster=True``.
8. Labels: a point gets the selected cluster above the cluster it fell from,
   else noise (``-1``). When the root is the one cluster selected
   (``allow_single_cluster=True``), only the points that left the root at
   its largest ``lambda`` (its smallest distance) belong to it, as in
   scikit-learn's ``_do_labelling``.

Ties: scikit-learn sorts the tree edges with numpy's default (not stable)
``argsort``; here the sort is stable. The two orders differ only between
edges of equal weight, and the labels then only when three or more parts
merge at one distance and the order decides whether a point leaves a
cluster before or after a split. With ``min_samples <= 2`` and distinct
pairwise distances, no two edges of the tree have the same weight; larger
``min_samples`` make ties common (a point's core distance is the weight of
several of its edges), and the partitions agreed with scikit-learn's on
every random matrix that tests/cluster/test_hdbscan.py tried. Distance 0 gives
``lambda = inf``, as in scikit-learn. Clusters are numbered in the order of
their smallest point index (scikit-learn numbers them in the order of its
condensed tree; the partitions are the same).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.cluster._points import checked_points

Array = jax.Array


def hdbscan(dist: Array, min_cluster_size, min_samples=None,
            allow_single_cluster: bool = False,
            valid: Optional[Array] = None) -> Array:
  """HDBSCAN* labels of ``n`` points given their pairwise distances.

  Args:
    dist: ``f32[n, n]`` symmetric distances; NaN counts as ``inf``, the
      diagonal is read as 0.
    min_cluster_size: smallest cluster (at least 2; smaller values count
      as 2); an int or a traced scalar.
    min_samples: neighbours, the point itself included, that define the
      core distance; ``None`` means ``min_cluster_size`` (scikit-learn's
      default); at most ``n``.
    allow_single_cluster: whether the root may be the selected cluster
      (scikit-learn's flag, default False); a Python or traced bool. As in
      scikit-learn, the root can then be a cluster of fewer than
      ``min_cluster_size`` points when there are no more.
    valid: optional ``bool[n]``; invalid points take no part (label ``-1``,
      infinitely far from every point, counted in no cluster size), so that
      a traced subset can be clustered with a fixed shape.

  Returns:
    ``int32[n]`` labels ``0..n_clusters-1`` (in the order of each cluster's
    smallest point index), ``-1`` for noise.
  """
  n, valid = checked_points(dist, valid)
  if n == 1:  # scikit-learn refuses one point; the padded case agrees
    return jnp.where(valid & allow_single_cluster, 0, -1).astype(jnp.int32)
  if min_samples is None:
    min_samples = min_cluster_size
  mcs = jnp.maximum(jnp.asarray(min_cluster_size, jnp.int32), 2)
  idx = jnp.arange(n, dtype=jnp.int32)
  eye = idx[:, None] == idx[None, :]
  pair = valid[:, None] & valid[None, :]
  d = jnp.where(jnp.isnan(dist), jnp.inf, dist).astype(jnp.float32)
  d = jnp.where(eye, 0.0, jnp.where(pair, d, jnp.inf))

  # 1-2. Core distances and mutual reachability.
  ms = jnp.clip(jnp.asarray(min_samples, jnp.int32), 1, n)
  core = jnp.sort(d, axis=1)[:, ms - 1]
  mr = jnp.maximum(jnp.maximum(core[:, None], core[None, :]), d)

  # 3. Prim's algorithm, edges recorded as scikit-learn records them.
  start = jnp.argmax(valid).astype(jnp.int32)

  def prim(i, carry):
    in_tree, reach, current, src, dst, wgt = carry
    in_tree = in_tree.at[current].set(True)
    reach = jnp.where(in_tree, jnp.inf, jnp.minimum(reach, mr[current]))
    best = jnp.min(jnp.where(in_tree, jnp.inf, reach))
    new = jnp.argmax(~in_tree & (reach == best)).astype(jnp.int32)
    return (in_tree, reach, new, src.at[i].set(current), dst.at[i].set(new),
            wgt.at[i].set(best))

  m = n - 1
  zeros_i = jnp.zeros((m,), jnp.int32)
  _, _, _, src, dst, wgt = lax.fori_loop(
      0, m, prim, (jnp.zeros((n,), bool), jnp.full((n,), jnp.inf), start,
                   zeros_i, zeros_i, jnp.zeros((m,), jnp.float32)))

  # 4. Single linkage: sorted edges merged with a union-find.
  order = jnp.argsort(wgt, stable=True)
  src, dst, wgt = src[order], dst[order], wgt[order]
  total = 2 * n - 1
  size0 = jnp.zeros((total,), jnp.int32).at[:n].set(valid.astype(jnp.int32))

  def link(i, carry):
    comp, size, left, right = carry
    a, b = comp[src[i]], comp[dst[i]]
    node = n + i
    size = size.at[node].set(size[a] + size[b])
    comp = jnp.where((comp == a) | (comp == b), node, comp)
    return comp, size, left.at[i].set(a), right.at[i].set(b)

  _, size, left, right = lax.fori_loop(0, m, link,
                                       (idx, size0, zeros_i, zeros_i))

  # 5. Condensed tree. Clusters are named by the node where they start.
  root = total - 1
  none = jnp.full((total,), -1, jnp.int32)

  def condense(t, carry):
    cl, fall_cl, fall_d, parent, birth_d, is_cluster = carry
    i = m - 1 - t
    node, l, r, dist_i = n + i, left[i], right[i], wgt[i]
    own = cl[node]
    alive = own >= 0
    big_l, big_r = size[l] >= mcs, size[r] >= mcs
    split = alive & big_l & big_r
    keep_l = alive & big_l & ~big_r
    keep_r = alive & big_r & ~big_l
    new_l = jnp.where(split, l, jnp.where(keep_l, own, -1))
    new_r = jnp.where(split, r, jnp.where(keep_r, own, -1))
    # A child that is not a cluster falls from this node's cluster here, or
    # keeps what it inherited from a fallen ancestor.
    f_cl = jnp.where(alive, own, fall_cl[node])
    f_d = jnp.where(alive, dist_i, fall_d[node])
    cl = cl.at[l].set(new_l).at[r].set(new_r)
    fall_cl = fall_cl.at[l].set(f_cl).at[r].set(f_cl)
    fall_d = fall_d.at[l].set(f_d).at[r].set(f_d)
    parent = parent.at[l].set(jnp.where(split, own, parent[l]))
    parent = parent.at[r].set(jnp.where(split, own, parent[r]))
    birth_d = birth_d.at[l].set(jnp.where(split, dist_i, birth_d[l]))
    birth_d = birth_d.at[r].set(jnp.where(split, dist_i, birth_d[r]))
    is_cluster = is_cluster.at[l].set(is_cluster[l] | split)
    is_cluster = is_cluster.at[r].set(is_cluster[r] | split)
    return cl, fall_cl, fall_d, parent, birth_d, is_cluster

  cl0 = none.at[root].set(root)
  is_cluster0 = jnp.zeros((total,), bool).at[root].set(True)
  birth_d0 = jnp.full((total,), jnp.inf)
  _, fall_cl, fall_d, parent, birth_d, is_cluster = lax.fori_loop(
      0, m, condense, (cl0, none, jnp.full((total,), jnp.inf), none,
                       birth_d0, is_cluster0))

  # 6. Stability of every cluster (segment sums over the condensed rows).
  def lam(x):
    return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), jnp.inf)

  birth_lam = jnp.where(jnp.arange(total) == root, 0.0, lam(birth_d))
  pt_parent = fall_cl[:n]
  pt_lam = lam(fall_d[:n])
  pt_gain = jnp.where(valid, pt_lam - birth_lam[jnp.maximum(pt_parent, 0)], 0.0)
  child = is_cluster & (parent >= 0)
  cl_gain = jnp.where(child, (birth_lam - birth_lam[jnp.maximum(parent, 0)])
                      * size.astype(jnp.float32), 0.0)
  stab = (jax.ops.segment_sum(pt_gain, jnp.where(valid, pt_parent, root),
                              num_segments=total)
          + jax.ops.segment_sum(cl_gain, jnp.where(child, parent, root),
                                num_segments=total))

  # 7. Excess of mass, bottom-up (a child's node id is below its parent's).
  def eom(i, carry):
    stab, keep = carry
    c = n + i
    cand = is_cluster[c] & ((c != root) | allow_single_cluster)
    sub = jnp.sum(jnp.where(child & (parent == c), stab, 0.0))
    replace = sub > stab[c]
    stab = stab.at[c].set(jnp.where(cand & replace, sub, stab[c]))
    return stab, keep.at[c].set(cand & ~replace)

  _, keep = lax.fori_loop(0, m, eom, (stab, jnp.zeros((total,), bool)))

  # Top-down: selected = kept with no kept ancestor; each cluster's nearest
  # selected ancestor-or-self.
  def select(t, carry):
    blocked, chosen = carry
    c = root - t
    p = jnp.maximum(parent[c], 0)
    has_p = child[c]
    above = has_p & (blocked[p] | keep[p])
    sel = is_cluster[c] & keep[c] & ~above
    chosen = chosen.at[c].set(jnp.where(sel, c, jnp.where(has_p, chosen[p], -1)))
    return blocked.at[c].set(above), chosen

  _, chosen = lax.fori_loop(0, m, select, (jnp.zeros((total,), bool), none))

  # 8. Labels.
  rep = jnp.where(valid, chosen[jnp.maximum(pt_parent, 0)], -1)
  # The root as the single cluster keeps only the points that left it last:
  # lambda >= the largest lambda leaving the root, i.e. distance <= the
  # smallest (compared as distances, which order exactly as scikit-learn's
  # float64 lambdas do).
  root_rows_d = jnp.minimum(
      jnp.min(jnp.where(valid & (pt_parent == root), fall_d[:n], jnp.inf)),
      jnp.min(jnp.where(child & (parent == root), birth_d, jnp.inf)))
  rep = jnp.where((rep == root) & (fall_d[:n] > root_rows_d), -1, rep)
  same = (rep[:, None] == rep[None, :]) & (rep[:, None] >= 0)
  first = jnp.argmax(same, axis=1)
  is_first = (rep >= 0) & (first == idx)
  rank = jnp.cumsum(is_first.astype(jnp.int32)) - 1
  return jnp.where(rep >= 0, rank[first], -1).astype(jnp.int32)
