"""RFA: geometric median by smoothed Weiszfeld (Pillutla et al., 2022).

ALGORITHMS.md section 4. Starting from the weighted mean ``v``, ``T`` times:
``beta_i = alpha_i / max(nu, ||v - u_i||)``, ``v = sum_i beta_i u_i / sum_i
beta_i``, with ``alpha`` the normalised weights, ``nu = 0.1``, ``T = 3``
(Pillutla et al., Alg. 2 and their default of 3 iterations; ``num_iters`` for
more). Under sparse uploads it runs on the zero-filled dense vectors, as the
papers evaluate it.

Non-finite rows (ours): a row with inf/nan has no finite distance to any
point, so it gets weight 0 from the start. Norms are computed with scaling
(:func:`._common.safe_norm`) so rows up to the f32 range do not overflow.
Acceptance is the final Weiszfeld weight ``beta_i / sum_j beta_j``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.registry import register


@register("rfa")
def rfa(nu: float = 0.1, num_iters: int = 3) -> Aggregator:
  """Smoothed Weiszfeld geometric median.

  Args:
    nu: smoothing, the smallest distance a weight divides by (``nu > 0``).
    num_iters: Weiszfeld iterations ``T``.

  Returns:
    An :class:`Aggregator`. Diagnostics: ``objective`` (weighted sum of the
    distances to the result).
  """
  if nu <= 0:
    raise ValueError(f"rfa: nu must be > 0, got {nu}")
  if num_iters < 0:
    raise ValueError(f"rfa: num_iters must be >= 0, got {num_iters}")

  def init(d):
    del d
    return ()

  def apply(state, updates, masks, weights, key, ctx):
    del masks, key, ctx
    ok = _common.finite_rows(updates)
    x = _common.zero_rows(updates, ok)
    alpha = jnp.where(ok, weights, 0.0).astype(x.dtype)
    alpha = alpha / jnp.maximum(jnp.sum(alpha), jnp.finfo(x.dtype).tiny)

    def weighted_mean(beta, fallback):
      total = jnp.sum(beta)
      mean = (beta @ x) / jnp.where(total > 0, total, 1.0)
      return jnp.where(total > 0, mean, fallback)

    def step(_, carry):
      v, _ = carry
      dist = _common.safe_norm(v[None, :] - x)
      beta = alpha / jnp.maximum(nu, dist)
      return weighted_mean(beta, v), beta

    v0 = weighted_mean(alpha, jnp.zeros((x.shape[1],), x.dtype))
    v, beta = lax.fori_loop(0, num_iters, step, (v0, alpha))
    acceptance = beta / jnp.maximum(jnp.sum(beta), jnp.finfo(x.dtype).tiny)
    objective = jnp.sum(alpha * _common.safe_norm(v[None, :] - x))
    return AggOut(v, acceptance, {"objective": objective}), state

  return Aggregator(init, apply)
