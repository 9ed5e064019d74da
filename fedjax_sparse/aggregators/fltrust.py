"""FLTrust (Cao et al., NDSS 2021; ALGORITHMS.md section 4).

The server trains on a small clean root set (default 100 samples) to get its
own update ``g0``; the round step passes it as ``ctx.server_update``
(``f32[d]``, a descent direction like the clients' updates). Then
``trust_i = ReLU(cos(u_i, g0))``, every update is rescaled to ``||g0||``, and
the result is ``sum_i trust_i ||g0|| u_i / ||u_i|| / sum_i trust_i`` (0 when
every trust is 0). The paper's average is over the dense vectors and ignores
dataset sizes; so does this one (weights unused, the dense view under sparse
uploads).

Rows with inf/nan get trust 0. Norms are scaled
(:func:`._common.safe_norm`). Both only in rounds where a plain squared norm
or product overflows (``lax.cond``); otherwise two passes over the updates:
the norms and the products with ``g0`` in one fused reduction, then
``(trust / norms) @ U``. Acceptance is ``trust_i``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.requirements import SERVER_DATA, declare


@register("fltrust")
@declare(SERVER_DATA)
def fltrust() -> Aggregator:
  """Trust-weighted average of updates rescaled to the server update's norm.

  Returns:
    An :class:`Aggregator` that reads ``ctx.server_update``.
    Diagnostics: ``cos f32[K]``.
  """

  def apply(updates, masks, weights, key, ctx):
    del masks, weights, key
    if ctx.server_update is None:
      raise ValueError(
          "fltrust needs the server's update on its root set in "
          "ctx.server_update (f32[d]); compute it in the round step")
    g0 = ctx.server_update.astype(updates.dtype)
    norm0 = _common.safe_norm(g0)

    def checked(_):
      ok = _common.finite_rows(updates)
      x = _common.zero_rows(updates, ok)
      norms = _common.safe_norm(x)
      # cos via unit vectors, so that huge rows cannot overflow the dot product.
      unit0 = _common.divide(g0, norm0)
      units = _common.divide(x, norms[:, None])
      cos = jnp.clip(units @ unit0, -1.0, 1.0)
      trust = jnp.where(ok & (norms > 0) & (norm0 > 0), jnp.maximum(cos, 0.0), 0.0)
      total = jnp.sum(trust)
      update = jnp.where(total > 0, norm0 * (trust @ units) / jnp.where(total > 0, total, 1.0),
                         0.0)
      return update, trust, cos

    # Two passes when nothing overflows: the norms and the products with g0
    # in one fused reduction, then (trust / norms) @ U.
    sq = jnp.sum(jnp.square(updates), axis=1)
    dots = jnp.sum(updates * g0[None, :], axis=1)
    norms = jnp.sqrt(sq)

    def fast(_):
      denom = norms * norm0
      cos = jnp.clip(dots / jnp.where(denom > 0, denom, 1.0), -1.0, 1.0)
      trust = jnp.where((norms > 0) & (norm0 > 0), jnp.maximum(cos, 0.0), 0.0)
      total = jnp.sum(trust)
      coef = trust / jnp.where(norms > 0, norms, 1.0)
      update = jnp.where(total > 0, norm0 * (coef @ updates) / jnp.where(total > 0, total, 1.0),
                         0.0)
      return update, trust, cos

    finite = (jnp.all(jnp.isfinite(sq)) & jnp.all(jnp.isfinite(dots))
              & jnp.isfinite(norm0) & (norm0 < 1e18))
    update, trust, cos = jax.lax.cond(finite, fast, checked, None)
    return AggOut(update, trust, {"cos": cos})

  return stateless(apply)
