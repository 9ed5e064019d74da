"""Nearest-neighbour mixing, NNM (Allouah et al., 2023; ALGORITHMS.md section 4).

Each update is replaced by the average of its ``K - f`` nearest updates in
Euclidean distance, itself included (the paper's Alg. 1), and the base rule
aggregates the mixed updates. Averages are weighted by the clients' weights
(plain means with unit weights, as in the paper); under sparse uploads each
pack is averaged over the neighbours that selected it and the mixed mask is
the union of theirs. Each mixed update keeps its client's weight.

Distances are those of the zero-filled dense vectors, from the Gram matrix
(:func:`._common.pairwise_sq_dists`); inf/nan rows are infinitely far, so with
at most ``f`` of them no finite row mixes one in. Non-finite rows (ours): a
row with ``inf``/``nan`` is absent from every average (:func:`._common.mix`),
so with more than ``f`` of them (or ``f = 0``, where every client mixes all
``K`` rows) one ``nan`` coordinate does not spoil the other clients' mixed
rows; the mixed row of a client that sent ``inf``/``nan`` is itself NaN, an
outlier for the base (left out by the means). Acceptance is the base's,
client by client.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.pre_registry import register_pre


@register_pre("nnm")
def nnm(base: Aggregator, f: Optional[int] = None) -> Aggregator:
  """Mix every update with its ``K - f`` nearest neighbours before ``base``.

  Args:
    base: the rule applied to the mixed updates.
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``.

  Returns:
    An :class:`Aggregator` with the base's state. Diagnostics: the base's.
  """

  def init(d):
    return base.init(d)

  def apply(state, updates, masks, weights, key, ctx):
    k = updates.shape[0]
    f_ = _common.resolve_f(f, ctx)
    n_mix = k - f_
    if n_mix < 1:
      raise ValueError(f"nnm: mixes K - f = {n_mix} neighbours (K={k}, f={f_});"
                       " need f < K")
    d2 = _common.pairwise_sq_dists(updates)
    d2 = jnp.where(jnp.eye(k, dtype=bool), -1.0, d2)  # self first on ties
    nearest = jnp.argsort(d2, axis=1, stable=True)[:, :n_mix]
    membership = jnp.zeros((k, k), updates.dtype).at[
        jnp.arange(k)[:, None], nearest].set(1.0)
    mixed, mixed_masks, _ = _common.mix(membership, updates, masks, weights,
                                        ctx.pack_size)
    # A client that sent inf/nan has no mixed row of its own (ours).
    mixed = jnp.where(_common.finite_rows(updates)[:, None], mixed, jnp.nan)
    out, state = base.apply(state, mixed, mixed_masks, weights, key, ctx)
    return AggOut(out.update, out.acceptance, out.diagnostics), state

  return Aggregator(init, apply, base.selection_escape)
