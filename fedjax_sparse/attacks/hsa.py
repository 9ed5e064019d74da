"""Hybrid sparse attack: HSA and DHSA (C-LASA: :mod:`.clasa`).

hybrid_sparse_attack.txt section 3 (eqs. 17-21, Alg. 3), App. H (variance
stabilisation) and App. G (Alg. 10); ALGORITHMS.md sections 5-6.

HSA perturbs the benign mean with a dense, stealthy component and a sparse,
strong one concentrated on a static mask ``c`` (computed once, before
training, from the network topology: :mod:`fedjax_sparse.saliency`)::

  Delta = (z1 (1 - c) + z2 c) * sigma,    malicious = mu - Delta   (eq. 18)

* ``"hsa"`` (Alg. 3 option 1): ``z1 = z_max`` (ALIE, eq. 12), ``z2 = 1.5``.
* ``"dhsa"`` (option 2): ``z2`` fixed, ``z1`` the largest value with
  ``(1/k_b) sum_i ||malicious - m_i||_2 <= (1/(k_b - 1)) max_i sum_j ||m_i - m_j||_2``
  (eqs. 20-21), found by the Min-Sum bisection (from 10 down to a 1e-5 step).
* Variance stabilisation (App. H, for both): the std at the masked positions
  ``{sigma[i] : c[i] = 1}`` is clipped at ``Q3 + 1.5 IQR`` (``"iqr"``) or at
  the elbow of its sorted values (``"elbow"``).

Direction of the perturbation (``direction``, both attacks):

* ``"inv_std"`` (default, Alg. 3): ``malicious = mu - Delta``, the
  "inverse standard deviation" perturbation of ALIE and Min-Max/Min-Sum.
* ``"inv_mean"`` (ours): ``malicious = mu - sign(mu) * Delta``
  coordinate-wise (``sign(0) = +1``): every coordinate is pushed against the
  sign of the benign mean, the "inverse sign" perturbation of Shejwalkar and
  Houmansadr's AGR-tailored attacks (NDSS 2021).

The hybrid paper defines no sign options (such as an inverted-std or
inverted-mean sign) for HSA/DHSA: ``"inv_mean"`` is our extension. The only
sign manipulation the paper describes is C-LASA's inverted mean sign
(Alg. 10), implemented in :func:`fedjax_sparse.attacks.clasa.c_lasa`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.attacks import _stats
from fedjax_sparse.attacks.base import (UpdateAttack, check_knowledge, no_state,
                                        replace_malicious)
from fedjax_sparse.attacks.clasa import CLASA_SELECTIONS, bottomk_mask, c_lasa
from fedjax_sparse.attacks.registry import register_update

# C-LASA's names (fedjax_sparse.attacks.clasa) are importable from here too.
__all__ = ["CLASA_SELECTIONS", "DHSASolution", "HSA_DIRECTIONS", "STABILIZERS",
           "bottomk_mask", "c_lasa", "dhsa", "dhsa_solve", "direction_sign",
           "hsa", "stabilization_threshold"]

Array = jax.Array

STABILIZERS = ("none", "iqr", "elbow")
HSA_DIRECTIONS = ("inv_std", "inv_mean")


def _as_mask(mask: Any) -> np.ndarray:
  """A static ``bool[d]`` numpy mask from an array or a saliency MaskResult."""
  mask = getattr(mask, "mask", mask)
  if mask is None:
    raise ValueError("HSA needs the sparse mask c (bool[d]); build one with "
                     "fedjax_sparse.saliency.compute_mask")
  if isinstance(mask, jax.core.Tracer):
    raise ValueError("the HSA mask must be a concrete array (it is static: "
                     "computed once before training)")
  m = np.asarray(mask).astype(bool).ravel()
  if m.size == 0:
    raise ValueError("the HSA mask is empty")
  return m


def _check_d(mask: np.ndarray, d: int, name: str) -> None:
  if mask.shape[0] != d:
    raise ValueError(f"{name}: the mask has {mask.shape[0]} entries but the "
                     f"updates have d={d}; build the mask on the same model")


def _check_stabilize(stabilize: str) -> None:
  if stabilize not in STABILIZERS:
    raise ValueError(f"unknown variance stabilisation {stabilize!r}; choose one "
                     f"of {', '.join(STABILIZERS)}")


def _check_direction(direction: str) -> None:
  if direction not in HSA_DIRECTIONS:
    raise ValueError(f"unknown HSA direction {direction!r}; choose one of "
                     f"{', '.join(HSA_DIRECTIONS)}")


def direction_sign(mu: Array, direction: str) -> Array:
  """Coordinate-wise sign applied to ``Delta`` (see the module docstring).

  ``"inv_std"``: ones; ``"inv_mean"``: ``sign(mu)`` with ``sign(0) = +1``
  (ours: a zero mean coordinate is still perturbed, downwards like
  ``"inv_std"``).

  Returns:
    ``f32[d]`` of +-1, shaped like ``mu``.
  """
  _check_direction(direction)
  if direction == "inv_std":
    return jnp.ones_like(mu)
  return jnp.where(mu >= 0, 1.0, -1.0).astype(mu.dtype)


def stabilization_threshold(values: Array, method: str) -> Array:
  """Clipping threshold for the masked std values (App. H).

  Args:
    values: ``f32[n]`` the std at the masked positions.
    method: ``"none"`` (``+inf``), ``"iqr"`` (``Q3 + 1.5 (Q3 - Q1)``, linear
      quantiles) or ``"elbow"``: sort ascending, take the consecutive
      differences ``g_k = v[k+1] - v[k]`` and the ratios ``g_{k+1} / g_k``;
      the largest ratio marks the jump, and the threshold is the last value
      before it. The paper leaves the search range open; we search the upper
      half of the sorted values only (where the variance "begins to grow
      abnormally") and floor the denominators at ``1e-6 * (v_max - v_min)``
      so runs of equal values do not produce infinite ratios (ours).

  Returns:
    f32 scalar.
  """
  _check_stabilize(method)
  n = values.shape[0]
  if method == "none" or n < 3:
    return jnp.float32(jnp.inf)
  if method == "iqr":
    q1, q3 = jnp.quantile(values, jnp.array([0.25, 0.75], jnp.float32))
    return q3 + 1.5 * (q3 - q1)
  v = jnp.sort(values)
  gaps = v[1:] - v[:-1]                               # n - 1
  floor = 1e-6 * (v[-1] - v[0]) + 1e-30
  ratios = gaps[1:] / jnp.maximum(gaps[:-1], floor)   # n - 2, ratio k: gap k+1 / gap k
  pos = jnp.arange(n - 2)
  ratios = jnp.where(pos + 1 >= (n - 1) // 2, ratios, -jnp.inf)
  j = jnp.argmax(ratios)
  return v[j + 1]


def _stabilize(sigma: Array, c: Array, thr: Array) -> Array:
  return jnp.where(c, jnp.minimum(sigma, thr), sigma)


@register_update("hsa")
def hsa(mask: Any, z2: float = 1.5, z1: Optional[float] = None,
        knowledge: str = "omniscient", stabilize: str = "none",
        direction: str = "inv_std") -> UpdateAttack:
  """Static hybrid sparse attack (Alg. 3 option 1, eq. 18).

  Args:
    mask: the sparse mask ``c``: ``bool[d]`` (numpy, concrete) or a
      :class:`fedjax_sparse.saliency.MaskResult`.
    z2: scale on the masked positions (1.5, section 3.1).
    z1: scale elsewhere; None for ALIE's ``z_max`` of this round's K, k_m.
    knowledge: ``"omniscient"`` or ``"partial"`` (App. C.3).
    stabilize: ``"none"``, ``"iqr"`` or ``"elbow"`` (App. H).
    direction: ``"inv_std"`` (``mu - Delta``, Alg. 3) or ``"inv_mean"``
      (``mu - sign(mu) Delta``; ours, the paper defines no sign options: see
      the module docstring).
  """
  c_np = _as_mask(mask)
  idx = np.flatnonzero(c_np)
  check_knowledge(knowledge)
  _check_stabilize(stabilize)
  _check_direction(direction)

  def apply(state, updates, is_malicious, key, ctx):
    del key, ctx
    _check_d(c_np, updates.shape[1], "hsa")
    c = jnp.asarray(c_np)
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    mu, sigma = _stats.mean_std(updates, sel)
    if stabilize != "none" and idx.size:
      sigma = _stabilize(sigma, c, stabilization_threshold(sigma[idx], stabilize))
    zz1 = (_stats.z_max(updates.shape[0], jnp.sum(is_malicious)) if z1 is None
           else jnp.float32(z1))
    delta = jnp.where(c, jnp.float32(z2), zz1) * sigma
    mal = mu - direction_sign(mu, direction) * delta
    return replace_malicious(updates, is_malicious, mal), state

  return UpdateAttack(no_state, apply)


class DHSASolution(NamedTuple):
  """``malicious = mu - s * (z1 (1 - c) + z2 c) * sigma`` (eq. 18).

  ``s`` is 1 for ``direction="inv_std"`` and ``sign(mu)`` (``sign(0) = +1``)
  for ``"inv_mean"`` (:func:`direction_sign`).

  Attributes:
    z1: f32 scalar found by bisection.
    mu: ``f32[d]``.
    sigma: ``f32[d]`` (after stabilisation).
    threshold: Delta_th of eq. 21.
    malicious: ``f32[d]``.
  """

  z1: Array
  mu: Array
  sigma: Array
  threshold: Array
  malicious: Array


def dhsa_solve(updates: Array, is_malicious: Array, mask: Any, z2: float = 1.5,
               knowledge: str = "omniscient", stabilize: str = "none",
               lambda_init: float = 10.0, tol: float = 1e-5,
               direction: str = "inv_std") -> DHSASolution:
  """Solves DHSA's eq. (20) for ``z1`` (see the module docstring).

  One pass over the updates gives the centred Gram matrix (for eq. 21's
  pairwise distances) and ``<e_i, a>``, ``<e_i, b>``, ``||a||^2``, ``||b||^2``
  for ``a = s (1 - c) sigma``, ``b = z2 s c sigma``, ``e_i = m_i - mu``,
  where ``s`` is the direction's sign vector (:func:`direction_sign`; the
  mean is known inside each column slice of the pass); then
  ``||malicious - m_i||^2 = ||e_i + b + z1 a||^2`` is a quadratic in ``z1``
  and each bisection step is O(K). The constraint of eq. 20 therefore holds
  for either direction.

  Returns:
    :class:`DHSASolution`.
  """
  c_np = _as_mask(mask)
  _check_d(c_np, updates.shape[1], "dhsa")
  check_knowledge(knowledge)
  _check_stabilize(stabilize)
  _check_direction(direction)
  idx = np.flatnonzero(c_np)
  sel = _stats.knowledge_rows(is_malicious, knowledge)
  cf = jnp.asarray(c_np, updates.dtype)
  z2f = jnp.float32(z2)
  sigma_fn = None
  if stabilize != "none" and idx.size:
    # The threshold only needs the masked columns: gather them (static
    # indices) instead of a separate pass over all of d.
    cols = updates[:, idx]
    sig_c = _stats.mean_std(cols, sel)[1]
    thr = stabilization_threshold(sig_c, stabilize)
    sigma_fn = lambda s, cc: _stabilize(s, cc > 0, thr)

  def vec_fn(m, s, cc):
    sgn = direction_sign(m, direction)
    return jnp.stack([sgn * (1.0 - cc) * s, sgn * z2f * cc * s])

  out = _stats.centered_pass(updates, None, sel, want_sigma=True, want_gram=True,
                             sigma_fn=sigma_fn, vec_fn=vec_fn, aux=(cf,))
  mu = out.mu
  n = _stats.row_count(sel)
  both = (sel[:, None] * sel[None, :]) > 0
  dist = jnp.sqrt(_stats.pair_sq_dists(out.gram))
  threshold = jnp.max(jnp.where(sel > 0, jnp.sum(jnp.where(both, dist, 0.0), axis=1),
                                -jnp.inf)) / jnp.maximum(n - 1.0, 1.0)
  const = out.row_sq + 2.0 * out.proj[:, 1] + out.vv[1, 1]
  lin = 2.0 * (out.proj[:, 0] + out.vv[0, 1])
  quad = out.vv[0, 0]

  def feasible(z):
    q = jnp.maximum(const + z * lin + z * z * quad, 0.0)
    return jnp.sum(sel * jnp.sqrt(q)) / n <= threshold

  z1 = _stats.bisect_max(feasible, lambda_init, tol)
  sigma = out.sigma
  mal = mu - direction_sign(mu, direction) * jnp.where(jnp.asarray(c_np), z2f, z1) * sigma
  return DHSASolution(z1, mu, sigma, threshold, mal)


@register_update("dhsa")
def dhsa(mask: Any, z2: float = 1.5, knowledge: str = "omniscient",
         stabilize: str = "none", lambda_init: float = 10.0,
         tol: float = 1e-5, direction: str = "inv_std") -> UpdateAttack:
  """Dynamic hybrid sparse attack (Alg. 3 option 2, eqs. 20-21).

  Args:
    mask: the sparse mask ``c`` (``bool[d]`` or a ``MaskResult``).
    z2: fixed scale on the masked positions (1.5).
    knowledge: ``"omniscient"`` or ``"partial"``.
    stabilize: ``"none"``, ``"iqr"`` or ``"elbow"`` (App. H).
    lambda_init, tol: bisection start and final step for ``z1``.
    direction: ``"inv_std"`` (Alg. 3) or ``"inv_mean"`` (ours, the paper
      defines no sign options; the bisection bounds eq. 20 for the signed
      vector, see :func:`dhsa_solve`).
  """
  c_np = _as_mask(mask)
  check_knowledge(knowledge)
  _check_stabilize(stabilize)
  _check_direction(direction)

  def apply(state, updates, is_malicious, key, ctx):
    del key, ctx
    sol = dhsa_solve(updates, is_malicious, c_np, z2, knowledge, stabilize,
                     lambda_init, tol, direction)
    return replace_malicious(updates, is_malicious, sol.malicious), state

  return UpdateAttack(no_state, apply)
