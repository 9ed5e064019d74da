"""Robust-DPFL filter (FLARE's description, flare.txt V-B; ALGORITHMS.md section 4).

Each client's detection score is the mean of its model parameters; a 2-means
split of the scores (exact in 1-D, :func:`fedjax_sparse.cluster.two_means_1d`)
keeps the cluster with the higher mean score, combined with FedAvg / FLARE
Alg. 2.

With ``score="params"`` (the paper) the local model is ``global - u_i``, so
the score is ``mean(global) - mean(u_i)``. The shift ``mean(global)`` is the
same for every client and changes neither the split nor which cluster is
higher, so it is added only when ``ctx.global_params`` is given (for the
diagnostics). ``score="update"`` (ours) scores ``mean(u_i)`` instead, which
keeps the clients with the larger mean *update* - the opposite side.
Under sparse uploads the mean is over the zero-filled vector.

Non-finite and huge rows (ours): a row with ``inf``/``nan``, or whose squared
norm overflows ``f32`` (entries beyond ~1e19, e.g. ``-1e30``), is unusable: it
gets no score, takes no part in the 2-means and is never accepted. Without
this one row at ``-1e30`` (score ``+1e30``) was a cluster of its own, the
higher one, and was the only client kept (output ``1e30``). The same
convention makes the Krum family's distances treat such rows as infinitely
far (:mod:`._distances`). It bounds the output only against such rows: the
paper's rule keeps the higher-scoring cluster, so a finite attacker whose
local model has a higher mean than every honest one (a row at ``-1e18``,
say) is still kept, by design of the rule.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.cluster.kmeans import two_means_1d


@register("robust_dpfl")
def robust_dpfl(score: str = "params") -> Aggregator:
  """2-means on mean-parameter scores; keep the higher cluster.

  Args:
    score: ``"params"`` (mean of the local model, the paper) or ``"update"``
      (mean of the update, ours).

  Returns:
    An :class:`Aggregator`. Diagnostics: ``scores f32[K]``, ``centres f32[2]``.
  """
  if score not in ("params", "update"):
    raise ValueError(f"robust_dpfl: score must be 'params' or 'update', got {score!r}")

  def apply(updates, masks, weights, key, ctx):
    del key
    # inf/nan, or a squared norm beyond f32 (|u| > ~1e19): unusable.
    usable = jnp.isfinite(jnp.sum(updates * updates, axis=1))
    mean_u = jnp.mean(updates, axis=1)
    if score == "params":
      scores = -mean_u
      if ctx.global_params is not None:
        scores = scores + jnp.mean(ctx.global_params)
    else:
      scores = mean_u
    labels, centres = two_means_1d(scores, valid=usable)
    acceptance = (labels == 1).astype(jnp.float32)
    update = _common.combine_accepted(updates, masks, weights, acceptance,
                                      ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"scores": scores, "centres": centres})

  return stateless(apply)
