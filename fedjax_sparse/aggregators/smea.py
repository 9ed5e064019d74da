"""Smallest Maximum Eigenvalue Averaging, SMEA (Allouah et al., 2023;
ByzFL's ``SMEA``).

Allouah, Guerraoui, Gupta, Pinot and Stephan, "On the Privacy-Robustness-
Utility Trilemma in Distributed Learning", ICML 2023. With ``m = K - f``,
``mu_S`` the mean of a set ``S`` and ``Sigma_S = (1/|S|) sum_{i in S} (u_i -
mu_S)(u_i - mu_S)^T`` its empirical covariance:

  S* in argmin_{|S| = m} lambda_max(Sigma_S),   SMEA_f(u) = mu_{S*}.

``lambda_max`` is exact (ours): ``Sigma_S`` has the nonzero eigenvalues of the
``m x m`` centred Gram matrix ``-1/2 C D2_S C / m`` (``C = I - 11^T / m``,
``D2_S`` the squared distances within ``S``), whatever ``d``; ByzFL
estimates it as ``||Sigma_S v||`` for a fresh random unit vector ``v`` per
subset (one power-method step; a random lower bound, exact at ``d = 1``), so
its choice among subsets of similar spread is random.

Conventions:

* ``f``: ByzFL's (``ctx.num_byzantine`` by default); ``2f < K`` required
  (ValueError).
* Exact for ``C(K, K - f) <= max_subsets`` (default 5000: every ``K <= 14``,
  ``K = 20`` up to ``f = 4``; one ``m x m`` eigenvalue problem per subset,
  about 0.2 s for 4845 subsets of 16 on the loaded 2-core dev machine), in
  ByzFL's order (``itertools.combinations``), ties to the first. Beyond the
  cap (ours): ``f`` greedy removals, each of the row whose removal leaves the
  smallest ``lambda_max`` (ties to the lower index); an approximation
  without a guarantee on the objective. ``diagnostics["exact"]`` says which.
* Selection rule: the set is chosen without weights; its members are
  combined by the shared aggregation (``combine``: the mean weighted by
  ``weights``, ByzFL's plain mean for equal weights; FLARE Alg. 2 under
  sparse uploads). Distances are those of the zero-filled dense vectors.
* Non-finite rows (ours): a row with ``inf``/``nan`` (or a squared norm
  beyond ``f32``) has no position. Sets are ranked first by how many such
  rows they hold, then by ``lambda_max`` of their other members, so while
  at least ``K - f`` rows are usable none is selected, and an unusable row is
  never averaged (acceptance 0). The greedy path removes unusable rows first.

Acceptance: 1 for the averaged clients. Diagnostics: ``lambda_max`` (of the
selected set's covariance) and ``exact``; the round step reports
``escape_ratio`` from the acceptance (``selection_escape``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _subsets
from fedjax_sparse.aggregators.base import Aggregator
from fedjax_sparse.aggregators.registry import register

MAX_SUBSETS = 5000


def _exact(d2z, ok, m):
  k = d2z.shape[0]
  idx = _subsets.kept_subsets(k, m)
  blocks = d2z[idx[:, :, None], idx[:, None, :]]
  usable = ok[idx]
  lam = _subsets.top_eigenvalue(blocks, usable)
  best = _subsets.lexicographic_argmin(jnp.sum(~usable, axis=1), lam)
  members = jnp.asarray(_subsets.members_of(idx, k))
  return members[best].astype(jnp.float32), lam[best]


def _greedy(d2z, ok, m):
  k = d2z.shape[0]
  eye = jnp.eye(k, dtype=bool)

  def step(_, keep):
    cand = keep[None, :] & ~eye  # candidate i: keep without row i
    lam = _subsets.top_eigenvalue(jnp.broadcast_to(d2z, (k, k, k)),
                                  cand & ok[None, :])
    bad = jnp.sum(cand & ~ok[None, :], axis=1)
    primary = jnp.where(keep, bad, k + 1)  # only members can be removed
    return keep & ~(jnp.arange(k) == _subsets.lexicographic_argmin(primary, lam))

  keep = jax.lax.fori_loop(0, k - m, step, jnp.ones((k,), bool))
  return keep.astype(jnp.float32), _subsets.top_eigenvalue(d2z, keep & ok)


def select(d2, ok, m: int, max_subsets: int):
  """``(f32[K] selection, f32 lambda_max, exact)`` of SMEA."""
  k = d2.shape[0]
  d2z = _subsets.zero_unusable(d2, ok)
  is_exact = _subsets.exact(k, m, max_subsets)
  sel, lam = (_exact if is_exact else _greedy)(d2z, ok, m)
  return sel, lam, is_exact


@register("smea")
def smea(f: Optional[int] = None, max_subsets: int = MAX_SUBSETS) -> Aggregator:
  """Average of the ``K - f`` updates whose covariance has the smallest top
  eigenvalue.

  Args:
    f: Byzantine clients tolerated; ``None`` means ``ctx.num_byzantine``.
      Needs ``2f < K``.
    max_subsets: enumerate the ``C(K, K - f)`` subsets exactly up to this
      many; beyond, ``f`` greedy removals.

  Returns:
    A stateless :class:`Aggregator` (a selection rule).
  """
  return _subsets.selection_rule("smea", select, f, max_subsets, "lambda_max")
