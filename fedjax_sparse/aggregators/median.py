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
7): when ``ctx.extra`` carries ``malicious`` (``bool[K]``, for diagnostics
only), ``escape_ratio`` is the share of coordinates whose median comes from
a malicious client. For an even count the median averages the two middle
values and a coordinate counts when either of them is malicious; ties between
equal values are credited in proportion (see :mod:`._escape`). In mask-aware
mode the share is over the coordinates some client selected.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _escape, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register


@register("median")
def median(mask_aware: bool = False) -> Aggregator:
  """Coordinate-wise median.

  Args:
    mask_aware: with masks, the median of each coordinate over its
      contributors only (ours); otherwise over all K zero-filled rows.

  Returns:
    An :class:`Aggregator`; acceptance is all ones (no client is rejected).
    Diagnostics: ``escape_ratio`` when ``ctx.extra`` has ``malicious``.
  """

  def apply(updates, masks, weights, key, ctx):
    del weights, key
    contrib = (_common.coordinate_masks(masks, ctx.pack_size, updates.shape[1])
               if mask_aware else None)
    diagnostics = {}
    if "malicious" in ctx.extra:
      update, diagnostics["escape_ratio"] = _escape.coordinate_median(
          updates, ctx.extra["malicious"], contrib)
    else:
      update = _order_stats.coordinate_median(updates, contrib)
    acceptance = jnp.ones((updates.shape[0],), jnp.float32)
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply)
