"""MoNNA: the mean of a pivot's nearest neighbours (Farhadkhani et al., 2023;
ByzFL's ``MoNNA``).

Farhadkhani, Guerraoui, Gupta, Hoang, Pinot and Stephan, "Robust
collaborative learning with linear gradient overhead", ICML 2023 (PMLR 202:
9761-9813). With ``N_p`` the ``K - f`` nearest updates of the pivot ``u_p``
in Euclidean distance (``u_p`` itself included):

  MoNNA_{f, p}(u_1, ..., u_K) = (1 / (K - f)) sum_{i in N_p} u_i.

In the paper (a peer-to-peer setting) each honest node is its own pivot, a
vector it trusts; ByzFL takes the pivot by index, ``idx = 0``.

The pivot (ours), argument ``pivot``:

* an index ``p`` (default 0, as ByzFL): ``u_p`` is trusted. Nothing protects
  the rule from a Byzantine pivot (the output is then near that row), so use
  it where row ``p`` is known to be honest (e.g. the server's own update
  placed first, or a simulation's honest client);
* ``None``: the pivot is the row whose ``K - f`` nearest rows lie in the
  smallest ball (the first on ties). With at most ``f`` outliers each farther
  than the honest rows' diameter from every honest row, that row and its
  neighbourhood are honest.

A pivot row with ``inf``/``nan`` (or a squared norm beyond ``f32``) has no
position: then the ``None`` choice is used (ours; ByzFL returns NaN).

Conventions: ``f`` is ByzFL's (``ctx.num_byzantine`` by default), ``2f < K``
required (ValueError, as ByzFL). Selection rule: the neighbourhood is chosen
without weights; its members are combined by the shared aggregation
(``combine``: the mean weighted by ``weights``, ByzFL's plain mean for equal
weights; FLARE Alg. 2 under sparse uploads). Distances are those of the
zero-filled dense vectors (:func:`._distances.pairwise_sq_dists`); distance
ties go to the lower client index. Non-finite rows are infinitely far from
the pivot, so they are chosen only when fewer than ``K - f`` rows are
usable, and never averaged (acceptance 0).

Acceptance: 1 for the averaged neighbours. Diagnostics: ``pivot`` (the row
used), ``radius`` (distance from the pivot to its farthest averaged
neighbour); the round step reports ``escape_ratio`` from the acceptance
(``selection_escape``).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from fedjax_sparse.aggregators import _distances, _subsets
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register


@register("monna")
def monna(f: Optional[int] = None, pivot: Optional[int] = 0) -> Aggregator:
  """Average of the ``K - f`` nearest neighbours of a pivot update.

  Args:
    f: Byzantine clients tolerated; ``None`` means ``ctx.num_byzantine``.
      Needs ``2f < K``.
    pivot: the index of the trusted row (default 0, ByzFL's ``idx``), or
      ``None`` for the row with the tightest ``K - f`` neighbourhood.

  Returns:
    A stateless :class:`Aggregator` (a selection rule).
  """
  if pivot is not None and (isinstance(pivot, bool) or not isinstance(pivot, int)
                            or pivot < 0):
    raise ValueError(f"monna: pivot must be an index >= 0 or None, got {pivot!r}")

  def apply(updates, masks, weights, key, ctx):
    del key
    k = updates.shape[0]
    f_ = _subsets.majority_f(f, ctx, k, "monna")
    if pivot is not None and pivot >= k:
      raise ValueError(f"monna: pivot={pivot} is not a row of the K={k} "
                       "updates; pass pivot < K (or None)")
    m = k - f_
    d2, ok = _distances.pairwise_sq_dists(updates)
    p = _subsets.tightest_centre(d2, ok, m)
    if pivot is not None:
      p = jnp.where(ok[pivot], pivot, p)
    row = jnp.where(jnp.arange(k) == p, -1.0, d2[p])  # the pivot first
    nearest = jnp.argsort(row, stable=True)[:m]
    sel = jnp.zeros((k,), jnp.float32).at[nearest].set(1.0)
    acceptance = sel * ok.astype(sel.dtype)
    update = _distances.combine_selected(updates, masks, weights, acceptance,
                                         ctx.pack_size, ctx.finite_uploads)
    radius2 = jnp.max(jnp.where(acceptance > 0, jnp.maximum(row, 0.0), 0.0))
    diagnostics = {"pivot": p.astype(jnp.int32), "radius": jnp.sqrt(radius2)}
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply, selection_escape="escape_ratio")
