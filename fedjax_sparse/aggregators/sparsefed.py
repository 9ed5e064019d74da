"""SparseFed: norm clipping + global top-k with error feedback (sparsefed.txt).

Panda et al., "SparseFed: Mitigating Model Poisoning Attacks in Federated
Learning with Sparsification", Alg. 1 and Alg. 5 (momentum with momentum factor
masking, App. B.1.1), App. B.1.4 (the learning rate is applied after top-k) and
App. B.2 (adaptive clipping). ALGORITHMS.md section 3 fixes the reading used
here. Each round::

  u_i <- u_i * min(1, L / ||u_i||_2)      # clipping (server-enforced here)
  u   <- (1/K) sum_i u_i                   # "a simple average" (Alg. 1)
  R   <- rho * R + u                       # momentum
  W   <- W + R                             # error feedback
  Delta <- top_k(W)                        # k largest magnitudes
  W   <- W - Delta                         # error accumulation
  R[selected] <- 0                         # momentum factor masking
  return Delta                             # server: theta <- theta - lr * Delta

Mass conservation (tested): with ``rho = 0``, ``sum_t Delta_t + W_T =
sum_t u_t``. In general ``sum_t Delta_t + W_T = sum_t R_t`` where ``R_t =
u_t + rho * R'_{t-1}`` is the momentum after round t's update and before its
masking, and ``R'_{t-1}`` the (masked) momentum carried into round t, i.e.
``state.momentum`` before the call.

Choices (each one setting away from the paper):

* Clipping is applied by the aggregator to the updates it receives (the paper
  clips on the device; a server that enforces the bound is what makes it a
  defence against clients that skip it), with the library's one clip step
  (:func:`~fedjax_sparse.aggregators.clipping.clip_step`, also the
  ``"clip"`` pre-aggregator's and FetchSGD's). ``clip_norm=inf`` disables it.
* The mean is unweighted (Alg. 1: ``1/n sum_i``); ``weighted=True`` uses the
  clients' dataset sizes instead (ours).
* Momentum factor masking zeroes ``R`` on the k selected coordinates
  (ALGORITHMS.md: ``R[Delta != 0] = 0``; the two differ only where the
  selected ``W`` is exactly 0).
* Under sparse uploads the updates are the zero-filled dense views (how the
  papers evaluate baselines under sparsity); ``mask_aware=True`` averages each
  pack over the clients that sent it (FLARE Alg. 2, ours).
* Adaptive clipping (App. B.2): ``L_t = L * lr(t)`` with ``lr`` from
  ``lr_schedule(ctx.round)`` when given, else from the traced scalar
  ``ctx.lr`` that the round step passes in.
* Non-finite and huge rows (ours): a row at ``1e30`` is clipped to norm ``L``
  (norms without overflow,
  :func:`~fedjax_sparse.aggregators.clipping.clip_by_l2_norm`);
  a row with ``inf``/``nan`` is left out of the mean (acceptance 0,
  :func:`~fedjax_sparse.aggregators.base.combine_finite`), so no ``nan`` ever
  enters ``R`` or ``W``, which would keep it forever. With clipping, ``||u||
  <= L``, ``||R|| <= L / (1 - rho)`` and ``||Delta_t|| <= ||W_t|| <= t L / (1 -
  rho)`` whatever is sent; without it (``clip_norm=inf``) SparseFed averages
  finite rows as sent, like FedAvg.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators.base import AggOut, Aggregator, combine_finite
from fedjax_sparse.aggregators.clipping import check_clip_config, clip_step
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.sparsify import TOPK_METHODS, check_k_spec, resolve_k, topk_mask

Array = jax.Array


@flax.struct.dataclass
class SparseFedState:
  """Server state carried across rounds.

  Attributes:
    momentum: ``f32[d]`` momentum ``R`` (masked on the coordinates sent).
    error: ``f32[d]`` error-feedback accumulator ``W``.
  """

  momentum: Array
  error: Array


def check_rho(rho) -> None:
  """Server momentum ``rho`` in ``[0, 1)``."""
  if isinstance(rho, bool) or not isinstance(rho, numbers.Real) \
      or not 0.0 <= float(rho) < 1.0:
    raise ValueError(f"momentum rho must be in [0, 1), got {rho!r}")


def check_topk_method(topk_method: str) -> None:
  """``topk_method`` is one of :data:`fedjax_sparse.sparsify.TOPK_METHODS`."""
  if topk_method not in TOPK_METHODS:
    raise ValueError(f"unknown top-k method {topk_method!r}; known: "
                     f"{', '.join(TOPK_METHODS)}")


def client_mean(clipped: Array, masks, weights: Array, weighted: bool,
                mask_aware: bool, pack_size: int,
                assume_finite: bool) -> tuple[Array, Array]:
  """The round's aggregate ``u`` (unweighted mean unless ``weighted``) and
  the acceptance (0 for rows with inf/nan, left out of the mean).

  ``mask_aware`` averages each pack over the clients that sent it (FLARE
  Alg. 2); otherwise the zero-filled dense views are averaged.
  """
  w = weights if weighted else jnp.ones((clipped.shape[0],), clipped.dtype)
  ones = jnp.ones((clipped.shape[0],), clipped.dtype)
  return combine_finite(clipped, masks if mask_aware else None, w, ones,
                        pack_size, assume_finite)


def clipped_mean(updates: Array, masks, weights: Array, ctx, clip_norm: float,
                 adaptive_clip: bool, lr_schedule: Optional[Callable],
                 weighted: bool, mask_aware: bool) -> tuple[Array, Array, dict]:
  """The first steps of SparseFed and FetchSGD: every row clipped to ``L``
  (:func:`~fedjax_sparse.aggregators.clipping.clip_step`), then their mean
  (:func:`client_mean`).

  Returns:
    ``(u f32[d], acceptance f32[K], diagnostics)``, the diagnostics
    ``clip_scale`` (``f32[K]``) and ``clip_norm`` (the bound used).
  """
  clipped, scale, lim = clip_step(updates, clip_norm, ctx, adaptive_clip,
                                  lr_schedule)
  u, acceptance = client_mean(clipped, masks, weights, weighted, mask_aware,
                              ctx.pack_size, ctx.finite_uploads)
  return u, acceptance, {"clip_scale": scale,
                         "clip_norm": jnp.asarray(lim, jnp.float32)}


@register("sparsefed")
def sparsefed(clip_norm: float = math.inf, k=None, rho: float = 0.9,
              adaptive_clip: bool = False,
              lr_schedule: Optional[Callable[[Array], Array]] = None,
              weighted: bool = False, mask_aware: bool = False,
              topk_method: str = "radix") -> Aggregator:
  """SparseFed (sparsefed.txt Alg. 1/5; ALGORITHMS.md section 3).

  Args:
    clip_norm: ``L``, the per-client L2 bound (``inf``: no clipping).
    k: coordinates updated per round (required): an int >= 1, or a float in
      (0, 1] read as a fraction of ``d`` (``ceil(k * d)``).
    rho: server momentum (paper: 0.9; 0 disables momentum).
    adaptive_clip: clip to ``L * lr(t)`` (App. B.2).
    lr_schedule: ``round -> lr`` for adaptive clipping; if ``None`` the lr is
      read from ``ctx.lr``.
    weighted: weight the mean by the clients' dataset sizes (ours; the paper
      averages uniformly).
    mask_aware: with sparse uploads, average each pack over the clients that
      sent it (FLARE Alg. 2) instead of the zero-filled mean (ours).
    topk_method: see :data:`fedjax_sparse.sparsify.TOPK_METHODS`.

  Returns:
    An :class:`~fedjax_sparse.aggregators.Aggregator` whose ``update`` is
    ``Delta`` (the server applies ``theta - lr * Delta``) and whose state is a
    :class:`SparseFedState`. Diagnostics: ``clip_scale`` (f32[K]),
    ``clip_norm``, ``error_norm`` (||W|| after the round).
  """
  check_clip_config(clip_norm, adaptive_clip)
  check_k_spec(k)
  check_rho(rho)
  check_topk_method(topk_method)

  def init(d: int) -> SparseFedState:
    resolve_k(k, d)  # fails here, before anything is compiled
    z = jnp.zeros((d,), jnp.float32)
    return SparseFedState(momentum=z, error=z)

  def apply(state, updates, masks, weights, key, ctx):
    del key
    d = updates.shape[1]
    kk = resolve_k(k, d)
    u, acceptance, diagnostics = clipped_mean(
        updates, masks, weights, ctx, clip_norm, adaptive_clip, lr_schedule,
        weighted, mask_aware)
    momentum = rho * state.momentum + u
    error = state.error + momentum
    selected = topk_mask(error, kk, topk_method)
    delta = jnp.where(selected, error, 0.0)
    error = error - delta
    momentum = jnp.where(selected, 0.0, momentum)
    diagnostics["error_norm"] = jnp.linalg.norm(error)
    return AggOut(delta, acceptance, diagnostics), SparseFedState(momentum, error)

  return Aggregator(init, apply)
