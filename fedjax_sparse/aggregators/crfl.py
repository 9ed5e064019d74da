"""CRFL's training rule (Xie, Chen, Chen and Li, "CRFL: Certifiably Robust
Federated Learning against Backdoor Attacks", ICML 2021, Alg. 1; arXiv:2106.08283).

Each round the server averages the client updates (FedAvg), clips the *new
global model's parameters* to L2 norm ``rho_t`` and perturbs them with
Gaussian noise before sending the model out::

  w_{t+1} = w~_t - mean_i u_i                      (FedAvg, u_i = global - local)
  w_{t+1} <- w_{t+1} / max(1, ||w_{t+1}||_2 / rho_t)   (parameter clipping)
  w~_{t+1} = w_{t+1} + eps_{t+1},  eps ~ N(0, sigma^2 I_d)  (parameter perturbation)

``w~_t`` is the global model the clients trained from (``ctx.global_params``,
itself noisy from the last round). The clipping and the noise bound how
far a backdoor injected at round ``t_adv`` can move the final model's
distribution; certification (Alg. 2, parameter smoothing, and the certified
radius of the paper's Theorem) is in :mod:`fedjax_sparse.metrics.crfl`.

What is clipped and where the noise enters:

* All the model's parameters, as one flat vector of length ``d`` (the
  paper's ``||w||``, the authors' ``clip_weight_norm`` over
  ``named_parameters()``), after the mean update is applied; not the
  updates. Non-parameter collections (BatchNorm statistics) are neither
  clipped nor noised (the authors' code noises its ``state_dict``, buffers
  included; their MNIST/EMNIST/LOAN models have none that matter).
* The noise is added to every parameter of the clipped model, after
  clipping, so the model the clients receive has norm up to ``rho_t`` plus
  the noise. ``sigma`` is constant over rounds (the paper and the authors'
  configs: ``sigma_param = 0.01`` for MNIST, EMNIST and LOAN). With
  ``rounds`` given, the last round adds no noise: the run's final model is
  then the clipped ``w_T`` around which Alg. 2 samples the smoothing noise
  (the authors save and certify the model before its last noise).
* ``rho_t = min(rho + rho_growth * t, rho_max)`` for the model of round
  ``t`` (1-based: ``t = ctx.round + 1``). Defaults: the authors' MNIST
  schedule (``main.py``: ``epoch * 0.1 + 2`` capped by
  ``param_clip_thres = 15``); EMNIST ``rho=4, rho_growth=0.25,
  rho_max=100``; LOAN ``rho=2, rho_growth=0.025, rho_max=5``. A constant
  bound is ``rho_growth=0`` (then ``rho <= rho_max`` is required).
  The authors' MNIST model is logistic regression (``d = 7850``: noise of
  norm about ``0.01 sqrt(d) = 0.9``); for the library's MLP (``d =
  199210``, norm about 20 at initialisation) these defaults shrink the
  model tenfold in round 1 and the noise (norm about 4.5) outweighs
  ``rho_1``: scale ``rho`` and ``sigma`` to the model (``sigma sqrt(d)``
  well below ``rho_t``).

The round step applies ``theta <- theta - lr * u`` with the sgd server
optimizer, so the rule returns ``u = (w~_t - w~_{t+1}) / lr`` with ``lr``
the round's server learning rate (``ctx.lr``, decay included; the
factory's ``server_lr`` when the context has none): the server's step then
lands on the paper's ``w~_{t+1}`` (to float rounding) whatever
``--server_lr``. With momentum or Adam on the server the step would pass
the difference through their moments and land elsewhere, so the factory
refuses ``server_optimizer`` other than ``sgd`` (the run must pass its
``--server_optimizer``; see the report of issue #17).

Choices (ours): the mean is :func:`~fedjax_sparse.aggregators.base.combine`
(weighted by ``weights``, FLARE's Alg. 2 under sparse uploads; the authors
divide the sum of the updates by the number of clients); rows with inf/nan
are left out (acceptance 0); huge finite rows are averaged like any other
and the clipping takes the model back to norm ``rho_t``
(:func:`~fedjax_sparse.aggregators.clipping.clip_by_l2_norm` computes the
norm without overflow).

Diagnostics: ``model_norm`` (``||w_{t+1}||`` before clipping),
``clip_bound`` (``rho_t``), ``clip_scale`` (the factor applied),
``noise_std`` (``sigma``, or 0 in a round without noise).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators.base import (AggOut, Aggregator,
                                            combine_finite, stateless)
from fedjax_sparse.aggregators.clipping import clip_by_l2_norm
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.requirements import SERVER, declare

Array = jax.Array

# Which server optimizers give the paper's semantics (see the docstring).
SERVER_OPTIMIZERS = ("sgd",)


def _real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_crfl_config(rho, rho_growth, rho_max, sigma, rounds,
                      server_optimizer, server_lr) -> None:
  """Raises ValueError saying what to change (before anything is compiled)."""
  if not _real(rho) or not 0 < float(rho) < math.inf:
    raise ValueError(f"crfl: rho (the model's norm bound at round 0) must be "
                     f"finite and > 0, got {rho!r}")
  if not _real(rho_growth) or not 0 <= float(rho_growth) < math.inf:
    raise ValueError(f"crfl: rho_growth must be finite and >= 0 (0: constant "
                     f"bound), got {rho_growth!r}")
  if not _real(rho_max) or not float(rho_max) >= float(rho):
    raise ValueError(f"crfl: rho_max must be >= rho, got rho_max={rho_max!r} "
                     f"and rho={rho!r}; raise rho_max (inf: no cap)")
  if not _real(sigma) or not 0 <= float(sigma) < math.inf:
    raise ValueError(f"crfl: sigma (the noise's standard deviation) must be "
                     f"finite and >= 0, got {sigma!r}")
  if rounds is not None and (isinstance(rounds, bool)
                             or not isinstance(rounds, numbers.Integral)
                             or rounds < 1):
    raise ValueError(f"crfl: rounds must be None or an integer >= 1 (the "
                     f"run's --rounds), got {rounds!r}")
  if server_optimizer not in SERVER_OPTIMIZERS:
    raise ValueError(
        f"crfl sets the global model itself (clip(w - mean) + noise) and "
        f"returns the difference, which the server's step theta - lr * u "
        f"applies exactly only with a plain sgd server optimizer; with "
        f"{server_optimizer!r} the step goes through its moments and misses "
        f"the paper's model: use --server_optimizer=sgd")
  if not _real(server_lr) or not 0 < float(server_lr) < math.inf:
    raise ValueError(f"crfl: server_lr must be finite and > 0, got "
                     f"{server_lr!r}")


def crfl_rho(t, rho: float = 2.0, rho_growth: float = 0.1,
             rho_max: float = 15.0):
  """``rho_t = min(rho + rho_growth * t, rho_max)``, the clip bound of the
  model of round ``t`` (1-based; a Python number or an array)."""
  if isinstance(t, numbers.Real):
    return min(float(rho) + float(rho_growth) * float(t), float(rho_max))
  return jnp.minimum(jnp.float32(rho) + jnp.float32(rho_growth)
                     * jnp.asarray(t, jnp.float32), jnp.float32(rho_max))


@register("crfl")
@declare(SERVER)
def crfl(rho: float = 2.0, rho_growth: float = 0.1, rho_max: float = 15.0,
         sigma: float = 0.01, rounds: Optional[int] = None,
         server_optimizer: str = "sgd", server_lr: float = 1.0) -> Aggregator:
  """CRFL's training (Alg. 1): FedAvg, then clip the model, then noise it.

  Args:
    rho, rho_growth, rho_max: the clip bound ``rho_t = min(rho + rho_growth
      * t, rho_max)`` of round ``t`` (1-based); defaults are the authors'
      MNIST schedule (see the module docstring for EMNIST and LOAN).
    sigma: the standard deviation of the Gaussian noise added to every
      parameter after clipping (the paper's 0.01); 0 turns it off.
    rounds: the run's number of rounds; when given, the last round
      (``ctx.round == rounds - 1``) adds no noise, so that the final model
      is the clipped ``w_T`` that certification smooths. None: noise every
      round.
    server_optimizer: the run's server optimizer; only ``"sgd"`` gives the
      paper's model (the factory refuses the others).
    server_lr: the server learning rate the update is divided by when
      ``ctx.lr`` is None (the round step always fills ``ctx.lr``).

  Returns:
    A stateless :class:`~fedjax_sparse.aggregators.Aggregator` whose update
    is ``(w~_t - w~_{t+1}) / lr``; it reads ``ctx.global_params`` and
    ``ctx.lr``. Acceptance: 1, 0 for rows with inf/nan.

  Raises:
    ValueError: a setting out of range or a server optimizer other than
      sgd (at construction); ``ctx.global_params`` missing (when traced).
  """
  check_crfl_config(rho, rho_growth, rho_max, sigma, rounds,
                    server_optimizer, server_lr)
  sigma = float(sigma)

  def apply(updates, masks, weights, key, ctx):
    if ctx.global_params is None:
      raise ValueError("crfl clips and noises the global model: it needs "
                       "ctx.global_params (the flat global model, f32[d])")
    d = updates.shape[1]
    theta = jnp.asarray(ctx.global_params, updates.dtype)
    if theta.shape != (d,):
      raise ValueError(f"crfl: ctx.global_params has shape {theta.shape}, "
                       f"the updates have d = {d}")
    mean, acceptance = combine_finite(updates, masks, weights,
                                      jnp.ones_like(weights), ctx.pack_size,
                                      ctx.finite_uploads)
    model = theta - mean  # FedAvg's new global model w_{t+1}
    rho_t = crfl_rho(jnp.asarray(ctx.round) + 1, rho, rho_growth, rho_max)
    clipped, scale = clip_by_l2_norm(model[None, :], rho_t)
    clipped, scale = clipped[0], scale[0]
    model_norm = jnp.sqrt(jnp.sum(jnp.square(model)))
    # Beyond f32's squared range the clip step's own (scaled) norm.
    model_norm = jnp.where(jnp.isfinite(model_norm), model_norm,
                           rho_t / scale)
    noise_std = jnp.float32(sigma)
    if rounds is not None:
      noise_std = jnp.where(jnp.asarray(ctx.round) + 1 < rounds, noise_std,
                            jnp.float32(0.0))
    if sigma > 0:
      noise = jax.random.normal(key, (d,), updates.dtype)
      clipped = clipped + noise_std.astype(updates.dtype) * noise
    lr = ctx.lr if ctx.lr is not None else server_lr
    lr = jnp.asarray(lr, updates.dtype)
    update = (theta - clipped) / jnp.where(lr > 0, lr, 1.0)
    diagnostics = {"model_norm": model_norm, "clip_bound": rho_t,
                   "clip_scale": scale, "noise_std": noise_std}
    return AggOut(update, acceptance, diagnostics)

  return stateless(apply)
