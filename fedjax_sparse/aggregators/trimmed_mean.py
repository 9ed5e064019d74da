"""Coordinate-wise trimmed mean, TM (Yin et al., 2018; ALGORITHMS.md section 4).

For every coordinate, drop the ``b`` largest and ``b`` smallest values and
average the rest. ``b = f`` (the number of Byzantine clients, by default
``ctx.num_byzantine``) or ``b = floor(beta * K)`` for a fraction ``beta``
(FLARE/SafeSparse trim 10%: flare.txt V-B, ``beta=0.1``).

Under sparse uploads the papers trim the zero-filled dense vectors
(``mask_aware=False``); ``mask_aware=True`` (ours) trims each coordinate over
its ``c_j`` contributors only, with ``b_j = floor(beta * c_j)`` (or ``b_j =
b``), capped at ``(c_j - 1) // 2`` so that one value is left; coordinates
nobody selected get 0. Weights are not used. NaN sorts as ``+inf``, so up to
``b`` non-finite or huge values per side are trimmed away.

Escape ratio (hybrid_sparse_attack.txt section 2.4, ``e_TM``; ALGORITHMS.md
section 7): when ``ctx.extra`` carries ``malicious`` (``bool[K]``, for
diagnostics only), ``escape_ratio`` = malicious values not trimmed /
``(k_m d)`` (mask-aware: over the malicious clients' contributed values);
ties at the trimming boundary are credited in proportion (see
:mod:`._escape`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _escape, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register


@register("trimmed_mean")
def trimmed_mean(f: Optional[int] = None, beta: Optional[float] = None,
                 mask_aware: bool = False) -> Aggregator:
  """Coordinate-wise trimmed mean.

  Args:
    f: values trimmed per side; ``None`` means ``ctx.num_byzantine``. Ignored
      when ``beta`` is given.
    beta: fraction of the K values trimmed per side, ``0 <= beta < 0.5``.
    mask_aware: trim over each coordinate's contributors only (ours).

  Returns:
    An :class:`Aggregator`; acceptance is all ones. Diagnostics: ``b`` and,
    when ``ctx.extra`` has ``malicious``, ``escape_ratio``.
  """
  if beta is not None and not 0.0 <= beta < 0.5:
    raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")

  def apply(updates, masks, weights, key, ctx):
    del weights, key
    k, d = updates.shape
    b = math.floor(beta * k) if beta is not None else _common.resolve_f(f, ctx)
    if 2 * b >= k:
      raise ValueError(
          f"trimmed_mean: trimming b={b} per side leaves nothing of K={k} values;"
          " need 2b < K (lower f or beta)")
    contrib = (_common.coordinate_masks(masks, ctx.pack_size, d)
               if mask_aware else None)
    beta_ = beta if contrib is not None else None
    diagnostics = {"b": jnp.int32(b)}
    if "malicious" in ctx.extra:
      update, diagnostics["escape_ratio"] = _escape.coordinate_trimmed_mean(
          updates, b, ctx.extra["malicious"], contrib, beta_)
    else:
      update = _order_stats.coordinate_trimmed_mean(updates, b, contrib, beta_)
    acceptance = jnp.ones((k,), jnp.float32)
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply)
