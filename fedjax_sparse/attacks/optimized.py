"""Min-Max and Min-Sum (Shejwalkar and Houmansadr, NDSS 2022).

hybrid_sparse_attack.txt section 2.3 ("Adaptive Optimized Attacks") and
ALGORITHMS.md section 5: every attacker sends ``mal = mu - lam * dev`` where
``mu`` is the benign mean and ``dev`` is the coordinate std (``"std"``), the
unit mean direction ``mu / ||mu||`` (``"unit_vec"``) or ``sign(mu)``
(``"sign"``); ``lam`` is the largest value, found by bisection from 10 down
to a 1e-5 step (:func:`~fedjax_sparse.attacks._stats.bisect_max`), with

* Min-Max: ``max_i ||g_i - mal||^2 <= max_{i,j} ||g_i - g_j||^2``,
* Min-Sum: ``sum_i ||g_i - mal||^2 <= min_i sum_j ||g_i - g_j||^2``,

``g`` ranging over the benign updates (``knowledge="partial"``: over the
attackers' own honest updates).

Cost. With ``e_i = g_i - mu``, ``||g_i - mal||^2 = ||e_i||^2 + 2 lam <e_i, dev>
+ lam^2 ||dev||^2`` is a quadratic in ``lam`` whose coefficients come from one
pass over the updates, so each bisection step is O(K). Min-Max's threshold
needs the pairwise distances (a K x K Gram matrix, O(K^2 d), computed in the
same pass). Min-Sum's needs none: centred on the benign mean,
``sum_j ||g_i - g_j||^2 = k_b ||e_i||^2 + sum_j ||e_j||^2`` (the ``e_j`` sum to
zero), so Min-Sum is O(K d).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sparse.attacks import _stats
from fedjax_sparse.attacks.base import (UpdateAttack, check_knowledge, no_state,
                                        replace_malicious)
from fedjax_sparse.attacks.registry import register_update

Array = jax.Array

DEVIATIONS = ("std", "unit_vec", "sign")


class OptimizedSolution(NamedTuple):
  """The solved attack: ``malicious = mu - lam * dev``.

  Attributes:
    lam: f32 scalar, the scale found by bisection.
    mu: ``f32[d]`` mean of the rows the attacker knows.
    dev: ``f32[d]`` perturbation direction.
    threshold: f32 scalar, the right-hand side of the constraint.
  """

  lam: Array
  mu: Array
  dev: Array
  threshold: Array

  @property
  def malicious(self) -> Array:
    return self.mu - self.lam * self.dev


def _check(deviation: str, knowledge: str) -> None:
  if deviation not in DEVIATIONS:
    raise ValueError(f"unknown deviation {deviation!r}; choose one of "
                     f"{', '.join(DEVIATIONS)}")
  check_knowledge(knowledge)


def _pass(updates, sel, deviation, want_gram):
  """One pass: the mean, the direction ``dev`` and the quadratic's coefficients."""
  if deviation == "std":
    out = _stats.centered_pass(updates, None, sel, want_sigma=True, want_gram=want_gram,
                               vec_fn=lambda m, s: s[None, :])
    return out.mu, out.sigma, out
  if deviation == "sign":
    out = _stats.centered_pass(updates, None, sel, want_gram=want_gram,
                               vec_fn=lambda m, s: jnp.sign(m)[None, :],
                               vec_uses_sigma=False)
    return out.mu, jnp.sign(out.mu), out
  # unit_vec: project on mu in the pass, normalise afterwards.
  out = _stats.centered_pass(updates, None, sel, want_gram=want_gram,
                             vec_fn=lambda m, s: m[None, :], vec_uses_sigma=False)
  norm = jnp.sqrt(out.vv[0, 0])
  inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
  out = out._replace(proj=out.proj * inv, vv=out.vv * inv * inv)
  return out.mu, out.mu * inv, out


def _sq_dist_to_mal(out, lam):
  """``||g_i - (mu - lam dev)||^2`` for every row: ``f32[K]``."""
  return out.row_sq + 2.0 * lam * out.proj[:, 0] + lam * lam * out.vv[0, 0]


def min_max_solve(updates: Array, is_malicious: Array, deviation: str = "std",
                  knowledge: str = "omniscient", lambda_init: float = 10.0,
                  tol: float = 1e-5) -> OptimizedSolution:
  """Solves Min-Max: the largest ``lam`` with
  ``max_i ||g_i - mal||^2 <= max_{i,j} ||g_i - g_j||^2``.

  Args:
    updates: ``f32[K, d]`` honest updates of all sampled clients.
    is_malicious: ``bool[K]``.
    deviation: ``"std"``, ``"unit_vec"`` or ``"sign"``.
    knowledge: ``"omniscient"`` (benign rows) or ``"partial"``.
    lambda_init, tol: bisection start and final step.

  Returns:
    :class:`OptimizedSolution`.
  """
  _check(deviation, knowledge)
  sel = _stats.knowledge_rows(is_malicious, knowledge)
  mu, dev, out = _pass(updates, sel, deviation, want_gram=True)
  both = (sel[:, None] * sel[None, :]) > 0
  threshold = jnp.max(jnp.where(both, _stats.pair_sq_dists(out.gram), -jnp.inf))

  def feasible(lam):
    dist = jnp.where(sel > 0, _sq_dist_to_mal(out, lam), -jnp.inf)
    return jnp.max(dist) <= threshold

  lam = _stats.bisect_max(feasible, lambda_init, tol)
  return OptimizedSolution(lam, mu, dev, threshold)


def min_sum_solve(updates: Array, is_malicious: Array, deviation: str = "std",
                  knowledge: str = "omniscient", lambda_init: float = 10.0,
                  tol: float = 1e-5) -> OptimizedSolution:
  """Solves Min-Sum: the largest ``lam`` with
  ``sum_i ||g_i - mal||^2 <= min_i sum_j ||g_i - g_j||^2``.

  Args and returns as :func:`min_max_solve`.
  """
  _check(deviation, knowledge)
  sel = _stats.knowledge_rows(is_malicious, knowledge)
  mu, dev, out = _pass(updates, sel, deviation, want_gram=False)
  n = jnp.sum(sel)
  total = jnp.sum(sel * out.row_sq)
  threshold = jnp.min(jnp.where(sel > 0, n * out.row_sq + total, jnp.inf))

  def feasible(lam):
    return jnp.sum(sel * _sq_dist_to_mal(out, lam)) <= threshold

  lam = _stats.bisect_max(feasible, lambda_init, tol)
  return OptimizedSolution(lam, mu, dev, threshold)


def _make(solve, deviation, knowledge, lambda_init, tol) -> UpdateAttack:
  _check(deviation, knowledge)

  def apply(state, updates, is_malicious, key, ctx):
    del key, ctx
    sol = solve(updates, is_malicious, deviation, knowledge, lambda_init, tol)
    return replace_malicious(updates, is_malicious, sol.malicious), state

  return UpdateAttack(no_state, apply)


@register_update("min_max")
def min_max(deviation: str = "std", knowledge: str = "omniscient",
            lambda_init: float = 10.0, tol: float = 1e-5) -> UpdateAttack:
  """Min-Max attack (see the module docstring and :func:`min_max_solve`)."""
  return _make(min_max_solve, deviation, knowledge, lambda_init, tol)


@register_update("min_sum")
def min_sum(deviation: str = "std", knowledge: str = "omniscient",
            lambda_init: float = 10.0, tol: float = 1e-5) -> UpdateAttack:
  """Min-Sum attack (see the module docstring and :func:`min_sum_solve`)."""
  return _make(min_sum_solve, deviation, knowledge, lambda_init, tol)
