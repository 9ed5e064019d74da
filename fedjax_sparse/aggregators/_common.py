"""Helpers shared by the robust aggregators (private).

Non-finite inputs: a Byzantine client may send ``inf`` or ``nan``. The rules
here never let such a row reach a matrix product with a zero weight
(``0 * inf = nan``): :func:`combine_accepted` zeroes every row that is not
accepted before calling :func:`~fedjax_sparse.aggregators.base.combine`, and
distance computations zero non-finite rows and put them infinitely far away.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _order_stats
from fedjax_sparse.aggregators.base import combine, expand_pack_mask

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def resolve_f(f: Optional[int], ctx) -> int:
  """The number of Byzantine clients a rule assumes: ``f`` or ``ctx.num_byzantine``."""
  f = ctx.num_byzantine if f is None else f
  if f < 0:
    raise ValueError(f"the number of Byzantine clients f must be >= 0, got {f}")
  return int(f)


def finite_rows(updates: Array) -> Array:
  """``bool[K]``: rows without ``inf`` or ``nan``.

  As the row sums of ``updates * 0``: ``0`` for a finite entry, however
  large, ``nan`` for ``inf``/``nan``. One floating-point sum per row runs
  several times faster on XLA:CPU than ``all(isfinite(...))``, a boolean
  reduction (25 x 700k: about 10 ms against 30)."""
  zero = jnp.zeros((), updates.dtype)
  return jnp.isfinite(jnp.sum(updates * zero, axis=1))


def usable_rows(updates: Array, ctx) -> Array:
  """``bool[K]``: the rows a rule may use: all of them when the caller has
  screened non-finite uploads (``ctx.finite_uploads``), else
  :func:`finite_rows`."""
  if ctx.finite_uploads:
    return jnp.ones((updates.shape[0],), bool)
  return finite_rows(updates)


def zero_rows(updates: Array, keep: Array) -> Array:
  """Rows with ``keep`` False set to 0 (also clears their inf/nan)."""
  return jnp.where(keep[:, None], updates, jnp.zeros((), updates.dtype))


def combine_accepted(updates: Array, masks: Optional[Array], weights: Array,
                     acceptance: Array, pack_size: int,
                     assume_finite: bool = False) -> Array:
  """:func:`combine` of the accepted rows, whatever the rejected ones hold.

  ``combine`` multiplies the updates by ``weights * acceptance``, so a
  rejected ``inf``/``nan`` row (``0 * inf = nan``) makes the plain product
  non-finite; :func:`combine_finite` then recomputes without the non-finite
  rows, which leaves out exactly the rejected ones (and any accepted
  non-finite row). Under ``assume_finite`` (``ctx.finite_uploads``) no row
  is non-finite. The rows are not zeroed beforehand: that wrote a copy of
  the ``K x d`` updates every call (Robust-DPFL at 25 x 270k: 20 -> 14 ms),
  and ``0 * x = 0`` for the finite rejected rows gives the same sums, bit
  for bit.
  """
  return combine(updates, masks, weights, acceptance.astype(updates.dtype),
                 pack_size, assume_finite)


def coordinate_masks(masks: Optional[Array], pack_size: int, d: int) -> Optional[Array]:
  """``bool[K, n_packs]`` pack masks -> ``bool[K, d]``, or None."""
  return None if masks is None else expand_pack_mask(masks, pack_size, d)


def divide(x: Array, s: Array) -> Array:
  """``x / s`` (0 where ``s <= 0``) that stays exact-ish for ``s`` up to f32 max.

  XLA:CPU divides through the reciprocal, which is subnormal (flushed to 0)
  for ``s > ~8.5e37``; multiplying twice by ``1/sqrt(s)`` never is.
  """
  pos = s > 0
  root = jax.lax.rsqrt(jnp.where(pos, s, 1.0))
  return jnp.where(pos, (x * root) * root, 0.0)


def safe_norm(x: Array, axis: int = -1) -> Array:
  """Euclidean norm that does not overflow for entries up to f32 max.

  Scales by the largest magnitude first: ``||x|| = s * ||x / s||``. Zero for
  a zero vector; ``inf`` only when the true norm exceeds the f32 range.
  """
  s = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  s = jnp.where(s > 0, s, 1.0)
  # x / s in two steps: XLA:CPU divides through the reciprocal, which is
  # subnormal (flushed to 0) for s > ~8.5e37; 1/sqrt(s) never is.
  root = jax.lax.rsqrt(s)
  y = (x * root) * root
  return jnp.squeeze(s, axis) * jnp.sqrt(jnp.sum(y * y, axis=axis))


# Contraction chunk of :func:`gram` (columns), and the largest K it is used for.
_GRAM_CHUNK = 16384
_GRAM_CHUNK_MAX_ROWS = 64


def gram(a: Array, b: Array) -> Array:
  """``a @ b.T`` for short, wide ``[K, d]`` operands, in f32 at full precision.

  XLA:CPU computed ``[25, 270k] @ [270k, 25]`` in about 25 ms; summing the
  products of 16384-column slices took 6-12 ms (2-core dev machine). For
  more than 64 rows the single product is as fast and is used.
  """
  k, d = a.shape
  if max(k, b.shape[0]) > _GRAM_CHUNK_MAX_ROWS or d <= 2 * _GRAM_CHUNK:
    return jnp.matmul(a, b.T, precision=_HIGHEST)
  out = None
  for s in range(0, d, _GRAM_CHUNK):
    part = jnp.matmul(a[:, s:s + _GRAM_CHUNK], b[:, s:s + _GRAM_CHUNK].T,
                      precision=_HIGHEST)
    out = part if out is None else out + part
  return out


def pairwise_sq_dists(updates: Array) -> Array:
  """``f32[K, K]`` squared Euclidean distances via the Gram matrix.

  ``||a - b||^2 = ||a||^2 + ||b||^2 - 2<a, b>``, clamped at 0, diagonal 0.
  The rows are first centred on their coordinate-wise median: distances are
  translation invariant and centring keeps the norms small, so the f32
  cancellation in the formula stays small relative to the distances even
  when the updates share a large common component; the median (not the
  mean) keeps a few huge rows from dragging the centre away. Rows with
  ``inf``/``nan`` are infinitely far from every other row, and so are pairs
  whose distance overflows f32 (NaN from ``inf - inf`` counts as ``inf``).
  """
  k = updates.shape[0]
  ok = finite_rows(updates)
  x = zero_rows(updates, ok)
  x = x - _order_stats.coordinate_median(x)[None, :]
  g = gram(x, x)
  sq = jnp.sum(x * x, axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
  d2 = jnp.where(jnp.isnan(d2), jnp.inf, d2)
  d2 = jnp.where(ok[:, None] & ok[None, :], d2, jnp.inf)
  return jnp.where(jnp.eye(k, dtype=bool), 0.0, d2)


def check_krum_size(k: int, f: int, name: str) -> None:
  """Raises ValueError unless ``K >= 2f + 3`` (Blanchard et al., 2017).

  Krum's resilience (Blanchard et al., 2017, Prop. 1) needs ``n > 2f + 2``.
  With ``K <= 2f + 2`` the ``K - f - 2`` nearest neighbours of a Byzantine
  update can all be Byzantine: ``f`` copies of one vector score 0 at ``K =
  2f + 1`` and are selected wherever they are.
  """
  if k < 2 * f + 3:
    raise ValueError(
        f"{name}: Krum needs K >= 2f + 3 updates (Blanchard et al., 2017: "
        f"n > 2f + 2, so that K - f - 2 nearest neighbours include an honest "
        f"one); got K={k}, f={f} (K - f - 2 = {k - f - 2}): lower f "
        "(--num_byzantine, or the rule's f) or sample more clients per round")


def krum_scores(d2: Array, n_nearest: int) -> Array:
  """Krum score: sum of the squared distances to the ``n_nearest`` nearest others.

  Blanchard et al. (2017), section 4, with ``n_nearest = K - f - 2``.
  """
  k = d2.shape[0]
  if not 1 <= n_nearest <= k - 1:
    raise ValueError(
        f"Krum needs K - f - 2 >= 1 nearest neighbours (K={k}, K-f-2={n_nearest});"
        " lower f or sample more clients")
  others = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, d2)
  nearest = jnp.sort(others, axis=1)[:, :n_nearest]
  return jnp.sum(nearest, axis=1)


def lowest(scores: Array, m: int) -> Array:
  """``f32[K]`` indicator of the ``m`` lowest scores (stable: lower index wins ties)."""
  k = scores.shape[0]
  scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
  order = jnp.argsort(scores, stable=True)
  return jnp.zeros((k,), jnp.float32).at[order[:m]].set(1.0)


def mix(membership: Array, updates: Array, masks: Optional[Array], weights: Array,
        pack_size: int) -> tuple[Array, Optional[Array], Array]:
  """Group averages for pre-aggregators (bucketing, NNM).

  Row ``g`` of the result averages the clients with ``membership[g, i] > 0``,
  weighted by ``membership[g, i] * weights[i]``; with masks, each pack is
  averaged over the members that selected it (as in FLARE Alg. 2) and the
  group mask is the union of the members' masks. A member with ``inf``/``nan``
  is absent from every group (weight 0, zeroed with ``jnp.where``, its mask
  ignored): one bad coordinate does not spoil the other members' averages.
  A group without any finite member is a NaN row, so the base rule sees it
  as an outlier (and the means leave it out).

  Args:
    membership: ``f32[G, K]`` non-negative group weights.
    updates, masks, weights, pack_size: as in the aggregator contract.

  Returns:
    ``(mixed f32[G, d], mixed masks bool[G, n_packs] or None, group weights
    f32[G])``; a group's weight is the sum of ``membership * weights`` over
    its finite members.
  """
  ok = finite_rows(updates)
  x = zero_rows(updates, ok)
  w_ok = jnp.where(ok, weights, jnp.zeros((), weights.dtype)).astype(x.dtype)
  w = membership * w_ok[None, :]
  empty = ~jnp.any((membership > 0) & ok[None, :], axis=1)
  num = jnp.matmul(w, x, precision=_HIGHEST)
  if masks is None:
    den = jnp.sum(w, axis=1)[:, None]
    mixed_masks = None
  else:
    den_packs = jnp.matmul(w, masks.astype(x.dtype), precision=_HIGHEST)
    den = expand_pack_mask(den_packs, pack_size, x.shape[1])
    mixed_masks = den_packs > 0
  mixed = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  return (jnp.where(empty[:, None], jnp.nan, mixed), mixed_masks,
          membership.astype(x.dtype) @ w_ok)


def sample_coordinates(key: Array, d: int, b: int) -> Array:
  """``i32[b]``: ``b`` distinct coordinates of ``range(d)``, a uniformly random
  subset (``b <= d``), in random order.

  ``jax.random.choice(..., replace=False)`` permutes all ``d`` indices (a sort
  of ``d`` keys: about 1 s at ``d = 700k`` on XLA:CPU). When ``b`` is small
  against ``d`` (``8 b <= d``), this draws ``m`` indices with replacement,
  slightly more than ``b``, and keeps the first ``b`` distinct ones in draw
  order: the first ``b`` distinct values of an i.i.d. uniform sequence are a
  uniformly random ``b``-subset (the order of first occurrences is
  exchangeable). ``m`` leaves room for about twice the expected collisions
  plus ten standard deviations; in the (astronomically rare) draw with fewer
  than ``b`` distinct values, and whenever ``8 b > d``, the subset is the
  ``b`` smallest of ``d`` uniform keys (``lax.top_k``).
  """
  if not 1 <= b <= d:
    raise ValueError(f"sample_coordinates: need 1 <= b <= d, got b={b}, d={d}")
  key_draws, key_keys = jax.random.split(key)

  def by_keys(_):
    u = jax.random.uniform(key_keys, (d,))
    return jax.lax.top_k(-u, b)[1].astype(jnp.int32)

  if 8 * b > d:
    return by_keys(None)
  collisions = b * b / (2.0 * d)
  m = int(b + 2 * collisions + 10 * collisions ** 0.5 + 32)
  draws = jax.random.randint(key_draws, (m,), 0, d, dtype=jnp.int32)
  pos = jnp.arange(m, dtype=jnp.int32)
  first = jnp.full((d,), m, jnp.int32).at[draws].min(pos)
  is_first = first[draws] == pos
  keep = jnp.nonzero(is_first, size=b, fill_value=0)[0]
  return jax.lax.cond(jnp.sum(is_first) >= b, lambda _: draws[keep], by_keys,
                      None)
