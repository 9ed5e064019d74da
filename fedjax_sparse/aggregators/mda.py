"""Minimum Diameter Averaging, MDA (El Mhamdi et al., 2020; ByzFL's ``MDA``).

El Mhamdi, Guerraoui, Guirguis, Hoang and Rouault, "Genuinely distributed
Byzantine machine learning", PODC 2020 (the rule goes back to Rousseeuw's
minimum-volume estimators). With ``m = K - f``:

  S* in argmin_{S subset [K], |S| = m} max_{i, j in S} ||u_i - u_j||_2,
  MDA_f(u_1, ..., u_K) = average of {u_i : i in S*}.

Conventions:

* ``f``: the number of Byzantine clients tolerated (``ctx.num_byzantine`` by
  default), the same ``f`` as ByzFL's; ``2f < K`` is required (ValueError).
* Exact for ``C(K, K - f) <= max_subsets`` (default 65536: every ``K <= 18``,
  ``K = 20`` up to ``f = 6``, ``K = 25`` up to ``f = 5``): every subset is
  scored from the ``K x K`` squared distances, in ByzFL's order
  (``itertools.combinations``), ties to the first. Beyond the cap (ours):
  the best of the ``K`` neighbourhoods ``N_i`` (row ``i`` and its ``K - f - 1``
  nearest rows) by their exact diameter, a 2-approximation: for ``i`` in
  ``S*``, ``N_i`` lies in the ball of radius ``diam(S*)`` around ``u_i``, so
  ``diam(N_i) <= 2 diam(S*)``. ``diagnostics["exact"]`` says which was used.
* Selection rule: the selection is unweighted; the selected clients are
  combined by the shared aggregation (``combine``: the mean weighted by
  ``weights``, ByzFL's plain mean for equal weights; FLARE Alg. 2 under
  sparse uploads). Distances are those of the zero-filled dense vectors.
* Non-finite rows (ours): a row with ``inf``/``nan`` (or whose squared norm
  overflows ``f32``) is infinitely far from every row. Sets are ranked first
  by how many such rows they hold, then by the diameter of their other
  members, so while at least ``K - f`` rows are usable none is selected, and
  an unusable row is never averaged (acceptance 0). Then, with at most ``f``
  outliers, the output is the mean of ``K - f`` rows of diameter at most that
  of the honest rows, ``K - 2f >= 1`` of them honest: within twice the honest
  diameter of the honest mean (exact mode).

Acceptance: 1 for the averaged clients, 0 otherwise. Diagnostics:
``diameter`` (of the selected set) and ``exact``; the round step reports
``escape_ratio`` from the acceptance (``selection_escape``).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from fedjax_sparse.aggregators import _subsets
from fedjax_sparse.aggregators.base import Aggregator
from fedjax_sparse.aggregators.registry import register

MAX_SUBSETS = 65536


def select(d2, ok, m: int, max_subsets: int):
  """``(f32[K] selection, f32 squared diameter, exact)`` of MDA.

  Args:
    d2: ``f32[K, K]`` squared distances (``inf`` for unusable rows).
    ok: ``bool[K]`` usable rows.
    m: the size of the selected set.
    max_subsets: the most subsets scored exactly.
  """
  k = d2.shape[0]
  d2z = _subsets.zero_unusable(d2, ok)
  bad = (~ok).astype(jnp.int32)
  if _subsets.exact(k, m, max_subsets):
    members = jnp.asarray(_subsets.members_of(_subsets.kept_subsets(k, m), k))
  else:
    nearest, _ = _subsets.neighbourhoods(d2, m)
    members = jnp.zeros((k, k), bool).at[jnp.arange(k)[:, None], nearest].set(True)
  diam2 = _subsets.set_diameters(d2z, members & ok[None, :])
  best = _subsets.lexicographic_argmin(members.astype(jnp.int32) @ bad, diam2)
  return (members[best].astype(jnp.float32), diam2[best],
          _subsets.exact(k, m, max_subsets))


@register("mda")
def mda(f: Optional[int] = None, max_subsets: int = MAX_SUBSETS) -> Aggregator:
  """Average of the ``K - f`` updates of smallest diameter.

  Args:
    f: Byzantine clients tolerated; ``None`` means ``ctx.num_byzantine``.
      Needs ``2f < K``.
    max_subsets: enumerate the ``C(K, K - f)`` subsets exactly up to this
      many; beyond, the best of the ``K`` nearest-neighbour sets (a
      2-approximation of the smallest diameter).

  Returns:
    A stateless :class:`Aggregator` (a selection rule).
  """
  return _subsets.selection_rule("mda", select, f, max_subsets, "diameter",
                                 jnp.sqrt)
