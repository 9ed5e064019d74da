"""Mean around median, Meamed (Xie, Koyejo & Gupta, 2018; ByzFL's ``Meamed``).

Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD" (arXiv
1802.10116, 2018), the "mean around median". Per coordinate ``j``, with the
median ``m_j`` of the ``K`` values (the mean of the two middle values for
even ``K``) and ``n = K - f``:

  Meamed_f(u)_j = (1/n) sum of the n values u_ij closest to m_j.

The ``n`` values closest to ``m_j`` are a run of consecutive sorted values
(``{x : |x - m| <= r}`` is an interval), so the rule sorts each coordinate's
``K`` values with the sorting network (:mod:`._order_stats`) and takes, of
the ``f + 1`` windows of ``n`` consecutive sorted values, the one whose
farthest value is closest to ``m_j`` (Bulyan's stage 2 is the same window,
:mod:`.bulyan`). Ties (ours): when the farthest values of two windows are
equally far from ``m_j`` the lower window wins, i.e. of two values at equal
distance on either side of the median the smaller one is averaged; a rule
of values, so the result does not depend on the client order (ByzFL's
``argpartition`` breaks such ties by position).

Conventions: ``f`` is ByzFL's (``ctx.num_byzantine`` by default), ``2f < K``
required (ValueError). Unweighted, as in the paper and ByzFL: the weights are
not used. Under sparse uploads it runs on the zero-filled dense vectors.
Acceptance is all ones (no client is rejected as a whole).

Non-finite values: NaN sorts as ``+inf``, and a non-finite value is never
averaged (ours): the mean is over the finite values of the chosen window (0
when it has none). With at most ``f`` non-finite or far values in a
coordinate the window holds only the others; with fewer than ``K/2`` the
median is finite and the output stays finite. Bound: with at most ``f``
outliers, ``m_j`` lies in the honest values' range ``[lo_j, hi_j]`` and every
averaged value is no farther from ``m_j`` than the farthest honest value, so
``|out_j - m_j| <= hi_j - lo_j``: the output is within twice the honest
bounding box's diagonal of the honest mean.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _order_stats, _subsets
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register

Array = jax.Array


def mean_around_median(x: Array, n: int) -> Array:
  """Per coordinate, the mean of the finite values among the ``n`` closest
  to the median (the lower window on ties).

  Args:
    x: ``f32[K, d]``.
    n: values averaged, ``1 <= n <= K``.

  Returns:
    ``f32[d]``.
  """
  k = x.shape[0]
  if not 1 <= n <= k:
    raise ValueError(f"meamed: n must be in [1, K={k}], got {n}")
  rows = _order_stats.sort_rows(x)
  start, _ = _order_stats.closest_window(rows, n)
  total, count = None, None
  for r, row in enumerate(rows):
    use = (r >= start) & (r < start + n) & jnp.isfinite(row)
    term = jnp.where(use, row, 0.0)
    total = term if total is None else total + term
    count = use.astype(row.dtype) if count is None else count + use
  return _order_stats.materialize(
      jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0))


@register("meamed")
def meamed(f: Optional[int] = None) -> Aggregator:
  """Coordinate-wise mean of the ``K - f`` values closest to the median.

  Args:
    f: Byzantine clients tolerated; ``None`` means ``ctx.num_byzantine``.
      Needs ``2f < K``.

  Returns:
    A stateless :class:`Aggregator`; acceptance is all ones.
  """

  def apply(updates, masks, weights, key, ctx):
    del masks, weights, key
    k = updates.shape[0]
    f_ = _subsets.majority_f(f, ctx, k, "meamed")
    update = mean_around_median(updates, k - f_)
    return AggOut(update, jnp.ones((k,), jnp.float32), {})

  return stateless(apply)
