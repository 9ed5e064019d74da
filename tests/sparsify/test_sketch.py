"""The count sketch (fedjax_sparse/sparsify/sketch.py): linear, deterministic,
recovers heavy hitters."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.sparsify import CountSketch


def test_sketch_linear_deterministic_and_recovers_heavy_hitters():
  # c = 10 k columns and O(log d) rows, so that no light coordinate has a
  # majority of rows colliding with heavy ones (a union bound over d).
  d, k, rows = 4096, 10, 15
  sk = CountSketch.create(d, rows, 10 * k, jax.random.PRNGKey(0))
  rs = np.random.default_rng(6)
  a = rs.standard_normal(d).astype(np.float32)
  b = rs.standard_normal(d).astype(np.float32)
  S = jax.jit(sk.sketch)
  np.testing.assert_allclose(np.asarray(S(a + b)), np.asarray(S(a)) + np.asarray(S(b)),
                             rtol=1e-4, atol=1e-3)
  sk2 = CountSketch.create(d, rows, 10 * k, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(sk2.buckets()), np.asarray(sk.buckets()))
  assert set(np.unique(np.asarray(sk.signs()))) == {-1.0, 1.0}
  counts = np.bincount(np.asarray(sk.buckets())[0], minlength=10 * k)
  assert counts.min() > 0.5 * d / (10 * k)   # buckets are balanced
  # k heavy coordinates + small noise: the top-k of the estimate finds them.
  roundtrip = jax.jit(lambda sk, v: sk.unsketch(sk.sketch(v)))  # the sketch is a pytree
  for seed in range(3):
    sks = CountSketch.create(d, rows, 10 * k, jax.random.PRNGKey(seed))
    heavy = rs.choice(d, k, replace=False)
    v = 0.01 * rs.standard_normal(d).astype(np.float32)
    v[heavy] = rs.choice([-1, 1], k) * rs.uniform(5, 10, k)
    est = np.asarray(roundtrip(sks, v))
    assert set(np.argsort(-np.abs(est))[:k]) == set(heavy)
    np.testing.assert_allclose(est[heavy], v[heavy], atol=0.5)
  # A 1-sparse vector is recovered exactly; its cells are its support.
  e = np.zeros(d, np.float32)
  e[123] = 2.5
  np.testing.assert_allclose(np.asarray(roundtrip(sk, e)), e, atol=1e-6)
  sup = np.asarray(sk.support(jnp.asarray(e != 0)))
  assert (sup == (np.asarray(sk.sketch(e)) != 0)).all() and sup.sum() == rows


def test_sketch_of_mean_equals_mean_of_client_sketches():
  d = 3000
  sk = CountSketch.create(d, 3, 64, jax.random.PRNGKey(1))
  U = np.random.default_rng(7).standard_normal((6, d)).astype(np.float32)
  per_client = np.mean([np.asarray(sk.sketch(jnp.asarray(u))) for u in U], axis=0)
  np.testing.assert_allclose(np.asarray(sk.sketch(jnp.asarray(U.mean(0)))), per_client,
                             rtol=1e-4, atol=1e-4)
