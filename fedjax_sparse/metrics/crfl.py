"""CRFL's certification by parameter smoothing (Xie, Chen, Chen and Li,
"CRFL: Certifiably Robust Federated Learning against Backdoor Attacks",
ICML 2021, Alg. 2 and the certified radius of its Theorem; arXiv:2106.08283).

Parameter smoothing (Alg. 2): ``M`` noisy models ``w_T + eps_m``, ``eps_m ~
N(0, sigma_T^2 I_d)``, around the final global model ``w_T`` (trained by
:func:`fedjax_sparse.aggregators.crfl.crfl`); the smoothed classifier's
prediction for a test point is the class most of them predict,
``c_A``, with counts ``n_A`` and ``n_B`` (the runner-up class).

Bounds at confidence ``1 - alpha``:

* ``"clopper_pearson"`` (the default): ``p_A >= B^{-1}(alpha; n_A, M - n_A +
  1)`` (0 if ``n_A = 0``) and ``p_B <= B^{-1}(1 - alpha; n_B + 1, M - n_B)``
  (1 if ``n_B = M``), ``B^{-1}`` the Beta quantile, each bound one-sided at
  ``1 - alpha`` (both hold with probability at least ``1 - 2 alpha``);
* ``"hoeffding"``, the authors' ``certify_*.py``: ``p_A >= max(1e-8,
  n_A / M - h)``, ``p_B <= min(1 - 1e-8, n_B / M + h)``, ``h =
  sqrt(ln(1 / alpha) / (2 M))``.

Certified radius: the prediction ``c_A`` is the same for the model trained
with the backdoor and without it for every attacker pattern magnitude
``||delta|| < RAD`` with::

  RAD^2 = -ln(1 - (sqrt(p_A) - sqrt(p_B))^2) sigma^2
          / (2 S prod_{t = t_adv + 1}^{T} (2 Phi(rho_t / sigma_t) - 1)),
  S = R sum_{i=1}^{R} (p_i gamma_i tau_i eta_i q_i / n_i)^2 L_Z^2,

where ``R`` attackers with aggregation weights ``p_i`` scale their updates
by ``gamma_i`` (model replacement) after ``tau_i`` local steps of learning
rate ``eta_i`` with ``q_i`` of ``n_i`` examples per batch poisoned, ``L_Z``
bounds the loss gradient's Lipschitz constant in the input, ``t_adv`` is the
attack round, ``rho_t`` and ``sigma_t`` the clip bound and noise of round
``t`` (round ``T``'s noise is the smoothing noise ``sigma_T``), ``Phi`` the
standard normal CDF and ``sigma`` the training noise. Each factor ``2
Phi(rho / sigma) - 1`` (the total variation between ``N(-rho, sigma^2)``
and ``N(rho, sigma^2)``) is the contraction of one round of clipping and
noise. This is the formula as the authors' ``cal_prob_bound`` computes it
(same ``gamma``, ``tau``, ``eta``, ``q / n`` for every attacker there; per
attacker here). No radius (0, ``abstain``) where ``p_A <= p_B``; ``p_A = 1,
p_B = 0`` gives ``inf``.

Everything is jittable: :func:`smoothed_votes` maps a model apply function
over the ``M`` noisy models (``vmap`` over batches of ``model_batch`` models,
``lax.scan`` over the batches, so memory grows with ``model_batch``, not
``M``); the Beta quantiles are found by bisection of
``jax.scipy.special.betainc`` (to about ``2e-6`` in ``f32``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc
from jax.scipy.stats import norm

Array = jax.Array
METHODS = ("clopper_pearson", "hoeffding")
_BISECTION_STEPS = 40


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_models",
                                             "num_classes", "model_batch"))
def smoothed_votes(apply_fn: Callable[[Array, Array], Array], theta: Array,
                   x: Array, key: Array, sigma, *, num_models: int,
                   num_classes: int, model_batch: int = 32) -> Array:
  """Votes of ``num_models`` noisy models ``theta + sigma * eps_m`` (Alg. 2).

  Args:
    apply_fn: ``(f32[d] flat parameters, x) -> f32[N, C]`` logits (e.g.
      ``lambda t, x: model.apply({"params": unravel(t)}, x, train=False)``);
      static, so pass the same function object to reuse the compilation.
    theta: ``f32[d]``, the final global model ``w_T``.
    x: the ``N`` test inputs.
    key: the smoothing noise's PRNG key (model ``m`` draws from
      ``jax.random.split(key, num_models)[m]``).
    sigma: ``sigma_T``, the smoothing noise's standard deviation.
    num_models: ``M``.
    num_classes: ``C``.
    model_batch: noisy models evaluated at once (``vmap``).

  Returns:
    ``int32[N, C]``: how many of the ``M`` noisy models predict each class.
  """
  if num_models < 1 or model_batch < 1:
    raise ValueError(f"smoothed_votes: num_models and model_batch must be >= "
                     f"1, got {num_models} and {model_batch}")
  theta = jnp.asarray(theta)
  keys = jax.random.split(key, num_models)
  sigma = jnp.asarray(sigma, theta.dtype)

  def votes(batch_keys):
    def one(k):
      noisy = theta + sigma * jax.random.normal(k, theta.shape, theta.dtype)
      pred = jnp.argmax(apply_fn(noisy, x), axis=-1)
      return jax.nn.one_hot(pred, num_classes, dtype=jnp.int32)
    return jnp.sum(jax.vmap(one)(batch_keys), axis=0)

  b = min(model_batch, num_models)
  full = num_models // b
  head = keys[:full * b].reshape((full, b) + keys.shape[1:])
  counts, _ = jax.lax.scan(lambda c, kb: (c + votes(kb), None),
                           votes(head[0]), head[1:])
  if full * b < num_models:
    counts = counts + votes(keys[full * b:])
  return counts


def top_two(counts: Array) -> tuple[Array, Array, Array]:
  """``(c_A int32[N], n_A int32[N], n_B int32[N])``: the majority class (ties:
  the lowest index), its count and the runner-up's count."""
  c_a = jnp.argmax(counts, axis=-1).astype(jnp.int32)
  n_a = jnp.take_along_axis(counts, c_a[..., None], axis=-1)[..., 0]
  others = jnp.where(jax.nn.one_hot(c_a, counts.shape[-1], dtype=bool), -1,
                     counts)
  return c_a, n_a, jnp.max(others, axis=-1)


def beta_ppf(q, a, b) -> Array:
  """The Beta(``a``, ``b``) quantile at ``q`` (``a, b > 0``), by bisection of
  the regularised incomplete beta function ``I_x(a, b)``."""
  q, a, b = (jnp.asarray(v, jnp.float32) for v in (q, a, b))
  shape = jnp.broadcast_shapes(q.shape, a.shape, b.shape)
  lo, hi = jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32)

  def step(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    below = betainc(a, b, mid) < q
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (lo, hi))
  return 0.5 * (lo + hi)


def clopper_pearson_lower(k, n, alpha) -> Array:
  """One-sided lower bound of a binomial proportion at ``1 - alpha``:
  ``B^{-1}(alpha; k, n - k + 1)``, 0 for ``k = 0``."""
  k, n = jnp.asarray(k, jnp.float32), jnp.asarray(n, jnp.float32)
  p = beta_ppf(alpha, jnp.maximum(k, 1.0), n - k + 1.0)
  return jnp.where(k > 0, p, 0.0)


def clopper_pearson_upper(k, n, alpha) -> Array:
  """One-sided upper bound of a binomial proportion at ``1 - alpha``:
  ``B^{-1}(1 - alpha; k + 1, n - k)``, 1 for ``k = n``."""
  k, n = jnp.asarray(k, jnp.float32), jnp.asarray(n, jnp.float32)
  p = beta_ppf(1.0 - jnp.asarray(alpha, jnp.float32), k + 1.0,
               jnp.maximum(n - k, 1.0))
  return jnp.where(k < n, p, 1.0)


def probability_bounds(n_a, n_b, num_models: int, alpha: float,
                       method: str = "clopper_pearson") -> tuple[Array, Array]:
  """``(p_A lower, p_B upper)`` at ``1 - alpha`` each (module docstring)."""
  if method not in METHODS:
    raise ValueError(f"unknown bound method {method!r}; known: "
                     f"{', '.join(METHODS)}")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  if method == "clopper_pearson":
    return (clopper_pearson_lower(n_a, num_models, alpha),
            clopper_pearson_upper(n_b, num_models, alpha))
  h = math.sqrt(math.log(1.0 / alpha) / (2.0 * num_models))
  m = jnp.float32(num_models)
  return (jnp.maximum(1e-8, jnp.asarray(n_a, jnp.float32) / m - h),
          jnp.minimum(1.0 - 1e-8, jnp.asarray(n_b, jnp.float32) / m + h))


def attack_scale(weights, gamma, tau, eta, poison_fraction,
                 lipschitz) -> float:
  """``S = R sum_i (p_i gamma_i tau_i eta_i q_i / n_i)^2 L_Z^2``.

  Args:
    weights: ``p_i``, the ``R`` attackers' aggregation weights (the
      authors' default ``1 / N`` each); a sequence, its length is ``R``.
    gamma, tau, eta, poison_fraction: per attacker (sequences of length
      ``R``) or one value for all: the scale factor, local steps, local
      learning rate and ``q_i / n_i`` poisoned examples per batch.
    lipschitz: ``L_Z`` (the authors' MNIST value: ``sqrt(2 + 2 rho + rho^2)``
      with ``rho = 3``).
  """
  p = [float(v) for v in weights]
  r = len(p)
  if r == 0:
    raise ValueError("attack_scale: give the weights of R >= 1 attackers")

  def each(v, name):
    v = [float(v)] * r if not isinstance(v, Sequence) else [float(x) for x in v]
    if len(v) != r:
      raise ValueError(f"attack_scale: {name} has {len(v)} values for "
                       f"{r} attackers")
    return v

  terms = zip(p, each(gamma, "gamma"), each(tau, "tau"), each(eta, "eta"),
              each(poison_fraction, "poison_fraction"))
  return r * sum((a * g * t * e * q) ** 2 for a, g, t, e, q in terms) \
      * float(lipschitz) ** 2


def contraction(rhos, sigmas) -> Array:
  """``prod_t (2 Phi(rho_t / sigma_t) - 1)`` over the rounds ``t_adv + 1 ..
  T`` (1 for none); ``sigmas[-1]`` is round ``T``'s, the smoothing noise."""
  rhos = jnp.atleast_1d(jnp.asarray(rhos, jnp.float32))
  sigmas = jnp.broadcast_to(jnp.asarray(sigmas, jnp.float32), rhos.shape)
  return jnp.prod(2.0 * norm.cdf(rhos / sigmas) - 1.0)


def certified_radius(p_a, p_b, *, sigma, scale, contraction_factor) -> Array:
  """``RAD`` of the module docstring (0 where ``p_A <= p_B``).

  Args:
    p_a, p_b: the lower bound of ``p_A`` and upper bound of ``p_B``.
    sigma: the training noise ``sigma``.
    scale: ``S`` (:func:`attack_scale`).
    contraction_factor: :func:`contraction` of the rounds after the attack.
  """
  p_a, p_b = jnp.asarray(p_a, jnp.float32), jnp.asarray(p_b, jnp.float32)
  gap = jnp.square(jnp.sqrt(p_a) - jnp.sqrt(jnp.maximum(p_b, 0.0)))
  bound = -jnp.log1p(-gap)  # -ln(1 - (sqrt(p_A) - sqrt(p_B))^2)
  rad = jnp.sqrt(bound * jnp.float32(sigma) ** 2
                 / (2.0 * jnp.float32(scale) * contraction_factor))
  return jnp.where(p_a > p_b, rad, 0.0)


class Certificate(NamedTuple):
  """Per test point: ``prediction`` (``c_A``), ``p_a``, ``p_b`` (bounds),
  ``radius`` (0 if ``abstain``), ``abstain`` (``p_A <= p_B``) and
  ``correct`` (``c_A`` is the label and the point is not abstained)."""

  prediction: Array
  p_a: Array
  p_b: Array
  radius: Array
  abstain: Array
  correct: Array


def certify(apply_fn, theta, x, y, key, *, sigma_test: float,
            num_models: int, num_classes: int, alpha: float = 0.001,
            sigma: Optional[float] = None, scale: float = 1.0,
            contraction_factor=1.0, method: str = "clopper_pearson",
            model_batch: int = 32) -> Certificate:
  """Alg. 2 and the certified radius of every test point.

  ``sigma`` (training noise) defaults to ``sigma_test``; ``scale`` and
  ``contraction_factor`` as for :func:`certified_radius`. Defaults of the
  authors' ``*_smooth_params.yaml``: ``M = 1000``, ``sigma_T = 0.01``,
  ``alpha = 0.001``.
  """
  counts = smoothed_votes(apply_fn, theta, x, key, sigma_test,
                          num_models=num_models, num_classes=num_classes,
                          model_batch=model_batch)
  c_a, n_a, n_b = top_two(counts)
  p_a, p_b = probability_bounds(n_a, n_b, num_models, alpha, method)
  radius = certified_radius(p_a, p_b,
                            sigma=sigma_test if sigma is None else sigma,
                            scale=scale, contraction_factor=contraction_factor)
  abstain = ~(p_a > p_b)
  correct = (c_a == jnp.asarray(y)) & ~abstain
  return Certificate(c_a, p_a, p_b, radius, abstain, correct)


def certified_accuracy(cert: Certificate, radius) -> Array:
  """The share of test points predicted correctly with a certified radius
  of at least ``radius`` (the authors' ``CertifiedAcc.at_radius``)."""
  return jnp.mean((cert.correct & (cert.radius >= radius)).astype(jnp.float32))
