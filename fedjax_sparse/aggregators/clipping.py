"""L2 norm clipping, then the weighted mean (Sun et al., 2019).

The "clipping only" defence of sparsefed.txt B.1.4 / B.2 ("Can you really
backdoor federated learning?", Sun et al. 2019): every client's update is
scaled to L2 norm at most ``L``,

  u_i <- u_i * min(1, L / ||u_i||_2),

and the clipped updates are averaged like FedAvg (weighted by the clients'
dataset sizes, or uniformly). It is SparseFed without momentum, error
feedback and top-k (``sparsefed(clip_norm=L, k=d, rho=0)``), the ablation
"sparsification needs norm clipping" of sparsefed.txt B.2 sets against.

Under sparse uploads the norm is that of the zero-filled dense view (the
values the client sent) and the mean is FLARE's sparse aggregation (Alg. 2),
as for FedAvg (:func:`~fedjax_sparse.aggregators.combine`).

Non-finite and huge rows: norms are computed without overflow, so a row at
``1e30`` is clipped to norm ``L`` like any other; a row with ``inf``/``nan`` has
no norm and is left out of the mean (acceptance 0; see
:func:`~fedjax_sparse.sparsify.clip_by_l2_norm` and
:func:`~fedjax_sparse.aggregators.base.combine_finite`). The output is a mean
of rows of norm at most ``L``, so its norm is at most ``L`` whatever is sent.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from fedjax_sparse.aggregators.base import AggOut, Aggregator, combine_finite
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.sparsify._common import check_clip_config, clip_by_l2_norm


@register("clipping")
def clipping(clip_norm: float = 5.0, weighted: bool = True) -> Aggregator:
  """Per-client L2 clipping to ``clip_norm``, then the (weighted) mean.

  Args:
    clip_norm: ``L``, the per-client L2 bound (sparsefed.txt's parameter,
      5.0); ``inf`` disables clipping (then this is FedAvg).
    weighted: weight the mean by the given weights (the clients' dataset
      sizes, like ``fedavg``); False averages uniformly (like ``nwfedavg``).

  Returns:
    An :class:`~fedjax_sparse.aggregators.Aggregator` with no state, every
    client accepted, and diagnostics ``clip_scale`` (``f32[K]``, the factor
    applied to each update).

  Raises:
    ValueError: ``clip_norm`` is not > 0.
  """
  check_clip_config(clip_norm, adaptive_clip=False)
  no_clip = math.isinf(float(clip_norm))

  def init(d):
    del d
    return ()

  def apply(state, updates, masks, weights, key, ctx):
    del key
    k = updates.shape[0]
    if no_clip:
      clipped, scale = updates, jnp.ones((k,), updates.dtype)
    else:
      clipped, scale = clip_by_l2_norm(updates, clip_norm)
    w = weights if weighted else jnp.ones_like(weights)
    update, acceptance = combine_finite(clipped, masks, w,
                                        jnp.ones((k,), updates.dtype),
                                        ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"clip_scale": scale}), state

  return Aggregator(init, apply)
