"""FetchSGD: SparseFed over count sketches (sparsefed.txt App. B.1.4, Alg. 10).

The count sketch itself is :class:`fedjax_sparse.sparsify.CountSketch` and the
bits per round :func:`fedjax_sparse.sparsify.fetchsgd_round_comm`.

FetchSGD (Alg. 10, with ALGORITHMS.md section 3's reading)::

  S     <- (1/K) sum_i S(clip(u_i))       # = S(mean_i clip(u_i)) by linearity
  S_u   <- rho * S_u + S                  # momentum sketch
  S_e   <- S_e + S_u                      # error sketch
  Delta <- top_k(U(S_e))                  # estimated values on k coordinates
  S_e, S_u <- 0 on the cells of S(Delta)  # the cells Delta's own sketch touches
  return Delta                            # server: theta <- theta - lr * Delta

Notes:

* The aggregator sketches the mean of the clipped updates once instead of
  summing ``K`` client sketches; by linearity the two are equal up to float
  rounding (tested), and it costs one scatter instead of ``K``. Each client
  still uploads ``32 * r * c`` bits
  (:func:`fedjax_sparse.sparsify.fetchsgd_round_comm`).
* Alg. 10 writes the learning rate into the error sketch (``S_e = eta S_u +
  S_e``) and subtracts ``S(Delta)``; here the server applies the learning rate
  (``theta - lr * Delta``, like every aggregator of the library) and the cells
  touched by ``Delta`` are zeroed in both sketches, as in FetchSGD's reference
  code. ``error_reset="subtract"`` gives Alg. 10's ``S_e - S(Delta)`` (the
  momentum cells are still zeroed).
* ``mode="true_topk"`` runs the same steps with exact ``f32[d]`` vectors in
  place of sketches: zeroing the selected coordinates of ``W`` is ``W -
  Delta``, so this is SparseFed (tested).
* Non-finite and huge rows (ours), as in SparseFed: a row at ``1e30`` is
  clipped to norm ``L``, a row with ``inf``/``nan`` is left out of the mean
  (acceptance 0), so the sketches never hold ``nan``. With clipping every
  cell of ``S`` is at most ``||u||_1 <= sqrt(d) L``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.clipping import check_clip_config
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.aggregators.sparsefed import (check_rho, check_topk_method,
                                                clipped_mean)
from fedjax_sparse.sparsify import (CountSketch, check_k_spec, check_sketch_config,
                                    resolve_k, topk_mask)

Array = jax.Array

FETCHSGD_MODES = ("sketch", "true_topk")


@flax.struct.dataclass
class FetchSGDState:
  """Server state: ``f32[rows, cols]`` sketches, or ``f32[d]`` in true_topk mode.

  Attributes:
    momentum: momentum ``S_u`` (``R``).
    error: error accumulator ``S_e`` (``W``).
  """

  momentum: Array
  error: Array


@register("fetchsgd")
def fetchsgd(rows: int = 5, cols: Optional[int] = None, k=None, rho: float = 0.9,
             clip_norm: float = math.inf, mode: str = "sketch", seed: int = 0,
             adaptive_clip: bool = False,
             lr_schedule: Optional[Callable[[Array], Array]] = None,
             weighted: bool = False, error_reset: str = "zero",
             topk_method: str = "radix") -> Aggregator:
  """SparseFed with FetchSGD (sparsefed.txt Alg. 10; ALGORITHMS.md section 3).

  Args:
    rows: sketch rows r.
    cols: sketch columns c (required; FetchSGD recovers the top-k well with
      ``c >= 10 k``).
    k: coordinates updated per round (required): int >= 1 or a fraction of d.
    rho: momentum (0.9).
    clip_norm: ``L`` per client (``inf``: no clipping).
    mode: ``"sketch"`` (FetchSGD) or ``"true_topk"`` (same steps on exact
      vectors; equals SparseFed).
    seed: seed of the sketch's hashes.
    adaptive_clip, lr_schedule: as
      :func:`~fedjax_sparse.aggregators.sparsefed.sparsefed`.
    weighted: weight the mean by dataset sizes (ours; Alg. 10 averages).
    error_reset: ``"zero"`` (zero the touched cells) or ``"subtract"``
      (``S_e - S(Delta)``, Alg. 10 line 15).
    topk_method: see :data:`fedjax_sparse.sparsify.TOPK_METHODS`.

  Returns:
    An :class:`~fedjax_sparse.aggregators.Aggregator` with a
    :class:`FetchSGDState`; ``update`` is ``Delta``. Diagnostics:
    ``clip_scale`` (f32[K]), ``clip_norm``, ``error_norm``.
  """
  check_sketch_config(rows, cols)
  check_k_spec(k)
  check_rho(rho)
  check_clip_config(clip_norm, adaptive_clip)
  if mode not in FETCHSGD_MODES:
    raise ValueError(f"unknown FetchSGD mode {mode!r}; known: "
                     f"{', '.join(FETCHSGD_MODES)}")
  if error_reset not in ("zero", "subtract"):
    raise ValueError(f"error_reset must be 'zero' or 'subtract', got {error_reset!r}")
  check_topk_method(topk_method)

  def make_sketch(d):
    return CountSketch.create(d, rows, cols, jax.random.PRNGKey(seed))

  def init(d: int) -> FetchSGDState:
    resolve_k(k, d)  # fails here, before anything is compiled
    shape = (rows, cols) if mode == "sketch" else (d,)
    z = jnp.zeros(shape, jnp.float32)
    return FetchSGDState(momentum=z, error=z)

  def apply(state, updates, masks, weights, key, ctx):
    del key
    d = updates.shape[1]
    kk = resolve_k(k, d)
    del masks  # clients upload sketches of their dense updates
    u, acceptance, diagnostics = clipped_mean(
        updates, None, weights, ctx, clip_norm, adaptive_clip, lr_schedule,
        weighted, False)
    if mode == "sketch":
      sk = make_sketch(d)
      momentum = rho * state.momentum + sk.sketch(u)
      error = state.error + momentum
      est = sk.unsketch(error)
      selected = topk_mask(est, kk, topk_method)
      delta = jnp.where(selected, est, 0.0)
      touched = sk.support(selected)
      if error_reset == "zero":
        error = jnp.where(touched, 0.0, error)
      else:
        error = error - sk.sketch(delta)
      momentum = jnp.where(touched, 0.0, momentum)
    else:
      momentum = rho * state.momentum + u
      error = state.error + momentum
      selected = topk_mask(error, kk, topk_method)
      delta = jnp.where(selected, error, 0.0)
      error = jnp.where(selected, 0.0, error)
      momentum = jnp.where(selected, 0.0, momentum)
    diagnostics["error_norm"] = jnp.linalg.norm(error)
    return AggOut(delta, acceptance, diagnostics), FetchSGDState(momentum, error)

  return Aggregator(init, apply)
