"""Exact top-k with a traced k, and the layer-wise constrained selection (SLC).

hybrid_sparse_attack.txt App. B.2, Alg. 5-7. Both are fixed-shape and
jittable, so FORCE's T pruning steps run inside one ``lax.fori_loop``.

The k-th largest key is found by the radix select of
:mod:`fedjax_sparse.sparsify.topk` (two histogram passes over the row; its
``k`` may be traced). Keys are the f32 bit patterns of non-negative
saliencies; a key of -1 marks an excluded entry (it falls outside the
histograms and never compares above the threshold). Ties go to the lower
index, so exactly ``k`` entries are kept.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# The radix select of the sparsifier, shared so both stay exact in the same way.
from fedjax_sparse.sparsify.topk import _score_keys, _threshold_row

Array = jax.Array

score_keys = _score_keys


def topk_keys(key: Array, k: Array) -> Array:
  """``bool[n]``: the ``k`` largest non-negative keys (``k`` may be traced).

  Entries with ``key < 0`` are excluded. ``k <= 0`` keeps nothing; ``k``
  larger than the number of eligible entries keeps all of them.
  """
  n = key.shape[0]
  valid = key >= 0
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  k = jnp.asarray(k, jnp.int32)
  kk = jnp.clip(k, 1, jnp.maximum(n_valid, 1))
  t, cut = _threshold_row(key, kk, "radix")
  m = (key > t) | ((key == t) & (jnp.arange(n, dtype=jnp.int32) <= cut))
  return m & valid & (k > 0)


def layerwise_select(saliency: Array, sizes: Sequence[int], n_target: Array,
                     caps: Array, capped: Sequence[bool]) -> Array:
  """Sparsification with layer-wise constraint (Alg. 5, with Alg. 6-7).

  ``A`` starts as all layers. Repeat: take the global top-``n_target`` of the
  saliencies of the layers in ``A`` (GMG, Alg. 7); every layer of ``A`` whose
  share exceeds its cap ``caps[l]`` gets its own top-``caps[l]`` (LMG, Alg. 6)
  and leaves ``A``, and ``n_target`` drops by ``caps[l]``; stop when no layer
  violates its cap, the layers left in ``A`` keeping the global selection.
  The loop runs ``sum(capped) + 1`` fixed iterations (each one removes a
  layer or stops). Unlike the paper's ``s >= u_th`` thresholds, ties at the
  threshold go to the lower index so the counts are exact.

  Args:
    saliency: ``f32[n]`` non-negative saliencies of the prunable parameters,
      layer after layer.
    sizes: static number of parameters of each layer (sum ``n``).
    n_target: global number to keep (may be traced).
    caps: ``int32[L]`` per-layer maximum counts (may be traced).
    capped: static, whether each layer has a cap below its size (layers
      without one cannot violate it and are skipped).

  Returns:
    ``bool[n]`` with ``n_target`` entries when the caps allow it.
  """
  sizes = [int(s) for s in sizes]
  n_layers = len(sizes)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  key = score_keys(saliency)
  n_target = jnp.asarray(n_target, jnp.int32)
  if not any(capped):
    return topk_keys(key, n_target)
  caps = jnp.asarray(caps, jnp.int32)
  capped_arr = jnp.asarray(np.asarray(capped, bool))
  seg = jnp.asarray(np.repeat(np.arange(n_layers), sizes).astype(np.int32))

  def global_mask(active, n_rem):
    return topk_keys(jnp.where(active[seg], key, -1), n_rem)

  def counts(m):
    return jnp.stack([jnp.sum(m[offsets[l]:offsets[l + 1]], dtype=jnp.int32)
                      for l in range(n_layers)])

  def body(_, carry):
    active, n_rem, done = carry
    viol = active & capped_arr & (counts(global_mask(active, n_rem)) > caps) & ~done
    any_v = jnp.any(viol)
    return (active & ~viol, n_rem - jnp.sum(jnp.where(viol, caps, 0)),
            done | ~any_v)

  init = (jnp.ones((n_layers,), bool), n_target, jnp.bool_(False))
  active, n_rem, _ = lax.fori_loop(0, int(sum(capped)) + 1, body, init)
  m = global_mask(active, n_rem)
  parts = []
  for l in range(n_layers):
    part = m[offsets[l]:offsets[l + 1]]
    if capped[l]:
      own = topk_keys(key[offsets[l]:offsets[l + 1]], caps[l])
      part = jnp.where(active[l], part, own)
    parts.append(part)
  return jnp.concatenate(parts)
