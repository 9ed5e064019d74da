"""FLGuardian (Zhou et al., 2025), as ALGORITHMS.md section 4 interprets it (ours).

Per layer ``l``: every client gets the feature vector ``[cos(u_i^l, u_j^l)]_j
++ [||u_i^l - u_j^l|| / max distance]_j`` (cosine and normalised Euclidean
distance to every client, 2K features); 2-means (deterministic maximin seeding, so
that the split does not depend on the order of the clients; fixed Lloyd
iterations) splits the clients in two, and the
larger cluster is benign in that layer (a tie goes to the cluster of the
lowest client index). ``trust_i`` is the fraction of layers in which ``i`` is
benign; the clients with ``trust_i >= median(trust)`` are combined with
FedAvg / FLARE Alg. 2.

Layers are the leaves of ``ctx.layout`` (the whole vector without one).
Distances come from Gram matrices after centring on the mean of the usable
rows (as the numpy reference does), cosines from the Gram matrix of the
unit rows. The mean is not robust, but it does not need to be here: the
distance features are divided by the largest distance, which is at least
every usable row's distance to the mean, so the f32 cancellation error of
``g_aa + g_bb - 2 g_ab`` is a few ulps of the largest squared distance (the
honest rows' features are resolved to about 1e-3 of the largest distance
when a far row sets it, as far as 2-means needs). (The rule
centred on the coordinate-wise median until 2026-12; its sorting network
was half of the rule's HLO at K = 100 and about 2 s of compiling on the
loaded 2-core machine; the features moved by f32 rounding only.)

Unusable rows (ours): a row with inf/nan, or whose squared norm overflows
``f32`` (entries beyond ~1e19, e.g. ``1e30``; the Krum family's convention,
:mod:`._distances`), gets cosine 0 and distance 1 (the maximum) to everyone,
is left out of the 2-means (:func:`fedjax_sparse.cluster.kmeans` with
``valid``: it is never a seed and moves no centre) and is never accepted;
the cluster sizes and the median trust are those of the usable rows. Without
this, four identical rows at ``1e30`` among nine joined a cluster of
honest rows with similar cosines and were averaged in. With ``K = 1`` there
is nothing to split: the one client is accepted if usable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.cluster.kmeans import kmeans

Array = jax.Array


def _layer_features(raw: Array, centred: Array, ok: Array) -> Array:
  """``f32[K, 2K]`` cosine and normalised distance features of one layer.

  Both features are scale invariant, so the rows are rescaled first (unit
  rows for the cosine, the layer's largest magnitude for the distances) and
  no Gram entry can overflow, whatever the magnitudes sent.
  """
  k = raw.shape[0]
  norm = _common.safe_norm(raw)
  units = _common.divide(raw, norm[:, None])
  cos = jnp.clip(_common.gram(units, units), -1.0, 1.0)
  c = jnp.where(ok[:, None], centred, 0.0)
  c = _common.divide(c, jnp.max(jnp.abs(c)))
  gc = _common.gram(c, c)
  sq = jnp.diag(gc)
  dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gc, 0.0))
  pair_ok = ok[:, None] & ok[None, :]
  top = jnp.max(jnp.where(pair_ok, dist, 0.0))
  dist = jnp.where(pair_ok, _common.divide(dist, top), 1.0)
  eye = jnp.eye(k, dtype=bool)
  dist = jnp.where(eye, 0.0, dist)
  cos = jnp.where(pair_ok, cos, jnp.where(eye, 1.0, 0.0))
  return jnp.concatenate([cos, dist], axis=1)


@register("flguardian")
def flguardian(num_iters: int = 20) -> Aggregator:
  """Layer-wise 2-means on cosine/distance features; trust by majority layers.

  Args:
    num_iters: Lloyd iterations of each layer's 2-means.

  Returns:
    An :class:`Aggregator`. Diagnostics: ``trust f32[K]``.
  """

  def apply(updates, masks, weights, key, ctx):
    del key  # maximin seeding needs none
    k, d = updates.shape
    # inf/nan, or a squared norm beyond f32 (|u| > ~1e19): unusable.
    ok = jnp.isfinite(jnp.sum(updates * updates, axis=1))
    if k == 1:  # nothing to split
      acceptance = ok.astype(jnp.float32)
      update = _common.combine_accepted(updates, masks, weights, acceptance,
                                        ctx.pack_size, ctx.finite_uploads)
      return AggOut(update, acceptance, {"trust": acceptance})
    x = _common.zero_rows(updates, ok)
    share = ok.astype(x.dtype) / jnp.maximum(jnp.sum(ok), 1).astype(x.dtype)
    centre = jnp.matmul(share, x, precision=jax.lax.Precision.HIGHEST)
    centred = x - centre[None, :]
    slices = ctx.layout.slices() if ctx.layout is not None else [slice(0, d)]
    features = jnp.stack([_layer_features(x[:, sl], centred[:, sl], ok)
                          for sl in slices])
    labels, _ = jax.vmap(
        lambda f: kmeans(f, 2, jax.random.PRNGKey(0), num_iters=num_iters,
                         init="maximin", valid=ok))(features)
    size1 = jnp.sum(labels == 1, axis=1)
    size0 = jnp.sum(labels == 0, axis=1)
    # Larger cluster; on a tie, the cluster of the first usable client.
    first = jnp.argmax(ok)
    benign_label = jnp.where(size1 > size0, 1,
                             jnp.where(size1 < size0, 0, labels[:, first]))
    benign = labels == benign_label[:, None]
    trust = jnp.where(ok, jnp.mean(benign.astype(jnp.float32), axis=0), 0.0)
    median_trust = jnp.nanmedian(jnp.where(ok, trust, jnp.nan))
    acceptance = (ok & (trust >= median_trust)).astype(jnp.float32)
    update = _common.combine_accepted(updates, masks, weights, acceptance,
                                      ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, acceptance, {"trust": trust})

  return stateless(apply)
