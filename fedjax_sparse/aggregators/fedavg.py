"""FedAvg and unweighted FedAvg (McMahan et al., 2017).

Under sparse uploads both reduce to FLARE's sparse aggregation (Alg. 2) with
every client accepted (ALGORITHMS.md sections 1 and 4).

Non-finite and huge rows: a row with ``inf``/``nan`` is left out of the mean
(acceptance 0; :func:`~fedjax_sparse.aggregators.base.combine_finite`), so
the output is finite whatever the others send. A mean is not robust and
does not try to be: finite rows are averaged as sent, so one row at ``1e30``
moves the output by ``1e30 w_i / sum_j w_j`` (finite, not bounded by the
other rows).
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.aggregators.base import AggOut, Aggregator, combine_finite, stateless
from fedjax_sparse.aggregators.registry import register


def _make(weighted: bool) -> Aggregator:

  def apply(updates, masks, weights, key, ctx):
    del key
    w = weights if weighted else jnp.ones_like(weights)
    ones = jnp.ones((updates.shape[0],), updates.dtype)
    update, acceptance = combine_finite(updates, masks, w, ones, ctx.pack_size,
                                        ctx.finite_uploads)
    return AggOut(update, acceptance, {})

  return stateless(apply)


@register("fedavg")
def fedavg() -> Aggregator:
  """FedAvg: the mean of the updates weighted by the clients' dataset sizes."""
  return _make(weighted=True)


@register("nwfedavg")
def nwfedavg() -> Aggregator:
  """Unweighted FedAvg: the plain mean of the updates."""
  return _make(weighted=False)
