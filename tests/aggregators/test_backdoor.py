"""FLAME, FoolsGold and RLR: numpy/scikit-learn oracles on random inputs
(fedjax_sparse/testing/aggregator_refs.py) and one hand-computed case each.

Few shapes, so that each rule compiles a couple of times at most.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.aggregators.flame import cosine_distances
from fedjax_sparse.metrics.escape import selection_escape_ratio
from fedjax_sparse.testing import aggregator_refs as refs
from tests.helpers import KEY

_cosine_distances = jax.jit(cosine_distances)


@functools.lru_cache(maxsize=None)
def _jitted(name, hp=()):
  agg = agg_lib.get(name)(**dict(hp))
  return agg.init, jax.jit(agg.apply)


def run(name, u, w=None, hp=(), state=None, masks=None, pack_size=1,
        clients=None, malicious=None):
  init, apply = _jitted(name, hp)
  u = jnp.asarray(u, jnp.float32)
  k, d = u.shape
  w = jnp.ones((k,)) if w is None else jnp.asarray(w, jnp.float32)
  ctx = AggContext(
      round=jnp.int32(0),
      clients=None if clients is None else jnp.asarray(clients, jnp.int32),
      malicious=None if malicious is None else jnp.asarray(malicious),
      pack_size=pack_size, num_clients=k)
  state = init(d) if state is None else state
  m = None if masks is None else jnp.asarray(masks)
  out, state = apply(state, u, m, w, KEY, ctx)
  return out, state


def _backdoor_round(rs, k=12, d=40, n_bad=4):
  """Honest updates around one direction, attackers around another."""
  honest_dir = rs.randn(d)
  bad_dir = rs.randn(d)
  u = honest_dir + rs.uniform(0.3, 1.5) * rs.randn(k, d)
  u[:n_bad] = 3.0 * bad_dir + 0.05 * rs.randn(n_bad, d)
  u *= rs.uniform(0.5, 2.0, (k, 1))
  return u.astype(np.float32), rs.uniform(1, 5, k).astype(np.float32)


# ---------------------------------------------------------------- FLAME


def test_flame_matches_sklearn_oracle():
  for seed in range(8):
    rs = np.random.RandomState(seed)
    u, w = _backdoor_round(rs)
    out, _ = run("flame", u, w, hp=(("lamb", 0.0),))
    # The rule's own f32 distances, so that the oracle clusters the same
    # matrix (scikit-learn's HDBSCAN, min_cluster_size = K//2 + 1).
    dist = np.asarray(_cosine_distances(jnp.asarray(u), jnp.ones(len(u), bool)))
    ref, acc, s_t = refs.np_flame(u, w, dist=dist)
    np.testing.assert_array_equal(np.asarray(out.acceptance), acc)
    np.testing.assert_allclose(out.update, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.diagnostics["median_norm"], s_t, rtol=1e-6)
    assert acc[:4].sum() == 0, acc  # the attackers are outliers
    # ... and the f64 distances of numpy give the same clients.
    np.testing.assert_array_equal(refs.np_flame(u, w)[1], acc)


def test_flame_hand_computed():
  # Unit rows e1, (0.8, 0.6), (0.8, -0.6), 2 e1 and -3 e1. Cosine distances:
  # 0 between rows 0 and 3, 0.2 from both to rows 1 and 2, 0.72 between 1
  # and 2, >= 1.8 to row 4. min_cluster_size = 3, min_samples = 2: row 4
  # leaves the root first (lambda = 1/1.8), the other four last, together:
  # they are the cluster. S_t = median(1, 1, 1, 2, 3) = 1, row 3 is clipped
  # to e1, and the mean of the four kept rows is (0.9, 0). The noise is
  # N(0, (lambda S_t)^2) per coordinate: 0.001 times a normal draw of key.
  u = np.array([[1, 0], [0.8, 0.6], [0.8, -0.6], [2, 0], [-3, 0]], np.float32)
  out, _ = run("flame", u, hp=(("lamb", 0.001),),
               malicious=np.array([0, 0, 0, 0, 1], bool))
  np.testing.assert_array_equal(out.acceptance, [1, 1, 1, 1, 0])
  noise = np.asarray(jax.random.normal(KEY, (2,)))
  np.testing.assert_allclose(out.update, [0.9, 0.0] + 0.001 * noise, atol=1e-6)
  np.testing.assert_allclose(out.diagnostics["median_norm"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(out.diagnostics["noise_std"], 0.001, rtol=1e-6)
  assert "escape_ratio" not in out.diagnostics  # the round step's metric
  assert agg_lib.get("flame")().selection_escape == "escape_ratio"
  assert float(selection_escape_ratio(out.acceptance, [0, 0, 0, 0, 1])) == 0.0


def test_flame_sparse_uploads_and_nonfinite_rows():
  rs = np.random.RandomState(4)
  u, w = _backdoor_round(rs)
  masks = rs.rand(len(u), 20) < 0.6  # pack size 2
  u = np.where(refs.coord(masks, u.shape[1], 2), u, 0).astype(np.float32)
  u[5] = np.nan
  out, _ = run("flame", u, w, hp=(("lamb", 0.0),), masks=masks, pack_size=2)
  acc = np.asarray(out.acceptance)
  assert acc[5] == 0 and np.all(np.isfinite(out.update))
  ok = np.arange(len(u)) != 5
  # The finite rows only: HDBSCAN of the others, S_t over their norms.
  dist = np.asarray(_cosine_distances(jnp.asarray(u[ok]),
                                      jnp.ones(ok.sum(), bool)))
  labels = refs.np_hdbscan(dist, len(u) // 2 + 1, 2, True)
  np.testing.assert_array_equal(acc[ok], labels >= 0)
  norms = np.linalg.norm(u[ok].astype(np.float64), axis=1)
  s_t = np.median(norms)
  gamma = np.minimum(1, s_t / norms)
  ref = refs.np_combine(u[ok] * gamma[:, None], masks[ok], w[ok], acc[ok], 2)
  np.testing.assert_allclose(out.update, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- FoolsGold


def test_foolsgold_matches_numpy_oracle_over_rounds():
  # A population of 8 clients, 5 sampled per round, two sybils (clients 0
  # and 1) pushing one direction; the history is keyed by client id.
  rs = np.random.RandomState(0)
  n_pop, k, d = 8, 5, 30
  hp = (("num_clients", n_pop),)
  target = rs.randn(d)
  history = np.zeros((n_pop, d))
  state = None
  for r in range(4):
    clients = np.sort(rs.choice(n_pop, k, replace=False))
    if r == 0:
      clients[:2] = [0, 1]
    u = rs.randn(k, d)
    sybil = clients < 2
    u[sybil] = target + 0.1 * rs.randn(sybil.sum(), d)
    u = u.astype(np.float32)
    w = rs.uniform(1, 3, k).astype(np.float32)
    out, state = run("foolsgold", u, w, hp=hp, state=state, clients=clients)
    history[clients] += u
    ref, alpha = refs.np_foolsgold(history[clients], u, w)
    np.testing.assert_allclose(out.acceptance, alpha, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.update, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.history, history, rtol=1e-5, atol=1e-5)
    if sybil.sum() == 2:
      np.testing.assert_array_equal(np.asarray(out.acceptance)[sybil], 0.0)


def test_foolsgold_hand_computed():
  # Round 1: rows e1, e1, e2. cs_01 = 1, v = (1, 1, 0); pardoning scales
  # client 2's similarities by 0/1; alpha = (0, 0, 1) -> 0.99 -> logit
  # ln 99 + 0.5 > 1 -> 1: only client 2 counts, the update is e2.
  hp = (("num_clients", 3),)
  e1, e2 = [1.0, 0.0], [0.0, 1.0]
  out, state = run("foolsgold", np.array([e1, e1, e2]), hp=hp)
  np.testing.assert_allclose(out.acceptance, [0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(out.update, e2, atol=1e-6)
  # Round 2: rows e2, e1, e2; histories (1, 1), (2, 0), (0, 2): every max
  # similarity is cos 45 = 0.707, alpha = 0.293 each -> 1 after rescaling
  # -> 0.99 -> 1. The mean of this round's rows is (1/3, 2/3) (without the
  # history, rows 0 and 2 would be identical and weigh 0).
  out, state = run("foolsgold", np.array([e2, e1, e2]), hp=hp, state=state)
  np.testing.assert_allclose(out.acceptance, [1, 1, 1], atol=1e-6)
  np.testing.assert_allclose(out.update, [1 / 3, 2 / 3], atol=1e-6)
  np.testing.assert_allclose(state.history, [[1, 1], [2, 0], [0, 2]])


def test_foolsgold_nonfinite_row_is_absent_and_population_is_checked():
  hp = (("num_clients", 3),)
  u = np.array([[1.0, 0.0], [np.inf, 0.0], [0.0, 1.0]], np.float32)
  out, state = run("foolsgold", u, hp=hp)
  assert out.acceptance[1] == 0 and np.all(np.isfinite(out.update))
  np.testing.assert_array_equal(state.history[1], [0, 0])
  with pytest.raises(ValueError, match="num_clients"):
    run("foolsgold", np.ones((4, 2)), hp=hp)
  with pytest.raises(ValueError, match="num_clients"):
    agg_lib.get("foolsgold")(num_clients=0)


# ---------------------------------------------------------------- RLR


@pytest.mark.parametrize("sparse,theta", [(False, 4.0), (True, 6.0)])
def test_rlr_matches_numpy_oracle(sparse, theta):
  for seed in range(4):
    rs = np.random.RandomState(seed)
    k, d, p = 10, 40, 2
    u = (rs.randn(k, d) + 0.3).astype(np.float32)
    w = rs.uniform(1, 5, k).astype(np.float32)
    masks = rs.rand(k, d // p) < 0.7 if sparse else None
    if sparse:
      u = np.where(refs.coord(masks, d, p), u, 0).astype(np.float32)
    out, _ = run("rlr", u, w, hp=(("theta", theta),), masks=masks,
                 pack_size=p if sparse else 1)
    ref = refs.np_rlr(u, masks, w, theta, pack_size=p)
    np.testing.assert_allclose(out.update, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.acceptance, np.ones(k))


def test_rlr_hand_computed():
  # Signs per column: (+ + + + +) -> 5 >= 4: rate +1; (+ + - + +) -> 3: -1;
  # (- + + + -) -> 1: -1. Means: 6/5, 4/5, 0.
  u = np.array([[1, 1, -1], [1, 2, 1], [1, -1, 1], [1, 1, 1], [2, 1, -2]],
               np.float32)
  out, _ = run("rlr", u)
  np.testing.assert_allclose(out.update, [1.2, -0.8, 0.0], atol=1e-6)
  # Sparse: client 4 did not send column 0 (4 votes, still >= 4; mean over
  # the four senders 1.0), client 0 not column 1 (votes 2: -1; mean 3/4).
  masks = np.ones((5, 3), bool)
  masks[4, 0] = masks[0, 1] = False
  us = np.where(masks, u, 0)
  out, _ = run("rlr", us, masks=masks)
  np.testing.assert_allclose(out.update, [1.0, -0.75, 0.0], atol=1e-6)
  # A non-finite row neither votes nor counts: 4, 2 and 2 votes; means 1,
  # 3/4 and 1/2.
  un = u.copy()
  un[4] = np.nan
  out, _ = run("rlr", un)
  np.testing.assert_allclose(out.update, [1.0, -0.75, -0.5], atol=1e-6)
  np.testing.assert_array_equal(out.acceptance, [1, 1, 1, 1, 0])
