"""Numpy + scipy reference of CRFL (test oracle; Xie et al., ICML 2021).

* :func:`np_crfl_round`: one round of Alg. 1 as
  :mod:`fedjax_sparse.aggregators.crfl` runs it: the weighted mean of the
  finite rows (FLARE's Alg. 2 with masks), the global model minus it, the
  model scaled to norm ``rho_t`` (``w / max(1, ||w|| / rho_t)``), plus
  ``sigma_t * noise``; the update ``(theta - model) / lr``. float64.
* :func:`np_probability_bounds`: Clopper-Pearson bounds from
  ``scipy.stats.beta`` (or the authors' Hoeffding bounds).
* :func:`np_cal_prob_bound`: the certified radius written as the authors'
  ``certify_mnist.py`` (``cal_prob_bound``) computes it, with their
  arguments (the schedule of ``rho_t`` a function), in plain Python floats
  and ``scipy.stats.norm``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.stats import beta, norm

from fedjax_sparse.testing.aggregator_refs import np_combine


def np_crfl_round(u, w, theta, rho_t: float, sigma_t: float = 0.0,
                  noise=None, masks=None, pack_size: int = 1, lr: float = 1.0,
                  dtype=np.float64) -> dict:
  """One CRFL round: ``{"update", "model", "model_norm", "scale",
  "acceptance"}`` (``model`` is the noisy model the clients receive)."""
  u = np.asarray(u, dtype)
  ok = np.all(np.isfinite(u), axis=1)
  clean = np.where(ok[:, None], u, 0)
  acceptance = ok.astype(dtype)
  mean = np_combine(clean, masks, w, acceptance, pack_size, dtype)
  model = np.asarray(theta, dtype) - mean
  model_norm = float(np.linalg.norm(model))
  scale = 1.0 / max(1.0, model_norm / rho_t)
  model = model * scale
  if noise is not None and sigma_t:
    model = model + sigma_t * np.asarray(noise, dtype)
  update = (np.asarray(theta, dtype) - model) / lr
  return {"update": update, "model": model, "model_norm": model_norm,
          "scale": scale, "acceptance": acceptance}


def np_probability_bounds(n_a, n_b, num_models: int, alpha: float,
                          method: str = "clopper_pearson"):
  """``(p_A lower, p_B upper)``, each one-sided at ``1 - alpha``."""
  n_a = np.asarray(n_a, np.float64)
  n_b = np.asarray(n_b, np.float64)
  m = float(num_models)
  if method == "hoeffding":  # the authors' certify_*.py
    h = np.sqrt(np.log(1 / alpha) / 2 / m)
    return np.maximum(1e-8, n_a / m - h), np.minimum(1 - 1e-8, n_b / m + h)
  with np.errstate(invalid="ignore"):
    lower = np.where(n_a > 0, beta.ppf(alpha, np.maximum(n_a, 1),
                                       m - n_a + 1), 0.0)
    upper = np.where(n_b < m, beta.ppf(1 - alpha, n_b + 1,
                                       np.maximum(m - n_b, 1)), 1.0)
  return lower, upper


def np_cal_prob_bound(pa: float, pb: float, *, sigma_train: float,
                      sigma_test: float, eta: float, T: int, N: int,
                      R: int, q_B: float, n_B: float, gamma: float,
                      tau: float, t_adv: int, L_z: float,
                      rho_fn: Callable[[int], float],
                      agg_weight: Optional[Sequence[float]] = None) -> float:
  """The certified radius as the authors' ``cal_prob_bound``: the rounds
  ``t_adv + 1 .. T - 1`` contract with ``sigma_train``, round ``T`` with
  ``sigma_test``; the numerator has ``sigma_train``. (The authors return
  100000 for ``pa == 1``; here the formula's own value.) 0 where ``pa <=
  pb`` (no certificate; the authors' code does not check)."""
  if pa <= pb:
    return 0.0
  if agg_weight is None:
    agg_weight = [1.0 / N] * R
  weighted = sum(a ** 2 for a in agg_weight)
  fraction = -math.log(1 - (math.sqrt(pa) - math.sqrt(pb)) ** 2) \
      * sigma_train ** 2
  denominator = (2 * R * tau ** 2 * L_z ** 2 * weighted * gamma ** 2
                 * eta ** 2 * (q_B ** 2 / n_B ** 2))
  contract = 1.0
  for t in range(t_adv + 1, T):
    contract *= 2 * norm.cdf(rho_fn(t) / sigma_train) - 1
  contract *= 2 * norm.cdf(rho_fn(T) / sigma_test) - 1
  return math.sqrt(fraction / (denominator * contract))
