"""Bulyan (El Mhamdi, Guerraoui & Rouault, 2018) and a one-shot variant.

``bulyan`` is the rule of "The Hidden Vulnerability of Distributed Learning in
Byzantium" (ICML 2018, PMLR 80:3521-3530; Bulyan(A) with A = Krum, the
paper's instance; the paper's text was not available here, so the
section/equation numbers are not given), for ``K`` updates of which ``f``
may be Byzantine, ``K >= 4f + 3``:

1. Selection by *iterated* Krum. Start with the pool ``R`` = all ``K``
   updates and an empty selection ``S``; ``theta = K - 2f`` times, run Krum on
   ``R`` (``n' = |R|``: the score of ``u_i`` is the sum of its squared
   distances to its ``n' - f - 2`` nearest other members of ``R``, Blanchard et
   al., 2017, section 4), move the lowest-scored update from ``R`` to ``S``.
   Pairwise distances are computed once (:mod:`._distances`); each step
   only re-masks them. When ``n' - f - 2 < 1`` (the last steps when ``f <= 1``)
   one neighbour is counted (ours: Krum is undefined there). Ties (ours):
   with one neighbour counted (the last step when ``f = 2``, the last two
   when ``f = 1``) the two updates of the closest pair in the pool always
   have the same score, and f32 rounding decides exact ties differently for
   another client order; so scores within a relative ``TIE_RTOL = 1e-5`` of
   the lowest count as tied, the tied update with the smallest sum of
   squared distances to the whole pool wins, then the lower client index.
2. Coordinate-wise, over the ``theta`` selected values of each coordinate:
   their median ``m`` (the mean of the two middle values for even ``theta``)
   and the average of the ``beta = theta - 2f`` values closest to ``m``.
   The ``beta`` values closest to ``m`` are a contiguous run of the sorted
   values (``{x : |x - m| <= r}`` is an interval), so the rule sorts the
   ``theta`` values with the sorting network (:mod:`._order_stats`) and takes,
   of the ``2f + 1`` windows of ``beta`` consecutive sorted values, the one
   whose farthest value is closest to ``m``. Without ties in ``|x - m|`` this
   is exactly the set of the ``beta`` closest values; when the ``beta``-th and
   the next distance are equal the lower window wins (ours; a sort by
   ``|x - m|`` would break the tie by client order).

Weights are not used (Bulyan is unweighted). NaN sorts as ``+inf``; rows with
inf/nan are infinitely far from the others and are selected last. Under
sparse uploads the rule runs on the zero-filled dense vectors. Acceptance is
membership in the selection ``S`` (``theta`` ones).

Conventions elsewhere: ByzFL 0.0.11 has no Bulyan (``byzfl.aggregators``
has ``Krum``, ``MultiKrum``, ``Meamed``, ...), and its ``Krum`` counts
``n - f - 1`` neighbours (one more than Blanchard et al. and this rule);
``Meamed(f=2f)`` over the selected updates is this rule's stage 2.

``bulyan_fast`` is this project's earlier, cheaper approximation (the form
ALGORITHMS.md section 4 described): stage 1 is one-shot Multi-Krum (the
``K - 2f`` lowest Krum scores over all ``K`` updates, ``K - f - 2``
neighbours, no re-scoring as the pool shrinks) and stage 2 the
coordinate-wise trimmed mean of the selected updates, dropping ``b = min(f,
(n_sel - 1) // 2)`` values per side (i.e. averaging the middle ``n_sel - 2b``
values, not the ``beta`` closest to the median). It needs only Krum's ``K >=
2f + 3`` (Blanchard et al., 2017; at ``K = 2f + 1`` ``f`` copies of one
vector score 0 and would be selected), and supports ``mask_aware=True``
(ours: stage 2 over each coordinate's contributors among the selected
clients, see :mod:`.trimmed_mean`).

Escape ratios (hybrid_sparse_attack.txt section 2.4, "each stage
separately"; ALGORITHMS.md section 7), both rules: ``escape_ratio_selection``
is the share of the malicious clients selected by stage 1, computed by the
round step from the acceptance
(:func:`fedjax_sparse.metrics.escape.selection_escape_ratio`; the rules
name it in ``Aggregator.selection_escape``), and ``escape_ratio_trim``, a
diagnostic of the rule when ``ctx.malicious`` is given (``bool[K]``, ground
truth for diagnostics only), the share of the selected malicious clients'
values that stage 2 averages (the ``beta`` closest to the median, or the
untrimmed middle; ties credited in proportion, see
:mod:`fedjax_sparse.metrics.escape`; 0 when no malicious client is
selected). Their product is the share of all malicious values that reach
the average.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.aggregators import _common, _distances, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.aggregators.trimmed_mean import trimmed_mean_and_escape
from fedjax_sparse.metrics import escape

Array = jax.Array

# Krum scores within this relative distance of the lowest count as tied.
TIE_RTOL = 1e-5


def check_size(k: int, f: int) -> None:
  """Raises ValueError unless ``K >= 4f + 3`` (El Mhamdi et al., 2018)."""
  if k < 4 * f + 3:
    raise ValueError(
        f"bulyan: needs K >= 4f + 3 updates (El Mhamdi et al., 2018); got "
        f"K={k}, f={f}: lower f (--num_byzantine, or the aggregator's f), "
        "sample more clients per round, or use bulyan_fast (needs K > 2f)")


def iterated_krum(d2: Array, f: int, theta: int) -> tuple[Array, Array]:
  """Stage 1: ``theta`` rounds of Krum on a shrinking pool.

  Args:
    d2: ``f32[K, K]`` squared distances (``inf`` for unusable pairs).
    f: Byzantine updates assumed.
    theta: updates to select.

  Returns:
    ``(selected int32[theta] in selection order, first-round scores f32[K])``;
    the first-round scores are the plain Krum scores (``K - f - 2``
    neighbours).
  """
  k = d2.shape[0]
  eye = jnp.eye(k, dtype=bool)
  others = jnp.where(eye | jnp.isnan(d2), jnp.inf, d2)
  # Each row's other updates, nearest first; re-masked by the pool each step.
  order = jnp.argsort(others, axis=1, stable=True)
  near = jnp.take_along_axis(others, order, axis=1)
  not_self = order != jnp.arange(k)[:, None]
  big = jnp.finfo(d2.dtype).max

  def scores_of(pool, n_left):
    """(Krum scores, sums of the finite squared distances to the pool)."""
    n_nearest = jnp.maximum(n_left - f - 2, 1)
    member = pool[order] & not_self
    rank = jnp.cumsum(member.astype(jnp.int32), axis=1)
    taken = member & (rank <= n_nearest)
    spread = jnp.sum(jnp.where(member & jnp.isfinite(near), near, 0.0), axis=1)
    return jnp.sum(jnp.where(taken, near, 0.0), axis=1), spread

  def step(t, carry):
    pool, selected = carry
    scores, spread = scores_of(pool, k - t)
    # Pool members always rank before the others, even with infinite scores.
    key = jnp.where(pool, jnp.minimum(scores, big), jnp.inf)
    low = jnp.min(key)
    tied = pool & (key <= low + TIE_RTOL * low)
    i = jnp.argmin(jnp.where(tied, jnp.minimum(spread, big), jnp.inf))
    i = i.astype(jnp.int32)
    return pool.at[i].set(False), selected.at[t].set(i)

  pool = jnp.ones((k,), bool)
  first, _ = scores_of(pool, k)
  _, selected = lax.fori_loop(0, theta, step,
                              (pool, jnp.zeros((theta,), jnp.int32)))
  return selected, first


def closest_to_median_mean(x: Array, beta: int,
                           malicious: Optional[Array] = None
                           ) -> tuple[Array, Optional[Array]]:
  """Stage 2: per coordinate, the mean of the ``beta`` values closest to the median.

  Args:
    x: ``f32[theta, d]`` selected updates.
    beta: values averaged, ``1 <= beta <= theta``.
    malicious: optional ``bool[theta]``; when given, also the escape ratio
      (share of the malicious values among the averaged ones).

  Returns:
    ``(f32[d], escape ratio or None)``.
  """
  theta = x.shape[0]
  if not 1 <= beta <= theta:
    raise ValueError(f"bulyan: beta must be in [1, theta={theta}], got {beta}")
  if beta == theta:  # nothing is dropped (f = 0)
    mean = _order_stats.materialize(_order_stats.sum_rows(x) / theta)
    esc = None
    if malicious is not None:
      esc = jnp.where(jnp.any(malicious), 1.0, 0.0).astype(jnp.float32)
    return mean, esc
  rows = _order_stats.sort_rows(x)
  start, _ = _order_stats.closest_window(rows, beta)
  total = None
  for r, row in enumerate(rows):
    term = jnp.where((r >= start) & (r < start + beta), row, 0.0)
    total = term if total is None else total + term
  if malicious is None:
    return _order_stats.materialize(total / beta), None
  span = theta - beta  # = 2f windows to either side
  lo = _order_stats._pick(rows, start, tuple(range(span + 1)))
  hi = _order_stats._pick(rows, start + beta - 1, tuple(range(beta - 1, theta)))
  kept, den = escape.trimmed_escape_parts(x, lo, hi, start, span - start,
                                          malicious)
  # One fusion, one copy of the network for the mean and the escape count
  # (see escape.value_and_escape_ratio).
  return escape.value_and_escape_ratio(total / beta, kept, den)


@register("bulyan")
def bulyan(f: Optional[int] = None, mask_aware: bool = False) -> Aggregator:
  """Bulyan of El Mhamdi et al. (2018): iterated Krum, then the mean around the median.

  Args:
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``.
      Needs ``K >= 4f + 3`` (checked when the rule is traced, from the
      static number of rows).
    mask_aware: not supported (raises); ``bulyan_fast`` has it.

  Returns:
    An :class:`Aggregator`. Diagnostics: ``scores`` (Krum scores of the full
    set, ``K - f - 2`` neighbours), ``beta`` (values averaged per
    coordinate) and, when ``ctx.malicious`` is given, ``escape_ratio_trim``;
    ``selection_escape`` is ``escape_ratio_selection``.
  """
  if mask_aware:
    raise ValueError("bulyan: mask_aware is not implemented for the paper's "
                     "rule; use bulyan_fast(mask_aware=True)")

  def apply(updates, masks, weights, key, ctx):
    del masks, weights, key
    k, _ = updates.shape
    f_ = _common.resolve_f(f, ctx)
    check_size(k, f_)
    theta = k - 2 * f_
    beta = theta - 2 * f_
    d2, _ = _distances.pairwise_sq_dists(updates)
    if theta == k:  # f = 0: everyone is selected
      order = jnp.arange(k, dtype=jnp.int32)
      scores = _common.krum_scores(d2, k - 2) if k >= 3 else jnp.zeros((k,))
    else:
      order, scores = iterated_krum(d2, f_, theta)
    acceptance = jnp.zeros((k,), jnp.float32).at[order].set(1.0)
    selected = updates[order]
    diagnostics = {"scores": scores, "beta": jnp.int32(beta)}
    if ctx.malicious is not None:
      update, diagnostics["escape_ratio_trim"] = closest_to_median_mean(
          selected, beta, ctx.malicious[order])
    else:
      update, _ = closest_to_median_mean(selected, beta)
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply, selection_escape="escape_ratio_selection")


@register("bulyan_fast")
def bulyan_fast(f: Optional[int] = None, mask_aware: bool = False) -> Aggregator:
  """One-shot Bulyan: Multi-Krum selection of ``K - 2f``, then a trimmed mean.

  The earlier ``bulyan`` of this project (see the module docstring for how
  it differs from the paper's rule).

  Args:
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``. Needs
      ``K >= 2f + 3`` (Multi-Krum's condition).
    mask_aware: trimmed mean over each coordinate's contributors (ours).

  Returns:
    An :class:`Aggregator`. Diagnostics: ``scores`` (Krum scores), ``b`` and,
    when ``ctx.malicious`` is given, ``escape_ratio_trim``;
    ``selection_escape`` is ``escape_ratio_selection``.
  """

  def apply(updates, masks, weights, key, ctx):
    del weights, key
    k, d = updates.shape
    f_ = _common.resolve_f(f, ctx)
    n_sel = k - 2 * f_
    _common.check_krum_size(k, f_, "bulyan_fast")
    d2, _ = _distances.pairwise_sq_dists(updates)
    scores = _common.krum_scores(d2, k - f_ - 2)
    order = jnp.argsort(jnp.where(jnp.isnan(scores), jnp.inf, scores),
                        stable=True)[:n_sel]
    acceptance = jnp.zeros((k,), jnp.float32).at[order].set(1.0)
    b = min(f_, (n_sel - 1) // 2)
    selected = updates[order]
    contrib = None
    if mask_aware and masks is not None:
      contrib = _common.coordinate_masks(masks[order], ctx.pack_size, d)
    diagnostics = {"scores": scores, "b": jnp.int32(b)}
    if ctx.malicious is not None:
      update, diagnostics["escape_ratio_trim"] = trimmed_mean_and_escape(
          selected, b, ctx.malicious[order], contrib)
    else:
      update = _order_stats.coordinate_trimmed_mean(selected, b, contrib)
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply, selection_escape="escape_ratio_selection")
