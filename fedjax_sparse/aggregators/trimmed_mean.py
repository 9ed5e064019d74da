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
section 7): when ``ctx.malicious`` is given (``bool[K]``, ground truth for
diagnostics only), ``escape_ratio`` = malicious values not trimmed /
``(k_m d)`` (mask-aware: over the malicious clients' contributed values);
ties at the trimming boundary are credited in proportion (see
:mod:`fedjax_sparse.metrics.escape`). The rule computes it with its own
lowest and highest kept values (:func:`trimmed_mean_and_escape`).

Layout of the fused computation (the median's and Bulyan's alike): the
rule's value is computed exactly as in :mod:`._order_stats` (same function,
same bits); the order statistics the escape ratio needs are each computed
into their own buffer with :func:`._order_stats.materialize` before the
counting loop reads them. Measured on XLA:CPU (jax 0.10):
``optimization_barrier`` did not keep the sorting network out of the
counting loop's fusion, and once inside it the network was re-evaluated per
use (K = 100, d = 2000: 3 s a call instead of 1 ms); materialising several
statistics in one fusion (a variadic reduce, or a while loop's state) did
the same. A reduction per statistic evaluates its cone of the network once
per coordinate, which costs up to two more passes of the network for the
trimmed mean (lowest and highest kept value). (Bulyan's stage 2 instead
leaves its network's fusion once, see
:func:`fedjax_sparse.metrics.escape.value_and_escape_ratio`: its network is
smaller. For the coordinate-wise median and trimmed mean at K = 100 that
one fusion ran slower (median: 0.16 s against 0.12 s a call) or compiled
for 32 s (trimmed mean: 5.5k lines in one fusion; XLA:CPU's compile time
grows much faster than a fusion's size); packing only their two
materialised order statistics into one complex64 buffer compiled one
network fewer but ran 30-50% slower. So they keep this layout.)
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.metrics import escape

Array = jax.Array


def trimmed_mean_and_escape(x: Array, b: Optional[int], malicious: Array,
                            contrib: Optional[Array] = None,
                            beta: Optional[float] = None
                            ) -> tuple[Array, Array]:
  """``(trimmed mean f32[d], escape ratio)``; the mean as
  :func:`._order_stats.coordinate_trimmed_mean` computes it (same bits)."""
  k = x.shape[0]
  tm = _order_stats.coordinate_trimmed_mean(x, b, contrib, beta)
  if contrib is None:
    rows = _order_stats.sort_rows(x, (b, k - b - 1))
    lo = _order_stats.materialize(rows[b])
    hi = _order_stats.materialize(rows[k - b - 1])
    return tm, escape.trimmed_escape_ratio(x, lo, hi, b, b, malicious)
  filled, count, pad = _order_stats._balanced_infinities(x, contrib)
  rows = _order_stats._sort_filled(filled)
  if beta is not None:
    bj = jnp.floor(beta * count.astype(jnp.float32)).astype(jnp.int32)
  else:
    bj = jnp.full_like(count, b)
  bj = jnp.minimum(bj, jnp.maximum(count - 1, 0) // 2)
  positions = tuple(range(k))
  lo = _order_stats.materialize(_order_stats._pick(rows, pad + bj, positions))
  hi = _order_stats.materialize(
      _order_stats._pick(rows, pad + count - bj - 1, positions))
  return tm, escape.trimmed_escape_ratio(x, lo, hi, bj, bj, malicious, contrib)


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
    when ``ctx.malicious`` is given, ``escape_ratio``.
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
    if ctx.malicious is not None:
      update, diagnostics["escape_ratio"] = trimmed_mean_and_escape(
          updates, b, ctx.malicious, contrib, beta_)
    else:
      update = _order_stats.coordinate_trimmed_mean(updates, b, contrib, beta_)
    acceptance = jnp.ones((k,), jnp.float32)
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply)
