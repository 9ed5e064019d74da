"""Escape ratios (hybrid_sparse_attack.txt section 2.4; ALGORITHMS.md section 7).

The escape ratio measures how much of the malicious input passes a rule's
elimination stage:

* selection rules (Krum, Multi-Krum, Bulyan's first stage, ...): the share of
  the malicious clients selected, ``k_m^sel / k_m``
  (:func:`selection_escape_ratio`, from the rule's acceptance; the round step
  computes it for every rule whose
  :attr:`~fedjax_sparse.aggregators.Aggregator.selection_escape` names it);
* trimmed mean: malicious values not trimmed over all malicious values,
  ``sum_j n_j^m / (k_m d)`` (:func:`trimmed_escape_ratio`);
* coordinate median: the share of coordinates whose median comes from a
  malicious client, ``sum_j n_j^m / d`` with ``n_j^m in {0, 1}``
  (:func:`median_escape_ratio`).

The malicious flags are ground truth (``RoundContext.malicious``), for these
diagnostics only; they never enter a rule's decision. The coordinate-wise
ratios need per-coordinate order statistics that only the rule has, so the
rule calls them with its lowest and highest kept values (or its middle
values), and they count in one fused pass over the ``K`` rows instead of
carrying a permutation through the sorting network.

Ties (ours): order statistics do not say which of several equal values was
kept. A value strictly between the lowest and the highest kept value is kept;
of a group of ``n`` equal values at a boundary, of which ``m`` are malicious,
``t`` are kept, and the malicious clients are credited ``m t / n`` (the
expected count when ties are broken uniformly at random). Without ties this
is the exact count. The median is credited the same way: a middle slot whose
value is shared by ``n`` clients, ``m`` of them malicious, comes from a
malicious client with probability ``m / n``; for an even number of values the
median averages two slots and a coordinate counts when either slot is
malicious: ``1 - (1 - m_lo/n_lo)(1 - m_hi/n_hi)`` for two different values,
``1 - (n-m)(n-m-1) / (n(n-1))`` when both slots hold the same value. NaN
counts as ``+inf``, as in the rules' order statistics. With no malicious
value (or no coordinate) the ratio is 0.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# A cycle through the package __init__s (the rules import this module), safe
# because neither side uses the other at import time.
from fedjax_sparse.aggregators import _order_stats

Array = jax.Array


# Counts of up to 255 rows fit in 8 bits: four counts share one uint32 sum.
_FIELD_BITS = 8
_MAX_PACKED_ROWS = (1 << _FIELD_BITS) - 1


def _field_counts(x: Array, valid: Optional[Array], preds, fields) -> list[Array]:
  """Per-coordinate counts over the K rows, in one fused loop.

  Args:
    x: ``f32[K, d]``; NaN is compared as ``+inf``.
    valid: optional ``bool[K, d]``: only valid values are counted.
    preds: functions ``v f32[d] -> bool[d]`` of a row's values.
    fields: ``(pred index, bool[K] or None)``: field ``f`` counts the valid
      values of the rows ``i`` with ``rows[i]`` (all rows for None) where the
      predicate holds.

  Returns:
    One ``f32[d]`` count per field.

  Up to :data:`_MAX_PACKED_ROWS` rows, four counts are packed into the 8-bit
  fields of one ``uint32`` sum, with a per-row code per predicate that says
  which fields it increments: at K = 100, d = 270k the median's four counts
  took 24 ms instead of 43 ms for four ``f32`` sums (sum of the rows: 10 ms).
  """
  k = x.shape[0]
  u32 = jnp.uint32
  packed = k <= _MAX_PACKED_ROWS
  per_acc = 32 // _FIELD_BITS if packed else 1
  n_acc = -(-len(fields) // per_acc)
  # codes[a][p]: uint32[K] (packed) or f32[K], what predicate p adds to sum a.
  codes = [[None] * len(preds) for _ in range(n_acc)]
  for f, (p, rows) in enumerate(fields):
    a, slot = divmod(f, per_acc)
    on = jnp.ones((k,), bool) if rows is None else rows
    if packed:
      c = jnp.where(on, u32(1 << (_FIELD_BITS * slot)), u32(0))
    else:
      c = on.astype(jnp.float32)
    codes[a][p] = c if codes[a][p] is None else codes[a][p] + c
  # Computed once into their own buffers: fused into the loop (as XLA did
  # for K < 16) they were recomputed for every coordinate, 5-18x slower.
  codes = [[None if c is None else _order_stats.materialize(c) for c in row]
           for row in codes]
  zero = u32(0) if packed else jnp.float32(0)
  sums = [None] * n_acc
  for i in range(k):
    v = _order_stats.nan_to_inf(x[i])
    hold = [pred(v) for pred in preds]
    if valid is not None:
      hold = [h & valid[i] for h in hold]
    for a in range(n_acc):
      term = None
      for p, c in enumerate(codes[a]):
        if c is None:
          continue
        t = jnp.where(hold[p], c[i], zero)
        term = t if term is None else term + t
      sums[a] = term if sums[a] is None else sums[a] + term
  out = []
  for f in range(len(fields)):
    a, slot = divmod(f, per_acc)
    if packed:
      field = (sums[a] >> u32(_FIELD_BITS * slot)) & u32(_MAX_PACKED_ROWS)
      out.append(field.astype(jnp.float32))
    else:
      out.append(sums[a])
  return out


def _dense_trimmed_counts(x: Array, lo: Array, hi: Array,
                          malicious: Array) -> list[Array]:
  """The counts of :func:`trimmed_escape_parts` for dense values, in one fused loop.

  Per coordinate, over the ``K <= 255`` rows: values ``<= lo``, ``== lo``,
  ``>= hi``, ``== hi``; of the malicious rows: values strictly between ``lo``
  and ``hi``, ``== lo``, ``== hi`` (NaN compared as ``+inf``). The integers
  of :func:`_field_counts` (``<= lo`` is its ``< lo`` plus ``== lo``), packed
  four to a ``uint32`` sum by shifts of the predicates, not a select per field:
  about half the HLO per row (at K = 60 the loop was 4.4k lines, most of
  Bulyan's escape-ratio compile time at K = 100).

  Returns:
    Seven ``f32[d]`` counts in that order.
  """
  u32 = jnp.uint32
  mal = malicious.astype(u32)
  every = malicious_part = None
  for i in range(x.shape[0]):
    v = _order_stats.nan_to_inf(jax.lax.index_in_dim(x, i, keepdims=False))
    le_lo, eq_lo = (v <= lo).astype(u32), (v == lo).astype(u32)
    ge_hi, eq_hi = (v >= hi).astype(u32), (v == hi).astype(u32)
    inside = ((v > lo) & (v < hi)).astype(u32)
    a = le_lo | (eq_lo << 8) | (ge_hi << 16) | (eq_hi << 24)
    b = (inside | (eq_lo << 8) | (eq_hi << 16)) * mal[i]
    every = a if every is None else every + a
    malicious_part = b if malicious_part is None else malicious_part + b
  mask = u32(_MAX_PACKED_ROWS)
  fields = [(every >> u32(s)) & mask for s in (0, 8, 16, 24)]
  fields += [(malicious_part >> u32(s)) & mask for s in (0, 8, 16)]
  return [f.astype(jnp.float32) for f in fields]


def _total(per_coordinate: Array) -> Array:
  """Sum of an ``f32[d]`` vector computed by a fused loop over the K rows.

  The vector is materialised first: a reduction that fused the whole loop
  over the rows as its input ran 20x slower on XLA:CPU (29 ms instead of
  1.4 ms at K = 25, d = 270k); see
  :func:`fedjax_sparse.aggregators._order_stats.materialize`. Only one vector
  at a time: materialising a stack of several made XLA compute the loop once
  per stacked operand.
  """
  return jnp.sum(_order_stats.materialize(per_coordinate))


def _ratio(num: Array, den: Array) -> Array:
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def selection_escape_ratio(accepted: Array, malicious: Array) -> Array:
  """Share of the malicious clients accepted: ``k_m^sel / k_m`` (0 if ``k_m = 0``).

  Args:
    accepted: ``f32[K]`` acceptance (a client counts when it is > 0).
    malicious: ``bool[K]``.
  """
  mal = jnp.asarray(malicious).astype(jnp.float32)
  return _ratio(jnp.sum(mal * (jnp.asarray(accepted) > 0)), jnp.sum(mal))


def trimmed_escape_ratio(x: Array, lo: Array, hi: Array, n_low, n_high,
                         malicious: Array,
                         valid: Optional[Array] = None) -> Array:
  """Escape ratio of a trimmed mean: malicious values kept / malicious values.

  :func:`trimmed_escape_parts` (its arguments and conventions), summed over
  the coordinates.
  """
  kept, den = trimmed_escape_parts(x, lo, hi, n_low, n_high, malicious, valid)
  return _ratio(_total(kept), den)


def trimmed_escape_parts(x: Array, lo: Array, hi: Array, n_low, n_high,
                         malicious: Array, valid: Optional[Array] = None
                         ) -> tuple[Array, Array]:
  """Per-coordinate numerator and denominator of :func:`trimmed_escape_ratio`.

  Per coordinate ``j`` the kept values are the ranks ``n_low .. n_j -
  n_high - 1`` of the ``n_j`` valid values; ``lo``/``hi`` are the values at the
  first and last kept rank.

  Args:
    x: ``f32[K, d]`` the values the rule sorted.
    lo, hi: ``f32[d]`` lowest and highest kept order statistics
      (materialised: see the trimmed mean's
      :func:`~fedjax_sparse.aggregators.trimmed_mean.trimmed_mean_and_escape`).
    n_low, n_high: values trimmed below and above (ints or ``int32[d]``).
    malicious: ``bool[K]``.
    valid: optional ``bool[K, d]`` (mask-aware rules: the contributors); all
      values are valid when None.

  Returns:
    ``(kept f32[d], den f32)``: the malicious values kept in each
    coordinate (not materialised: a caller may fuse it with the statistic
    it reports, see :func:`value_and_escape_ratio`), and ``sum_j malicious valid`` (for
    dense inputs ``k_m d``); the escape ratio is ``sum_j kept_j / den``.
  """
  d = x.shape[1]
  f32 = jnp.float32
  if valid is None and x.shape[0] <= _MAX_PACKED_ROWS:
    le_lo, eq_lo, ge_hi, eq_hi, inside, m_lo, m_hi = _dense_trimmed_counts(
        x, lo, hi, malicious)
    n = f32(x.shape[0])
  else:
    preds = (lambda v: v < lo, lambda v: v == lo, lambda v: v > hi,
             lambda v: v == hi, lambda v: (v > lo) & (v < hi))
    fields = [(0, None), (1, None), (2, None), (3, None),
              (4, malicious), (1, malicious), (3, malicious)]
    if valid is not None:
      preds += (lambda v: jnp.ones(v.shape, bool),)
      fields.append((5, None))
    counts = _field_counts(x, valid, preds, fields)
    lt_lo, eq_lo, gt_hi, eq_hi, inside, m_lo, m_hi = counts[:7]
    n = counts[7] if valid is not None else f32(x.shape[0])
    le_lo, ge_hi = lt_lo + eq_lo, gt_hi + eq_hi
  n_low = jnp.asarray(n_low, f32)
  n_high = jnp.asarray(n_high, f32)
  one = jnp.float32(1.0)
  distinct = lo < hi
  # Kept members of the tie group at each boundary.
  kept_lo = jnp.where(distinct, le_lo - n_low, n - n_low - n_high)
  kept_hi = ge_hi - n_high
  frac_lo = kept_lo / jnp.maximum(eq_lo, one)
  frac_hi = kept_hi / jnp.maximum(eq_hi, one)
  kept = inside + m_lo * frac_lo + jnp.where(distinct, m_hi * frac_hi, 0.0)
  kept = jnp.where(n - n_low - n_high > 0, kept, 0.0)
  mal = malicious.astype(f32)
  if valid is None:
    den = jnp.sum(mal) * d
  else:
    den = jnp.sum(mal * jnp.sum(valid, axis=1, dtype=f32))
  return kept, den


def median_escape_ratio(x: Array, lo: Array, hi: Array, same_slot,
                        malicious: Array, valid: Optional[Array] = None,
                        count: Optional[Array] = None) -> Array:
  """Share of coordinates whose median comes from a malicious client.

  Args:
    x: ``f32[K, d]`` the values the rule took the median of.
    lo, hi: ``f32[d]`` the two middle order statistics (materialised).
    same_slot: bool (or ``bool[d]``): ``lo`` and ``hi`` are the same rank
      (odd number of valid values).
    malicious: ``bool[K]``.
    valid: optional ``bool[K, d]`` (mask-aware median: contributors).
    count: ``int32[d]`` valid values per coordinate; required with ``valid``.

  Returns:
    ``f32`` scalar over the coordinates with at least one valid value.
  """
  d = x.shape[1]
  f32 = jnp.float32
  preds = (lambda v: v == lo, lambda v: v == hi)
  n_lo, m_lo, n_hi, m_hi = _field_counts(
      x, valid, preds, [(0, None), (0, malicious), (1, None), (1, malicious)])
  one = jnp.float32(1.0)
  p_lo = m_lo / jnp.maximum(n_lo, one)
  p_hi = m_hi / jnp.maximum(n_hi, one)
  # Two slots drawn from one tie group of n_lo values, m_lo malicious.
  benign_pair = ((n_lo - m_lo) * (n_lo - m_lo - 1)
                 / jnp.maximum(n_lo * (n_lo - 1), one))
  p_two = jnp.where(lo == hi, 1.0 - benign_pair,
                    1.0 - (1.0 - p_lo) * (1.0 - p_hi))
  p = jnp.where(same_slot, p_lo, p_two)
  if valid is None:
    return _ratio(_total(p), d)
  has = count > 0
  return _ratio(_total(jnp.where(has, p, 0.0)), jnp.sum(has, dtype=f32))


def value_and_escape_ratio(value: Array, numerator: Array,
                           den: Array) -> tuple[Array, Array]:
  """``(value, escape ratio)`` out of one fusion with the order statistics.

  ``value`` (the rule's output, ``f32[d]``) and ``numerator`` (the escape
  count of every coordinate) are computed from the same sorting network;
  materialised separately (each through its own reduction, as before
  2026-12), XLA:CPU gave each its own copy of the network, and the lowest
  and highest kept values two more (Bulyan at K = 100: 12k HLO lines and
  up to 15 s of compiling on the loaded 2-core machine). Packed as the real
  and imaginary parts of one ``complex64`` vector they leave a single
  fusion. ``_order_stats.materialize`` adds 0 to both parts, as it did to
  each (``-0.0`` becomes ``+0.0``); the values are the same bits as before.
  Used by Bulyan's stage 2 (the coordinate-wise median and trimmed mean do
  not: see the note in :mod:`fedjax_sparse.aggregators.trimmed_mean`).
  """
  packed = _order_stats.materialize(jax.lax.complex(value, numerator))
  return jnp.real(packed), _ratio(jnp.sum(jnp.imag(packed)), den)


def selection_escape_metrics(aggregator, acceptance: Array,
                             malicious: Array) -> dict:
  """The selection escape ratio a rule names, as the round step records it.

  Args:
    aggregator: an :class:`~fedjax_sparse.aggregators.Aggregator`.
    acceptance: ``f32[K]``, its ``AggOut.acceptance``.
    malicious: ``bool[K]`` ground truth.

  Returns:
    ``{aggregator.selection_escape: selection_escape_ratio(acceptance,
    malicious)}``, or ``{}`` for a rule whose acceptance is not a selection.
  """
  name = aggregator.selection_escape
  if name is None:
    return {}
  return {name: selection_escape_ratio(acceptance, malicious)}
