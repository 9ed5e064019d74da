"""Subset selection in distance space for MDA, MoNNA, SMEA and CAF (private).

These rules pick ``K - f`` of the ``K`` updates (or weigh them) from their
pairwise geometry alone, so everything after one pass over the ``f32[K, d]``
updates works on the ``K x K`` squared distances ``D2`` of
:func:`._distances.pairwise_sq_dists`:

* a set's diameter is the largest ``D2`` entry among its members;
* the centred Gram matrix of rows weighted by ``p`` (``sum p = 1``) is
  ``A = -1/2 P D2 P^T`` with ``P = I - 1 p^T`` (classical scaling:
  ``A_ij = <x_i - mu_p, x_j - mu_p>``), so the largest eigenvalue of the
  weighted covariance ``sum_i c_i (x_i - mu)(x_i - mu)^T / sum c`` is that of
  the ``K x K`` matrix ``diag(sqrt c) A diag(sqrt c) / sum c``: exact, in
  ``O(K^3)``, whatever ``d``.

Rows that :func:`._distances.pairwise_sq_dists` marks unusable (``inf`` or
``nan`` entries, or a squared norm beyond ``f32``) are infinitely far from
every row. The subset rules rank candidate sets first by how many unusable
rows they hold and then by their objective over the usable members
(:func:`lexicographic_argmin`): while at least ``K - f`` rows are usable the
chosen set holds none, and beyond that it holds every usable row.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Candidate sets scored per step of :func:`set_diameters` (bounds the
# [chunk, K, K] intermediate).
_CHUNK = 4096


def check_majority(k: int, f: int, name: str) -> None:
  """Raises ValueError unless ``2f < K`` (an honest majority, as ByzFL)."""
  if not 0 <= 2 * f < k:
    raise ValueError(
        f"{name}: needs an honest majority, 2f < K; got K={k}, f={f}: lower f "
        "(--num_byzantine, or the rule's f) or sample more clients per round")


def majority_f(f, ctx, k: int, name: str) -> int:
  """The ``f`` a rule assumes (``f``, or ``ctx.num_byzantine`` for None),
  checked against ``2f < K`` (:func:`check_majority`)."""
  from fedjax_sparse.aggregators import _common
  f_ = _common.resolve_f(f, ctx)
  check_majority(k, f_, name)
  return f_


def check_max_subsets(max_subsets: int, name: str) -> None:
  if isinstance(max_subsets, bool) or not isinstance(max_subsets, int) \
      or max_subsets < 1:
    raise ValueError(f"{name}: max_subsets must be an int >= 1, got "
                     f"{max_subsets!r}")


def exact(k: int, m: int, max_subsets: int) -> bool:
  """Whether the ``C(K, m)`` subsets of size ``m`` are few enough to enumerate."""
  return math.comb(k, m) <= max_subsets


@functools.lru_cache(maxsize=16)
def kept_subsets(k: int, m: int) -> np.ndarray:
  """``i32[C(K, m), m]``: every ``m``-subset of ``range(K)``, in the
  lexicographic order of ``itertools.combinations`` (so that ties go to the
  first subset, as in ByzFL's loops)."""
  out = np.fromiter(itertools.chain.from_iterable(
      itertools.combinations(range(k), m)), np.int32, count=math.comb(k, m) * m)
  return out.reshape(-1, m)


def members_of(idx: np.ndarray, k: int) -> np.ndarray:
  """``bool[N, K]`` membership of the index sets ``idx`` (``[N, m]``)."""
  members = np.zeros((idx.shape[0], k), bool)
  np.put_along_axis(members, idx, True, axis=1)
  return members


def zero_unusable(d2: Array, ok: Array) -> Array:
  """``D2`` with the rows and columns of unusable rows set to 0 (their
  ``inf`` would turn into ``nan`` in products with a zero weight)."""
  return jnp.where(ok[:, None] & ok[None, :], d2, 0.0)


def lexicographic_argmin(primary: Array, secondary: Array) -> Array:
  """Index of the smallest ``secondary`` among the smallest ``primary``
  (the first on ties; ``nan`` counts as ``+inf``)."""
  secondary = jnp.where(jnp.isnan(secondary), jnp.inf, secondary)
  best = primary == jnp.min(primary)
  # An all-inf tie among the best still picks one of them, the first.
  key = jnp.where(best, secondary, jnp.inf)
  fallback = jnp.argmax(best)
  i = jnp.argmin(key)
  return jnp.where(jnp.isfinite(key[i]), i, fallback)


def set_diameters(d2z: Array, members: Array) -> Array:
  """``f32[N]``: the largest squared distance within each member set.

  Args:
    d2z: ``f32[K, K]`` squared distances (unusable rows zeroed).
    members: ``bool[N, K]``.
  """

  def diameter(m):
    return jnp.max(jnp.where(m[:, None] & m[None, :], d2z, 0.0))

  if members.shape[0] <= _CHUNK:
    return jax.vmap(diameter)(members)
  return jax.lax.map(diameter, members, batch_size=_CHUNK)


def neighbourhoods(d2: Array, m: int) -> tuple[Array, Array]:
  """Each row's ``m`` nearest rows, itself first.

  Returns:
    ``(i32[K, m] indices, f32[K] radius2)``: the neighbours of row ``i`` by
    increasing squared distance (ties to the lower index), and the squared
    distance to the farthest of them.
  """
  k = d2.shape[0]
  d2 = jnp.where(jnp.eye(k, dtype=bool), -1.0, d2)  # self first on ties
  order = jnp.argsort(d2, axis=1, stable=True)[:, :m]
  radius2 = jnp.maximum(jnp.take_along_axis(d2, order[:, -1:], axis=1)[:, 0],
                        0.0)
  return order, radius2


def tightest_centre(d2: Array, ok: Array, m: int) -> Array:
  """The usable row whose ``m`` nearest rows lie in the smallest ball (the
  first on ties; row 0 when no row is usable)."""
  _, radius2 = neighbourhoods(d2, m)
  return lexicographic_argmin((~ok).astype(jnp.int32), radius2)


def weighted_top_eig(d2z: Array, c: Array) -> tuple[Array, Array, Array]:
  """Top eigenpair of the ``c``-weighted covariance, in distance space.

  With ``p = c / sum c``, ``A = -1/2 P D2 P^T`` is the Gram matrix of the
  rows centred on ``mu = sum p_i x_i`` and ``M = diag(sqrt c) A diag(sqrt
  c)`` the Gram matrix of ``W = diag(sqrt c)(X - mu)``; the covariance is
  ``W^T W / sum c``, whose top eigenvalue is ``lambda_M / sum c`` and whose
  top eigenvector is ``v = W^T u / sqrt(lambda_M)`` (``u`` that of ``M``).

  Args:
    d2z: ``f32[..., n, n]`` squared distances, no ``inf``.
    c: ``f32[..., n]`` non-negative weights.

  Returns:
    ``(lambda_max f32[...], A f32[..., n, n], proj f32[..., n])`` with
    ``proj_i = <x_i - mu, v>`` (0 when the covariance is 0).
  """
  total = jnp.sum(c, axis=-1, keepdims=True)
  p = c / jnp.where(total > 0, total, 1.0)
  r = jnp.einsum("...ij,...j->...i", d2z, p)
  q = jnp.sum(p * r, axis=-1)[..., None, None]
  a = -0.5 * (d2z - r[..., :, None] - r[..., None, :] + q)
  a = 0.5 * (a + jnp.swapaxes(a, -1, -2))
  sc = jnp.sqrt(c)
  m = sc[..., :, None] * a * sc[..., None, :]
  # Scaled to a unit diagonal maximum: the eigensolver then works on numbers
  # near 1 whatever the spread of the updates.
  scale = jnp.max(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)
  scale = jnp.where(scale > 0, scale, 1.0)
  evals, evecs = jnp.linalg.eigh(m / scale[..., None, None])
  lam, u = jnp.maximum(evals[..., -1], 0.0) * scale, evecs[..., -1]
  proj = jnp.einsum("...ij,...j->...i", a, sc * u)
  proj = jnp.where(lam[..., None] > 0,
                   proj * jax.lax.rsqrt(jnp.where(lam > 0, lam, 1.0))[..., None],
                   0.0)
  return lam / jnp.where(total[..., 0] > 0, total[..., 0], 1.0), a, proj


def top_eigenvalue(d2z: Array, members: Array) -> Array:
  """``f32[...]``: the largest eigenvalue of the empirical covariance
  ``(1/|S|) sum_{i in S} (x_i - mu_S)(x_i - mu_S)^T`` of each member set.

  Args:
    d2z: ``f32[..., n, n]`` squared distances, no ``inf``.
    members: ``bool[..., n]``.
  """
  c = members.astype(d2z.dtype)
  total = jnp.sum(c, axis=-1, keepdims=True)
  p = c / jnp.where(total > 0, total, 1.0)
  r = jnp.einsum("...ij,...j->...i", d2z, p)
  q = jnp.sum(p * r, axis=-1)[..., None, None]
  a = -0.5 * (d2z - r[..., :, None] - r[..., None, :] + q)
  both = members[..., :, None] & members[..., None, :]
  a = jnp.where(both, 0.5 * (a + jnp.swapaxes(a, -1, -2)), 0.0)
  lam = jnp.maximum(jnp.linalg.eigvalsh(a)[..., -1], 0.0)
  return lam / jnp.where(total[..., 0] > 0, total[..., 0], 1.0)


def selection_rule(name: str, select, f, max_subsets: int, score_name: str,
                   score_fn=lambda v: v):
  """The ``apply`` of a rule that averages the ``K - f`` rows ``select``
  chooses (MDA, SMEA): ``select(d2, ok, m, max_subsets) -> (bool/float [K]
  selection, score, exact)``; the selected usable rows are combined with the
  shared aggregation, and the diagnostics hold ``score_fn(score)`` under
  ``score_name`` and ``exact``; the rule's ``selection_escape`` is
  ``escape_ratio``."""
  from fedjax_sparse.aggregators import _distances
  from fedjax_sparse.aggregators.base import AggOut, stateless
  check_max_subsets(max_subsets, name)

  def apply(updates, masks, weights, key, ctx):
    del key
    k = updates.shape[0]
    f_ = majority_f(f, ctx, k, name)
    d2, ok = _distances.pairwise_sq_dists(updates)
    sel, score, is_exact = select(d2, ok, k - f_, max_subsets)
    acceptance = sel * ok.astype(sel.dtype)
    update = _distances.combine_selected(updates, masks, weights, acceptance,
                                         ctx.pack_size, ctx.finite_uploads)
    diagnostics = {score_name: score_fn(score), "exact": jnp.bool_(is_exact)}
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply, selection_escape="escape_ratio")
