"""GAS: gradient splitting (Liu, Gu & Chen, 2023; ALGORITHMS.md section 4).

The d coordinates are shuffled with the round's key and cut into ``p`` groups
of (nearly) equal size (``p = 1000`` in the hybrid paper for ResNet-20 and the
2-layer CNN, 100 for the MLP). In every group the base rule (Krum or Bulyan)
aggregates the clients' sub-vectors; client ``i`` scores the sum over groups
of the Euclidean distance from its sub-vector to the group aggregate; the
``K - f`` lowest-scored clients are combined with FedAvg / FLARE Alg. 2.

Per-group Krum distances come from per-group Gram matrices after centring
on the coordinate-wise median, as in :mod:`.krum`. Krum's condition ``K >=
2f + 3`` (Blanchard et al., 2017) is required (ValueError otherwise): with
``K = 2f + 1`` copies of one vector win every group. Rows with inf/nan are
infinitely far in every group, never selected by the base rule and scored
``inf``. Zero coordinates pad ``d`` up to a multiple of ``p``; they add
nothing to any distance.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register

Array = jax.Array


def _group_sq_dists(x: Array, ok: Array) -> Array:
  """``f32[p, K, K]`` squared distances within each group of ``x f32[K, p, s]``."""
  g = jnp.einsum("kps,jps->pkj", x, x, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.einsum("kps,kps->pk", x, x, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * g, 0.0)
  d2 = jnp.where(jnp.isnan(d2), jnp.inf, d2)
  d2 = jnp.where(ok[None, :, None] & ok[None, None, :], d2, jnp.inf)
  k = x.shape[0]
  return jnp.where(jnp.eye(k, dtype=bool)[None], 0.0, d2)


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
    x = x - _order_stats.coordinate_median(x)[None, :]
    perm = jax.random.permutation(key, d)
    x = jnp.pad(x[:, perm], ((0, 0), (0, groups * size - d)))
    x = x.reshape(k, groups, size)
    d2 = _group_sq_dists(x, ok)
    others = jnp.where(jnp.eye(k, dtype=bool)[None], jnp.inf, d2)
    krum = jnp.sum(jnp.sort(others, axis=2)[:, :, :n_nearest], axis=2)  # [p, K]
    order = jnp.argsort(jnp.where(jnp.isnan(krum), jnp.inf, krum), axis=1,
                        stable=True)
    if base == "krum":
      agg = jnp.take_along_axis(x, order[:, :1].T[:, :, None], axis=0)[0]
    else:
      n_sel = k - 2 * f_
      selected = jnp.take_along_axis(x, order[:, :n_sel].T[:, :, None], axis=0)
      b = min(f_, (n_sel - 1) // 2)
      agg = _order_stats.coordinate_trimmed_mean(
          selected.reshape(n_sel, groups * size), b).reshape(groups, size)
    dist = _common.safe_norm(x - agg[None], axis=2)  # [K, p]
    scores = jnp.where(ok, jnp.sum(dist, axis=1), jnp.inf)
    acceptance = _common.lowest(scores, k - f_)
    update = _common.combine_accepted(updates, masks, weights, acceptance,
                                      ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"scores": scores})

  return stateless(apply)
