"""FedNova: normalised averaging (Wang et al., NeurIPS 2020).

Clients run different numbers of local steps ``tau_i`` (with an epoch
schedule, larger clients run more steps), which biases FedAvg towards them.
FedNova averages the per-step updates ``u_i / tau_i`` with the data weights
``p_i`` and rescales by the effective step count
``tau_eff = sum_i p_i tau_i``:

  update = tau_eff * sum_i p_i u_i / tau_i      (p_i = w_i / sum_j w_j)

With equal step counts it is FedAvg. The round step reports each client's
steps in ``ctx.local_steps``; FedNova is one of the training-side
baselines of class_aware_masking.txt (ALGORITHMS.md section 4). Under sparse
uploads the per-coordinate normalisation of FLARE's Alg. 2 is applied to the
step-normalised updates.

Non-finite rows and weights: a row with ``inf``/``nan`` is left out (acceptance
0; :func:`~fedjax_sparse.aggregators.base.combine_finite`) and ``p`` is
renormalised over the other clients; with all weights 0 the update is 0.
Like FedAvg the rule is a mean: its output is finite, not bounded by the
honest rows (a finite row at ``1e30`` is averaged in).
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.aggregators.base import AggOut, Aggregator, combine_finite, stateless
from fedjax_sparse.aggregators.registry import register


@register("fednova")
def fednova() -> Aggregator:
  """FedNova aggregator (needs ``ctx.local_steps``)."""

  def apply(updates, masks, weights, key, ctx):
    del key
    if ctx.local_steps is None:
      raise ValueError("fednova needs the clients' local step counts in "
                       "ctx.local_steps (the round step provides them)")
    tau = jnp.maximum(ctx.local_steps.astype(updates.dtype), 1.0)
    total = jnp.sum(weights)
    # All weights 0: nothing to average (0, not 0 / 0).
    p = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    # combine() normalises by sum_i (w_i / tau_i); undo that to get
    # sum_i p_i u_i / tau_i.
    w_norm = p / tau
    update, acceptance = combine_finite(updates, masks, w_norm,
                                        jnp.ones_like(weights), ctx.pack_size,
                                        ctx.finite_uploads)
    used = acceptance > 0
    if masks is None:
      update = update * jnp.sum(jnp.where(used, w_norm, 0.0))
    tau_eff = jnp.sum(jnp.where(used, p, 0.0) * tau)
    # Rows left out (inf/nan): p renormalised over the others. With every row
    # used the factor is exactly 1 (the numbers of finite rounds unchanged).
    kept = jnp.sum(jnp.where(used, p, 0.0))
    renorm = jnp.where(jnp.all(used) | ~(kept > 0), 1.0,
                       1.0 / jnp.where(kept > 0, kept, 1.0))
    tau_eff = tau_eff * renorm
    if masks is None:
      update = update * renorm
    update = tau_eff * update
    return AggOut(update, acceptance, {"tau_eff": tau_eff})

  return stateless(apply)
