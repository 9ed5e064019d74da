"""Jittable k-means (Lloyd, 1982) and the exact 1-D 2-means of Robust-DPFL.

:func:`kmeans` runs a fixed number of Lloyd iterations from k-means++
(Arthur & Vassilvitskii, 2007) or deterministic farthest-point seeding, with
``n_init`` restarts in parallel (``vmap``) keeping the lowest inertia, as
scikit-learn's ``KMeans`` does.

:func:`two_means_1d` is the two-cluster split of scalar detection scores used
by Robust-DPFL (flare.txt V-B; ALGORITHMS.md section 4). In one dimension the
optimal 2-means partition is a threshold on the sorted values, so it is found
exactly by trying every split (``O(n^2)`` for the small n of a round) instead
of by Lloyd iterations that may stop in a local optimum.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _sq_dists(x: Array, centres: Array) -> Array:
  """``f32[n, k]`` squared distances, computed from differences (small n, k)."""
  diff = x[:, None, :] - centres[None, :, :]
  return jnp.sum(diff * diff, axis=-1)


def _init_centres(x: Array, k: int, key: Array, init: str,
                  valid: Optional[Array] = None) -> Array:
  n = x.shape[0]
  if init == "maximin":
    if valid is None:
      first = jnp.argmax(jnp.sum((x - jnp.mean(x, axis=0)) ** 2, axis=-1))
    else:
      mean = (jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0)
              / jnp.maximum(jnp.sum(valid), 1))
      first = jnp.argmax(jnp.where(valid, jnp.sum((x - mean) ** 2, axis=-1),
                                   -jnp.inf))
  elif valid is None:
    first = jax.random.randint(key, (), 0, n)
  else:
    first = jax.random.choice(key, n, p=valid / jnp.maximum(jnp.sum(valid), 1))
  centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  d2 = jnp.sum((x - x[first]) ** 2, axis=-1)
  if valid is not None:  # invalid points are never chosen
    d2 = jnp.where(valid, d2, 0.0)

  def body(c, carry):
    centres, d2, key = carry
    key, sub = jax.random.split(key)
    if init == "kmeans++":
      total = jnp.sum(d2)
      uniform = (1.0 / n if valid is None
                 else valid / jnp.maximum(jnp.sum(valid), 1))
      probs = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), uniform)
      nxt = jax.random.choice(sub, n, p=probs)
    else:  # farthest point ("farthest", "maximin")
      nxt = jnp.argmax(d2 if valid is None else jnp.where(valid, d2, -1.0))
    centres = centres.at[c].set(x[nxt])
    d2 = jnp.minimum(d2, jnp.sum((x - x[nxt]) ** 2, axis=-1))
    if valid is not None:
      d2 = jnp.where(valid, d2, 0.0)
    return centres, d2, key

  centres, _, _ = lax.fori_loop(1, k, body, (centres, d2, key))
  return centres


def _lloyd(x: Array, centres: Array, num_iters: int,
           valid: Optional[Array] = None):
  k = centres.shape[0]

  def step(_, centres):
    labels = jnp.argmin(_sq_dists(x, centres), axis=1)
    onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)
    if valid is not None:
      onehot = jnp.where(valid[:, None], onehot, 0.0)
    counts = jnp.sum(onehot, axis=0)
    sums = onehot.T @ x
    # An empty cluster keeps its previous centre.
    return jnp.where(counts[:, None] > 0,
                     sums / jnp.maximum(counts, 1.0)[:, None], centres)

  centres = lax.fori_loop(0, num_iters, step, centres)
  d2 = _sq_dists(x, centres)
  labels = jnp.argmin(d2, axis=1).astype(jnp.int32)
  if valid is None:
    inertia = jnp.sum(jnp.min(d2, axis=1))
  else:
    inertia = jnp.sum(jnp.where(valid, jnp.min(d2, axis=1), 0.0))
    labels = jnp.where(valid, labels, -1)
  return labels, centres, inertia


def kmeans(x: Array, k: int, key: Array, num_iters: int = 50,
           init: str = "kmeans++", n_init: int = 1,
           valid: Optional[Array] = None) -> tuple[Array, Array]:
  """k-means clustering of ``n`` points.

  Args:
    x: ``f32[n, p]`` points (``f32[n]`` is taken as ``n`` scalars).
    k: number of clusters (static).
    key: PRNG key for the seeding.
    num_iters: Lloyd iterations (static; runs them all, no early stop).
    init: ``"kmeans++"`` (D^2 sampling), ``"farthest"`` (a random first
      centre, then repeatedly the point farthest from the chosen centres) or
      ``"maximin"`` (the same from the point farthest from the mean: no
      randomness, and the result does not depend on the order of the points
      unless distances tie).
    n_init: independent seedings run in parallel; the lowest inertia wins.
    valid: optional ``bool[n]``: only these points are clustered (fixed
      shapes: the others are never a seed, count in no centre or inertia,
      and get label ``-1``). Rows of ``x`` outside it may hold anything
      finite. With fewer than ``k`` valid points some centres repeat.

  Returns:
    ``(labels int32[n], centres f32[k, p])``.
  """
  if init not in ("kmeans++", "farthest", "maximin"):
    raise ValueError(
        f"init must be 'kmeans++', 'farthest' or 'maximin', got {init!r}")
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 1:
    x = x[:, None]
  chex.assert_rank(x, 2)
  if not 1 <= k <= x.shape[0]:
    raise ValueError(f"k must be in [1, n={x.shape[0]}], got {k}")

  if valid is not None:
    valid = jnp.asarray(valid, bool)
    x = jnp.where(valid[:, None], x, 0.0)

  def run(key):
    return _lloyd(x, _init_centres(x, k, key, init, valid), num_iters, valid)

  labels, centres, inertia = jax.vmap(run)(jax.random.split(key, n_init))
  best = jnp.argmin(inertia)
  return labels[best], centres[best]


def two_means_1d(scores: Array, valid: Optional[Array] = None) -> tuple[Array, Array]:
  """Exact 2-means of scalars: the split of the sorted values with least SSE.

  Scores are divided by their largest finite magnitude first (the partition
  is scale invariant) so that huge scores cannot overflow the squared errors.

  Args:
    scores: ``f32[n]``.
    valid: optional ``bool[n]``; invalid and non-finite scores are left out
      (label ``-1``).

  Returns:
    ``(labels int32[n], centres f32[2])``: label 1 is the cluster with the
    higher mean, 0 the lower, -1 left out. When the valid scores are all equal
    (or fewer than two) every valid score gets label 1 and both centres equal
    their mean.
  """
  scores = jnp.asarray(scores, jnp.float32)
  chex.assert_rank(scores, 1)
  n = scores.shape[0]
  ok = jnp.isfinite(scores)
  if valid is not None:
    ok = ok & valid
  scale = jnp.max(jnp.where(ok, jnp.abs(scores), 0.0))
  scale = jnp.where(scale > 0, scale, 1.0)
  # x / scale in two steps: XLA:CPU divides through the reciprocal, which is
  # subnormal (flushed to 0) for scale > ~8.5e37; 1/sqrt(scale) never is.
  root = jax.lax.rsqrt(scale)
  z = jnp.where(ok, (scores * root) * root, jnp.inf)
  order = jnp.argsort(z)  # invalid (+inf) last
  s = z[order]
  m = jnp.sum(ok, dtype=jnp.int32)
  pos = jnp.arange(n, dtype=jnp.int32)
  is_val = pos < m
  sv = jnp.where(is_val, s, 0.0)
  t = pos[:, None]  # candidate split: left = sorted[:t], t = 1..m-1
  left = (pos[None, :] < t) & is_val[None, :]
  right = (pos[None, :] >= t) & is_val[None, :]
  nl = jnp.sum(left, axis=1)
  nr = jnp.sum(right, axis=1)
  ml = jnp.sum(jnp.where(left, sv[None, :], 0.0), axis=1) / jnp.maximum(nl, 1)
  mr = jnp.sum(jnp.where(right, sv[None, :], 0.0), axis=1) / jnp.maximum(nr, 1)
  sse = (jnp.sum(jnp.where(left, (sv[None, :] - ml[:, None]) ** 2, 0.0), axis=1)
         + jnp.sum(jnp.where(right, (sv[None, :] - mr[:, None]) ** 2, 0.0), axis=1))
  prev = jnp.concatenate([sv[:1], sv[:-1]])
  split_ok = (pos >= 1) & (pos < m) & (prev < sv)  # never split equal values
  sse = jnp.where(split_ok, sse, jnp.inf)
  any_split = jnp.any(split_ok)
  best = jnp.where(any_split, jnp.argmin(sse), 0)
  sorted_labels = jnp.where(is_val, (pos >= best).astype(jnp.int32), -1)
  labels = jnp.zeros((n,), jnp.int32).at[order].set(sorted_labels)
  mean_all = jnp.sum(sv) / jnp.maximum(m, 1)
  lo = jnp.where(any_split, ml[best], mean_all)
  hi = jnp.where(any_split, mr[best], mean_all)
  centres = jnp.stack([lo, hi]) * scale
  return labels, centres
