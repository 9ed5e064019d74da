"""Per-client L2 norm clipping: the one clip step, a pre-aggregator, a rule.

Every client's update is scaled to L2 norm at most ``L`` (sparsefed.txt
Alg. 1 line 7; ALGORITHMS.md section 3),

  u_i <- u_i * min(1, L / ||u_i||_2),

by :func:`clip_by_l2_norm`. The library clips in one place, used three ways:

* :func:`clip`, the pre-aggregator ``"clip"``: clips the K updates, then
  any base rule aggregates them (``compose(get("krum")(), [("clip",
  {"clip_norm": 5.0})])``);
* :func:`clipping`, the rule ``"clipping"``: the "clipping only" defence of
  sparsefed.txt B.1.4 / B.2 ("Can you really backdoor federated learning?",
  Sun et al. 2019), ``clip`` around FedAvg (weighted by the clients' dataset
  sizes) or unweighted FedAvg. It is SparseFed without momentum, error
  feedback and top-k (``sparsefed(clip_norm=L, k=d, rho=0)``), the ablation
  "sparsification needs norm clipping" of sparsefed.txt B.2 sets against;
* :func:`clip_step`, the step SparseFed and FetchSGD take first, with the
  adaptive bound ``L_t = L * lr(t)`` of sparsefed.txt App. B.2.

Under sparse uploads the norm is that of the zero-filled dense view (the
values the client sent); the masks pass through to the base rule (FedAvg's
mean is then FLARE's sparse aggregation, Alg. 2).

Non-finite and huge rows: norms are computed without overflow, so a row at
``1e30`` is clipped to norm ``L`` like any other; a row with ``inf``/``nan``
has no norm and comes out non-finite, and the means that follow leave it out
(acceptance 0; :func:`~fedjax_sparse.aggregators.base.combine_finite`). The
output of ``clipping`` is a mean of rows of norm at most ``L``, so its norm
is at most ``L`` whatever is sent.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators._common import safe_norm
from fedjax_sparse.aggregators.base import AggOut, Aggregator, combine_scaled
from fedjax_sparse.aggregators.fedavg import fedavg, nwfedavg
from fedjax_sparse.aggregators.pre_registry import register_pre
from fedjax_sparse.aggregators.registry import register

Array = jax.Array


def clip_by_l2_norm(updates: Array, max_norm) -> tuple[Array, Array]:
  """Scales every row to L2 norm at most ``max_norm`` (sparsefed.txt Alg. 1).

  ``u_i <- u_i * min(1, L / ||u_i||_2)``; rows with norm 0 and ``L = inf``
  are left unchanged.

  Huge and non-finite rows: the squares of entries above ~1.8e19 overflow
  ``f32``; when a row's plain norm is not finite it is recomputed with scaling
  (:func:`fedjax_sparse.aggregators._common.safe_norm`, under ``lax.cond`` so
  that rounds without such rows compute exactly what they always did), so a
  row at ``1e30`` is clipped to norm ``L`` like any other (and its product
  with the tiny factor is taken in two steps, never through a subnormal); a
  row whose norm exceeds the ``f32`` range (entries near ``3e38``) becomes 0.
  A row with ``inf``/``nan`` has no norm: it comes out non-finite, and the
  means that follow leave such rows out
  (:func:`fedjax_sparse.aggregators.base.combine_finite`).

  Args:
    updates: ``f32[..., d]``.
    max_norm: ``L``, a Python float or a traced scalar (``inf``: no clipping).

  Returns:
    ``(clipped f32[..., d], scale f32[...])`` with the factor applied per row.
  """
  norms = jnp.sqrt(jnp.sum(jnp.square(updates), axis=-1))
  max_norm = jnp.asarray(max_norm, updates.dtype)

  def plain(norms):
    scale = jnp.where(norms > max_norm,
                      max_norm / jnp.where(norms > 0, norms, 1.0), 1.0)
    return updates * scale[..., None], scale

  def rescaled(norms):
    over = ~jnp.isfinite(norms)
    norms = jnp.where(over, safe_norm(updates), norms)
    clipped, scale = plain(norms)
    # u * (L / ||u||) in two steps: L / ||u|| is subnormal (flushed to 0 on
    # CPU) for ||u|| above ~1e38 / L.
    root = jax.lax.rsqrt(jnp.where(norms > 0, norms, 1.0))
    two_step = ((updates * root[..., None]) * root[..., None]) * max_norm
    clipped = jnp.where((over & (norms > max_norm))[..., None], two_step,
                        clipped)
    return clipped, scale

  return jax.lax.cond(jnp.all(jnp.isfinite(norms)), plain, rescaled, norms)


def check_clip_config(clip_norm, adaptive_clip: bool = False) -> None:
  """``clip_norm`` > 0 (``inf`` disables clipping), finite if adaptive."""
  if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) \
      or not float(clip_norm) > 0:
    raise ValueError(f"clip_norm (L) must be > 0 (inf disables clipping), got "
                     f"{clip_norm!r}")
  if adaptive_clip and math.isinf(float(clip_norm)):
    raise ValueError("adaptive_clip=True scales clip_norm by the learning rate; "
                     "set a finite clip_norm")


def clip_threshold(clip_norm: float, adaptive_clip: bool,
                   lr_schedule: Optional[Callable], ctx):
  """``L`` or, with adaptive clipping, ``L * lr(t)`` (sparsefed.txt App. B.2).

  The learning rate is ``lr_schedule(ctx.round)`` when given, else the traced
  scalar ``ctx.lr`` that the round step passes in.
  """
  if not adaptive_clip:
    return clip_norm
  if lr_schedule is not None:
    lr = lr_schedule(ctx.round)
  else:
    lr = getattr(ctx, "lr", None)
    if lr is None:
      raise ValueError(
          "adaptive_clip=True needs the learning rate: pass lr_schedule= to the "
          "factory or put the round's scalar lr in AggContext.lr")
  return clip_norm * jnp.asarray(lr, jnp.float32)


def clip_step(updates: Array, clip_norm: float, ctx,
              adaptive_clip: bool = False,
              lr_schedule: Optional[Callable] = None):
  """The clip step of ``"clip"``, ``"clipping"``, SparseFed and FetchSGD.

  Args:
    updates: ``f32[K, d]``.
    clip_norm: ``L`` (checked by :func:`check_clip_config`); ``inf`` without
      ``adaptive_clip`` returns the updates as they are.
    ctx: the round's :class:`~fedjax_sparse.aggregators.AggContext` (read
      only with ``adaptive_clip``).
    adaptive_clip, lr_schedule: clip to ``L * lr(t)``
      (:func:`clip_threshold`).

  Returns:
    ``(clipped f32[K, d], scale f32[K], limit)``: the factor applied to each
    row and the bound used (a float, or a traced scalar when adaptive).
  """
  limit = clip_threshold(clip_norm, adaptive_clip, lr_schedule, ctx)
  if math.isinf(float(clip_norm)) and not adaptive_clip:
    return updates, jnp.ones((updates.shape[0],), updates.dtype), limit
  clipped, scale = clip_by_l2_norm(updates, limit)
  return clipped, scale, limit


@register_pre("clip")
def clip(base: Aggregator, clip_norm: float = 5.0, adaptive_clip: bool = False,
         lr_schedule: Optional[Callable[[Array], Array]] = None) -> Aggregator:
  """Per-client L2 clipping to ``clip_norm`` before ``base``.

  Args:
    base: the rule applied to the clipped updates.
    clip_norm: ``L``, the per-client L2 bound (sparsefed.txt's parameter,
      5.0); ``inf`` disables clipping.
    adaptive_clip: clip to ``L * lr(t)`` (sparsefed.txt App. B.2).
    lr_schedule: ``round -> lr`` for adaptive clipping; ``None`` reads
      ``ctx.lr``.

  Returns:
    An :class:`~fedjax_sparse.aggregators.Aggregator` with the base's state.
    Diagnostics: the base's, plus ``clip_scale`` (``f32[K]``, the factor
    applied to each update).

  Raises:
    ValueError: ``clip_norm`` is not > 0, or not finite with
      ``adaptive_clip``.
  """
  check_clip_config(clip_norm, adaptive_clip)

  def apply(state, updates, masks, weights, key, ctx):
    clipped, scale, _ = clip_step(updates, clip_norm, ctx, adaptive_clip,
                                  lr_schedule)
    out, state = base.apply(state, clipped, masks, weights, key, ctx)
    return AggOut(out.update, out.acceptance,
                  dict(out.diagnostics, clip_scale=scale)), state

  return Aggregator(base.init, apply, base.selection_escape)


@register("clipping")
def clipping(clip_norm: float = 5.0, weighted: bool = True) -> Aggregator:
  """Per-client L2 clipping to ``clip_norm``, then the (weighted) mean.

  Args:
    clip_norm: ``L``, the per-client L2 bound (sparsefed.txt's parameter,
      5.0); ``inf`` disables clipping (then this is FedAvg).
    weighted: weight the mean by the given weights (the clients' dataset
      sizes, like ``fedavg``); False averages uniformly (like ``nwfedavg``).

  Returns:
    ``clip(fedavg())`` or ``clip(nwfedavg())``: no state, every client
    accepted (but those that sent inf/nan), and diagnostics ``clip_scale``
    (``f32[K]``, the factor applied to each update).

  Raises:
    ValueError: ``clip_norm`` is not > 0.
  """
  general = clip(fedavg() if weighted else nwfedavg(), clip_norm)
  limit = float(clip_norm)

  def apply(state, updates, masks, weights, key, ctx):
    # Every plain norm finite (no inf/nan, no entry beyond ~1e19): the
    # clipped mean as (w * s) @ U, one pass after the norms. Otherwise the
    # general clip step and mean, which handle such rows.
    norms = jnp.sqrt(jnp.sum(jnp.square(updates), axis=1))

    def fast(_):
      scale = (jnp.ones_like(norms) if math.isinf(limit) else
               jnp.where(norms > limit, limit / jnp.where(norms > 0, norms, 1.0),
                         1.0))
      w = weights if weighted else jnp.ones_like(weights)
      update = combine_scaled(updates, masks, w, scale, ctx.pack_size)
      return AggOut(update, jnp.ones_like(norms), {"clip_scale": scale}), state

    return jax.lax.cond(jnp.all(jnp.isfinite(norms)), fast,
                        lambda _: general.apply(state, updates, masks, weights,
                                                key, ctx), None)

  return Aggregator(general.init, apply)
