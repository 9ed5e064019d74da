"""Adaptive Robust Clipping, ARC, a pre-aggregator (Allouah et al., 2024;
ByzFL's ``ARC``).

Allouah, Guerraoui, Gupta, Jellouli, Rizk and Stephan, "The Vital Role of
Gradient Clipping in Byzantine-Resilient Distributed Learning" (arXiv
2405.14432, 2024). With ``n_clip = floor(2 (f / K) (K - f))`` and the norms
sorted ascending, ``||u_(1)|| <= ... <= ||u_(K)||``, the ``n_clip`` largest
updates are clipped to the largest norm left, ``C = ||u_(K - n_clip)||``:

  ARC_f(u)_i = min(1, C / ||u_i||_2) u_i.

Clipping every row to ``C`` is the same thing (the rows below ``C`` keep
scale 1), so ARC is :func:`.clipping.clip_by_l2_norm` with an adaptive
bound, then any base rule: ``compose(get("krum")(), [("arc", {})])``. ARC
clips at least ``f`` rows while ``2f <= K`` (``n_clip >= f`` there), so with
at most ``f`` Byzantine clients every row leaves with a norm at most the
largest honest norm.

Conventions:

* ``f``: ByzFL's (``ctx.num_byzantine`` by default), ``0 <= f <= K``
  (ValueError otherwise); ``f = 0`` (or ``n_clip = 0``) leaves the updates
  unchanged (``C`` is then the largest norm). ``n_clip`` is computed in integers, ``2 f (K - f) // K`` (ByzFL
  multiplies floats, ``int((2 f / K) (K - f))``, which rounds down to one
  fewer at, e.g., ``K = 121, f = 66``).
* Unweighted: ``n_clip`` counts clients; the weights and the masks pass to
  the base unchanged. Under sparse uploads the norm is that of the
  zero-filled dense view (the values the client sent).
* Non-finite and huge rows (as ``clip``): norms are computed without
  overflow, so a row at ``1e30`` counts among the largest and is clipped to
  ``C``; a row with ``inf``/``nan`` has no norm, counts as the largest, and
  leaves non-finite (the base's means leave such rows out). When more than
  ``n_clip`` rows are non-finite, ``C`` is not finite and nothing is clipped.

Acceptance and diagnostics are the base's, with ``arc_clip_norm`` (``C``)
added.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.clipping import clip_by_l2_norm
from fedjax_sparse.aggregators.pre_registry import register_pre


def num_clipped(k: int, f: int) -> int:
  """ARC's ``floor(2 (f / K) (K - f))``, in integers."""
  return (2 * f * (k - f)) // k


def clip_norm(updates: jax.Array, n_clip: int) -> jax.Array:
  """``C``: the ``(K - n_clip)``-th smallest row norm (``nan`` norms, of
  rows with ``inf``/``nan``, count as the largest)."""
  k = updates.shape[0]
  norms = jnp.sqrt(jnp.sum(jnp.square(updates), axis=1))
  norms = jax.lax.cond(jnp.all(jnp.isfinite(norms)), lambda n: n,
                       lambda n: jnp.where(jnp.isfinite(n), n,
                                           _common.safe_norm(updates)), norms)
  norms = jnp.where(jnp.isnan(norms), jnp.inf, norms)
  return jnp.sort(norms)[k - n_clip - 1]


@register_pre("arc")
def arc(base: Aggregator, f: Optional[int] = None) -> Aggregator:
  """Clip the ``floor(2 (f/K) (K - f))`` largest updates to the largest
  remaining norm before ``base``.

  Args:
    base: the rule applied to the clipped updates.
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``.

  Returns:
    An :class:`Aggregator` with the base's state.
  """

  def init(d):
    return base.init(d)

  def apply(state, updates, masks, weights, key, ctx):
    k = updates.shape[0]
    f_ = _common.resolve_f(f, ctx)
    if f_ > k:
      raise ValueError(f"arc: f={f_} exceeds the K={k} updates; lower f "
                       "(--num_byzantine, or arc's f)")
    n_clip = num_clipped(k, f_)
    threshold = clip_norm(updates, n_clip)
    if n_clip:
      updates, _ = clip_by_l2_norm(updates, threshold)
    out, state = base.apply(state, updates, masks, weights, key, ctx)
    diagnostics = dict(out.diagnostics, arc_clip_norm=threshold)
    return AggOut(out.update, out.acceptance, diagnostics), state

  return Aggregator(init, apply, base.selection_escape)
