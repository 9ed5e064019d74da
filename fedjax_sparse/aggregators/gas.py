"""GAS: gradient splitting (Liu, Gu & Chen, 2023; ALGORITHMS.md section 4).

The d coordinates are shuffled with the round's key and cut into ``p`` groups
of (nearly) equal size (``p = 1000`` in the hybrid paper for ResNet-20 and the
2-layer CNN, 100 for the MLP). In every group the base rule (Krum or Bulyan)
aggregates the clients' sub-vectors; client ``i`` scores the sum over groups
of the Euclidean distance from its sub-vector to the group aggregate; the
``K - f`` lowest-scored clients are combined with FedAvg / FLARE Alg. 2.

Per-group Krum distances come from per-group Gram matrices after centring
on a central row (:func:`._distances.medoid`, the centre :mod:`.krum` falls
back to; the coordinate-wise median until 2026-12, whose sorting network was
half of the rule's HLO at K = 100: any centre near the honest rows gives the
same distances up to f32 rounding). Krum's condition ``K >= 2f + 3``
(Blanchard et al., 2017) is required (ValueError otherwise): with ``K = 2f +
1`` copies of one vector win every group. Rows with inf/nan are
infinitely far in every group, never selected by the base rule and scored
``inf``. Zero coordinates pad ``d`` up to a multiple of ``p``; they add
nothing to any distance.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _distances, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register

Array = jax.Array


def _group_sq_dists(x: Array, xt: Array, ok: Array) -> Array:
  """``f32[p, K, K]`` squared distances within each group.

  ``x f32[K, p, s]`` and ``xt f32[p, K, s]`` are the same values in the two
  layouts: the Gram matrices come from ``xt`` (a batched product), the
  squared norms from ``x`` (the same sums as before the layout change).
  """
  g = jnp.einsum("pks,pjs->pkj", xt, xt, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.einsum("kps,kps->pk", x, x, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * g, 0.0)
  d2 = jnp.where(jnp.isnan(d2), jnp.inf, d2)
  d2 = jnp.where(ok[None, :, None] & ok[None, None, :], d2, jnp.inf)
  k = x.shape[0]
  return jnp.where(jnp.eye(k, dtype=bool)[None], 0.0, d2)


def _sum_nearest(d2: Array, n: int) -> Array:
  """``f32[p, K]``: sums of the ``n`` smallest entries of every row of ``d2``.

  ``d2 f32[p, K, K]`` holds no NaN and no negative number but ``-0.0``, so
  its bit patterns as ``int32`` sort in the order of the values: the rows
  are sorted as integers (XLA:CPU sorted ``f32[1000, 100, 100]`` in 0.57 s
  as ``int32`` and 2.1 s as ``f32``, with its NaN-aware comparator), and the
  ``n`` smallest values are summed in ascending order as before.
  """
  bits = jax.lax.bitcast_convert_type(d2, jnp.int32)
  ranked = jax.lax.bitcast_convert_type(
      jax.lax.sort(bits, dimension=2, is_stable=False), d2.dtype)
  return jnp.sum(ranked[:, :, :n], axis=2)


@register("gas")
def gas(base: str = "krum", p: int = 1000, f: Optional[int] = None) -> Aggregator:
  """Gradient splitting around Krum or Bulyan.

  Args:
    base: ``"krum"`` or ``"bulyan"``, the rule run in every group.
    p: number of coordinate groups (at most d; fewer if d is smaller).
    f: Byzantine clients assumed; ``None`` means ``ctx.num_byzantine``.

  Returns:
    An :class:`Aggregator`. Diagnostics: ``scores f32[K]``.
  """
  if base not in ("krum", "bulyan"):
    raise ValueError(f"gas: base must be 'krum' or 'bulyan', got {base!r}")
  if p < 1:
    raise ValueError(f"gas: the number of groups p must be >= 1, got {p}")

  def apply(updates, masks, weights, key, ctx):
    k, d = updates.shape
    f_ = _common.resolve_f(f, ctx)
    n_nearest = k - f_ - 2
    _common.check_krum_size(k, f_, "gas")
    groups = min(p, d)
    size = -(-d // groups)
    ok = _common.finite_rows(updates)
    x = _common.zero_rows(updates, ok)
    x = x - _distances.medoid(x, ok)[None, :]
    perm = jax.random.permutation(key, d)
    x = jnp.pad(x[:, perm], ((0, 0), (0, groups * size - d)))
    # Groups first: every group's rows are one contiguous [K, s] block, the
    # layout of a batched matrix product (0.17 s for the Gram matrices at K =
    # 100 against 0.67 s on [K, p, s]).
    x = x.reshape(k, groups, size)
    xt = jnp.transpose(x, (1, 0, 2))  # [p, K, s]
    d2 = _group_sq_dists(x, xt, ok)
    others = jnp.where(jnp.eye(k, dtype=bool)[None], jnp.inf, d2)
    krum = _sum_nearest(others, n_nearest)  # [p, K]
    order = jnp.argsort(jnp.where(jnp.isnan(krum), jnp.inf, krum), axis=1,
                        stable=True)
    if base == "krum":
      agg = jnp.take_along_axis(xt, order[:, :1, None], axis=1)[:, 0]  # [p, s]
    else:
      n_sel = k - 2 * f_
      selected = jnp.take_along_axis(xt, order[:, :n_sel, None], axis=1)
      selected = jnp.transpose(selected, (1, 0, 2)).reshape(n_sel, groups * size)
      b = min(f_, (n_sel - 1) // 2)
      agg = _order_stats.coordinate_trimmed_mean(selected, b).reshape(groups, size)
    dist = _common.safe_norm(x - agg[None], axis=2)  # [K, p]
    scores = jnp.where(ok, jnp.sum(dist, axis=1), jnp.inf)
    acceptance = _common.lowest(scores, k - f_)
    update = _common.combine_accepted(updates, masks, weights, acceptance,
                                      ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"scores": scores})

  return stateless(apply)
