"""Helpers shared by SparseFed and FetchSGD: clipping and settings checks.

Kept free of any import of :mod:`fedjax_sparse.aggregators` so that the
aggregator modules can import it while the registry is being populated.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.sparsify.topk import check_k

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
    from fedjax_sparse.aggregators._common import safe_norm  # no import cycle
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


def check_k_spec(k) -> None:
  """``k`` is an absolute int >= 1 or a fraction of ``d`` in (0, 1]."""
  if isinstance(k, bool) or not isinstance(k, numbers.Real):
    raise ValueError(f"k must be an int >= 1 (coordinates kept) or a float in "
                     f"(0, 1] (fraction of d), got {k!r}")
  if isinstance(k, numbers.Integral):
    if k < 1:
      raise ValueError(f"k must be >= 1 (coordinates kept each round), got {k}")
  elif not (0.0 < float(k) <= 1.0):
    raise ValueError(f"a fractional k must be in (0, 1] (fraction of d kept), "
                     f"got {k!r}; pass an int for an absolute number")


def resolve_k(k, d: int) -> int:
  """Absolute ``k`` for a model of ``d`` parameters (``ceil(k * d)`` if a fraction)."""
  check_k_spec(k)
  if isinstance(k, numbers.Integral):
    check_k(d, int(k))
    return int(k)
  return min(d, max(1, math.ceil(round(float(k) * d, 9))))


def check_clip_config(clip_norm, adaptive_clip: bool) -> None:
  if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) \
      or not float(clip_norm) > 0:
    raise ValueError(f"clip_norm (L) must be > 0 (inf disables clipping), got "
                     f"{clip_norm!r}")
  if adaptive_clip and math.isinf(float(clip_norm)):
    raise ValueError("adaptive_clip=True scales clip_norm by the learning rate; "
                     "set a finite clip_norm")


def check_rho(rho) -> None:
  if isinstance(rho, bool) or not isinstance(rho, numbers.Real) \
      or not 0.0 <= float(rho) < 1.0:
    raise ValueError(f"momentum rho must be in [0, 1), got {rho!r}")


def clip_threshold(clip_norm: float, adaptive_clip: bool,
                   lr_schedule: Optional[Callable], ctx):
  """``L`` or, with adaptive clipping, ``L * lr(t)`` (sparsefed.txt App. B.2)."""
  if not adaptive_clip:
    return clip_norm
  if lr_schedule is not None:
    lr = lr_schedule(ctx.round)
  else:
    extra = getattr(ctx, "extra", None) or {}
    if "lr" not in extra:
      raise ValueError(
          "adaptive_clip=True needs the learning rate: pass lr_schedule= to the "
          "factory or put the round's scalar lr in AggContext.extra['lr']")
    lr = extra["lr"]
  return clip_norm * jnp.asarray(lr, jnp.float32)
