"""FLARE Alg. 2 = aggregators.base.combine with masks, against a loop oracle
(tests/helpers.py: np_alg2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators
from fedjax_sparse.aggregators import combine
from fedjax_sparse.sparsify import num_packs, pack_topk_batch
from tests.helpers import np_alg2, pack_ctx


# P = 4 and 3 take the lax.cond branch of pack_sums_once, P = 8 and 16 the
# matrix product; d not a multiple of P leaves a partial last pack.
@pytest.mark.parametrize("P,d", [(1, 13), (4, 13), (3, 12), (8, 37), (16, 40)])
def test_combine_matches_alg2_oracle(P, d):
  rs = np.random.default_rng(P * 100 + d)
  K = 6
  n = num_packs(d, P)
  masks = rs.random((K, n)) < 0.4
  masks[:, 1] = False                    # a pack nobody selected
  masks[:, 2] = False
  masks[0, 2] = True                     # ... and one only a rejected client selected
  full = np.repeat(masks, P, axis=1)[:, :d]
  updates = np.where(full, rs.standard_normal((K, d)), 0).astype(np.float32)
  sizes = rs.integers(1, 50, K).astype(np.float32)
  f = jax.jit(lambda u, m, w, a: combine(u, m, w, a, P))
  for weights in (sizes, np.ones(K, np.float32)):
    for acc in (np.ones(K, np.float32), np.array([0, 1, 1, 0, 1, 1], np.float32),
                np.array([0.0, 0.5, 1, 0.25, 1, 0], np.float32), np.zeros(K, np.float32)):
      got = np.asarray(f(updates, masks, weights, acc))
      want = np_alg2(updates, masks, weights, acc, P)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      assert (got[P:3 * P] == 0).all() or acc[0] > 0
  # FedAvg over sparse uploads is Alg. 2 with everyone accepted.
  agg = aggregators.get("fedavg")()
  out, _ = jax.jit(agg.apply)(agg.init(d), updates, masks, sizes, None, pack_ctx(P))
  np.testing.assert_allclose(np.asarray(out.update),
                             np_alg2(updates, masks, sizes, np.ones(K), P), rtol=1e-5, atol=1e-6)


# P = 4: the select loop, in three groups of pack_weight_sums; P = 8: the
# matrix product.
@pytest.mark.parametrize("P", [4, 8])
def test_combine_after_pack_topk(P):
  rs = np.random.default_rng(1)
  K = 2 * aggregators.base._GROUP + 3
  U = rs.standard_normal((K, 50)).astype(np.float32)
  dense, masks = pack_topk_batch(jnp.asarray(U), 0.2, P)
  w = np.arange(1, K + 1, dtype=np.float32)
  acc = (rs.random(K) < 0.7).astype(np.float32)
  want = np_alg2(np.asarray(dense), np.asarray(masks), w, acc, P)
  got = jax.jit(lambda u, m: combine(u, m, w, acc, P))(dense, masks)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K", [1, 2, 51])
def test_pack_weight_sums_matches_matmul(K):
  rs = np.random.default_rng(K)
  masks = rs.random((K, 37)) < 0.4
  w = rs.random(K).astype(np.float32) * 10
  got = np.asarray(jax.jit(aggregators.base.pack_weight_sums)(masks, w))
  np.testing.assert_allclose(got, w.astype(np.float64) @ masks, rtol=1e-6)
  assert (got[~masks.any(axis=0)] == 0).all()
