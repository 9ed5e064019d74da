"""The attacks on sparsified uploads: HSA and DHSA (fedjax_sparse/attacks/hsa.py),
C-LASA's bottom-k mask (clasa.py) and index poisoning (index_poisoning.py);
hand-computed cases and constraint checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import attacks as A
from fedjax_sparse.sparsify import pack_topk_batch
from tests.helpers import (HSA_MASK, attack_ctx, attack_malicious,
                           attack_updates)
from tests.helpers import ATTACK_D as D, ATTACK_K as K


@pytest.mark.parametrize("stabilize,direction", [
    ("none", "inv_std"), ("elbow", "inv_std"), ("none", "inv_mean"), ("iqr", "inv_mean")])
def test_dhsa_eq20(stabilize, direction):
  x = attack_updates(seed=3)
  mal = attack_malicious([2, 3])
  sol = jax.jit(lambda u, m: A.dhsa_solve(u, m, HSA_MASK, stabilize=stabilize,
                                          direction=direction))(x, mal)
  m = np.asarray(x, np.float64)[~np.asarray(mal)]
  kb = m.shape[0]
  mu = m.mean(0)
  sigma = m.std(0, ddof=1)
  if stabilize != "none":
    thr_s = float(A.stabilization_threshold(
        jnp.asarray(sigma[HSA_MASK], jnp.float32), stabilize))
    sigma = np.where(HSA_MASK, np.minimum(sigma, thr_s), sigma)
  np.testing.assert_allclose(sol.sigma, sigma, rtol=1e-4)
  dth = max(sum(np.linalg.norm(a - b) for b in m) for a in m) / (kb - 1)
  assert float(sol.threshold) == pytest.approx(dth, rel=1e-4)
  # The sign vector from the solver's own mean (a numpy mean could differ in
  # sign on a coordinate within rounding of 0).
  sgn = np.where(np.asarray(sol.mu) >= 0, 1.0, -1.0) if direction == "inv_mean" else 1.0
  lhs = lambda z1: np.mean([np.linalg.norm(mu - sgn * (z1 * (1 - HSA_MASK) * sigma
                                                       + 1.5 * HSA_MASK * sigma) - mi)
                            for mi in m])
  z1 = float(sol.z1)
  assert 1e-2 < z1 < 19
  assert lhs(z1) <= dth * (1 + 1e-5)
  assert lhs(1.01 * z1) > dth
  np.testing.assert_allclose(sol.malicious, mu - sgn * np.where(HSA_MASK, 1.5, z1) * sigma,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["hsa", "dhsa"])
def test_hsa_inv_mean_direction(name):
  x = attack_updates(seed=5)
  # K = 12, k_m = 5: z_max = PhiInv(5/7) > 0, so every coordinate moves.
  mal = attack_malicious([0, 4, 5, 8, 11])
  is_mal = np.asarray(mal)
  outs = {}
  for direction in A.HSA_DIRECTIONS:
    attack = A.get_update_attack(name)(HSA_MASK, direction=direction)
    outs[direction] = np.asarray(
        jax.jit(attack.apply)((), x, mal, jax.random.key(0), attack_ctx())[0])
    np.testing.assert_array_equal(outs[direction][~is_mal], np.asarray(x)[~is_mal])
    assert np.all(np.any(outs[direction][is_mal] != np.asarray(x)[is_mal], axis=1))
  g = np.asarray(x, np.float64)[~is_mal]
  mu, sigma = g.mean(0), g.std(0, ddof=1)
  pert = outs["inv_mean"][0] - mu
  on = (sigma > 0) & (np.abs(mu) > 1e-5)
  assert on.sum() > 0.99 * D
  assert np.all(np.sign(pert[on]) == -np.sign(mu[on]))
  # Same magnitudes as inv_std for HSA (z1 = z_max does not depend on the sign).
  if name == "hsa":
    np.testing.assert_allclose(np.abs(pert), np.abs(outs["inv_std"][0] - mu),
                               rtol=1e-3, atol=1e-5)
  with pytest.raises(ValueError, match="unknown HSA direction"):
    A.get_update_attack(name)(HSA_MASK, direction="inv_sign")


def test_hsa_formula():
  x = attack_updates(seed=4)
  mal = attack_malicious([0, 1])
  out = jax.jit(A.hsa(HSA_MASK).apply)((), x, mal, jax.random.key(0), attack_ctx())[0]
  g = np.asarray(x, np.float64)[2:]
  z1 = float(A.z_max(K, 2))
  expect = g.mean(0) - np.where(HSA_MASK, 1.5, z1) * g.std(0, ddof=1)
  np.testing.assert_allclose(out[0], expect, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="mask has 10 entries"):
    A.hsa(np.ones(10, bool)).apply((), x, mal, jax.random.key(0), attack_ctx())


def test_stabilization_threshold():
  v = jnp.asarray([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 9.0, 10.0], jnp.float32)
  q1, q3 = np.quantile(np.asarray(v), [0.25, 0.75])
  assert float(A.stabilization_threshold(v, "iqr")) == pytest.approx(q3 + 1.5 * (q3 - q1))
  assert float(A.stabilization_threshold(v, "elbow")) == pytest.approx(1.6)
  assert float(A.stabilization_threshold(v, "none")) == np.inf


def test_bottomk_mask():
  v = jnp.asarray([3.0, -0.5, 0.0, 2.0, -0.5, 7.0])
  m3, m2 = jax.jit(lambda v: (A.bottomk_mask(v, 3), A.bottomk_mask(v, 2)))(v)
  np.testing.assert_array_equal(m3, [False, True, True, False, True, False])
  np.testing.assert_array_equal(m2, [False, True, True, False, False, False])


def test_index_poisoning_dominates_target_packs():
  k, d, p, r = 20, 4000, 4, 0.5
  n_packs = d // p
  rng = np.random.default_rng(7)
  pack_scale = np.repeat(np.exp(rng.normal(size=n_packs)), p)
  x = jnp.asarray((rng.normal(size=d) + rng.normal(size=(k, d))) * pack_scale, jnp.float32)
  mal = np.zeros(k, bool)
  mal[rng.choice(k, 8, replace=False)] = True          # attacker share 0.4
  attack = A.index_poisoning(topk_ratio=r, target_fraction=0.01)
  out = jax.jit(attack.apply)((), x, jnp.asarray(mal), jax.random.key(0),
                              attack_ctx(d=d, k=k, pack_size=p))[0]
  _, masks = pack_topk_batch(out, r, p)
  masks = np.asarray(masks)
  mal_row = np.abs(np.asarray(out)[mal][0]).reshape(n_packs, p).sum(1)
  targets = np.argsort(-mal_row, kind="stable")[:10]
  rho = np.asarray(A.malicious_contributor_ratio(jnp.asarray(masks), jnp.asarray(mal)))
  # numpy oracle of rho_p = |S_p & malicious| / |S_p|.
  np.testing.assert_allclose(rho[targets], masks[mal][:, targets].sum(0) / masks[:, targets].sum(0))
  assert masks[mal][:, targets].all()                   # every attacker keeps them
  assert rho[targets].min() >= 0.9
  # Masked value manipulation: the attackers' masks copy the benign pattern.
  mm = masks[mal][0]
  jac = [np.sum(mm & b) / np.sum(mm | b) for b in masks[~mal]]
  benign_jac = [np.sum(a & b) / np.sum(a | b) for a in masks[~mal] for b in masks[~mal]
                if a is not b]
  assert np.mean(jac) > np.mean(benign_jac)
