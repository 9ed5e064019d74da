"""fedjax_sparse.sparsify: pack top-k against a loop oracle, its settings and
the communication accounting (count sketch: test_sketch.py; SparseFed and
FetchSGD: tests/aggregators/test_sparsefed.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import sparsify
from fedjax_sparse.sparsify import (check_topk_config, num_kept, num_packs,
                                    pack_topk, pack_topk_batch, scalar_topk,
                                    topk_by_magnitude, topk_mask)
from tests.helpers import np_topk_mask


# ---------------------------------------------------------------------------
# numpy oracles


def np_pack_scores(u, P):
  """Sequential float32 sums, the order pack_scores uses for P <= 32."""
  d = u.shape[-1]
  n = -(-d // P)
  up = np.zeros(u.shape[:-1] + (n * P,), np.float32)
  up[..., :d] = u
  s = np.abs(up[..., 0::P]).astype(np.float32)
  for j in range(1, P):
    s = (s + np.abs(up[..., j::P])).astype(np.float32)
  if d % P:  # the tail pack is summed on its own: same values, same order
    s[..., -1] = np.float32(0)
    for j in range((n - 1) * P, d):
      s[..., -1] = np.float32(s[..., -1] + np.abs(u[..., j]))
  return s


def np_pack_topk(u, ratio, P):
  d = len(u)
  n = -(-d // P)
  k = math.ceil(round(ratio * n, 9))
  mask = np_topk_mask(np_pack_scores(u, P), k)
  dense = np.zeros_like(u)
  for p in range(n):
    if mask[p]:
      dense[p * P:(p + 1) * P] = u[p * P:(p + 1) * P]
  return dense, mask


# ---------------------------------------------------------------------------
# Configuration errors (plain Python, before anything is traced)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_ratio_raises(ratio):
  with pytest.raises(ValueError, match="ratio"):
    check_topk_config(100, ratio, 1)
  with pytest.raises(ValueError, match="ratio"):
    num_kept(100, ratio, 1)


@pytest.mark.parametrize("P", [0, -1, 1.5, 2.0, None, True])
def test_bad_pack_size_raises(P):
  with pytest.raises(ValueError, match="pack_size"):
    check_topk_config(100, 0.5, P)


def test_bad_k_and_d_raise():
  with pytest.raises(ValueError, match="d"):
    check_topk_config(0, 0.5, 1)
  u = jnp.ones(10)
  for k in (0, -1, 11, 2.5):
    with pytest.raises(ValueError, match="k"):
      scalar_topk(u, k)
    with pytest.raises(ValueError, match="k"):
      topk_mask(u, k)
  with pytest.raises(ValueError, match="method"):
    topk_mask(u, 3, "quickselect")
  with pytest.raises(ValueError, match="ratio"):
    pack_topk(u, 0.0, 2)


def test_counts():
  assert num_packs(1003, 16) == 63
  assert num_kept(1003, 0.5, 16) == 32
  assert num_kept(30, 0.1, 1) == 3       # not 4 from 0.1 * 30 = 3.0000000000000004
  assert num_kept(10, 1e-6, 1) == 1
  assert num_kept(10, 1.0, 3) == 4


# ---------------------------------------------------------------------------
# Pack top-k against the loop oracle


def _rows(rs, d):
  """Rows that exercise ties: floats, small ints, mostly zeros, all equal."""
  return np.stack([
      rs.standard_normal(d).astype(np.float32),
      rs.integers(-3, 4, d).astype(np.float32),
      np.where(rs.random(d) < 0.7, 0.0, rs.standard_normal(d)).astype(np.float32),
      np.full(d, -0.5, np.float32),
  ])


@pytest.mark.parametrize("d,P,ratio", [
    (1, 1, 0.5), (7, 1, 0.3), (7, 3, 0.5), (100, 1, 0.01), (100, 16, 0.5),
    (1003, 16, 0.3), (1003, 7, 0.9), (1000, 1, 0.5), (257, 64, 0.5), (50, 5, 1.0),
    (5000, 1, 0.37),
])
def test_pack_topk_matches_oracle(d, P, ratio):
  rs = np.random.default_rng(d * 131 + P)
  U = _rows(rs, d)
  if P > 32:  # reshape-sum path: keep the sums exact so no order question arises
    U = np.round(U * 4) / 4
  dense, mask = jax.jit(lambda u: pack_topk_batch(u, ratio, P))(U)
  dense, mask = np.asarray(dense), np.asarray(mask)
  k = num_kept(d, ratio, P)
  assert mask.shape == (4, num_packs(d, P))
  assert (mask.sum(axis=1) == k).all()
  for i in range(4):
    want_dense, want_mask = np_pack_topk(U[i], ratio, P)
    np.testing.assert_array_equal(mask[i], want_mask, err_msg=f"row {i}")
    np.testing.assert_array_equal(dense[i], want_dense)
  # The one-row entry point agrees with the batch, also under vmap.
  if (d, P) == (1003, 16):
    d0, m0 = jax.jit(lambda u: pack_topk(u, ratio, P))(U[2])
    np.testing.assert_array_equal(np.asarray(m0), mask[2])
    np.testing.assert_array_equal(np.asarray(d0), dense[2])
    dv, mv = jax.jit(jax.vmap(lambda u: pack_topk(u, ratio, P)))(U)
    np.testing.assert_array_equal(np.asarray(mv), mask)
    np.testing.assert_array_equal(np.asarray(dv), dense)


def test_ties_across_blocks_and_tail():
  """Ties spread over several 1024-blocks and in the clamped last window."""
  n = 4500
  s = np.zeros(n, np.float32)
  s[::3] = 1.0           # 1500 ties at 1.0
  s[4400:] = 1.0         # more ties inside the last (partial) block
  s[7] = 2.0
  for k in (700, 1550):
    got = np.asarray(jax.jit(lambda x: topk_mask(x, k))(s))
    np.testing.assert_array_equal(got, np_topk_mask(s, k), err_msg=f"k={k}")


def test_methods_agree_and_nan_ranks_first():
  rs = np.random.default_rng(0)
  s = np.abs(rs.integers(0, 6, 3000)).astype(np.float32)
  s[10] = np.nan
  want = np_topk_mask(np.nan_to_num(s, nan=np.inf), 900)
  for method in sparsify.TOPK_METHODS:
    got = np.asarray(jax.jit(lambda x: topk_mask(x, 900, method))(s))
    np.testing.assert_array_equal(got, want, err_msg=method)


def test_topk_by_magnitude():
  v = jnp.array([0.1, -3.0, 2.0, -2.0, 0.0, 5.0])
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda v: topk_by_magnitude(v, 3))(v)),
      [0, -3.0, 2.0, 0, 0, 5.0])     # |2| == |-2|: the lower index wins


# ---------------------------------------------------------------------------
# Communication accounting


def test_comm_accounting():
  d = 1003
  assert sparsify.dense_bits(d) == 32 * d
  assert sparsify.sparse_uplink_bits(d, 0.5, 16) == 32 * 32 * 16 + 63
  assert sparsify.sparse_uplink_bits(1000, 0.5, 1) == 32 * 500 + 1000
  rc = sparsify.round_comm(d, 20, ratio=0.5, pack_size=16)
  assert rc.uplink_bits == 20 * (32 * 512 + 63)
  assert rc.downlink_bits == 20 * 32 * d
  assert rc.as_dict()["total_bits"] == rc.uplink_bits + rc.downlink_bits
  fc = sparsify.fetchsgd_round_comm(d, 5, 100, 10, 7)
  assert fc.uplink_bits_per_client == 32 * 5 * 100
  assert fc.downlink_bits_per_client == 32 * 10 + d
  # Exact counts from masks: the short last pack (1003 = 62 * 16 + 11) has 11 values.
  masks = np.zeros((2, 63), bool)
  masks[0, :3] = True
  masks[1, [0, 62]] = True
  got = jax.jit(lambda m: sparsify.uplink_bits_from_masks(m, d, 16))(masks)
  np.testing.assert_array_equal(np.asarray(got), [32 * 48 + 63, 32 * 27 + 63])
  with pytest.raises(ValueError):
    sparsify.round_comm(d, 3, ratio=0.5, sketch=(5, 10))
  with pytest.raises(ValueError, match="ratio"):
    sparsify.round_comm(d, 3, ratio=2.0)
