"""Krum and Multi-Krum (Blanchard et al., 2017; ALGORITHMS.md section 4).

``score_i`` is the sum of the squared Euclidean distances from ``u_i`` to its
``K - f - 2`` nearest other updates; Krum accepts the lowest-scored client,
Multi-Krum the ``m`` lowest (default ``m = K - f``; flare.txt V-B). The
accepted clients are combined with the shared aggregation
(:func:`~fedjax_sparse.aggregators.base.combine`: weighted mean when dense,
FLARE Alg. 2 when sparse). Distances are those of the zero-filled dense
vectors, as the papers evaluate Krum under sparsity.

Distances come from the Gram matrix, ``||a||^2 + ||b||^2 - 2<a, b>`` clamped at
0, after centring on the mean, or on a central row (the medoid of the rows
near the median norm) when a few far rows drag the mean away (see
:func:`._distances.pairwise_sq_dists`).
Rows with inf/nan are infinitely far from all others, so they get an
infinite score and are never accepted while at least ``m`` rows are finite.
Ties go to the lower client index. Both rules need ``K >= 2f + 3``
(Blanchard et al., 2017, Prop. 1: ``n > 2f + 2``; ValueError otherwise):
then the accepted updates are honest whatever the ``f`` others send (huge,
non-finite, or copies of one another), so the output lies in the honest
updates' coordinate range. At ``K = 2f + 1`` ``f`` copies of one vector would
score 0 and be selected.

Escape ratio (hybrid_sparse_attack.txt section 2.4, ``e_krum``; ALGORITHMS.md
section 7): ``escape_ratio`` is the share of the malicious clients selected
(0 when there are none), computed by the round step from the acceptance and
the ground truth (``selection_escape``; :mod:`fedjax_sparse.metrics.escape`).
"""

from __future__ import annotations

from typing import Optional

from fedjax_sparse.aggregators import _common, _distances
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register


def _make(f: Optional[int], m: Optional[int], name: str) -> Aggregator:

  def apply(updates, masks, weights, key, ctx):
    del key
    k = updates.shape[0]
    f_ = _common.resolve_f(f, ctx)
    _common.check_krum_size(k, f_, name)
    m_ = k - f_ if m is None else m
    if not 1 <= m_ <= k:
      raise ValueError(f"{name}: m must be in [1, K={k}], got m={m_}")
    d2, _ = _distances.pairwise_sq_dists(updates)
    scores = _common.krum_scores(d2, k - f_ - 2)
    acceptance = _common.lowest(scores, m_)
    update = _distances.combine_selected(updates, masks, weights, acceptance,
                                         ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"scores": scores})

  return stateless(apply, selection_escape="escape_ratio")


@register("krum")
def krum(f: Optional[int] = None) -> Aggregator:
  """Krum: accept the single update with the lowest Krum score.

  Args:
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``.
      Needs ``K >= 2f + 3`` (Blanchard et al., 2017: ``n > 2f + 2``).
  """
  return _make(f, 1, "krum")


@register("multi_krum")
def multi_krum(f: Optional[int] = None, m: Optional[int] = None) -> Aggregator:
  """Multi-Krum: average the ``m`` updates with the lowest Krum scores.

  Args:
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``.
      Needs ``K >= 2f + 3``.
    m: clients accepted; ``None`` means ``K - f``.
  """
  return _make(f, m, "multi_krum")
