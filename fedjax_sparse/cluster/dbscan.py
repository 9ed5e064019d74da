"""Fixed-shape, jittable DBSCAN on a precomputed distance matrix.

DBSCAN (Ester et al., 1996) as used by FLARE's sign-similarity step
(flare.txt IV-B2, Alg. 1 line 15; ALGORITHMS.md section 2):

* ``i`` is a core point when at least ``min_samples`` points ``j`` (``i``
  itself included, scikit-learn's convention) have ``dist[i, j] <= eps``;
* clusters are the connected components of the core-core ``eps``-graph,
  found by min-label propagation iterated to a fixed point in a
  ``lax.while_loop`` (at most ``n`` sweeps of ``O(n^2)`` each);
* a non-core point within ``eps`` of a core point is a border point; it joins
  the cluster, among those of its core neighbours, whose smallest core index
  is lowest. scikit-learn expands clusters one at a time in the order of
  their smallest core point and never relabels a point, so this is exactly
  the cluster scikit-learn gives it;
* everything else is noise, label ``-1``.

Clusters are numbered ``0..n_clusters-1`` in the order of their smallest core
point index, which is scikit-learn's numbering, so the labels equal
``sklearn.cluster.DBSCAN(metric="precomputed")``'s (the tests compare core and
noise points; border points agree by the argument above). The numbering
coincides with "order of smallest member index" unless a border point has a
lower index than every core point of its cluster.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.cluster._points import checked_points

Array = jax.Array


def dbscan(dist: Array, eps, min_samples, valid: Optional[Array] = None) -> Array:
  """DBSCAN labels of ``n`` points given their pairwise distances.

  Args:
    dist: ``f32[n, n]`` symmetric distances (NaN counts as infinitely far).
    eps: neighbourhood radius (inclusive), a float or traced scalar.
    min_samples: neighbours, self included, needed to be a core point; an int
      or traced scalar.
    valid: optional ``bool[n]``; invalid points take no part (label ``-1``,
      never anyone's neighbour). Lets callers cluster a traced subset with a
      fixed shape.

  Returns:
    ``int32[n]`` cluster labels ``0..n_clusters-1``, ``-1`` for noise.
  """
  n, valid = checked_points(dist, valid)
  idx = jnp.arange(n, dtype=jnp.int32)
  pair_valid = valid[:, None] & valid[None, :]
  # `dist <= eps` is False for NaN; the diagonal counts whatever it holds.
  within = ((dist <= eps) | (idx[:, None] == idx[None, :])) & pair_valid
  count = jnp.sum(within, axis=1, dtype=jnp.int32)
  core = valid & (count >= min_samples)
  core_adj = within & core[:, None] & core[None, :]
  big = jnp.int32(n)

  def sweep(labels):
    return jnp.min(jnp.where(core_adj, labels[None, :], big), axis=1)

  def cond(carry):
    return carry[1]

  def body(carry):
    labels, _ = carry
    new = sweep(labels)
    return new, jnp.any(new != labels)

  init = jnp.where(core, idx, big)
  comp, _ = lax.while_loop(cond, body, (init, jnp.array(True)))
  # Border points: the lowest component label among core neighbours.
  border = jnp.min(jnp.where(within & core[None, :], comp[None, :], big), axis=1)
  root = jnp.where(core, comp, border)
  # Renumber representatives (the smallest core index of a cluster) 0, 1, ...
  is_rep = core & (comp == idx)
  rank = jnp.cumsum(is_rep.astype(jnp.int32)) - 1
  labels = jnp.where(root < big, rank[jnp.minimum(root, n - 1)], -1)
  return labels.astype(jnp.int32)


def core_points(dist: Array, eps, min_samples, valid: Optional[Array] = None) -> Array:
  """``bool[n]``: the core points of :func:`dbscan` with the same arguments."""
  n = dist.shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  eye = jnp.eye(n, dtype=bool)
  within = ((dist <= eps) | eye) & valid[:, None] & valid[None, :]
  return valid & (jnp.sum(within, axis=1) >= min_samples)
