"""Covariance-bound Agnostic Filter, CAF (Allouah, Guerraoui & Stephan, 2025;
ByzFL's ``CAF``).

Allouah, Guerraoui and Stephan, "Towards Trustworthy Federated Learning with
Untrusted Participants", ICML 2025 (arXiv 2505.01874), the robust mean of
CafCor. A spectral filter with soft weights ``c_i`` (1 at the start):

  while sum_i c_i > K - 2f:
    mu_c = sum_i c_i u_i / sum_i c_i
    Sigma_c = sum_i c_i (u_i - mu_c)(u_i - mu_c)^T / sum_i c_i
    (lambda, v) = the top eigenpair of Sigma_c
    tau_i = <u_i - mu_c, v>^2
    c_i <- c_i (1 - tau_i / tau_max)
  return the mu_c of the smallest lambda seen.

Conventions (ours where marked):

* ``f``: ByzFL's (``ctx.num_byzantine`` by default); ``2f < K`` required
  (ValueError). With ``f = 0`` the loop never runs and the rule returns the
  mean (ours; ByzFL returns ``None`` there).
* The top eigenpair is exact, from the ``K x K`` weighted centred Gram
  matrix (:func:`._subsets.weighted_top_eig`, ``O(K^3)`` whatever ``d``);
  ByzFL takes one power-method step from a random unit vector ``v`` (its
  eigenvalue ``||Sigma_c v||``: random, exact at ``d = 1``).
* ``tau_max`` is the largest ``tau_i`` among the clients still weighted
  (``c_i > 0``; ours, the usual downweighting filter): each pass then zeroes
  at least one weight, so the loop ends after at most ``2f`` passes (a
  ``lax.while_loop``). ByzFL takes the maximum over all ``K`` clients,
  including those already at weight 0; that only shrinks the steps (more
  passes, sometimes many) and gives different weights once a removed client
  is the farthest along ``v``. The two agree while the largest ``tau`` is a
  weighted client's, e.g. when the loop stops after one pass.
* The loop also stops when ``lambda = 0`` (the weighted clients coincide).
* Weights that fall below ``TINY = 1e-20`` are set to 0 (ours): a client
  left at such a weight is removed. Kept, their ``sqrt(c)`` scaling drove the
  ``K x K`` eigensolver into subnormal numbers (K = 100: 52 ms for such a
  pass instead of 0.6 ms).
* Unweighted, as in the paper and ByzFL: the clients' weights are not used;
  the output is ``sum_i c_i u_i / sum_i c_i`` of the chosen pass, through
  ``combine`` with acceptance ``c`` and unit weights (FLARE Alg. 2 with soft
  weights under sparse uploads). Distances, covariances and the filter are
  those of the zero-filled dense vectors.
* Non-finite rows (ours): a row with ``inf``/``nan`` (or a squared norm beyond
  ``f32``) starts with ``c_i = 0`` and is never averaged; its missing weight
  counts against ``sum c > K - 2f`` like a removed client's (with more than
  ``2f`` of them no pass runs, and the output is the mean of the others).

Acceptance: the weights ``c`` of the chosen pass (soft, in ``[0, 1]``).
Diagnostics: ``lambda_max`` (of the chosen pass) and ``passes``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common, _distances, _subsets
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register

# Weights below this are set to 0 (see the module docstring).
TINY = 1e-20


def filter_weights(d2: jax.Array, ok: jax.Array, f: int):
  """CAF's loop in distance space.

  Args:
    d2: ``f32[K, K]`` squared distances (``inf`` for unusable rows).
    ok: ``bool[K]`` usable rows.
    f: Byzantine clients tolerated.

  Returns:
    ``(c f32[K] of the chosen pass, its lambda_max, number of passes)``.
  """
  k = d2.shape[0]
  d2z = _subsets.zero_unusable(d2, ok)
  c0 = ok.astype(d2.dtype)
  floor = float(k - 2 * f)

  def cond(state):
    c, _, _, t, done = state
    return (jnp.sum(c) > floor) & (t < 2 * f) & ~done

  def body(state):
    c, best_c, best_lam, t, _ = state
    lam, _, proj = _subsets.weighted_top_eig(d2z, c)
    better = lam < best_lam
    best_c = jnp.where(better, c, best_c)
    best_lam = jnp.where(better, lam, best_lam)
    tau = jnp.square(proj)
    tau_max = jnp.max(jnp.where(c > 0, tau, 0.0))
    done = ~(tau_max > 0)
    ratio = jnp.where(tau_max > 0, tau / jnp.where(tau_max > 0, tau_max, 1.0), 0.0)
    # XLA:CPU divides through the reciprocal, so tau_max / tau_max may miss
    # 1 by an ulp: the farthest weighted clients are zeroed explicitly.
    shrunk = c * jnp.clip(1.0 - ratio, 0.0, 1.0)
    shrunk = jnp.where((tau >= tau_max) | (shrunk < TINY), 0.0, shrunk)
    c = jnp.where(done, c, shrunk)
    return c, best_c, best_lam, t + 1, done

  state = (c0, c0, jnp.asarray(jnp.inf, d2.dtype), jnp.int32(0),
           jnp.bool_(False))
  _, best_c, best_lam, t, _ = jax.lax.while_loop(cond, body, state)
  # Without a pass (f = 0, or too few usable rows) the plain mean's
  # lambda is reported.
  best_lam = jnp.where(t > 0, best_lam,
                       _subsets.weighted_top_eig(d2z, c0)[0])
  return best_c, best_lam, t


@register("caf")
def caf(f: Optional[int] = None) -> Aggregator:
  """The covariance-bound agnostic filter's robust mean.

  Args:
    f: Byzantine clients tolerated; ``None`` means ``ctx.num_byzantine``.
      Needs ``2f < K``.

  Returns:
    A stateless :class:`Aggregator`; acceptance is the filter's weights.
  """

  def apply(updates, masks, weights, key, ctx):
    del weights, key
    k = updates.shape[0]
    f_ = _subsets.majority_f(f, ctx, k, "caf")
    d2, ok = _distances.pairwise_sq_dists(updates)
    c, lam, passes = filter_weights(d2, ok, f_)
    update = _common.combine_accepted(updates, masks, jnp.ones((k,), c.dtype),
                                      c, ctx.pack_size, ctx.finite_uploads)
    return AggOut(update, c, {"lambda_max": lam, "passes": passes})

  return stateless(apply)
