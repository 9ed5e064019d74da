"""The mimicry attacks against mask- and sign-based defences: mask_mimicry and
sign_camouflage (fedjax_sparse.attacks.mimicry); the helpers of
test_adaptive.py (tests/helpers.py).
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import attacks as A
from fedjax_sparse.sparsify.topk import pack_topk_numpy
from tests.helpers import (malicious_rows, random_updates, run_attack,
                           sparsify_batch)


# -------------------------------------------------------- mask_mimicry ----

# Benign rows 2-5 keep (top 3 of 6): {0,1,2}, {0,1,3}, {0,2,4}, {1,2,5};
# counts 3,3,3,1,1,1 -> M = {0,1,2}. The attackers' own masks are {3,4,5}.
_MM_X = np.array([[0, 0, 0, 5, 5, 5],
                  [0, 0, 0, -4, 6, 1],
                  [3, 2, 1, .1, .1, .1],
                  [3, 2, .1, 1, .1, .1],
                  [-3, .1, 2, .1, 1, .1],
                  [.1, 3, 2, .1, .1, -1]], np.float32)
_MM_MAL = malicious_rows(6, [0, 1])


def _jaccard(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_mask_mimicry_hand_case():
  out = run_attack("mask_mimicry", _MM_X, _MM_MAL, topk_ratio=0.5)
  mu = _MM_X[2:].astype(np.float64).mean(0)       # [0.775, 1.775, 1.275, ...]
  expected = np.array([-0.4 * 0.775, -0.4 * 1.775, -0.4 * 1.275, 0, 0, 0])
  np.testing.assert_allclose(out[0], expected, rtol=1e-5)
  np.testing.assert_allclose(out[1], expected, rtol=1e-5)
  np.testing.assert_allclose(out[0, :3], -0.4 * mu[:3], rtol=1e-5)
  sparse, masks = sparsify_batch(jnp.asarray(out), 0.5, 1)
  masks = np.asarray(masks)
  np.testing.assert_array_equal(masks[0], [1, 1, 1, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(sparse)[:2], out[:2])
  # Jaccard to the benign masks: 1, 1/2, 1/2, 1/2 (mean 0.625), against
  # 0, 1/5, 1/5, 1/5 (mean 0.15) for the attacker's own mask.
  own = pack_topk_numpy(_MM_X[0], 0.5)[1]
  benign = masks[2:]
  assert np.mean([_jaccard(masks[0], b) for b in benign]) == pytest.approx(0.625)
  assert np.mean([_jaccard(own, b) for b in benign]) == pytest.approx(0.15)


def _benign_masks(x, mal, ratio, p):
  return np.stack([pack_topk_numpy(r, ratio, p)[1] for r in x[~mal]])


@pytest.mark.parametrize("seed,p", [(0, 1), (1, 1), (2, 2)])
def test_mask_mimicry_maximises_overlap_and_carries_its_mask(seed, p):
  k_rows, d, ratio = 7, 8, 0.5
  x = random_updates(k_rows, d, seed)
  mal = malicious_rows(k_rows, [0, 5])
  out = run_attack("mask_mimicry", x, mal, pack_size=p, topk_ratio=ratio)
  sparse, masks = sparsify_batch(jnp.asarray(out), ratio, p)
  masks, sparse = np.asarray(masks), np.asarray(sparse)
  benign = _benign_masks(x, mal, ratio, p)
  m = masks[0]
  n, k = m.shape[0], int(m.sum())
  # The crafted upload survives top-k unchanged: its mask is the chosen one
  # and the values inside are IPM's.
  np.testing.assert_array_equal(sparse[[0, 5]], out[[0, 5]])
  mu = x[~mal].astype(np.float64).mean(0)
  coord = np.repeat(m, p)[:d]
  np.testing.assert_allclose(out[0][coord], -0.4 * mu[coord], rtol=1e-4, atol=1e-7)
  assert np.all(out[0][~coord] == 0)
  # Brute force over every mask of k packs: M has the largest total overlap.
  overlap = lambda c: sum((c & b).sum() for b in benign)
  best = max(overlap(np.isin(np.arange(n), s)) for s in itertools.combinations(range(n), k))
  assert overlap(m) == best
  # ... and a mean Jaccard to the benign masks at least the attackers' own.
  jm = np.mean([_jaccard(m, b) for b in benign])
  for i in (0, 5):
    own = pack_topk_numpy(x[i], ratio, p)[1]
    assert jm >= np.mean([_jaccard(own, b) for b in benign]) - 1e-12


def test_mask_mimicry_own_mask_and_alie_values():
  x = random_updates(7, 8, 4)
  mal = malicious_rows(7, [2, 3, 6])
  out = run_attack("mask_mimicry", x, mal, values="alie", knowledge="own", topk_ratio=0.5)
  _, masks = sparsify_batch(jnp.asarray(out), 0.5, 1)
  own = np.stack([pack_topk_numpy(x[i], 0.5)[1] for i in (2, 3, 6)])
  np.testing.assert_array_equal(np.asarray(masks)[[2, 3, 6]], own)
  a = x[mal].astype(np.float64)                   # partial: the attackers' rows
  v = a.mean(0) - float(A.z_max(7, 3)) * a.std(0, ddof=1)
  for row, m in zip(out[[2, 3, 6]], own):
    np.testing.assert_allclose(row[m], v[m], rtol=1e-4, atol=1e-6)
    assert np.all(row[~m] == 0)


def test_mask_mimicry_keeps_zero_values_in_its_mask():
  # The benign mean is 0 on coordinate 0, which the benign masks all keep:
  # the floor keeps it in the upload's mask.
  # Benign masks {0,1,2} and {0,2,3}; mu = [0, 0.5, 1, 0.5, 0, 0].
  x = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1],
                [4, 1, 1, 0, 0, 0], [-4, 0, 1, 1, 0, 0],
                [4, 1, 1, 0, 0, 0], [-4, 0, 1, 1, 0, 0]], np.float32)
  out = run_attack("mask_mimicry", x, malicious_rows(6, [0, 1]), topk_ratio=0.5)
  _, masks = sparsify_batch(jnp.asarray(out), 0.5, 1)
  np.testing.assert_array_equal(np.asarray(masks)[0], [1, 1, 1, 0, 0, 0])
  assert out[0, 0] == A.mimicry.TINY
  np.testing.assert_allclose(out[0, 1:], [-0.2, -0.4, 0, 0, 0], rtol=1e-6)


# ----------------------------------------------------- sign_camouflage ----

# Benign rows 2-4: majority signs m = [+, -, +, -], mu = [1/3, -2/3, 1, -1/3];
# |mu| order 2, 1, 0, 3 (0 and 3 tie: lower index first). All 4 coordinates
# are sent (r = 1). Row 0's own signs disagree with m on {1, 3}, row 1's too
# (its 0 on coordinate 0 is not a disagreement). Push value
# -3 |mu_j| m_j = [-1, 2, -3, 1]; agreeing value m_j |u_ij|.
_SC_X = np.array([[.5, .5, .5, .5],
                  [0, 1, 1, 1],
                  [1, -2, 3, -1],
                  [1, 2, -3, -1],
                  [-1, -2, 3, 1]], np.float32)
_T = A.mimicry.TINY


@pytest.mark.parametrize("disagree_on,agree,row0,row1", [
    # 2 pushed, the largest |mu|: coordinates 2 and 1.
    ("largest_mean", 0.5, [0.5, 2, -3, -0.5], [_T, 2, -3, -1]),
    # 2 pushed, the own disagreements {1, 3}.
    ("own_first", 0.5, [0.5, 2, 0.5, 1], [_T, 2, 1, 1]),
    # 1 pushed: the own disagreement with the larger |mu|, coordinate 1.
    ("own_first", 0.75, [0.5, 2, 0.5, -0.5], [_T, 2, 1, -1]),
    # 3 pushed: {1, 3}, then the largest |mu| of the rest, coordinate 2.
    ("own_first", 0.25, [0.5, 2, -3, 1], [_T, 2, -3, 1]),
])
def test_sign_camouflage_hand_cases(disagree_on, agree, row0, row1):
  out = run_attack("sign_camouflage", _SC_X, malicious_rows(5, [0, 1]),
                   agree=agree, scale=3.0, topk_ratio=1.0,
                   disagree_on=disagree_on)
  np.testing.assert_allclose(out[0], row0, rtol=1e-6)
  np.testing.assert_allclose(out[1], row1, rtol=1e-6)
  np.testing.assert_array_equal(out[2:], _SC_X[2:])


def _majority(g):
  maj = np.sign(np.sign(g).sum(0))
  return np.where(maj == 0, np.sign(g.mean(0)), maj)


@pytest.mark.parametrize("disagree_on,agree,p", [
    ("largest_mean", 0.0, 1), ("largest_mean", 0.9, 1), ("largest_mean", 0.75, 2),
    ("own_first", 0.9, 1), ("own_first", 0.3, 2), ("own_first", None, 1)])
def test_sign_camouflage_agreement_and_mask(disagree_on, agree, p):
  k_rows, d, ratio = 7, 8, 0.5
  x = random_updates(k_rows, d, 11)
  mal = malicious_rows(k_rows, [1, 2, 6])
  out = run_attack("sign_camouflage", x, mal, pack_size=p, agree=agree, topk_ratio=ratio,
                   disagree_on=disagree_on)
  sparse, masks = sparsify_batch(jnp.asarray(out), ratio, p)
  sparse, masks = np.asarray(sparse), np.asarray(masks)
  g = x[~mal].astype(np.float64)
  maj = _majority(g)
  mu = g.mean(0)
  sent_of = lambda i: np.repeat(pack_topk_numpy(x[i], ratio, p)[1], p)[:d]
  if agree is None:   # the benign clients' mean agreement with m
    agree = np.mean([(np.sign(x[i])[sent_of(i)] != -maj[sent_of(i)]).mean()
                     for i in np.flatnonzero(~mal)])
  for i in (1, 2, 6):
    own = pack_topk_numpy(x[i], ratio, p)[1]
    np.testing.assert_array_equal(masks[i], own)        # the attacker's own mask
    np.testing.assert_array_equal(sparse[i], out[i])    # kept as crafted
    sent = sent_of(i)
    n = sent.sum()
    agreeing = (np.sign(out[i][sent]) == maj[sent]).sum()
    assert abs(agreeing - agree * n) <= 1               # within one coordinate
    push = sent & (np.sign(out[i]) != maj)
    np.testing.assert_allclose(out[i][push], -10.0 * np.abs(mu[push]) * maj[push],
                               rtol=1e-4)
    own_dis = sent & (np.sign(x[i]) == -maj)
    if disagree_on == "largest_mean":
      pools = [(push, sent & ~push)]
    elif push.sum() <= own_dis.sum():
      assert np.all(push <= own_dis)
      pools = [(push, own_dis & ~push)]
    else:
      assert np.all(own_dis <= push)
      pools = [(push & ~own_dis, sent & ~push)]
    # The disagreeing coordinates have the largest |mu| of their pool.
    for chosen, others in pools:
      if chosen.any() and others.any():
        assert np.abs(mu[chosen]).min() >= np.abs(mu[others]).max()
