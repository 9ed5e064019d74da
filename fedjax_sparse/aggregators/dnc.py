"""DnC: divide and conquer (Shejwalkar & Houmansadr, NDSS 2021; ALGORITHMS.md section 4).

``num_iters`` times: pick ``b`` random coordinates (``b = 10000``, all if
``d <= b``; a uniformly random subset, :func:`_common.sample_coordinates`), centre the K sub-vectors on their mean, take the top right
singular vector ``v`` of the centred matrix, score ``s_i = <g_i - mu, v>^2``
and mark the ``K - c f`` lowest-scored clients good (``c = 1``). The clients
good in every iteration are combined with FedAvg / FLARE Alg. 2.

The top singular direction comes from the K x K matrix ``C C^T`` (``eigh``):
with its top eigenpair ``(lambda, w)``, ``C v = sqrt(lambda) w`` so ``s_i =
lambda w_i^2`` without a d-sized SVD. Rows with inf/nan get score ``inf``
(always removed) and are left out of the mean.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register


@register("dnc")
def dnc(num_coords: int = 10000, num_iters: int = 1, c: float = 1.0,
        f: Optional[int] = None) -> Aggregator:
  """Spectral outlier removal on random coordinate subsets.

  Args:
    num_coords: coordinates sampled per iteration (``b``).
    num_iters: iterations; the good sets are intersected.
    c: filtering fraction, ``c * f`` clients removed per iteration.
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``.

  Returns:
    An :class:`Aggregator`. Diagnostics: ``scores f32[num_iters, K]``.
  """
  if num_coords < 1 or num_iters < 1 or c < 0:
    raise ValueError("dnc: need num_coords >= 1, num_iters >= 1 and c >= 0; got "
                     f"{num_coords}, {num_iters}, {c}")

  def apply(updates, masks, weights, key, ctx):
    k, d = updates.shape
    f_ = _common.resolve_f(f, ctx)
    n_keep = k - int(c * f_)
    if n_keep < 1:
      raise ValueError(f"dnc: keeps K - c*f = {n_keep} clients (K={k}, f={f_}, c={c})")
    ok = _common.finite_rows(updates)
    b = min(num_coords, d)
    good = ok
    all_scores = []
    for key_i in jax.random.split(key, num_iters):
      cols = (jnp.arange(d) if b == d
              else _common.sample_coordinates(key_i, d, b))
      # Gathered before the non-finite rows are zeroed: a K x b copy, not K x d.
      sub = _common.zero_rows(updates[:, cols], ok)
      mu = jnp.sum(jnp.where(ok[:, None], sub, 0.0), axis=0) / jnp.maximum(jnp.sum(ok), 1)
      centred = jnp.where(ok[:, None], sub - mu[None, :], 0.0)
      # Scores only rank the clients: rescale so that C C^T cannot overflow.
      centred = _common.divide(centred, jnp.max(jnp.abs(centred)))
      cov = _common.gram(centred, centred)
      eigval, eigvec = jnp.linalg.eigh(cov)
      scores = jnp.maximum(eigval[-1], 0.0) * eigvec[:, -1] ** 2
      scores = jnp.where(ok, scores, jnp.inf)
      good = good & (_common.lowest(scores, n_keep) > 0)
      all_scores.append(scores)
    acceptance = good.astype(jnp.float32)
    update = _common.combine_accepted(updates, masks, weights, acceptance,
                                      ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"scores": jnp.stack(all_scores)})

  return stateless(apply)
