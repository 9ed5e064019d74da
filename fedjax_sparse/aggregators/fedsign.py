"""FedSign filter (Guo et al., 2023, as FLARE describes it; ALGORITHMS.md section 4).

Interpretation (ours, as ALGORITHMS.md fixes it): each client's signature is
``sign(u_i)`` (0 off its mask under sparse uploads, since the dense view is 0
there); ``cos(i, j)`` is the cosine of two signatures (0 if either is all
zero); the attack density of client ``i`` is its mean cosine to the others.
Clients whose density is at most the average density are honest (flare.txt
V-B: "clients with an attack density below average are considered honest")
and are combined with FedAvg / FLARE Alg. 2. "At most" rather than "below",
with a relative tolerance of 1e-6, so that a round of identical densities
keeps everyone instead of no one. ``sign(nan)`` counts as 0, and a row with
inf/nan is rejected whatever its density (ours: it cannot be averaged).

Huge rows: the output is finite (the accepted rows are averaged by
:func:`~fedjax_sparse.aggregators.base.combine`), not bounded by the honest
rows. The filter sees signs only, never magnitudes, so a finite row whose
signs look honest (a low density) is averaged in at whatever scale it was
sent: one row at ``-1e30`` whose signs disagree with the others has the
lowest density and moves the output by about ``1e30 / (number accepted)``.
That is the rule (FLARE's FedSign reading), not a numerical accident.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register


def sign_cosine(signs: jax.Array) -> jax.Array:
  """``f32[K, K]`` cosine similarity of sign vectors (0 for a zero vector)."""
  g = _common.gram(signs, signs)
  norm = jnp.sqrt(jnp.diag(g))
  den = norm[:, None] * norm[None, :]
  return jnp.where(den > 0, g / jnp.where(den > 0, den, 1.0), 0.0)


@register("fedsign")
def fedsign() -> Aggregator:
  """FedSign: keep the clients whose sign-cosine density is at most the mean.

  Returns:
    An :class:`Aggregator`. Diagnostics: ``density f32[K]``.
  """

  def apply(updates, masks, weights, key, ctx):
    del key
    k = updates.shape[0]
    signs = jnp.sign(jnp.where(jnp.isnan(updates), 0.0, updates))
    cos = sign_cosine(signs)
    off_diag = ~jnp.eye(k, dtype=bool)
    density = jnp.sum(jnp.where(off_diag, cos, 0.0), axis=1) / max(k - 1, 1)
    mean = jnp.mean(density)
    tol = 1e-6 * jnp.maximum(jnp.max(jnp.abs(density)), 1e-12)
    # A row with inf/nan cannot be averaged (ours): always rejected.
    acceptance = ((density <= mean + tol)
                  & _common.finite_rows(updates)).astype(jnp.float32)
    update = _common.combine_accepted(updates, masks, weights, acceptance,
                                      ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"density": density})

  return stateless(apply)
