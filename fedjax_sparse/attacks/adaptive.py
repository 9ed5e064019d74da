"""Adaptive attacks on mask-and-sign filters such as SafeSparse/FLARE.

SafeSparse (flare.txt Alg. 1) reads only the clients' top-k pack masks and
the signs of their values. An attacker that knows this can keep a benign
mask and benign signs and put its harm into the magnitudes. The boosted
honest update (``boosted_update``, :mod:`.update`) is the simplest such
attack; :func:`copy_boost` below is the omniscient one.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_sparse.attacks.base import UpdateAttack, no_state
from fedjax_sparse.attacks.registry import register_update


def copy_targets(is_malicious):
  """``int32[K]``: for attacker row ``i`` (rank ``r`` among the attackers),
  the index of the ``(r mod k_b)``-th benign row; benign rows map to
  themselves. Fixed shapes: a stable argsort puts the benign rows first."""
  k = is_malicious.shape[0]
  order = jnp.argsort(is_malicious, stable=True)
  num_benign = jnp.maximum(k - jnp.sum(is_malicious), 1)
  rank = jnp.cumsum(is_malicious) - 1
  target = order[jnp.mod(rank, num_benign)]
  return jnp.where(is_malicious, target, jnp.arange(k))


@register_update("copy_boost")
def copy_boost(scale: float = 10.0) -> UpdateAttack:
  """Copy a benign client's mask and signs, scale its values (ours).

  The adaptive attack on SafeSparse of ALGORITHMS.md section 8 ("an
  attacker that copies a benign client's mask and signs and scales its
  values"): attacker ``r`` (its rank among this round's attackers) uploads
  ``lambda * u_b`` with ``u_b`` the update of the ``(r mod k_b)``-th benign
  client, so different attackers copy different benign clients. Each upload
  has exactly a benign client's top-k mask (top-k is scale invariant) and
  signs, so its Jaccard score and sign cosines are those of a benign client;
  the attackers do not form a cluster of their own (each has one twin, the
  copied client, fewer than DBSCAN's ``min_samples`` at K = 20) and pass the
  filter, while the boosted magnitudes pull the per-pack means.

  Knowledge: omniscient (this round's benign updates), like IPM and ALIE.

  Args:
    scale: lambda (10, as the papers' scaling).
  """

  def apply(state, updates, is_malicious, key, ctx):
    del key, ctx
    copied = updates[copy_targets(is_malicious)]
    return jnp.where(is_malicious[:, None], scale * copied, updates), state

  return UpdateAttack(no_state, apply)
