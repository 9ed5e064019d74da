"""signSGD with majority vote (Bernstein et al., 2019; ALGORITHMS.md section 4).

``update = scale * sign(sum_i sign(u_i))``: every coordinate moves by exactly
``server_lr * scale`` (or not at all on a tied vote). Server learning rate:
the simulation applies ``global - server_lr * update``, so with signSGD the
product ``server_lr * scale`` *is* signSGD's step size and must be set like
it (Bernstein et al. use about 1e-4 to 1e-3), not to FedAvg's usual
``server_lr = 1``, which would move every weight by 1 per round. ``scale``
lets a sweep keep one ``server_lr`` across rules.

Under sparse uploads ``sign(0) = 0`` off the mask, so each coordinate's vote is
among its contributors, and coordinates nobody selected get 0. The vote is
unweighted; ``sign(nan)`` counts as an abstention.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.aggregators import _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register


@register("signsgd")
def signsgd(scale: float = 1.0) -> Aggregator:
  """Majority vote of the signs.

  Args:
    scale: multiplies the vote; the effective step is ``server_lr * scale``.

  Returns:
    An :class:`Aggregator`; acceptance is all ones.
  """

  def apply(updates, masks, weights, key, ctx):
    del masks, weights, key, ctx
    signs = jnp.sign(jnp.where(jnp.isnan(updates), 0.0, updates))
    vote = jnp.sign(_order_stats.sum_rows(signs))
    acceptance = jnp.ones((updates.shape[0],), jnp.float32)
    return AggOut(scale * vote, acceptance, {})

  return stateless(apply)
