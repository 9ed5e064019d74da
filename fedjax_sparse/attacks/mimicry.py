"""Adaptive attacks on SafeSparse's mask-and-sign filter (ours).

SafeSparse / FLARE (flare.txt Alg. 1, eqs. 1-5; ALGORITHMS.md section 2)
reads two things of each upload: its top-k pack mask (Jaccard scores, eqs.
1-3) and the signs of its kept values (cosine of sign vectors over mask
overlaps, eqs. 4-5, clustered by DBSCAN). The two attacks here shape exactly
those two things and put the harm in the values the filter never reads:

* :func:`mask_mimicry`: the upload mask most similar to the benign masks,
  with IPM or ALIE values inside it;
* :func:`sign_camouflage`: signs that agree with the benign majority on a
  chosen fraction of the sent coordinates, a strong IPM push on the others.

Masks and the sparsifier. Update attacks act before sparsification (see
:mod:`.base`): the client's pack top-k (ratio ``r``, pack size ``P``) is then
applied to the crafted update. Both attacks therefore build the upload they
want and make it survive top-k unchanged: the crafted update is 0 outside
the chosen ``k = ceil(r n_packs)`` packs and nonzero at every coordinate
inside them (a value that would be 0 is replaced by the smallest normal f32,
``1.18e-38``, with a + sign), so the sparsifier's top-k keeps exactly the
chosen packs and the values as crafted. This needs the sparsifier's ``r``
(``topk_ratio``: the attacks declare the sparsifier need, so the run passes
its own ``--topk_ratio``, or 1 with dense uploads, unless the attack
arguments set it; see :mod:`fedjax_sparse.requirements`) and ``P``
(``ctx.pack_size``, or ``pack_size``).

Attackers that send the same signs on their mask overlaps (both variants
of ``mask_mimicry``; ``sign_camouflage`` with ``disagree_on="largest_mean"``)
have sign cosine 1 with each other, i.e. SafeSparse distance 0: with at
least ``min_samples = round(0.2 m)`` of them they are DBSCAN core points of
their own cluster, and their zero distances also lower ``eps``. They escape
only if they are density-connected to the benign clients and the guard
(``safesparse(guard=True)``, ours) keeps that largest cluster; under the
paper's literal rule (``guard=False``) every clustered client is excluded.
Measured at the flare_sweep setting (MLP, FashionMNIST, Dirichlet 1, K = 20
with 8 attackers, r = 0.5, round 2 of an attack from round 1):
``mask_mimicry`` passes the Jaccard step by a wide margin (score 0.68
against 0.39-0.46 for the benign clients, threshold 0.32) but its 8
identical sign vectors form a cluster and all 8 are excluded (with
``knowledge="own"`` too); ``sign_camouflage``'s default spreads the
attackers' signs as benign clients' are spread, and all 8 were accepted
(its docstring has the numbers).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.attacks import _stats
from fedjax_sparse.attacks.base import UpdateAttack, check_knowledge, no_state
from fedjax_sparse.attacks.registry import register_update
from fedjax_sparse.requirements import SPARSIFIER, declare
from fedjax_sparse.sparsify.topk import (check_topk_config, num_kept, num_packs,
                                         pack_scores, topk_mask)

Array = jax.Array

MIMICRY_VALUES = ("ipm", "alie")
MIMICRY_KNOWLEDGE = ("omniscient", "own")
DISAGREE_ON = ("largest_mean", "own_first")
# The floor that keeps a chosen coordinate nonzero (the smallest normal f32).
TINY = float(np.finfo(np.float32).tiny)


def _check_ratio(topk_ratio: float, what: str) -> None:
  if not 0.0 < float(topk_ratio) <= 1.0:
    raise ValueError(f"{what}: topk_ratio must be the sparsifier's --topk_ratio, "
                     f"in (0, 1], got {topk_ratio} (1 for dense uploads)")


def _expand(masks: Array, pack_size: int, d: int) -> Array:
  """``bool[..., n_packs]`` -> ``bool[..., d]`` (each pack's coordinates)."""
  if pack_size == 1:
    return masks[..., :d]
  return jnp.repeat(masks, pack_size, axis=-1)[..., :d]


def _geometry(d: int, topk_ratio: float, pack_size: Optional[int], ctx):
  p = int(pack_size if pack_size is not None else ctx.pack_size)
  check_topk_config(d, topk_ratio, p)
  return p, num_packs(d, p), num_kept(d, topk_ratio, p)


def _nonzero(v: Array) -> Array:
  """``v`` with exact zeros replaced by ``+TINY`` (so top-k keeps them)."""
  return jnp.where(v == 0, jnp.asarray(TINY, v.dtype), v)


def own_pack_masks(updates: Array, k: int, pack_size: int) -> Array:
  """``bool[K, n_packs]``: each row's own pack top-k mask (the sparsifier's)."""
  return topk_mask(pack_scores(updates, pack_size), k)


def mimicry_mask(updates: Array, sel: Array, k: int, pack_size: int) -> Array:
  """``bool[n_packs]``: the ``k`` packs that most selected rows keep.

  ``count_p`` = number of selected rows whose own pack top-k keeps ``p``;
  the mask is the top-k of ``count`` (ties: the larger mean pack score of
  the selected rows, then the lower pack index). It maximises the total
  overlap ``sum_i |M & M_i|`` over all masks of ``k`` packs, the numerator
  of every Jaccard term (eq. 1); with equal mask sizes each Jaccard term
  ``x / (2k - x)`` increases with its overlap ``x``.
  """
  scores = pack_scores(updates, pack_size)
  own = topk_mask(scores, k)
  count = jnp.matmul(sel, own.astype(jnp.float32))
  mean_score = jnp.matmul(sel / _stats.row_count(sel), scores)
  # Lexicographic (count, mean score): the score term stays in [0, 0.5].
  rank = count + 0.5 * mean_score / (jnp.max(mean_score) + 1e-30)
  return topk_mask(rank, k)


@register_update("mask_mimicry")
@declare(SPARSIFIER)
def mask_mimicry(values: str = "ipm", eps: float = 0.4, z: Optional[float] = None,
                 knowledge: str = "omniscient", topk_ratio: float = 0.5,
                 pack_size: Optional[int] = None) -> UpdateAttack:
  """Mask mimicry: the most benign-looking mask, IPM or ALIE values in it (ours).

  An adaptive attack on SafeSparse's Jaccard filter (flare.txt eqs. 1-3):
  the attackers upload the pack top-k mask ``M`` that is most similar to the
  benign masks and put IPM (``-eps * mu``, Xie et al. 2020; hybrid paper
  eq. 14) or ALIE (``mu - z sigma``, Baruch et al. 2019; hybrid paper eqs.
  12-13, ``z = z_max`` by default) values inside it, 0 outside::

    upload_i = [M_i] * v,   v = -eps mu  or  mu - z sigma.

  * ``knowledge="omniscient"``: ``M`` = the ``k`` packs the most benign
    clients keep this round (:func:`mimicry_mask`; it maximises the total
    overlap with the benign masks); ``mu, sigma`` the benign mean and
    coordinate std. Every attacker sends the same upload.
  * ``knowledge="own"``: ``M_i`` = attacker ``i``'s own honest top-k mask
    (no knowledge of the benign masks); ``mu, sigma`` those of the
    attackers' own honest updates (partial knowledge, as ``ipm`` and
    ``alie`` with ``knowledge="partial"``). Each attacker keeps its own
    mask.

  The upload carries exactly the mask ``M`` through the sparsifier (module
  docstring): ``topk_ratio`` must equal the run's ``--topk_ratio``
  (1 for dense uploads) and the pack size is ``ctx.pack_size``.

  Args:
    values: ``"ipm"`` or ``"alie"``.
    eps: IPM's scale (0.4, hybrid paper 4.1).
    z: ALIE's scale; None for ``z_max`` of this round's ``K, k_m``.
    knowledge: ``"omniscient"`` or ``"own"``.
    topk_ratio: the sparsifier's top-k ratio r.
    pack_size: P; None uses ``ctx.pack_size``.
  """
  if values not in MIMICRY_VALUES:
    raise ValueError(f"mask_mimicry: unknown values {values!r}; choose one of "
                     f"{', '.join(MIMICRY_VALUES)}")
  if knowledge not in MIMICRY_KNOWLEDGE:
    raise ValueError(f"mask_mimicry: unknown knowledge {knowledge!r}; choose one "
                     f"of {', '.join(MIMICRY_KNOWLEDGE)}")
  _check_ratio(topk_ratio, "mask_mimicry")

  def apply(state, updates, is_malicious, key, ctx):
    del key
    k_rows, d = updates.shape
    p, _, k = _geometry(d, topk_ratio, pack_size, ctx)
    stats_rows = _stats.knowledge_rows(
        is_malicious, "omniscient" if knowledge == "omniscient" else "partial")
    if values == "ipm":
      v = -eps * _stats.masked_mean(updates, stats_rows)
    else:
      mu, sigma = _stats.mean_std(updates, stats_rows)
      zz = (_stats.z_max(k_rows, jnp.sum(is_malicious)) if z is None
            else jnp.float32(z))
      v = mu - zz * sigma
    v = _nonzero(v)
    if knowledge == "omniscient":
      chosen = _expand(mimicry_mask(updates, stats_rows, k, p), p, d)[None, :]
    else:
      chosen = _expand(own_pack_masks(updates, k, p), p, d)
    crafted = jnp.where(chosen, v[None, :], jnp.zeros((), updates.dtype))
    return jnp.where(is_malicious[:, None], crafted, updates), state

  return UpdateAttack(no_state, apply)


def majority_sign(updates: Array, sel: Array) -> Array:
  """``f32[d]`` in {-1, +1}: the sign most selected rows give each coordinate.

  ``sign(sum_i sel_i sign(u_i))``; a tie goes to the sign of the selected
  rows' mean, then to +1.
  """
  vote = jnp.matmul(sel, jnp.sign(updates))
  mu = _stats.masked_mean(updates, sel)
  m = jnp.sign(vote)
  m = jnp.where(m == 0, jnp.sign(mu), m)
  return jnp.where(m == 0, 1.0, m)


@register_update("sign_camouflage")
@declare(SPARSIFIER)
def sign_camouflage(agree: Optional[float] = None, scale: float = 10.0,
                    disagree_on: str = "own_first", knowledge: str = "omniscient",
                    topk_ratio: float = 0.5,
                    pack_size: Optional[int] = None) -> UpdateAttack:
  """Sign camouflage: benign majority signs on a fraction ``agree`` of the
  sent coordinates, an IPM push on the rest (ours).

  An adaptive attack on SafeSparse's sign clustering (flare.txt eqs. 4-5,
  Alg. 1 lines 13-14). Attacker ``i`` sends on its own honest top-k packs
  ``S_i`` (so its Jaccard score is that of an honest client, and the
  attackers' masks differ as honest ones do), ``n_i`` coordinates. With
  ``m_j`` the benign majority sign (:func:`majority_sign`) and ``mu`` the
  benign mean, ``n_push = round((1 - agree) n_i)`` coordinates ``P_i`` of
  ``S_i`` disagree with ``m`` and carry the push, the others the majority
  sign::

    j in P_i:        upload_ij = -scale |mu_j| m_j  (= -scale mu_j, IPM's
                                                     direction, where
                                                     sign(mu_j) = m_j)
    other j in S_i:  upload_ij = m_j |u_ij|         (own magnitude)
    j not in S_i:    0

  so exactly ``n_i - n_push`` of the ``n_i`` sent signs agree with ``m``
  (``agree`` within ``1 / (2 n_i)``). Which coordinates disagree,
  largest-magnitude benign coordinates (``|mu_j|``) first:

  * ``disagree_on="largest_mean"``: the ``n_push`` coordinates of ``S_i``
    with the largest ``|mu_j|``.
  * ``disagree_on="own_first"`` (default): first the coordinates where the
    attacker's own honest sign already disagrees with ``m`` (largest
    ``|mu_j|`` first; if there are more than ``n_push``, the rest take the
    majority sign), then, if more are needed, the other coordinates of
    ``S_i`` with the largest ``|mu_j|``. The attackers' disagreements then
    fall where their honest ones do, so they differ from each other as
    benign clients do.

  Zero magnitudes are floored at the smallest normal f32 so that the upload
  keeps exactly ``S_i`` through the sparsifier (module docstring;
  ``topk_ratio`` must be the run's).

  The arithmetic of the default. If a client agrees with ``m`` on a fraction
  ``q`` of its sent coordinates, at independent positions, two such clients
  have sign cosine ``(2q - 1)^2`` on their mask overlap, and an attacker with
  agreement ``a`` has ``(2a - 1)(2q - 1)`` with a benign one: at ``a = q``
  SafeSparse's distance ``1 - cos`` from the attacker to the benign clients,
  and between attackers with independent disagreements, is the benign
  ``1 - (2q - 1)^2``. ``eps`` is the mean distance to the ``round(0.2 m)``-th
  nearest neighbour, a benign-level distance, so such attackers are
  density-connected to the benign clients: the same cluster, kept by the
  guard when it is the largest (or noise, kept by the paper's rule). The
  default ``agree=None`` therefore takes ``a`` = the mean agreement of the
  benign clients' own top-k signs with ``m`` this round. Attackers that
  disagree at the *same* positions are at distance about 0 from each other:
  they are DBSCAN core points of their own cluster once they are
  ``min_samples`` or more, and they also lower ``eps``, the mean
  ``n``-th-neighbour distance. Measured at the flare_sweep setting (MLP,
  FashionMNIST, Dirichlet 1, K = 20 with 8 attackers, r = 0.5, round 2):
  benign pairs at distance 0.75 (``q`` about 0.75), ``eps`` 0.72 without
  attack; ``largest_mean`` with ``agree = 0.9``: attackers 0.02 from each
  other and 0.77 from the benign clients, ``eps`` 0.44, all 8 clustered and
  excluded (likewise at 0.7); ``own_first`` with ``agree = 0.75``: 0.61
  between attackers, 0.73 to the benign clients, one cluster of all 20
  clients kept by the guard, all 8 accepted (0.9: 0.30 between attackers,
  all excluded).

  Knowledge: ``"omniscient"`` (this round's benign updates: mean, majority
  sign, benign agreement); ``"partial"`` estimates all three from the
  attackers' own honest updates. The mask is always the attacker's own.

  Args:
    agree: fraction of sent coordinates with the benign majority sign, in
      [0, 1]; None: the benign clients' mean agreement of the round.
    scale: the push's factor on ``|mu|`` (10, the boost of ``copy_boost`` and
      ``scaling``; SafeSparse never reads magnitudes).
    disagree_on: ``"own_first"`` or ``"largest_mean"``.
    knowledge: ``"omniscient"`` or ``"partial"``.
    topk_ratio: the sparsifier's top-k ratio r (1 for dense uploads).
    pack_size: P; None uses ``ctx.pack_size``.
  """
  check_knowledge(knowledge)
  _check_ratio(topk_ratio, "sign_camouflage")
  if agree is not None and not 0.0 <= agree <= 1.0:
    raise ValueError(f"sign_camouflage: agree must be in [0, 1] (or None), got "
                     f"{agree}")
  if not scale > 0:
    raise ValueError(f"sign_camouflage: scale must be > 0, got {scale}")
  if disagree_on not in DISAGREE_ON:
    raise ValueError(f"sign_camouflage: unknown disagree_on {disagree_on!r}; "
                     f"choose one of {', '.join(DISAGREE_ON)}")

  def apply(state, updates, is_malicious, key, ctx):
    del key
    _, d = updates.shape
    p, _, k = _geometry(d, topk_ratio, pack_size, ctx)
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    mu = _stats.masked_mean(updates, sel)
    maj = majority_sign(updates, sel)
    sent = _expand(own_pack_masks(updates, k, p), p, d)            # [K, d]
    n_sent = jnp.sum(sent, axis=1).astype(jnp.float32)
    own = sent & (jnp.sign(updates) == -maj[None, :])              # own disagreements
    if agree is None:
      a = benign_agreement(sent, own, sel)
    else:
      a = jnp.float32(agree)
    n_push = jnp.floor((1.0 - a) * n_sent + 0.5)
    # Rank of each coordinate of a row subset by |mu|, largest first (ties
    # to the lower index): one global order, a cumsum per subset.
    order = jnp.argsort(-jnp.abs(mu), stable=True)
    inverse = jnp.argsort(order)

    def rank(subset):
      r = jnp.cumsum(subset[:, order], axis=1, dtype=jnp.int32)[:, inverse]
      return r.astype(jnp.float32)

    if disagree_on == "largest_mean":
      push = sent & (rank(sent) <= n_push[:, None])
    else:
      n_own = jnp.sum(own, axis=1).astype(jnp.float32)
      rest = sent & ~own
      push = ((own & (rank(own) <= n_push[:, None]))
              | (rest & (rank(rest) <= (n_push - n_own)[:, None])))
    tiny = jnp.asarray(TINY, updates.dtype)
    push_val = -maj * jnp.maximum(scale * jnp.abs(mu), tiny)
    agree_val = maj[None, :] * jnp.maximum(jnp.abs(updates), tiny)
    crafted = jnp.where(push, push_val[None, :],
                        jnp.where(sent, agree_val, jnp.zeros((), updates.dtype)))
    return jnp.where(is_malicious[:, None], crafted, updates), state

  return UpdateAttack(no_state, apply)


def benign_agreement(sent: Array, disagree: Array, sel: Array) -> Array:
  """Mean over the selected rows of the fraction of their sent coordinates
  that do not disagree with the majority sign: f32 scalar."""
  n = jnp.maximum(jnp.sum(sent, axis=1).astype(jnp.float32), 1.0)
  frac = 1.0 - jnp.sum(disagree, axis=1).astype(jnp.float32) / n
  return jnp.sum(sel * frac) / _stats.row_count(sel)
