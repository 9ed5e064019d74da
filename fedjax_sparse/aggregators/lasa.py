"""LASA: layer-adaptive sparsified aggregation (Xu et al., 2024).

As the hybrid paper writes it (hybrid_sparse_attack.txt App. G, Alg. 9,
eqs. 34-35; ALGORITHMS.md section 4):

1. Clip every update to the median norm: ``u_i *= min(1, med / ||u_i||)``.
2. Sparsify every client: keep its top ``sparsity`` fraction (30%) of
   coordinates by magnitude (ties at the threshold are kept).
3. Per layer ``l``: norms ``omega_i`` and positive direction purity
   ``rho_i = (1 + sum sgn / sum |sgn|) / 2`` (eq. 34; 1/2 for an all-zero
   layer) of the sparsified updates; MZ-scores ``(x - median) / std`` of both
   (eq. 35; 0 when the std is 0); client ``i`` is kept in layer ``l`` if
   ``|MZ| <= lambda_m`` (norm) and ``|MZ| <= lambda_d`` (purity), both 1.0;
   if nobody is kept, everybody is.
4. The output on layer ``l`` is the plain mean of the kept clients'
   sparsified updates on that layer.

Layers are the leaves of ``ctx.layout`` (each kernel and each bias is its own
layer; ours, as the paper does not say how biases are grouped); without a
layout the whole vector is one layer. Under sparse uploads LASA runs on the
dense view; weights are not used. Rows with inf/nan are never kept.
Acceptance is the fraction of layers in which a client is kept.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.aggregators import _common, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register

Array = jax.Array


def _masked_median(x: Array, ok: Array, axis=None) -> Array:
  return jnp.nanmedian(jnp.where(ok, x, jnp.nan), axis=axis)


def mz_score(x: Array, ok: Array) -> Array:
  """MZ-score ``(x - median) / std`` over the clients with ``ok`` (eq. 35).

  Args:
    x: ``f32[..., K]`` values, one set per leading index.
    ok: ``bool[K]`` clients that count.

  Returns:
    ``f32[..., K]``; 0 where the standard deviation is 0.
  """
  n = jnp.maximum(jnp.sum(ok), 1)
  mean = jnp.sum(jnp.where(ok, x, 0.0), axis=-1, keepdims=True) / n
  var = jnp.sum(jnp.where(ok, (x - mean) ** 2, 0.0), axis=-1, keepdims=True) / n
  std = jnp.sqrt(var)
  med = _masked_median(x, ok, axis=-1)[..., None]
  return jnp.where(std > 0, (x - med) / jnp.where(std > 0, std, 1.0), 0.0)


def kth_largest_abs(x: Array, k: int) -> Array:
  """``f32[K]``: the ``k``-th largest ``|x[i, :]|`` of every row, exactly.

  Bisection on the bit patterns (monotone for non-negative floats): 32 counting
  passes, 160 ms for 25 x 270k against 1.9 s for a row sort on XLA:CPU.
  """
  bits = jax.lax.bitcast_convert_type(jnp.abs(x), jnp.int32)
  lo = jnp.zeros((x.shape[0],), jnp.int32)
  hi = jnp.full((x.shape[0],), 0x7F800001, jnp.int32)  # just above +inf

  def body(_, carry):
    lo, hi = carry
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits >= mid[:, None], axis=1) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def positive_direction_purity(pos: Array, total: Array) -> Array:
  """Eq. 34 from ``sum sgn`` and ``sum |sgn|``; 1/2 when ``total`` is 0."""
  return 0.5 * (1.0 + jnp.where(total > 0, pos / jnp.where(total > 0, total, 1.0), 0.0))


@register("lasa")
def lasa(sparsity: float = 0.3, lambda_m: float = 1.0,
         lambda_d: float = 1.0) -> Aggregator:
  """Layer-wise MZ-score filtering of clipped, sparsified updates.

  Args:
    sparsity: fraction of coordinates each client keeps (top by magnitude).
    lambda_m: radius on the norm MZ-score.
    lambda_d: radius on the direction-purity MZ-score.

  Returns:
    An :class:`Aggregator`. Diagnostics: ``kept bool[L, K]`` per layer.
  """
  if not 0.0 < sparsity <= 1.0:
    raise ValueError(f"lasa: sparsity must be in (0, 1], got {sparsity}")

  def apply(updates, masks, weights, key, ctx):
    del masks, weights, key
    d = updates.shape[1]
    ok = _common.finite_rows(updates)
    x = _common.zero_rows(updates, ok)
    norms = _common.safe_norm(x)
    med = _masked_median(norms, ok)
    x = x * jnp.where(norms > med, _common.divide(med, norms), 1.0)[:, None]
    n_keep = max(1, math.ceil(sparsity * d))
    if n_keep < d:
      threshold = kth_largest_abs(x, n_keep)
      x = jnp.where(jnp.abs(x) >= threshold[:, None], x, 0.0)
    if ctx.layout is not None:
      seg, n_layers = ctx.layout.segment_ids(), ctx.layout.num_leaves
    else:
      seg, n_layers = np.zeros((d,), np.int32), 1
    seg = jnp.asarray(seg)
    # Per-layer sums over the (contiguous) layers: [L, K].
    xt = x.T
    signs = jnp.sign(xt)

    def layer_sum(v):
      return jax.ops.segment_sum(v, seg, n_layers, indices_are_sorted=True)

    omega = jnp.sqrt(layer_sum(xt * xt))
    rho = positive_direction_purity(layer_sum(signs), layer_sum(jnp.abs(signs)))
    kept = (ok[None, :] & (jnp.abs(mz_score(omega, ok)) <= lambda_m)
            & (jnp.abs(mz_score(rho, ok)) <= lambda_d))
    kept = jnp.where(jnp.any(kept, axis=1, keepdims=True), kept, ok[None, :])
    counts = jnp.sum(kept, axis=1).astype(x.dtype)  # [L]
    coord_weight = kept.T.astype(x.dtype)[:, seg]  # [K, d]
    update = _order_stats.sum_rows(coord_weight * x) / jnp.maximum(counts, 1.0)[seg]
    acceptance = jnp.mean(kept.astype(jnp.float32), axis=0)
    return AggOut(update, acceptance, {"kept": kept})

  return stateless(apply)
