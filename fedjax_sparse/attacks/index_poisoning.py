"""Index poisoning under pack top-k sparsification (safesparse.txt section 2).

SafeSparse (section 2, Theorem 1, App. C eq. 15) bounds the damage of an
attack on sparsified aggregation by the *malicious contributor ratio* of each
pack ``p``: with ``S_p`` the clients whose mask selects ``p``,
``rho_p = |S_p ∩ malicious| / |S_p|``. Attackers who coordinate their masks
on a shared small set of packs become the local majority there even when
they are a minority overall.

Masks are produced downstream by the client's sparsifier (pack top-k of the
update, ALGORITHMS.md section 1), so this attack shapes the *update* so that
its top-k packs are exactly the ones it wants:

* Target packs ``T`` (``num_target_packs``, or ``target_fraction`` of the
  packs): the packs benign clients select least. ``target="least_selected"``
  (default, omniscient) counts, for every pack, the benign clients whose own
  pack top-k (same ratio and pack size as the sparsifier) keeps it;
  ``"least_score"`` ranks by the benign mean pack L1 score instead (one
  matvec, no per-client top-k). Ties go to the lower mean score.
  The attackers put large values there, ``-boost * S_max / P`` times
  ``sign(mu)`` (``S_max`` the largest L1 score of the other kept packs), so
  these packs have the largest scores and are always kept.
* Masked value manipulation that copies benign sparsity patterns: the other
  ``k - |T|`` kept packs are the ones benign clients select most, so the
  attackers' masks overlap the benign masks (this defeats SafeSparse's
  Jaccard filter, flare.txt eqs. 1-3); their values are ``-mu``
  (``mimic_values="flip"``, the sign flipping of safesparse section 2) or
  ``mu`` (``"mean"``, stealthier).
* Zero elsewhere, so those packs are never kept.

All attackers send the same vector, so the sparsifier gives them the same
mask and ``rho_p`` on ``T`` is ``k_m / (k_m + #benign selecting p)``.
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
from fedjax_sparse.sparsify.topk import num_kept, num_packs, pack_scores, topk_mask

Array = jax.Array

TARGETS = ("least_selected", "least_score")
MIMIC_VALUES = ("flip", "mean")


def malicious_contributor_ratio(masks: Array, is_malicious: Array) -> Array:
  """``rho_p = |S_p ∩ malicious| / |S_p|`` per pack (safesparse App. C, eq. 15).

  Args:
    masks: ``bool[K, n_packs]`` the clients' pack masks.
    is_malicious: ``bool[K]``.

  Returns:
    ``f32[n_packs]``; 0 for packs nobody selected.
  """
  m = masks.astype(jnp.float32)
  mal = jnp.matmul(is_malicious.astype(jnp.float32), m)
  tot = jnp.sum(m, axis=0)
  return jnp.where(tot > 0, mal / jnp.where(tot > 0, tot, 1.0), 0.0)


def _expand(packs: Array, pack_size: int, d: int) -> Array:
  if pack_size == 1:
    return packs[:d]
  return jnp.repeat(packs, pack_size, total_repeat_length=packs.shape[0] * pack_size)[:d]


@register_update("index_poisoning")
def index_poisoning(topk_ratio: float = 0.5, target_fraction: float = 0.01,
                    num_target_packs: Optional[int] = None,
                    target: str = "least_selected", mimic_values: str = "flip",
                    boost: float = 2.0, pack_size: Optional[int] = None,
                    knowledge: str = "omniscient") -> UpdateAttack:
  """Coordinated sparse masks on a shared set of packs (see module docstring).

  Args:
    topk_ratio: the sparsifier's top-k ratio r (ALGORITHMS.md default 0.5).
    target_fraction: fraction of the packs targeted (when
      ``num_target_packs`` is None); at least one pack.
    num_target_packs: number of target packs, at most the ``k`` kept.
    target: ``"least_selected"`` or ``"least_score"``.
    mimic_values: ``"flip"`` (``-mu``) or ``"mean"`` (``mu``) on the copied
      packs.
    boost: target pack score over the largest copied pack score (> 1).
    pack_size: P; None uses ``ctx.pack_size``.
    knowledge: ``"omniscient"`` (benign rows) or ``"partial"``.
  """
  check_knowledge(knowledge)
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
  if mimic_values not in MIMIC_VALUES:
    raise ValueError(f"unknown mimic_values {mimic_values!r}; choose one of "
                     f"{', '.join(MIMIC_VALUES)}")
  if not boost > 1:
    raise ValueError(f"boost must be > 1 so the target packs are kept, got {boost}")

  def apply(state, updates, is_malicious, key, ctx):
    del key
    k_rows, d = updates.shape
    p = int(pack_size if pack_size is not None else ctx.pack_size)
    n = num_packs(d, p)
    k = num_kept(d, topk_ratio, p)
    n_t = (num_target_packs if num_target_packs is not None
           else max(1, int(math.floor(target_fraction * n))))
    if not 1 <= n_t <= k:
      raise ValueError(f"index_poisoning: {n_t} target packs, but the sparsifier "
                       f"keeps k={k} of {n} packs; need 1 <= targets <= k")
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    scores = pack_scores(updates, p)                       # [K, n]
    mean_score = jnp.matmul(sel / _stats.row_count(sel), scores)
    s_norm = mean_score / (jnp.max(mean_score) + 1e-30) * 0.5  # in [0, 0.5]
    if target == "least_selected":
      def add_row(i, count):
        return lax.cond(sel[i] > 0,
                        lambda c: c + topk_mask(scores[i], k).astype(jnp.float32),
                        lambda c: c, count)
      count = lax.fori_loop(0, k_rows, add_row, jnp.zeros((n,), jnp.float32))
    else:
      count = jnp.zeros((n,), jnp.float32)
    # Lexicographic (count, mean score): the 0.5-scaled score never crosses
    # an integer count.
    rank = count + s_norm
    tgt = topk_mask(jnp.max(rank) + 1.0 - rank, n_t)       # least selected
    if n_t < k:
      cop = topk_mask(jnp.where(tgt, 0.0, rank + 1.0), k - n_t)  # most selected
    else:
      cop = jnp.zeros((n,), bool)
    mu = _stats.masked_mean(updates, sel)
    tgt_c = _expand(tgt, p, d)
    cop_c = _expand(cop, p, d)
    copied = jnp.where(cop_c, -mu if mimic_values == "flip" else mu, 0.0)
    s_max = jnp.max(jnp.where(cop, pack_scores(copied, p), 0.0))
    s_max = jnp.where(s_max > 0, s_max, jnp.max(jnp.abs(mu)) + 1e-12)
    last_len = d - (n - 1) * p                              # the padded pack
    a = boost * s_max / min(p, last_len)
    direction = jnp.where(mu >= 0, -1.0, 1.0)
    mal = jnp.where(tgt_c, a * direction, copied)
    return replace_malicious(updates, is_malicious, mal), state

  return UpdateAttack(no_state, apply)
