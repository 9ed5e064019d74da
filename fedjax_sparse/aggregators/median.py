"""Coordinate-wise median, CM (Yin et al., 2018; ALGORITHMS.md section 4).

FLARE's "Median" baseline (flare.txt V-B) and the hybrid paper's "CM". Under
sparse uploads the papers take the median of the zero-filled dense vectors
(``mask_aware=False``, the default); ``mask_aware=True`` (ours) takes the
median of each coordinate over the clients whose mask selects it, and 0 where
nobody does (ALGORITHMS.md section 1). The weights are not used: the median is
an unweighted statistic. The order statistic comes from a sorting network
(see :mod:`._order_stats`); NaN sorts as ``+inf``, so with fewer than K/2
non-finite or huge rows the output stays within the range of the others.

Escape ratio (hybrid_sparse_attack.txt section 2.4; ALGORITHMS.md section
7): when ``ctx.malicious`` is given (``bool[K]``, ground truth for
diagnostics only), ``escape_ratio`` is the share of coordinates whose median
comes from a malicious client. For an even count the median averages the two
middle values and a coordinate counts when either of them is malicious; ties
between equal values are credited in proportion (see
:mod:`fedjax_sparse.metrics.escape`). In mask-aware mode the share is over
the coordinates some client selected. The rule computes it with its own
middle order statistics (:func:`median_and_escape`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.metrics import escape

Array = jax.Array


def median_and_escape(x: Array, malicious: Array,
                      contrib: Optional[Array] = None) -> tuple[Array, Array]:
  """``(median f32[d], escape ratio)``; the median as
  :func:`._order_stats.coordinate_median` computes it (same bits).

  The order statistics the escape ratio needs are each computed into their
  own buffer first (see the note in :mod:`.trimmed_mean`). For an odd K the
  median is the one order statistic needed (no extra cost but the counting
  loop); for an even K each middle value is computed into its own buffer
  (its cone of the network runs once more).
  """
  k = x.shape[0]
  if contrib is None:
    lo_pos, hi_pos = (k - 1) // 2, k // 2
    rows = _order_stats.sort_rows(x, (lo_pos, hi_pos))
    if k % 2:
      lo = _order_stats.materialize(rows[lo_pos])
      return lo, escape.median_escape_ratio(x, lo, lo, True, malicious)
    lo = _order_stats.materialize(rows[lo_pos])
    hi = _order_stats.materialize(rows[hi_pos])
    med = _order_stats.materialize(0.5 * lo + 0.5 * hi)
    return med, escape.median_escape_ratio(x, lo, hi, False, malicious)
  filled, count, pad = _order_stats._balanced_infinities(x, contrib)
  window = tuple(range(max(0, (k - 3) // 2), k // 2 + 1))
  rows = _order_stats._sort_filled(filled, window)
  lo = _order_stats.materialize(
      _order_stats._pick(rows, pad + (count - 1) // 2, window))
  hi = _order_stats.materialize(
      _order_stats._pick(rows, pad + count // 2, window))
  med = _order_stats.materialize(jnp.where(count > 0, 0.5 * lo + 0.5 * hi, 0.0))
  return med, escape.median_escape_ratio(x, lo, hi, count % 2 == 1, malicious,
                                         contrib, count)


@register("median")
def median(mask_aware: bool = False) -> Aggregator:
  """Coordinate-wise median.

  Args:
    mask_aware: with masks, the median of each coordinate over its
      contributors only (ours); otherwise over all K zero-filled rows.

  Returns:
    An :class:`Aggregator`; acceptance is all ones (no client is rejected).
    Diagnostics: ``escape_ratio`` when ``ctx.malicious`` is given.
  """

  def apply(updates, masks, weights, key, ctx):
    del weights, key
    contrib = (_common.coordinate_masks(masks, ctx.pack_size, updates.shape[1])
               if mask_aware else None)
    diagnostics = {}
    if ctx.malicious is not None:
      update, diagnostics["escape_ratio"] = median_and_escape(
          updates, ctx.malicious, contrib)
    else:
      update = _order_stats.coordinate_median(updates, contrib)
    acceptance = jnp.ones((updates.shape[0],), jnp.float32)
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply)
