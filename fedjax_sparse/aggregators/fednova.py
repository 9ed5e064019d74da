"""FedNova: normalised averaging (Wang et al., NeurIPS 2020).

Clients run different numbers of local steps ``tau_i`` (with an epoch
schedule, larger clients run more steps), which biases FedAvg towards them.
FedNova averages the per-step updates ``u_i / tau_i`` with the data weights
``p_i`` and rescales by the effective step count
``tau_eff = sum_i p_i tau_i``:

  update = tau_eff * sum_i p_i u_i / tau_i      (p_i = w_i / sum_j w_j)

With equal step counts it is FedAvg. The round step reports each client's
steps in ``ctx.extra["local_steps"]``; FedNova is one of the training-side
baselines of class_aware_masking.txt (ALGORITHMS.md section 4). Under sparse
uploads the per-coordinate normalisation of FLARE's Alg. 2 is applied to the
step-normalised updates.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.aggregators.base import AggOut, Aggregator, combine
from fedjax_sparse.aggregators.registry import register


@register("fednova")
def fednova() -> Aggregator:
  """FedNova aggregator (needs ``ctx.extra["local_steps"]``)."""

  def init(d):
    del d
    return ()

  def apply(state, updates, masks, weights, key, ctx):
    del key
    if "local_steps" not in ctx.extra:
      raise ValueError("fednova needs the clients' local step counts in "
                       "ctx.extra['local_steps'] (the round step provides them)")
    tau = jnp.maximum(ctx.extra["local_steps"].astype(updates.dtype), 1.0)
    p = weights / jnp.sum(weights)
    tau_eff = jnp.sum(p * tau)
    acceptance = jnp.ones_like(weights)
    # combine() normalises by sum_i (w_i / tau_i); undo that to get
    # sum_i p_i u_i / tau_i.
    w_norm = p / tau
    update = combine(updates, masks, w_norm, acceptance, ctx.pack_size)
    if masks is None:
      update = update * jnp.sum(w_norm)
    update = tau_eff * update
    return AggOut(update, acceptance, {"tau_eff": tau_eff}), state

  return Aggregator(init, apply)
