"""Pairwise distances and dense averaging for the Krum family (private).

:func:`pairwise_sq_dists` computes what :func:`._common.pairwise_sq_dists`
computes (squared distances ``g_aa + g_bb - 2 g_ab`` from the Gram matrix of
centred rows, non-finite rows infinitely far away) with fewer passes over
the ``f32[K, d]`` updates, which is what it costs on XLA:CPU:

* The rows are first centred on their mean (one fused pass) and the Gram
  matrix is taken of the centred rows, which are formed inside the Gram
  matrix's column chunks instead of being written out; the squared norms are
  its diagonal, and finiteness is read off that diagonal.
* Centring keeps the f32 cancellation in ``g_aa + g_bb - 2 g_ab`` small
  relative to the distances. The mean is not robust (a few huge rows drag it
  away from the others), so the result is checked: if some row's squared
  norm around the mean exceeds ``1 / TOL`` times its median squared distance
  to the other rows, or a row is not finite, everything is recomputed around
  a central row (:func:`medoid`). ``lax.cond`` runs only the branch taken.

Measured at K = 25, d = 270k on the 2-core dev machine (loaded, calls
interleaved, best of 15): 51 ms with ``_common.pairwise_sq_dists`` (median,
zeroed and centred copies, separate norm and ``isfinite`` passes) and 10.6
ms on the mean path.

The fallback centre was the coordinate-wise median (a sorting network over
the K rows) until 2026-12: at K = 100 its network is one fusion of about 1900
HLO lines, which took about 2 s of the 4-5 s that Krum, Multi-Krum and the
Bulyans compiled for on the loaded 2-core machine (compile time grows
faster than the fusion), although the branch runs only under attack. The
medoid costs one Gram matrix (about the network's run time) and compiles
in a fraction of that. Any centre near the honest rows gives the same
distances up to f32 rounding (they are translation invariant): on the
fallback path Krum scores moved by at most 4e-7 relative and no selection
changed in the tests and benchmarks; the mean path is unchanged.

A row whose squared norm around the centre overflows ``f32`` counts as
non-finite, i.e. it is infinitely far from every other row, as
``_common`` already makes every pair whose distance overflows.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _order_stats

Array = jax.Array

# Relative size of a row's median squared distance to the others below which
# the mean-centred Gram matrix is not trusted (see the module docstring):
# the f32 error of g_aa + g_bb - 2 g_ab is a few ulps of g_aa + g_bb, i.e.
# at most ~1e-5 of the distances that Krum adds up when the check passes.
TOL = 1e-2


# Columns per step of :func:`centred_gram`'s loop.
GRAM_CHUNK = 1024


def _dot_rows(a: Array) -> Array:
  return jax.lax.dot_general(a, a, (((1,), (1,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST)


def centred_gram(updates: Array, centre: Array) -> Array:
  """``f32[K, K]`` Gram matrix of ``updates - centre``, never written out.

  A ``fori_loop`` over column chunks of :data:`GRAM_CHUNK` forms each chunk
  of centred rows and adds its ``[K, K]`` product. Measured on the 2-core
  dev machine (best of 6, interleaved): K = 25, d = 270k in 7.4 ms with
  1024-column chunks (9.8 ms with 4096, 13 ms with 65536, 29 ms for one
  product; ``_common.gram`` of a centred copy, unrolled chunks of 16384: 22
  ms); K = 50: 26 ms (4096: 34 ms, one product: 91 ms); K = 100: 46 ms.
  Unrolling 4096-column chunks instead compiled for 23 s at d = 700k.
  """
  k, d = updates.shape
  n = d // GRAM_CHUNK
  acc = jnp.zeros((k, k), updates.dtype)
  if n:
    def body(i, acc):
      start = i * GRAM_CHUNK
      a = (jax.lax.dynamic_slice_in_dim(updates, start, GRAM_CHUNK, axis=1)
           - jax.lax.dynamic_slice_in_dim(centre, start, GRAM_CHUNK)[None, :])
      return acc + _dot_rows(a)

    acc = jax.lax.fori_loop(0, n, body, acc)
  if n * GRAM_CHUNK < d:
    acc = acc + _dot_rows(updates[:, n * GRAM_CHUNK:] - centre[None, n * GRAM_CHUNK:])
  return acc


def _distances_around(updates: Array, centre: Array) -> tuple[Array, Array]:
  """``(d2 f32[K, K], squared norms f32[K])`` of the rows around ``centre``."""
  g = centred_gram(updates, centre)
  sq = jnp.diag(g)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0), sq


# Columns per product of :func:`_gram` up to :data:`_GRAM_SPLIT_MAX_ROWS` rows.
_GRAM_SPLIT = 8192
_GRAM_SPLIT_MAX_ROWS = 64


def _gram(x: Array) -> Array:
  """``x @ x.T`` in f32 at full precision, no loop.

  Up to 64 rows as a sum of products of 8192-column slices (K = 25, d =
  270k: 7 ms, against 10 ms with :func:`._common.gram`'s 16384 and 24 ms
  for one product); above, one product (K = 100: as fast as the slices).
  """
  k, d = x.shape
  if k > _GRAM_SPLIT_MAX_ROWS or d <= 2 * _GRAM_SPLIT:
    return _dot_rows(x)
  out = None
  for s in range(0, d, _GRAM_SPLIT):
    part = _dot_rows(x[:, s:s + _GRAM_SPLIT])
    out = part if out is None else out + part
  return out


def medoid(updates: Array, ok: Optional[Array] = None) -> Array:
  """``f32[d]``: a central row, the robust centre of the Gram-matrix distances.

  Everything comes from one uncentred Gram matrix of the rows
  (:func:`_gram`: no loop over column chunks). An entry depends on
  its two rows only, so the inf/nan and overflows of some rows stay in their
  own rows and columns. The candidates are the usable rows (finite squared
  norm, and in ``ok`` if given) whose norm is at most twice the (lower)
  median norm of the usable rows; of them, the one with the smallest (lower)
  median squared distance to the other candidates, ties to the lower row
  index. While most rows are honest, the median norm is an honest row's, so
  rows sent far beyond the honest scale (``1e30``, ``1e10``) never take part,
  and the candidates' distances resolve the honest scale up to the f32
  rounding of their norms: the chosen row is within about the honest rows'
  spread of most of them. It is only a centre: the distances around it are
  computed exactly as around the mean, so its own f32 rounding does not
  matter.

  Args:
    updates: ``f32[K, d]``.
    ok: optional ``bool[K]``, the rows that may be chosen and count as
      neighbours (rows outside it may hold anything).

  Returns:
    The chosen row (zeros when no row is usable).
  """
  k = updates.shape[0]
  g = _gram(updates)
  sq = jnp.diag(g)
  usable = jnp.isfinite(sq) if ok is None else ok & jnp.isfinite(sq)
  if k == 1:
    return jnp.where(usable[0], updates[0], 0.0)
  norm2 = jnp.where(usable, sq, jnp.inf)
  n_ok = jnp.sum(usable, dtype=jnp.int32)
  median_norm2 = jnp.sort(norm2)[jnp.maximum(n_ok - 1, 0) // 2]
  cand = usable & (norm2 <= 4.0 * median_norm2)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
  pair = cand[:, None] & cand[None, :] & ~jnp.eye(k, dtype=bool)
  others = jnp.sort(jnp.where(pair, d2, jnp.inf), axis=1)
  n_cand = jnp.sum(cand, dtype=jnp.int32)
  typical = jnp.take(others, jnp.maximum(n_cand - 2, 0) // 2, axis=1)
  r = jnp.argmin(jnp.where(cand, typical, jnp.inf))
  return jnp.where(cand[r], updates[r], 0.0)


def _around_medoid(updates: Array) -> tuple[Array, Array]:
  return _distances_around(updates, medoid(updates))


def pairwise_sq_dists(updates: Array) -> tuple[Array, Array]:
  """``(f32[K, K] squared distances, bool[K] usable rows)``.

  Clamped at 0, diagonal 0. Rows with inf/nan (or whose centred squared norm
  overflows) are infinitely far from every row, and so are pairs whose
  distance overflows.
  """
  k = updates.shape[0]
  eye = jnp.eye(k, dtype=bool)
  mean = _order_stats.sum_rows(updates) / k
  d2, sq = _distances_around(updates, mean)
  # A row's (lower) median squared distance to the other rows.
  others = jnp.sort(jnp.where(eye, jnp.inf, d2), axis=1)
  typical = others[:, (k - 2) // 2] if k > 1 else sq
  trusted = jnp.all(jnp.isfinite(sq) & (typical >= TOL * sq))
  d2, sq = jax.lax.cond(trusted, lambda: (d2, sq),
                        lambda: _around_medoid(updates))
  ok = jnp.isfinite(sq)
  d2 = jnp.where(jnp.isnan(d2), jnp.inf, d2)
  d2 = jnp.where(ok[:, None] & ok[None, :], d2, jnp.inf)
  return jnp.where(eye, 0.0, d2), ok


def combine_selected(updates: Array, masks: Optional[Array], weights: Array,
                     acceptance: Array, pack_size: int,
                     assume_finite: bool = False) -> Array:
  """:func:`._common.combine_accepted`, with one fused loop for dense uploads.

  Dense: ``sum_i a_i w_i u_i / sum_i a_i w_i`` as an unrolled select-and-add
  over the K rows (rows with ``a_i = 0`` never enter, so their inf/nan cannot
  spread), instead of zeroing a copy of the updates and a matrix-vector
  product. Sparse uploads (or K above the sorting-network limit) go through
  ``combine_accepted``.
  """
  k = updates.shape[0]
  if masks is not None or k > _order_stats.MAX_NETWORK_ROWS:
    return _common.combine_accepted(updates, masks, weights, acceptance,
                                    pack_size, assume_finite)
  w = (weights * acceptance).astype(updates.dtype)
  total = jnp.sum(w)
  zero = jnp.zeros((), updates.dtype)
  acc = None
  for i in range(k):
    term = jnp.where(acceptance[i] > 0, w[i] * updates[i], zero)
    acc = term if acc is None else acc + term
  return jnp.where(total > 0, acc / jnp.where(total > 0, total, 1.0), zero)
