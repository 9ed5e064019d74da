"""Hybrid sparse attack: HSA, DHSA and the C-LASA counter-attack.

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
(Alg. 10), implemented in :func:`c_lasa`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fedjax_sparse.attacks import _stats
from fedjax_sparse.attacks.base import (UpdateAttack, check_knowledge, no_state,
                                        replace_malicious)
from fedjax_sparse.attacks.registry import register_update
from fedjax_sparse.sparsify.topk import topk_mask

Array = jax.Array

STABILIZERS = ("none", "iqr", "elbow")
HSA_DIRECTIONS = ("inv_std", "inv_mean")
CLASA_SELECTIONS = ("least_utilized", "bottom_count")


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


# ---------------------------------------------------------------------------
# C-LASA (Alg. 10)

_F32_INF_BITS = 0x7F800000


def bottomk_mask(values: Array, k: int) -> Array:
  """Exact mask of the ``k`` smallest ``|values|`` (ties to the lower index).

  Reuses the radix top-k of :func:`fedjax_sparse.sparsify.topk_mask` on
  order-reversed keys: for ``x >= 0`` the f32 bit pattern is monotone in
  ``x``, so ``inf_bits - bits(x)`` is a non-negative bit pattern decreasing
  in ``x``.
  """
  bits = lax.bitcast_convert_type(jnp.abs(values).astype(jnp.float32), jnp.int32)
  rev = jnp.int32(_F32_INF_BITS) - jnp.minimum(bits, _F32_INF_BITS)
  return topk_mask(lax.bitcast_convert_type(rev, jnp.float32), k)


def _layer_slices(ctx, d: int) -> list[slice]:
  layout = getattr(ctx, "layout", None)
  if layout is None:
    return [slice(0, d)]
  if layout.d != d:
    raise ValueError(f"c_lasa: ctx.layout has d={layout.d} but the updates have d={d}")
  return layout.slices()


def _masked_median(v: Array, sel: Array) -> Array:
  """Median of ``v[i]`` over rows with ``sel > 0``, for ``v: f32[K, L]``."""
  s = jnp.sort(jnp.where(sel[:, None] > 0, v, jnp.inf), axis=0)
  n = jnp.maximum(jnp.sum(sel > 0), 1).astype(jnp.int32)
  lo = jnp.take(s, (n - 1) // 2, axis=0)
  hi = jnp.take(s, n // 2, axis=0)
  return 0.5 * (lo + hi)


@register_update("c_lasa")
def c_lasa(delta: float = 0.5, beta: float = 0.05, z_large: float = 1.5,
           z: Optional[float] = None, selection: str = "least_utilized",
           knowledge: str = "omniscient") -> UpdateAttack:
  """Counter-attack against LASA (hybrid_sparse_attack.txt App. G, Alg. 10).

  1. ``s = sign(mean(G))``, ``sigma = std(G)`` over the benign updates G.
  2. For every benign ``g_i``, ``I_i`` = its ``floor(delta d)`` smallest
     magnitudes; ``count[j]`` = how many ``I_i`` contain ``j``.
  3. ``J``: ``floor(beta d)`` locations chosen from ``count``; ``m = sigma
     z_max`` and ``m[J] = sigma z_large``; ``m = m * s``.
  4. Per layer ``l``: ``p_l = -m_l / ||m_l|| * median_i ||G_{i,l}||``.
  Every attacker sends ``p``. Layers are the leaves of ``ctx.layout`` (one
  layer if it is None).

  The paper is inconsistent about step 3: its text targets "less-utilized
  parameter locations", "the parameter indices with the smallest magnitudes
  from benign clients", i.e. the locations in the most ``I_i`` (largest
  ``count``; ``selection="least_utilized"``, the default), while line 12 of
  Alg. 10 writes ``bottom-k(count)`` (``selection="bottom_count"``, which with
  small ``delta`` mostly picks ties at ``count = 0``, broken here towards the
  lower index). The paper gives no defaults for ``delta``, ``beta`` and
  ``z_large``: 0.5, 0.05 (its HSA sparsity in Table XXVI) and 1.5 (HSA's z2)
  are ours.

  Args:
    delta: fraction of smallest-magnitude coordinates per benign client.
    beta: fraction of locations given ``z_large``.
    z_large: the large scale.
    z: the small scale; None for ALIE's ``z_max``.
    selection: ``"least_utilized"`` or ``"bottom_count"`` (see above).
    knowledge: ``"omniscient"`` or ``"partial"``.
  """
  check_knowledge(knowledge)
  if selection not in CLASA_SELECTIONS:
    raise ValueError(f"unknown selection {selection!r}; choose one of "
                     f"{', '.join(CLASA_SELECTIONS)}")
  if not 0 < delta <= 1 or not 0 < beta <= 1:
    raise ValueError(f"delta and beta must be in (0, 1], got {delta}, {beta}")

  def apply(state, updates, is_malicious, key, ctx):
    del key
    k_rows, d = updates.shape
    k_small = max(1, int(math.floor(delta * d)))
    k_large = max(1, int(math.floor(beta * d)))
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    mu, sigma = _stats.mean_std(updates, sel)
    sign = jnp.sign(mu)

    def add_row(i, count):
      return lax.cond(sel[i] > 0,
                      lambda c: c + bottomk_mask(updates[i], k_small).astype(jnp.int32),
                      lambda c: c, count)

    count = lax.fori_loop(0, k_rows, add_row, jnp.zeros((d,), jnp.int32))
    if selection == "least_utilized":
      big = topk_mask(count.astype(jnp.float32), k_large)
    else:
      big = bottomk_mask(count.astype(jnp.float32), k_large)
    zz = (_stats.z_max(k_rows, jnp.sum(is_malicious)) if z is None else jnp.float32(z))
    m = sigma * jnp.where(big, jnp.float32(z_large), zz) * sign
    parts = []
    for sl in _layer_slices(ctx, d):
      g_norm = jnp.sqrt(jnp.sum(jnp.square(updates[:, sl]), axis=1))
      target = _masked_median(g_norm[:, None], sel)[0]
      ml = m[sl]
      n_ml = jnp.linalg.norm(ml)
      parts.append(jnp.where(n_ml > 0, -ml / jnp.where(n_ml > 0, n_ml, 1.0) * target, 0.0))
    p = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return replace_malicious(updates, is_malicious, p), state

  return UpdateAttack(no_state, apply)
