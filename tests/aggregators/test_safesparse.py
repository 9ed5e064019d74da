"""SafeSparse (FLARE Alg. 1) on sparse populations: who is excluded.

The shapes and helpers of test_references.py (tests/helpers.py).
"""

import math

import numpy as np
import pytest

from tests.helpers import (agg_ctx, aggregator_data, coord_mask, np_combine,
                           np_safesparse, run_rule)


def _sparse_population(rs, n_benign=20, n_mal=8, n_packs=100, pack_size=4, r=0.5):
  k = n_benign + n_mal
  d = n_packs * pack_size
  masks = np.zeros((k, n_packs), bool)
  for i in range(k):
    masks[i, rs.choice(n_packs, int(math.ceil(r * n_packs)), replace=False)] = True
  u = rs.randn(k, d).astype(np.float32)
  masks[:n_mal] = masks[0]
  u[:n_mal] = u[0]
  perm = rs.permutation(k)
  masks, u = masks[perm], u[perm]
  return u * coord_mask(masks, d, pack_size), masks, np.isin(perm, np.arange(n_mal))


@pytest.mark.parametrize("seed", range(3))
def test_safesparse_excludes_exactly_the_coordinated_group(seed):
  rs = np.random.RandomState(seed)
  u, masks, malicious = _sparse_population(rs)
  ctx = agg_ctx(f=8, pack_size=4, k=28)
  for guard in (False, True):
    got, acc, diag, _ = run_rule("safesparse", u, masks, ctx=ctx, guard=guard)
    np.testing.assert_array_equal(acc, (~malicious).astype(float))
    assert int(diag["min_samples"]) == round(28 * 0.2)
    np.testing.assert_allclose(got, np_combine(u, masks, np.ones(28), ~malicious, 4),
                               atol=1e-6)


@pytest.mark.parametrize("seed", range(2))
def test_safesparse_barely_overlapping_masks(seed):
  # 20 benign clients, masks of 5% of 1000 packs: two masks share 2.5 packs on
  # average, so D is 1 or spread over few values. The Jaccard step keeps all.
  rs = np.random.RandomState(seed)
  u, masks, _ = _sparse_population(rs, n_benign=20, n_mal=0, n_packs=1000,
                                   pack_size=1, r=0.05)
  ctx = agg_ctx(f=0, pack_size=1, k=20)
  # The default (guard on) keeps everyone.
  _, acc, diag, _ = run_rule("safesparse", u, masks, ctx=ctx)
  np.testing.assert_array_equal(acc, 1.0)
  assert bool(diag["guard_triggered"])
  # The paper's literal rule (guard off): eps is the typical distance, most
  # points are core points, and the one big cluster is excluded.
  _, acc, diag, _ = run_rule("safesparse", u, masks, ctx=ctx, guard=False)
  assert acc.sum() <= 2
  np.testing.assert_array_equal(acc, np_safesparse(u, masks, pack_size=1))


def test_safesparse_dense_keeps_everyone_at_jaccard():
  u, _, w = aggregator_data(30)
  _, _, diag, _ = run_rule("safesparse", u, None, w)
  np.testing.assert_allclose(diag["jaccard_score"], 1.0)


def test_safesparse_jaccard_drops_index_poisoner():
  rs = np.random.RandomState(4)
  u, masks, _ = _sparse_population(rs, n_benign=12, n_mal=0, n_packs=40,
                                   pack_size=1, r=0.5)
  # Client 0 selects the packs nobody else selects most: tiny overlap.
  counts = masks[1:].sum(0)
  masks[0] = False
  masks[0, np.argsort(counts)[:5]] = True
  u = rs.randn(12, 40).astype(np.float32) * masks
  ctx = agg_ctx(f=0, pack_size=1, k=12)
  for guard in (False, True):
    _, acc, diag, _ = run_rule("safesparse", u, masks, ctx=ctx, guard=guard)
    assert acc[0] == 0
    assert diag["jaccard_score"][0] < diag["jaccard_threshold"]
    np.testing.assert_array_equal(acc, np_safesparse(u, masks, guard=guard,
                                                     pack_size=1))
