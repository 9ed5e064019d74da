"""Bucketing pre-aggregator (Karimireddy, He & Jaggi, 2022; ALGORITHMS.md section 4).

Each round the K clients are shuffled (with the round's key) and cut into
``ceil(K / s)`` buckets of ``s`` (the last may be smaller); the base rule
aggregates the bucket averages. Averages are weighted by the clients' weights
(plain means with unit weights, as in the paper); under sparse uploads each
pack is averaged over the bucket members that selected it and the bucket's
mask is the union of theirs. A bucket's weight is the sum of its members'.

The base rule sees ``ctx.num_clients`` = number of buckets and the same
``ctx.num_byzantine``: each Byzantine client spoils at most one bucket. Give
the base its own ``f`` to assume otherwise. A member with inf/nan is absent
from its bucket's average and weight (:func:`._common.mix`); a bucket of
such members only is a NaN row for the base. Each client's acceptance is
its bucket's, so a base rule's selection escape ratio (``selection_escape``)
is the share of the malicious clients whose bucket was accepted. The base
gets no ``ctx.malicious``: the ground truth is per client, not per bucket,
so per-coordinate escape diagnostics of the base are not computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.pre_registry import register_pre


@register_pre("bucketing")
def bucketing(base: Aggregator, s: int = 2) -> Aggregator:
  """Random buckets of ``s`` clients averaged before ``base``.

  Args:
    base: the rule applied to the bucket averages.
    s: bucket size (``>= 1``; 1 only shuffles).

  Returns:
    An :class:`Aggregator` with the base's state. Diagnostics: the base's,
    plus ``bucket int32[K]`` (each client's bucket).
  """
  if s < 1:
    raise ValueError(f"bucketing: bucket size s must be >= 1, got {s}")

  def init(d):
    return base.init(d)

  def apply(state, updates, masks, weights, key, ctx):
    k = updates.shape[0]
    n_buckets = -(-k // s)
    key_perm, key_base = jax.random.split(key)
    perm = jax.random.permutation(key_perm, k)
    bucket = jnp.zeros((k,), jnp.int32).at[perm].set(
        jnp.arange(k, dtype=jnp.int32) // s)
    membership = (bucket[None, :] == jnp.arange(n_buckets)[:, None]).astype(
        updates.dtype)
    mixed, mixed_masks, bucket_weights = _common.mix(
        membership, updates, masks, weights, ctx.pack_size)
    out, state = base.apply(state, mixed, mixed_masks, bucket_weights, key_base,
                            ctx.replace(num_clients=n_buckets, malicious=None))
    diagnostics = dict(out.diagnostics, bucket=bucket)
    return AggOut(out.update, out.acceptance[bucket], diagnostics), state

  return Aggregator(init, apply, base.selection_escape)
