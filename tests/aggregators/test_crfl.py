"""CRFL: the training rule against its numpy reference, the clip bound, the
noise, the refusals, and the certification metric against scipy
(fedjax_sparse/aggregators/crfl.py, fedjax_sparse/metrics/crfl.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import fedjax_sparse.aggregators.crfl as crfl_mod
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.metrics import crfl as cert
from fedjax_sparse.testing.crfl_ref import (np_cal_prob_bound, np_crfl_round,
                                            np_probability_bounds)

KEY = jax.random.PRNGKey(7)


def _case(k=6, d=20, seed=0, theta_scale=1.0):
  rs = np.random.RandomState(seed)
  u = rs.randn(k, d).astype(np.float32)
  w = rs.uniform(0.5, 2.0, k).astype(np.float32)
  theta = (theta_scale * rs.randn(d)).astype(np.float32)
  return u, w, theta


def _run(agg, u, w, theta, round_=0, lr=None, masks=None, pack_size=1,
         key=KEY):
  ctx = AggContext(jnp.int32(round_), global_params=jnp.asarray(theta),
                   lr=None if lr is None else jnp.float32(lr),
                   pack_size=pack_size, num_clients=len(u))
  out, _ = jax.jit(agg.apply)(agg.init(u.shape[1]), jnp.asarray(u),
                              masks, jnp.asarray(w), key, ctx)
  return out


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("theta_scale", [0.1, 5.0])  # inside / outside rho_t
@pytest.mark.parametrize("lr", [None, 1.0, 0.3])
def test_rule_equals_reference_without_noise(theta_scale, lr):
  u, w, theta = _case(theta_scale=theta_scale)
  agg = crfl_mod.crfl(rho=2.0, rho_growth=0.5, rho_max=15.0, sigma=0.0)
  out = _run(agg, u, w, theta, round_=3, lr=lr)
  rho_t = 2.0 + 0.5 * 4  # the model of round 4 (ctx.round 3)
  ref = np_crfl_round(u, w, theta, rho_t, lr=1.0 if lr is None else lr)
  np.testing.assert_allclose(out.update, ref["update"], rtol=1e-5, atol=1e-5)
  assert float(out.diagnostics["clip_bound"]) == pytest.approx(rho_t)
  assert float(out.diagnostics["model_norm"]) == pytest.approx(
      ref["model_norm"], rel=1e-5)
  assert float(out.diagnostics["clip_scale"]) == pytest.approx(
      ref["scale"], rel=1e-5)
  assert (ref["scale"] < 1) == (theta_scale > 1)  # both branches are met
  # The server's sgd step lands on the paper's model.
  step = theta - (1.0 if lr is None else lr) * np.asarray(out.update)
  np.testing.assert_allclose(step, ref["model"], rtol=1e-5, atol=1e-5)


def test_rule_equals_reference_with_the_same_noise():
  u, w, theta = _case(theta_scale=3.0)
  agg = crfl_mod.crfl(rho=1.5, rho_growth=0.0, rho_max=1.5, sigma=0.05)
  out = _run(agg, u, w, theta, round_=0, lr=0.5)
  noise = np.asarray(jax.random.normal(KEY, (u.shape[1],), jnp.float32))
  ref = np_crfl_round(u, w, theta, 1.5, 0.05, noise=noise, lr=0.5)
  np.testing.assert_allclose(out.update, ref["update"], rtol=1e-5, atol=1e-5)
  assert float(out.diagnostics["noise_std"]) == pytest.approx(0.05)


def test_rule_equals_reference_with_sparse_masks():
  u, w, theta = _case(k=5, d=12, seed=2, theta_scale=2.0)
  rs = np.random.RandomState(3)
  masks = rs.rand(5, 6) < 0.5
  masks[:, 0] = False  # a pack nobody sent keeps its global value
  dense = np.where(np.repeat(masks, 2, axis=1), u, 0).astype(np.float32)
  agg = crfl_mod.crfl(rho=1.0, rho_growth=0.0, rho_max=1.0, sigma=0.0)
  out = _run(agg, dense, w, theta, masks=jnp.asarray(masks), pack_size=2)
  ref = np_crfl_round(dense, w, theta, 1.0, masks=masks, pack_size=2)
  np.testing.assert_allclose(out.update, ref["update"], rtol=1e-5, atol=1e-6)


def test_noise_statistics_over_large_d():
  d, sigma = 200_000, 0.01
  rs = np.random.RandomState(0)
  u = (1e-3 * rs.randn(3, d)).astype(np.float32)
  theta = np.zeros(d, np.float32)  # ||w|| ~ 0.26 < rho: no clipping
  agg = crfl_mod.crfl(rho=100.0, rho_growth=0.0, rho_max=100.0, sigma=sigma)
  out = _run(agg, u, np.ones(3, np.float32), theta)
  assert float(out.diagnostics["clip_scale"]) == 1.0
  noise = (theta - np.asarray(out.update)) - (theta - u.mean(0))
  assert abs(noise.mean()) < 5 * sigma / math.sqrt(d)
  assert noise.std() == pytest.approx(sigma, rel=0.01)
  # Another key, other noise.
  other = _run(agg, u, np.ones(3, np.float32), theta,
               key=jax.random.PRNGKey(8))
  assert not np.allclose(other.update, out.update)


def test_clip_bound_holds_and_grows_with_rounds():
  u, w, theta = _case(d=50, theta_scale=10.0)
  agg = crfl_mod.crfl(rho=2.0, rho_growth=0.1, rho_max=2.35, sigma=0.0)
  for r, rho_t in [(0, 2.1), (1, 2.2), (2, 2.3), (3, 2.35), (9, 2.35)]:
    out = _run(agg, 1e3 * u, w, theta, round_=r)
    model = theta - np.asarray(out.update, np.float64)
    assert np.linalg.norm(model) <= rho_t * (1 + 1e-5)
    assert np.linalg.norm(model) == pytest.approx(rho_t, rel=1e-4)
    assert float(out.diagnostics["clip_bound"]) == pytest.approx(rho_t)
  assert crfl_mod.crfl_rho(3, 2.0, 0.1, 2.35) == pytest.approx(2.3)


def test_last_round_adds_no_noise():
  u, w, theta = _case()
  agg = crfl_mod.crfl(sigma=0.1, rounds=5)
  ref = crfl_mod.crfl(sigma=0.0)
  last = _run(agg, u, w, theta, round_=4)
  np.testing.assert_array_equal(last.update, _run(ref, u, w, theta,
                                                  round_=4).update)
  assert float(last.diagnostics["noise_std"]) == 0.0
  before = _run(agg, u, w, theta, round_=3)
  assert float(before.diagnostics["noise_std"]) == pytest.approx(0.1)
  assert not np.allclose(before.update, _run(ref, u, w, theta,
                                             round_=3).update)


def test_nonfinite_and_huge_rows():
  u, w, theta = _case(k=7, d=9)
  u[1] = np.nan
  u[4, 2] = np.inf
  u[5] = 1e30
  agg = crfl_mod.crfl(rho=3.0, rho_growth=0.0, rho_max=3.0, sigma=0.0)
  out = _run(agg, u, w, theta)
  assert np.all(np.isfinite(out.update))
  np.testing.assert_array_equal(out.acceptance, [1, 0, 1, 1, 0, 1, 1])
  model = theta - np.asarray(out.update, np.float64)
  assert np.linalg.norm(model) == pytest.approx(3.0, rel=1e-4)
  assert np.isfinite(float(out.diagnostics["model_norm"]))


@pytest.mark.parametrize("kwargs, match", [
    ({"server_optimizer": "momentum"}, "server_optimizer=sgd"),
    ({"server_optimizer": "adam"}, "server_optimizer=sgd"),
    ({"rho": 0.0}, "rho"),
    ({"rho": 20.0}, "rho_max"),
    ({"rho_growth": -1.0}, "rho_growth"),
    ({"sigma": -0.1}, "sigma"),
    ({"sigma": math.inf}, "sigma"),
    ({"rounds": 0}, "rounds"),
    ({"server_lr": 0.0}, "server_lr"),
])
def test_refuses_bad_configuration_before_compiling(kwargs, match):
  with pytest.raises(ValueError, match=match):
    crfl_mod.crfl(**kwargs)


def test_needs_the_global_model():
  agg = crfl_mod.crfl()
  ctx = AggContext(jnp.int32(0), num_clients=3)
  with pytest.raises(ValueError, match="global_params"):
    jax.eval_shape(agg.apply, (), jnp.zeros((3, 4)), None, jnp.ones(3), KEY,
                   ctx)


def test_registered_and_jit_compiles():
  from fedjax_sparse.aggregators import registry
  assert registry.get("crfl") is crfl_mod.crfl
  agg = crfl_mod.crfl()
  u, w, theta = _case()
  ctx = AggContext(jnp.int32(0), global_params=jnp.asarray(theta),
                   lr=jnp.float32(1.0), num_clients=len(u))
  compiled = jax.jit(agg.apply).lower((), jnp.asarray(u), None,
                                      jnp.asarray(w), KEY, ctx).compile()
  out, state = compiled((), jnp.asarray(u), None, jnp.asarray(w), KEY, ctx)
  assert state == () and out.update.shape == (u.shape[1],)


# ---------------------------------------------------------------- certification


@pytest.mark.parametrize("method", ["clopper_pearson", "hoeffding"])
def test_probability_bounds_equal_scipy(method):
  m, alpha = 1000, 0.001
  n_a = np.array([0, 1, 5, 100, 500, 900, 990, 999, 1000])
  n_b = np.array([0, 1, 5, 100, 400, 90, 10, 1, 1000])
  got_a, got_b = cert.probability_bounds(jnp.asarray(n_a), jnp.asarray(n_b),
                                         m, alpha, method)
  ref_a, ref_b = np_probability_bounds(n_a, n_b, m, alpha, method)
  np.testing.assert_allclose(got_a, ref_a, atol=5e-6)
  np.testing.assert_allclose(got_b, ref_b, atol=5e-6)
  if method == "clopper_pearson":  # hand-computable ends
    assert float(got_a[-1]) == pytest.approx(alpha ** (1 / m), abs=5e-6)
    assert float(got_b[0]) == pytest.approx(1 - alpha ** (1 / m), abs=5e-6)


def test_certified_radius_by_hand():
  # (sqrt(.81) - sqrt(.01))^2 = .64; -ln(.36) = 2 ln(5/3).
  p_a, p_b, sigma, s = 0.81, 0.01, 0.01, 2e-4
  rad = cert.certified_radius(p_a, p_b, sigma=sigma, scale=s,
                              contraction_factor=1.0)
  want = math.sqrt(2 * math.log(5 / 3) * sigma ** 2 / (2 * s))
  assert float(rad) == pytest.approx(want, rel=1e-5)
  assert float(cert.certified_radius(0.4, 0.45, sigma=sigma, scale=s,
                                     contraction_factor=1.0)) == 0.0
  assert math.isinf(float(cert.certified_radius(
      1.0, 0.0, sigma=sigma, scale=s, contraction_factor=1.0)))


@pytest.mark.parametrize("pa, pb", [(0.95, 0.03), (0.7, 0.2), (0.51, 0.45),
                                    (0.993, 0.0069)])
def test_certified_radius_equals_the_authors_formula(pa, pb):
  # The authors' MNIST setting (certify_mnist.py), with sigma_T != sigma.
  sigma, sigma_test, t_adv, big_t, n = 0.01, 0.02, 10, 30, 20
  gamma, eta, q_b, n_b, tau = 100.0, 0.001, 5, 100, 60000 / 20 / 100
  l_z = math.sqrt(2 + 2 * 3 + 3 ** 2)
  weights = [1 / n, 1 / n]
  rho = lambda t: crfl_mod.crfl_rho(t, 2.0, 0.1, 15.0) / 300  # make Phi < 1
  want = np_cal_prob_bound(pa, pb, sigma_train=sigma, sigma_test=sigma_test,
                           eta=eta, T=big_t, N=n, R=2, q_B=q_b, n_B=n_b,
                           gamma=gamma, tau=tau, t_adv=t_adv, L_z=l_z,
                           rho_fn=rho)
  rounds = range(t_adv + 1, big_t + 1)
  factor = cert.contraction([rho(t) for t in rounds],
                            [sigma] * (len(rounds) - 1) + [sigma_test])
  assert 0 < float(factor) < 0.5  # the contraction is exercised
  s = cert.attack_scale(weights, gamma, tau, eta, q_b / n_b, l_z)
  got = cert.certified_radius(pa, pb, sigma=sigma, scale=s,
                              contraction_factor=factor)
  assert float(got) == pytest.approx(want, rel=1e-4)


def _linear(theta, x):  # 2 classes: logits (theta . x, 0)
  return jnp.stack([x @ theta, jnp.zeros(x.shape[0])], axis=-1)


def test_smoothed_votes_on_a_linear_model():
  # Class 0 wins with probability Phi(theta . x / (sigma ||x||)).
  theta = jnp.array([1.0, 0.0, 0.0])
  x = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]])
  sigma, m = 1.0, 4000
  counts = np.asarray(cert.smoothed_votes(_linear, theta, x, KEY, sigma,
                                          num_models=m, num_classes=2,
                                          model_batch=64))
  assert counts.shape == (3, 2) and np.all(counts.sum(1) == m)
  p = norm.cdf(np.array([1.0, 0.5 / math.sqrt(0.5), -2.0 / 2.0]))
  se = np.sqrt(p * (1 - p) / m)
  assert np.all(np.abs(counts[:, 0] / m - p) < 5 * se + 1e-3)
  # The same keys, batched differently (remainder batch included): same votes.
  other = cert.smoothed_votes(_linear, theta, x, KEY, sigma, num_models=m,
                              num_classes=2, model_batch=300)
  np.testing.assert_array_equal(other, counts)


@pytest.mark.slow
def test_certify_end_to_end():
  theta = jnp.array([1.0, -1.0])
  x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # theta . x[2] = 0
  y = jnp.array([0, 1, 0])
  m, alpha, sigma = 200, 0.01, 0.01
  c = cert.certify(_linear, theta, x, y, KEY, sigma_test=sigma, num_models=m,
                   num_classes=2, alpha=alpha, scale=1e-4, model_batch=50)
  np.testing.assert_array_equal(c.prediction[:2], [0, 1])
  # Far from the boundary every noisy model agrees: p_A >= alpha^(1/M).
  p_a, p_b = alpha ** (1 / m), 1 - alpha ** (1 / m)
  np.testing.assert_allclose(c.p_a[:2], p_a, atol=5e-6)
  want = np_cal_prob_bound(p_a, p_b, sigma_train=sigma, sigma_test=sigma,
                           eta=1.0, T=1, N=1, R=1, q_B=1, n_B=1, gamma=1.0,
                           tau=1.0, t_adv=1, L_z=1.0, rho_fn=lambda t: 1e3,
                           agg_weight=[1e-2])
  np.testing.assert_allclose(c.radius[:2], want, rtol=1e-4)
  assert not np.any(c.abstain[:2])
  # Near the boundary the vote splits: no certificate.
  assert bool(c.abstain[2]) and float(c.radius[2]) == 0.0
  assert not bool(c.correct[2])
  assert float(cert.certified_accuracy(c, 0.0)) == pytest.approx(2 / 3)
  assert float(cert.certified_accuracy(c, 2 * want)) == 0.0
