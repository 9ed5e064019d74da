"""Bulyan (El Mhamdi et al., 2018; ALGORITHMS.md section 4).

Stage 1: Multi-Krum (``K - f - 2`` nearest neighbours) selects the
``n_sel = K - 2f`` lowest-scored updates. Stage 2: the coordinate-wise trimmed
mean of the selected updates, dropping ``b = min(f, (n_sel - 1) // 2)`` values
per side. (The paper's second stage averages the ``n_sel - 2f`` values closest
to the median and needs ``K >= 4f + 3``; ALGORITHMS.md fixes the trimmed-mean
form, which degrades gracefully for smaller K.)

``mask_aware=True`` (ours) runs stage 2 over the contributors of each
coordinate among the selected clients (see :mod:`.trimmed_mean`). Acceptance
marks the clients selected by stage 1; weights are not used.

Escape ratios (hybrid_sparse_attack.txt section 2.4, "each stage
separately"; ALGORITHMS.md section 7): when ``ctx.extra`` carries
``malicious`` (``bool[K]``, for diagnostics only),
``escape_ratio_selection`` is the share of the malicious clients selected by
stage 1 and ``escape_ratio_trim`` the share of the selected malicious
clients' values that stage 2 does not trim (``e_TM`` over the selected
updates; 0 when no malicious client is selected). Their product is the share
of all malicious values that reach the average.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _distances, _escape, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.registry import register


@register("bulyan")
def bulyan(f: Optional[int] = None, mask_aware: bool = False) -> Aggregator:
  """Bulyan: Multi-Krum selection of ``K - 2f``, then a trimmed mean.

  Args:
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``. Needs
      ``K - 2f >= 1`` and ``K - f - 2 >= 1``.
    mask_aware: trimmed mean over each coordinate's contributors (ours).

  Returns:
    An :class:`Aggregator`. Diagnostics: ``scores`` (Krum scores), ``b`` and,
    when ``ctx.extra`` has ``malicious``, ``escape_ratio_selection`` and
    ``escape_ratio_trim``.
  """

  def init(d):
    del d
    return ()

  def apply(state, updates, masks, weights, key, ctx):
    del weights, key
    k, d = updates.shape
    f_ = _common.resolve_f(f, ctx)
    n_sel = k - 2 * f_
    if n_sel < 1:
      raise ValueError(
          f"bulyan: selects K - 2f = {n_sel} updates (K={k}, f={f_}); need K > 2f")
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
    if "malicious" in ctx.extra:
      malicious = ctx.extra["malicious"]
      update, diagnostics["escape_ratio_trim"] = _escape.coordinate_trimmed_mean(
          selected, b, malicious[order], contrib)
      diagnostics["escape_ratio_selection"] = _escape.selection(acceptance,
                                                                malicious)
    else:
      update = _order_stats.coordinate_trimmed_mean(selected, b, contrib)
    return AggOut(update, acceptance, diagnostics), state

  return Aggregator(init, apply)
