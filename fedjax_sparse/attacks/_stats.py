"""Masked statistics, one-pass moments and bisection shared by update attacks.

Performance notes (2-core dev machine, ``f32[100, 700k]``, quiet machine):

* XLA:CPU reduces over the leading axis slowly (``jnp.mean(x, 0)`` 510 ms,
  ``jnp.std(x, 0)`` 1.5 s) while a weighted matvec ``w @ x`` takes 10-18 ms,
  so column statistics are matvecs with the row weights ``sel / n``.
* ``w @ (x - mu)**2`` took 150 ms: it writes a K x d temporary (fresh pages).
  :func:`centered_pass` walks the columns in 4096-wide slices that stay in
  cache and computes the mean, the std, the centred Gram matrix and the
  projections on perturbation directions in one pass: mean + std 50 ms.
* A single ``[100, 700k] @ [700k, 100]`` product took ~290 ms; summing the
  products of 4096-column slices in a ``fori_loop`` took 85 ms (~165
  GFLOP/s, the machine's sgemm peak). Splitting the rows to skip the
  symmetric block was 2x slower (three small products per slice).
* Every time doubles when other processes compete for the two cores.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtri

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST

# Columns per step of :func:`centered_pass` (measured, see module docstring).
CHUNK = 4096


def knowledge_rows(is_malicious: Array, knowledge: str) -> Array:
  """``f32[K]`` 0/1 indicator of the rows the attacker computes statistics on.

  ``"omniscient"``: the benign rows; ``"partial"``: the malicious rows' own
  honest updates (hybrid_sparse_attack.txt App. C.3).
  """
  rows = ~is_malicious if knowledge == "omniscient" else is_malicious
  return rows.astype(jnp.float32)


def row_count(sel: Array) -> Array:
  """Number of selected rows, at least 1 (so that divisions stay finite)."""
  return jnp.maximum(jnp.sum(sel), 1.0)


def masked_mean(x: Array, sel: Array) -> Array:
  """Mean of the selected rows of ``x: f32[K, d]`` -> ``f32[d]`` (one matvec)."""
  w = sel / row_count(sel)
  return jnp.matmul(w.astype(x.dtype), x, precision=_HIGHEST)


def _var_weights(sel: Array, ddof: int) -> Array:
  n = jnp.sum(sel)
  return sel / jnp.maximum(n - ddof, 1.0)


def masked_std(x: Array, sel: Array, mu: Array, ddof: int = 1) -> Array:
  """Coordinate std of the selected rows around ``mu``: ``f32[d]``.

  ``ddof=1`` (the unbiased estimate, ``torch.std``'s default used by the
  reference implementations of ALIE, Min-Max/Min-Sum and HSA). With a single
  selected row the divisor is clamped to 1. Computed by
  :func:`centered_pass` (3x faster than materialising ``(x - mu)^2``).
  """
  return centered_pass(x, mu, sel, want_sigma=True, want_row_sq=False,
                       ddof=ddof).sigma


Z_RULES = ("hybrid", "baruch")


def z_max(num_clients, num_malicious, rule: str = "hybrid") -> Array:
  """ALIE's scaling (Baruch et al. 2019; hybrid_sparse_attack.txt eq. 12).

  ``s = floor(K/2 + 1) - k_m``. ``rule="hybrid"`` (the hybrid paper's eq. 12):
  ``z_max = Phi^-1((K - k_m - s)/(K - k_m))``; ``rule="baruch"`` (Baruch et
  al. 2019, Alg. 3): ``z_max = Phi^-1((K - s)/K)``, larger at the papers'
  settings (K = 25, k_m = 5: 0.253 and 0.468). Both counts may be
  traced. The probability is clipped to ``[1e-6, 1 - 1e-6]`` so that
  ``z_max`` stays finite where the formula is undefined (``k_m >= K/2``).

  Args:
    num_clients: K, clients sampled this round.
    num_malicious: k_m, malicious clients among them.
    rule: ``"hybrid"`` or ``"baruch"``.

  Returns:
    f32 scalar.
  """
  if rule not in Z_RULES:
    raise ValueError(f"unknown z rule {rule!r}; choose one of {', '.join(Z_RULES)}")
  k = jnp.asarray(num_clients, jnp.float32)
  km = jnp.asarray(num_malicious, jnp.float32)
  s = jnp.floor(k / 2.0 + 1.0) - km
  if rule == "baruch":
    p = (k - s) / jnp.maximum(k, 1.0)
    return ndtri(jnp.clip(p, 1e-6, 1.0 - 1e-6))
  p = (k - km - s) / jnp.maximum(k - km, 1.0)
  return ndtri(jnp.clip(p, 1e-6, 1.0 - 1e-6))


def bisect_max(feasible: Callable[[Array], Array], init: float = 10.0,
               tol: float = 1e-5) -> Array:
  """Largest scale the reference bisection accepts, as a fixed-length loop.

  The reference of Min-Max/Min-Sum (Shejwalkar and Houmansadr, NDSS 2022;
  hybrid_sparse_attack.txt section 2.3): ``lam = init``, ``step = init``,
  ``succ = 0``; each step ``succ = lam`` and ``lam += step/2`` if
  ``feasible(lam)``, else ``lam -= step/2``; ``step /= 2``; stop when the
  step is below ``tol``. Here the loop runs exactly
  ``ceil(log2(init/tol)) + 1`` steps (21 for the defaults), so it is
  jittable and ends at the same resolution. Returns ``succ`` (0 when no
  tried value is feasible); values up to ``2 * init`` are reachable.
  """
  n_iter = int(math.ceil(math.log2(init / tol))) + 1

  def body(_, carry):
    lam, step, succ = carry
    ok = feasible(lam)
    succ = jnp.where(ok, lam, succ)
    lam = jnp.where(ok, lam + step / 2, lam - step / 2)
    return lam, step / 2, succ

  init_a = jnp.float32(init)
  _, _, succ = lax.fori_loop(0, n_iter, body, (init_a, init_a, jnp.float32(0.0)))
  return succ


class PassOut(NamedTuple):
  """What :func:`centered_pass` computes, with ``e_i = x_i - mu``.

  Attributes:
    mu: ``f32[d]`` the centre (the given one, or the mean of the selected
      rows computed in the pass).
    sigma: ``f32[d]`` coordinate std of the selected rows (after
      ``sigma_fn``), or None.
    row_sq: ``f32[K]`` ``||e_i||^2`` (zeros with ``want_row_sq=False``).
    gram: ``f32[K, K]`` ``<e_i, e_j>``, or None.
    proj: ``f32[K, m]`` ``<e_i, v_k>`` for the vectors of ``vec_fn``, or None.
    vv: ``f32[m, m]`` ``<v_k, v_l>``, or None.
  """

  mu: Array
  sigma: Optional[Array]
  row_sq: Array
  gram: Optional[Array]
  proj: Optional[Array]
  vv: Optional[Array]


def centered_pass(x: Array, mu: Optional[Array], sel: Array, *,
                  want_sigma: bool = False, want_gram: bool = False,
                  want_row_sq: bool = True,
                  sigma_fn: Optional[Callable[..., Array]] = None,
                  vec_fn: Optional[Callable[..., Array]] = None,
                  vec_uses_sigma: bool = True,
                  aux: Sequence[Array] = (), ddof: int = 1,
                  chunk: int = CHUNK) -> PassOut:
  """One pass over the columns of ``x`` computing centred moments.

  Walks ``x`` in slices of ``chunk`` columns; each slice stays in cache
  while everything below is computed from it. In each slice: the centre
  ``mu`` (given, or the mean of the selected rows when ``mu`` is None), the
  deviations ``e = x - mu``, the coordinate std ``sigma`` of the selected
  rows, then ``sigma_fn(sigma, *aux)`` (e.g. HSA's variance stabilisation),
  then the vectors ``V = vec_fn(mu, sigma, *aux): f32[m, chunk]``
  (perturbation directions); it accumulates ``||e_i||^2``, the Gram matrix
  ``e e^T``, ``e V^T`` and ``V V^T``. ``aux`` arrays (``f32[d]``) are sliced
  alongside. With ``vec_uses_sigma=False`` the std is not computed for
  ``vec_fn`` (it receives None).

  Every quantity of the optimised attacks is a function of these: e.g.
  ``||x_i - (mu - lam v)||^2 = ||e_i||^2 + 2 lam <e_i, v> + lam^2 ||v||^2``,
  and ``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``, so a bisection over
  ``lam`` costs O(K) per step after this O(K^2 d) (Gram) or O(K d) pass.
  Centring on ``mu`` first keeps the f32 cancellation in these formulas
  small relative to the distances.

  Returns:
    :class:`PassOut`.
  """
  k, d = x.shape
  dc = min(int(chunk), d)
  n_full = d // dc
  rem = d - n_full * dc
  need_sigma = want_sigma or (vec_fn is not None and vec_uses_sigma)
  wv = _var_weights(sel, ddof).astype(x.dtype)
  wm = (sel / row_count(sel)).astype(x.dtype)
  own_mu = mu is None
  aux = tuple(aux)

  def block(start, width, carry):
    mu_buf, sigma_buf, row_sq, gram, proj, vv = carry
    xc = lax.dynamic_slice_in_dim(x, start, width, axis=1)
    if own_mu:
      muc = jnp.matmul(wm, xc, precision=_HIGHEST)
      mu_buf = lax.dynamic_update_slice_in_dim(mu_buf, muc, start, 0)
    else:
      muc = lax.dynamic_slice_in_dim(mu, start, width)
    auxc = tuple(lax.dynamic_slice_in_dim(a, start, width) for a in aux)
    e = xc - muc[None, :]
    sig = None
    if need_sigma:
      sig = jnp.sqrt(jnp.matmul(wv, e * e, precision=_HIGHEST))
      if sigma_fn is not None:
        sig = sigma_fn(sig, *auxc)
      if want_sigma:
        sigma_buf = lax.dynamic_update_slice_in_dim(sigma_buf, sig, start, 0)
    v = vec_fn(muc, sig, *auxc) if vec_fn is not None else None
    if want_gram:
      # One product of [e; V] with itself gives the Gram matrix, e V^T and
      # V V^T at once (one matmul instead of three per slice).
      y = e if v is None else jnp.concatenate([e, v.astype(e.dtype)], axis=0)
      gram = gram + jnp.matmul(y, y.T, precision=_HIGHEST)
    else:
      if want_row_sq:
        row_sq = row_sq + jnp.sum(e * e, axis=1)
      if v is not None:
        proj = proj + jnp.matmul(e, v.T, precision=_HIGHEST)
        vv = vv + jnp.matmul(v, v.T, precision=_HIGHEST)
    return mu_buf, sigma_buf, row_sq, gram, proj, vv

  m = 0
  if vec_fn is not None:
    sig_spec = jax.ShapeDtypeStruct((dc,), x.dtype) if need_sigma else None
    probe = jax.eval_shape(
        lambda m_, s_, *a_: vec_fn(m_, s_, *a_),
        jax.ShapeDtypeStruct((dc,), x.dtype), sig_spec,
        *[jax.ShapeDtypeStruct((dc,), a.dtype) for a in aux])
    m = probe.shape[0]
  kg = k + m if want_gram else 0
  carry = (jnp.zeros((d,) if own_mu else (0,), x.dtype),
           jnp.zeros((d,) if want_sigma else (0,), x.dtype),
           jnp.zeros((k,), x.dtype),
           jnp.zeros((kg, kg), x.dtype),
           jnp.zeros((k, m), x.dtype), jnp.zeros((m, m), x.dtype))
  if n_full == 1:
    carry = block(0, dc, carry)
  else:
    carry = lax.fori_loop(0, n_full, lambda i, c: block(i * dc, dc, c), carry,
                          unroll=4 if n_full >= 4 else 1)
  if rem:
    carry = block(n_full * dc, rem, carry)
  mu_buf, sigma_buf, row_sq, gram, proj, vv = carry
  if want_gram:
    gram, proj, vv = gram[:k, :k], gram[:k, k:], gram[k:, k:]
    row_sq = jnp.diagonal(gram)
  return PassOut(mu_buf if own_mu else mu, sigma_buf if want_sigma else None,
                 row_sq, gram if want_gram else None,
                 proj if vec_fn is not None else None,
                 vv if vec_fn is not None else None)


def mean_std(x: Array, sel: Array, ddof: int = 1) -> tuple[Array, Array]:
  """Mean and coordinate std of the selected rows, in one pass over ``x``."""
  out = centered_pass(x, None, sel, want_sigma=True, want_row_sq=False, ddof=ddof)
  return out.mu, out.sigma


def pair_sq_dists(gram: Array) -> Array:
  """``||e_i - e_j||^2`` from the Gram matrix, clamped at 0, zero diagonal."""
  sq = jnp.diagonal(gram)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  return jnp.where(jnp.eye(gram.shape[0], dtype=bool), 0.0, d2)
