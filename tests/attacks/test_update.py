"""Update attacks (fedjax_sparse/attacks/update.py, optimized.py, targeted.py):
the registry, what every update attack keeps, hand-computed cases and
constraint checks (HSA, C-LASA and index poisoning: test_hsa.py; data
attacks: test_data.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators as agg_lib
from fedjax_sparse import attacks as A
from fedjax_sparse.sparsify import pack_topk_batch
from tests.helpers import (HSA_MASK, attack_ctx, attack_malicious,
                           attack_updates)
from tests.helpers import ATTACK_D as D, ATTACK_K as K, ATTACK_LAYOUT

# name -> factory kwargs, for every registered update attack.
UPDATE_CASES = {
    "gna": {}, "ipm": {}, "scaling": {}, "sign_flip": {}, "model_replacement": {},
    "boosted_update": {}, "copy_boost": {},
    "fang_trmean": {}, "fang_krum": {}, "mask_mimicry": {}, "sign_camouflage": {},
    "alie": {}, "rop": {}, "mimic": {}, "min_max": {}, "min_sum": {},
    "hsa": {"mask": HSA_MASK}, "dhsa": {"mask": HSA_MASK, "stabilize": "iqr"},
    "c_lasa": {}, "index_poisoning": {"pack_size": 3},
    "optimal_ipm": {"aggregator": agg_lib.get("median")(), "evals": 6},
    "optimal_alie": {"aggregator": agg_lib.get("trimmed_mean")(f=2),
                     "num_byzantine": 2, "evals": 6},
}
# The model-space variants (ALGORITHMS.md section 5, threat model).
SPACE_ATTACKS = ("gna", "scaling", "sign_flip", "model_replacement")
MODEL_SPACE_CASES = {f"{n}@model": (n, {"space": "model"}) for n in SPACE_ATTACKS}


def test_registry():
  assert set(UPDATE_CASES) | {"targeted_pgd"} == set(A.update_attack_names())
  assert set(A.data_attack_names()) == {"label_flip", "pixel_backdoor", "dba",
                                        "semantic_backdoor", "convergence_prevention",
                                        "neurotoxin", "edge_case_backdoor"}
  with pytest.raises(ValueError, match="known update attacks: .*alie"):
    A.get_update_attack("nope")
  with pytest.raises(ValueError, match="data attack"):
    A.get_update_attack("dba")
  with pytest.raises(ValueError, match="known data attacks: .*dba"):
    A.get_data_attack("alie")


def test_alie_z_max():
  assert round(float(A.z_max(25, 5)), 3) == 0.253
  # s = floor(K/2 + 1) - k_m, z = PhiInv((K - k_m - s) / (K - k_m)).
  from scipy.stats import norm
  for k, km in [(20, 4), (50, 10), (100, 20), (10, 0)]:
    s = math.floor(k / 2 + 1) - km
    assert float(A.z_max(k, km)) == pytest.approx(norm.ppf((k - km - s) / (k - km)), abs=1e-5)


@pytest.mark.parametrize("name", sorted(UPDATE_CASES) + sorted(MODEL_SPACE_CASES))
def test_only_malicious_rows_change(name):
  x = attack_updates()
  name, kwargs = MODEL_SPACE_CASES.get(name, (name, UPDATE_CASES.get(name)))
  attack = A.get_update_attack(name)(**kwargs)
  apply = jax.jit(attack.apply)
  state = attack.init(D)
  # The traced k_m changes (0 included) without recompiling.
  for idx in ([0, 3, 7], [1, 2, 5, 9, 11], []):
    mal = attack_malicious(idx)
    out, state = apply(state, x, mal, jax.random.key(len(idx)), attack_ctx())
    out = np.asarray(out)
    changed = np.any(out != np.asarray(x), axis=1)
    np.testing.assert_array_equal(changed, np.asarray(mal))
    assert np.all(np.isfinite(out))
    if name == "c_lasa" and idx:  # per layer, the norm is the benign median norm
      g = np.asarray(x, np.float64)[~np.asarray(mal)]
      for sl in ATTACK_LAYOUT.slices():
        assert np.linalg.norm(out[idx[0], sl]) == pytest.approx(
            np.median(np.linalg.norm(g[:, sl], axis=1)), rel=1e-4)
  assert apply._cache_size() == 1


def test_alie_ipm_match_numpy():
  x = attack_updates()
  mal = attack_malicious([0, 1, 2])
  xn = np.asarray(x, np.float64)[3:]
  mu, sd = xn.mean(0), xn.std(0, ddof=1)
  out = jax.jit(A.alie().apply)((), x, mal, jax.random.key(0), attack_ctx())[0]
  np.testing.assert_allclose(out[0], mu - float(A.z_max(K, 3)) * sd, rtol=1e-4, atol=1e-5)
  out = jax.jit(A.ipm().apply)((), x, mal, jax.random.key(0), attack_ctx())[0]
  np.testing.assert_allclose(out[1], -0.4 * mu, rtol=1e-4, atol=1e-6)
  # Partial knowledge: statistics of the malicious rows' own honest updates.
  out = jax.jit(A.ipm(knowledge="partial").apply)((), x, mal, jax.random.key(0),
                                                  attack_ctx())[0]
  np.testing.assert_allclose(out[2], -0.4 * np.asarray(x, np.float64)[:3].mean(0),
                             rtol=1e-4, atol=1e-6)


# The reference starts the bisection at 10 (reachable: < 20); a unit vector
# needs a larger start for the constraint to be active at d = 900.
_INIT = {"std": 10.0, "unit_vec": 500.0, "sign": 10.0}


def _np_sq(a, b):
  return float(np.sum((a - b) ** 2))


@pytest.mark.parametrize("deviation", ["std", "unit_vec", "sign"])
def test_min_max_constraint(deviation):
  x = attack_updates(seed=1)
  mal = attack_malicious([0, 4])
  init = _INIT[deviation]
  sol = jax.jit(lambda u, m: A.min_max_solve(u, m, deviation, lambda_init=init))(x, mal)
  g = np.asarray(x, np.float64)[~np.asarray(mal)]
  thr = max(_np_sq(a, b) for a in g for b in g)
  mu = g.mean(0)
  dev = {"std": g.std(0, ddof=1), "unit_vec": mu / np.linalg.norm(mu),
         "sign": np.sign(mu)}[deviation]
  lam = float(sol.lam)
  assert 1e-2 < lam < 1.9 * init
  worst = lambda l: max(_np_sq(gi, mu - l * dev) for gi in g)
  assert worst(lam) <= thr * (1 + 1e-5)
  assert worst(1.01 * lam) > thr
  np.testing.assert_allclose(sol.malicious, mu - lam * dev, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deviation", ["std", "unit_vec", "sign"])
def test_min_sum_constraint(deviation):
  x = attack_updates(seed=2)
  mal = attack_malicious([1, 5, 6])
  init = _INIT[deviation]
  sol = jax.jit(lambda u, m: A.min_sum_solve(u, m, deviation, lambda_init=init))(x, mal)
  g = np.asarray(x, np.float64)[~np.asarray(mal)]
  thr = min(sum(_np_sq(a, b) for b in g) for a in g)
  mu = g.mean(0)
  dev = {"std": g.std(0, ddof=1), "unit_vec": mu / np.linalg.norm(mu),
         "sign": np.sign(mu)}[deviation]
  lam = float(sol.lam)
  assert 1e-2 < lam < 1.9 * init
  total = lambda l: sum(_np_sq(gi, mu - l * dev) for gi in g)
  assert total(lam) <= thr * (1 + 1e-5)
  assert total(1.01 * lam) > thr


def test_rop_direction():
  x = attack_updates(seed=5)
  mal = attack_malicious([0])
  prev = jnp.asarray(np.random.default_rng(0).normal(size=D), jnp.float32)
  ctx = attack_ctx().replace(prev_aggregate=prev)
  out = jax.jit(A.rop().apply)((), x, mal, jax.random.key(0), ctx)[0]
  g = np.asarray(x, np.float64)[1:]
  ref = 0.9 * np.asarray(prev) + 0.1 * g.mean(0)
  pert = np.asarray(out[0], np.float64) - np.asarray(prev)   # pi = 1: located at prev
  assert np.linalg.norm(pert) == pytest.approx(abs(float(A.z_max(K, 1))), rel=1e-4)
  assert abs(pert @ ref) / np.linalg.norm(pert) / np.linalg.norm(ref) < 1e-4


def test_targeted_pgd():
  w_true = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  params = {"w": jnp.zeros((6, 3))}
  loss_fn = lambda p, x, y: jnp.mean(
      -jax.nn.log_softmax(x @ p["w"])[jnp.arange(y.shape[0]), y])
  rng = np.random.default_rng(1)
  ax = rng.normal(size=(40, 6)).astype(np.float32)
  ay = np.argmax(ax @ np.asarray(w_true), axis=1).astype(np.int32)
  u = A.pgd_update(loss_fn, params, ax, ay, clip_norm=0.5, lr=1.0, steps=20,
                   batch_size=8, key=jax.random.key(0))
  assert float(jnp.linalg.norm(u)) <= 0.5 + 1e-5
  local = {"w": params["w"] - u.reshape(6, 3)}
  assert float(loss_fn(local, ax, ay)) < float(loss_fn(params, ax, ay))
  v = jnp.asarray([3.0, 4.0])
  np.testing.assert_allclose(A.project_l2_ball(v, 1.0), [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(A.project_l2_ball(v * 0.1, 1.0), v * 0.1, rtol=1e-6)
  np.testing.assert_allclose(A.project_l2_ball(v * 0.1, 1.0, "sphere"), [0.6, 0.8], rtol=1e-6)
  xa, ya = A.make_auxiliary_set(ax, ay, 10, 3, seed=0)
  assert xa.shape == (10, 6) and np.all(ya < 3)
  # As an update attack, from the flat global model.
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(params)
  att = A.targeted_pgd(loss_fn, unravel, ax, ay, clip_norm=0.5, lr=1.0, steps=5)
  x = jnp.zeros((4, 18))
  out = jax.jit(att.apply)((), x, attack_malicious([1, 2], 4), jax.random.key(0),
                           attack_ctx(d=18, k=4).replace(global_params=flat))[0]
  np.testing.assert_array_equal(out[1], out[2])
  assert float(jnp.linalg.norm(out[1])) > 0 and not np.any(np.asarray(out[0]))


def _global_params(d=D, seed=5):
  return jnp.asarray(np.random.default_rng(seed).normal(size=d), jnp.float32)


def _ctx_global(g):
  return attack_ctx().replace(global_params=g)


def test_scaling_model_space_is_scaled_local_model():
  """Uploading lambda * local model: update = (1 - lambda) global + lambda u."""
  x, g, mal = attack_updates(), _global_params(), attack_malicious([0, 4])
  out = np.asarray(jax.jit(A.scaling(scale=10.0, space="model").apply)(
      (), x, mal, jax.random.key(0), _ctx_global(g))[0])
  xn, gn = np.asarray(x, np.float64), np.asarray(g, np.float64)
  np.testing.assert_allclose(out[[0, 4]], (1 - 10.0) * gn + 10.0 * xn[[0, 4]],
                             rtol=1e-5, atol=1e-4)
  # The server forms global - upload: the upload is 10 x the local model.
  np.testing.assert_allclose(gn - out[0], 10.0 * (gn - xn[0]), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(out[1:4], np.asarray(x)[1:4])
  # Update space is a boosted honest update.
  out = np.asarray(A.scaling(space="update").apply((), x, mal, jax.random.key(0),
                                                   _ctx_global(g))[0])
  np.testing.assert_allclose(out[0], 10.0 * xn[0], rtol=1e-6)
  boosted = np.asarray(A.boosted_update().apply((), x, mal, jax.random.key(0),
                                                _ctx_global(g))[0])
  np.testing.assert_array_equal(boosted, out)


def test_scaling_model_space_masks_follow_the_global_model():
  """Model-space scaled uploads of different attackers share their top-k mask
  (dominated by -9 global), where boosted honest updates keep honest masks."""
  d = 2000
  rng = np.random.default_rng(1)
  g = jnp.asarray(rng.normal(size=d) * 1.0, jnp.float32)
  x = jnp.asarray(rng.normal(size=(4, d)) * 0.01, jnp.float32)
  mal = jnp.ones(4, bool)
  ctx = attack_ctx(d=d, k=4, layout=None).replace(global_params=g)

  def jaccard(rows):
    _, m = pack_topk_batch(rows, 0.5, 1)
    m = np.asarray(m)
    return np.sum(m[0] & m[1]) / np.sum(m[0] | m[1])

  model = A.scaling(space="model").apply((), x, mal, jax.random.key(0), ctx)[0]
  update = A.scaling(space="update").apply((), x, mal, jax.random.key(0), ctx)[0]
  assert jaccard(model) > 0.95
  assert jaccard(update) < 0.5


def test_gna_model_space_has_local_model_statistics():
  d = 20000
  rng = np.random.default_rng(2)
  g = jnp.asarray(3.0 + rng.normal(size=d), jnp.float32)
  x = jnp.asarray(0.1 * rng.normal(size=(3, d)), jnp.float32)
  mal = attack_malicious([1, 2], k=3)
  ctx = attack_ctx(d=d, k=3, layout=None).replace(global_params=g)
  out = np.asarray(A.gna(space="model").apply((), x, mal, jax.random.key(3), ctx)[0],
                   np.float64)
  gn, xn = np.asarray(g, np.float64), np.asarray(x, np.float64)
  for i in (1, 2):
    local, noise_model = gn - xn[i], gn - out[i]
    assert noise_model.mean() == pytest.approx(local.mean(), abs=0.03)
    assert noise_model.std() == pytest.approx(local.std(), rel=0.03)
    # Independent of the local model, unlike a perturbed copy of it.
    assert abs(np.corrcoef(noise_model, local)[0, 1]) < 0.05
  assert not np.allclose(out[1], out[2])
  np.testing.assert_array_equal(out[0], np.asarray(x)[0])
  # Update space: the noise has the update's statistics.
  out = np.asarray(A.gna(space="update").apply((), x, mal, jax.random.key(3), ctx)[0])
  assert out[1].std() == pytest.approx(xn[1].std(), rel=0.03)


def test_sign_flip_and_model_replacement_spaces():
  x, g, mal = attack_updates(), _global_params(), attack_malicious([2])
  ctx = _ctx_global(g)
  out = np.asarray(A.sign_flip(space="model").apply((), x, mal, jax.random.key(0), ctx)[0])
  np.testing.assert_allclose(out[2], 2 * np.asarray(g) - np.asarray(x)[2], rtol=1e-6)
  out = np.asarray(A.sign_flip().apply((), x, mal, jax.random.key(0), ctx)[0])
  np.testing.assert_array_equal(out[2], -np.asarray(x)[2])
  a = A.model_replacement(space="model").apply((), x, mal, jax.random.key(0), ctx)[0]
  b = A.model_replacement(space="update").apply((), x, mal, jax.random.key(0), ctx)[0]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(a)[2], K * np.asarray(x)[2], rtol=1e-6)


@pytest.mark.parametrize("name", SPACE_ATTACKS)
def test_space_is_checked(name):
  with pytest.raises(ValueError, match="unknown space 'weights'"):
    A.get_update_attack(name)(space="weights")


def test_model_space_needs_the_global_model():
  with pytest.raises(ValueError, match="global_params"):
    A.scaling(space="model").apply((), attack_updates(), attack_malicious([0]),
                                   jax.random.key(0),
                                   attack_ctx().replace(global_params=None))


def test_alie_baruch_z():
  from scipy.stats import norm
  for k, km in [(25, 5), (20, 8), (50, 10)]:
    s = math.floor(k / 2 + 1) - km
    assert float(A.z_max(k, km, "baruch")) == pytest.approx(norm.ppf((k - s) / k), abs=1e-5)
  assert float(A.z_max(25, 5, "baruch")) > 1.8 * float(A.z_max(25, 5))
  x, mal = attack_updates(), attack_malicious([0, 1, 2])
  xn = np.asarray(x, np.float64)[3:]
  out = A.alie(z_rule="baruch").apply((), x, mal, jax.random.key(0), attack_ctx())[0]
  np.testing.assert_allclose(out[0], xn.mean(0) - float(A.z_max(K, 3, "baruch"))
                             * xn.std(0, ddof=1), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="z_rule"):
    A.alie(z_rule="nope")


def test_copy_boost_copies_distinct_benign_clients():
  x, mal = attack_updates(), attack_malicious([0, 3, 7, 8])
  out = np.asarray(A.copy_boost(scale=5.0).apply((), x, mal, jax.random.key(0),
                                                 attack_ctx())[0])
  xn = np.asarray(x)
  benign = [i for i in range(K) if i not in (0, 3, 7, 8)]
  # Attacker r copies the r-th benign client, scaled.
  for r, i in enumerate([0, 3, 7, 8]):
    np.testing.assert_allclose(out[i], 5.0 * xn[benign[r]], rtol=1e-6)
  np.testing.assert_array_equal(out[benign], xn[benign])
  # Same top-k masks and signs as the copied clients.
  _, m = pack_topk_batch(jnp.asarray(out), 0.5, 1)
  _, m0 = pack_topk_batch(x, 0.5, 1)
  np.testing.assert_array_equal(np.asarray(m)[0], np.asarray(m0)[benign[0]])
  # More attackers than benign clients: the copies wrap around.
  t = np.asarray(A.copy_targets(attack_malicious(range(9))))
  np.testing.assert_array_equal(t[:9], [9, 10, 11] * 3)
