"""C-LASA: the counter-attack against LASA (hybrid_sparse_attack.txt App. G, Alg. 10).

The only sign manipulation the hybrid paper describes: every attacker sends
``p``, built from the benign updates' inverted mean sign, a large scale on
the locations that the benign clients' smallest magnitudes point to, and
each layer's median benign norm (:func:`c_lasa`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.attacks import _stats
from fedjax_sparse.attacks.base import (UpdateAttack, check_knowledge, no_state,
                                        replace_malicious)
from fedjax_sparse.attacks.registry import register_update
from fedjax_sparse.sparsify.topk import topk_mask

Array = jax.Array

CLASA_SELECTIONS = ("least_utilized", "bottom_count")

_F32_INF_BITS = 0x7F800000


def bottomk_mask(values: Array, k: int) -> Array:
  """Exact mask of the ``k`` smallest ``|values|`` (ties to the lower index).

  Reuses the radix top-k of :func:`fedjax_sparse.sparsify.topk_mask` on
  order-reversed keys: for ``x >= 0`` the f32 bit pattern is monotone in
  ``x``, so ``inf_bits - bits(x)`` is a non-negative bit pattern decreasing
  in ``x``.
  """
  bits = lax.bitcast_convert_type(jnp.abs(values).astype(jnp.float32), jnp.int32)
  rev = jnp.int32(_F32_INF_BITS) - jnp.minimum(bits, _F32_INF_BITS)
  return topk_mask(lax.bitcast_convert_type(rev, jnp.float32), k)


def _layer_slices(ctx, d: int) -> list[slice]:
  layout = getattr(ctx, "layout", None)
  if layout is None:
    return [slice(0, d)]
  if layout.d != d:
    raise ValueError(f"c_lasa: ctx.layout has d={layout.d} but the updates have d={d}")
  return layout.slices()


def _masked_median(v: Array, sel: Array) -> Array:
  """Median of ``v[i]`` over rows with ``sel > 0``, for ``v: f32[K, L]``."""
  s = jnp.sort(jnp.where(sel[:, None] > 0, v, jnp.inf), axis=0)
  n = jnp.maximum(jnp.sum(sel > 0), 1).astype(jnp.int32)
  lo = jnp.take(s, (n - 1) // 2, axis=0)
  hi = jnp.take(s, n // 2, axis=0)
  return 0.5 * (lo + hi)


@register_update("c_lasa")
def c_lasa(delta: float = 0.5, beta: float = 0.05, z_large: float = 1.5,
           z: Optional[float] = None, selection: str = "least_utilized",
           knowledge: str = "omniscient") -> UpdateAttack:
  """Counter-attack against LASA (hybrid_sparse_attack.txt App. G, Alg. 10).

  1. ``s = sign(mean(G))``, ``sigma = std(G)`` over the benign updates G.
  2. For every benign ``g_i``, ``I_i`` = its ``floor(delta d)`` smallest
     magnitudes; ``count[j]`` = how many ``I_i`` contain ``j``.
  3. ``J``: ``floor(beta d)`` locations chosen from ``count``; ``m = sigma
     z_max`` and ``m[J] = sigma z_large``; ``m = m * s``.
  4. Per layer ``l``: ``p_l = -m_l / ||m_l|| * median_i ||G_{i,l}||``.
  Every attacker sends ``p``. Layers are the leaves of ``ctx.layout`` (one
  layer if it is None).

  The paper is inconsistent about step 3: its text targets "less-utilized
  parameter locations", "the parameter indices with the smallest magnitudes
  from benign clients", i.e. the locations in the most ``I_i`` (largest
  ``count``; ``selection="least_utilized"``, the default), while line 12 of
  Alg. 10 writes ``bottom-k(count)`` (``selection="bottom_count"``, which with
  small ``delta`` mostly picks ties at ``count = 0``, broken here towards the
  lower index). The paper gives no defaults for ``delta``, ``beta`` and
  ``z_large``: 0.5, 0.05 (its HSA sparsity in Table XXVI) and 1.5 (HSA's z2)
  are ours.

  Args:
    delta: fraction of smallest-magnitude coordinates per benign client.
    beta: fraction of locations given ``z_large``.
    z_large: the large scale.
    z: the small scale; None for ALIE's ``z_max``.
    selection: ``"least_utilized"`` or ``"bottom_count"`` (see above).
    knowledge: ``"omniscient"`` or ``"partial"``.
  """
  check_knowledge(knowledge)
  if selection not in CLASA_SELECTIONS:
    raise ValueError(f"unknown selection {selection!r}; choose one of "
                     f"{', '.join(CLASA_SELECTIONS)}")
  if not 0 < delta <= 1 or not 0 < beta <= 1:
    raise ValueError(f"delta and beta must be in (0, 1], got {delta}, {beta}")

  def apply(state, updates, is_malicious, key, ctx):
    del key
    k_rows, d = updates.shape
    k_small = max(1, int(math.floor(delta * d)))
    k_large = max(1, int(math.floor(beta * d)))
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    mu, sigma = _stats.mean_std(updates, sel)
    sign = jnp.sign(mu)

    def add_row(i, count):
      return lax.cond(sel[i] > 0,
                      lambda c: c + bottomk_mask(updates[i], k_small).astype(jnp.int32),
                      lambda c: c, count)

    count = lax.fori_loop(0, k_rows, add_row, jnp.zeros((d,), jnp.int32))
    if selection == "least_utilized":
      big = topk_mask(count.astype(jnp.float32), k_large)
    else:
      big = bottomk_mask(count.astype(jnp.float32), k_large)
    zz = (_stats.z_max(k_rows, jnp.sum(is_malicious)) if z is None else jnp.float32(z))
    m = sigma * jnp.where(big, jnp.float32(z_large), zz) * sign
    parts = []
    for sl in _layer_slices(ctx, d):
      g_norm = jnp.sqrt(jnp.sum(jnp.square(updates[:, sl]), axis=1))
      target = _masked_median(g_norm[:, None], sel)[0]
      ml = m[sl]
      n_ml = jnp.linalg.norm(ml)
      parts.append(jnp.where(n_ml > 0, -ml / jnp.where(n_ml > 0, n_ml, 1.0) * target, 0.0))
    p = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return replace_malicious(updates, is_malicious, p), state

  return UpdateAttack(no_state, apply)
