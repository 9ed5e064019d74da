"""Centered Clipping, CC (Karimireddy et al., 2021; ALGORITHMS.md section 4).

The reference ``v`` is the previous round's aggregate (0 at the start), kept
in the aggregator state. ``L`` times: ``v = v + (1/K) sum_i clip(u_i - v,
tau)`` with ``clip(z, tau) = z * min(1, tau / ||z||)``; defaults ``tau = 1.0``,
``L = 1``. The mean is unweighted, as in the paper. Under sparse uploads it
runs on the zero-filled dense vectors.

Non-finite rows (ours): a row with inf/nan carries no usable direction; its
clipped difference is taken as 0 (it still counts in the ``1/K``). Norms are
scaled (:func:`._common.safe_norm`) so huge rows are clipped, not overflowed.
Acceptance is each client's clipping factor in the last iteration (1 = not
clipped, 0 for non-finite rows).
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.registry import register


@register("centered_clipping")
def centered_clipping(tau: float = 1.0, num_iters: int = 1) -> Aggregator:
  """Centered clipping around the previous aggregate.

  Args:
    tau: clipping radius (``tau > 0``).
    num_iters: clipping iterations ``L`` per round (``>= 1``).

  Returns:
    An :class:`Aggregator` whose state is the previous aggregate ``f32[d]``.
  """
  if tau <= 0:
    raise ValueError(f"centered_clipping: tau must be > 0, got {tau}")
  if num_iters < 1:
    raise ValueError(f"centered_clipping: num_iters must be >= 1, got {num_iters}")

  def init(d):
    return jnp.zeros((d,), jnp.float32)

  def apply(state, updates, masks, weights, key, ctx):
    del masks, weights, key, ctx
    k = updates.shape[0]
    ok = _common.finite_rows(updates)
    v = state.astype(updates.dtype)
    scale = jnp.zeros((k,), updates.dtype)
    for _ in range(num_iters):
      z = _common.zero_rows(updates - v[None, :], ok)
      norm = _common.safe_norm(z)
      scale = jnp.where(ok, jnp.minimum(1.0, tau / jnp.maximum(norm, 1e-30)), 0.0)
      v = v + (scale @ z) / k
    return AggOut(v, scale, {}), v

  return Aggregator(init, apply)
