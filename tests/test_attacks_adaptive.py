"""Attacks that know the defence: Fang et al.'s trimmed-mean/median and Krum
attacks (fedjax_sparse.attacks.fang) and the adaptive attacks on SafeSparse
(fedjax_sparse.attacks.mimicry). Tiny hand-computed cases, numpy oracles and
one short end-to-end run per attack."""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators as G
from fedjax_sparse import attacks as A
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.sparsify.topk import pack_topk_batch, pack_topk_numpy


def _ctx(d, k, pack_size=1, global_params=None):
  g = jnp.zeros(d) if global_params is None else jnp.asarray(global_params, jnp.float32)
  return A.AttackContext(round=jnp.int32(3), global_params=g,
                         prev_aggregate=jnp.zeros(d), weights=jnp.ones(k),
                         num_clients=k, pack_size=pack_size)


def _mal(k, idx):
  m = np.zeros(k, bool)
  m[list(idx)] = True
  return m


@functools.lru_cache(maxsize=None)
def _jitted(name, items):
  """The jitted ``apply`` of attack ``name`` (cached: one compile per shape)."""
  return jax.jit(A.get_update_attack(name)(**dict(items)).apply)


def _run(name, x, mal, key=0, pack_size=1, global_params=None, **kwargs):
  x = jnp.asarray(x, jnp.float32)
  apply = _jitted(name, tuple(sorted(kwargs.items())))
  out, _ = apply((), x, jnp.asarray(mal), jax.random.key(key),
                 _ctx(x.shape[1], x.shape[0], pack_size, global_params))
  return np.asarray(out)


# The round step's sparsifier, compiled once per (ratio, pack size).
_sparsify = jax.jit(pack_topk_batch, static_argnums=(1, 2))


def _random(k, d, seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(k, d)) + rng.normal(size=d)).astype(np.float32)


# ------------------------------------------------------------ contract ----

CASES = {
    "fang_trmean": {}, "fang_trmean@model": {"space": "model"}, "fang_krum": {},
    "mask_mimicry@own_alie": {"knowledge": "own", "values": "alie"},
    "sign_camouflage": {},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_malicious_rows_change_one_compile(case):
  name = case.split("@")[0]
  attack = A.get_update_attack(name)(**CASES[case])
  x = jnp.asarray(_random(7, 8, 0))
  apply = jax.jit(attack.apply)
  for idx in ([0, 3], [1, 2, 5], []):
    mal = jnp.asarray(_mal(7, idx))
    out, _ = apply(attack.init(8), x, mal, jax.random.key(1), _ctx(8, 7))
    out = np.asarray(out)
    np.testing.assert_array_equal(np.any(out != np.asarray(x), axis=1), np.asarray(mal))
    assert np.all(np.isfinite(out))
  assert apply._cache_size() == 1


def test_registered_and_builder_accepts_arguments():
  for name in ("fang_trmean", "fang_krum", "mask_mimicry", "sign_camouflage"):
    assert A.is_update_attack(name)
  assert A.accepted_arguments("mask_mimicry") == ["values", "eps", "z", "knowledge",
                                                  "topk_ratio", "pack_size"]
  assert "disagree_on" in A.accepted_arguments("sign_camouflage")
  assert A.attack_space("fang_trmean", {"space": "model"}) == "model"
  with pytest.raises(ValueError, match="b must be > 1"):
    A.fang_trmean(b=1.0)
  with pytest.raises(ValueError, match="topk_ratio"):
    A.mask_mimicry(topk_ratio=0.0)
  with pytest.raises(ValueError, match="unknown knowledge"):
    A.mask_mimicry(knowledge="partial")
  with pytest.raises(ValueError, match="agree"):
    A.sign_camouflage(agree=1.5)
  with pytest.raises(ValueError, match="disagree_on"):
    A.sign_camouflage(disagree_on="random")


# --------------------------------------------------------- fang_trmean ----

# Benign rows 2-4. Per coordinate: mean sign s, the benign max / min, and the
# interval Fang et al. sample in (b = 2), worked out by hand:
#   0: values 1, 2, 3;    s = +1, min  1 > 0  -> [min/2, min] = [0.5, 1]
#   1: values -1, -2, -3; s = -1, max -1 <= 0 -> [max, max/2] = [-1, -0.5]
#   2: values 2, -1, 1;   s = +1, min -1 <= 0 -> [2 min, min]  = [-2, -1]
#   3: values -3, 1, -4;  s = -1, max  1 > 0  -> [max, 2 max]  = [1, 2]
_TR_X = np.array([[0, 0, 0, 0],
                  [2, 2, -2, -2],
                  [1, -1, 2, -3],
                  [2, -2, -1, 1],
                  [3, -3, 1, -4]], np.float32)
_TR_MAL = _mal(5, [0, 1])


def test_fang_trmean_full_knowledge_hand_case():
  out = _run("fang_trmean", _TR_X, _TR_MAL)
  lo = np.array([0.5, -1.0, -2.0, 1.0])
  hi = np.array([1.0, -0.5, -1.0, 2.0])
  for row in out[:2]:
    assert np.all(row >= lo - 1e-6) and np.all(row <= hi + 1e-6)
  assert not np.array_equal(out[0], out[1])   # each attacker samples its own
  np.testing.assert_array_equal(out[2:], _TR_X[2:])
  # Every crafted value lies beyond the benign extremes, against s.
  g = _TR_X[2:]
  s = np.sign(g.mean(0))
  assert np.all(np.where(s > 0, out[:2] <= g.min(0), out[:2] >= g.max(0)))


def test_fang_trmean_partial_knowledge_hand_case():
  # Attackers' own rows 0, 1: m = [1, 1, -1, -1], sigma = sqrt(2) (ddof 1).
  out = _run("fang_trmean", _TR_X, _TR_MAL, knowledge="partial")
  r2 = math.sqrt(2.0)
  lo = np.array([1 - 4 * r2, 1 - 4 * r2, -1 + 3 * r2, -1 + 3 * r2])
  hi = np.array([1 - 3 * r2, 1 - 3 * r2, -1 + 4 * r2, -1 + 4 * r2])
  for row in out[:2]:
    assert np.all(row >= lo - 1e-5) and np.all(row <= hi + 1e-5)


def test_fang_trmean_model_space_matches_numpy():
  g0 = np.array([1.0, -0.5, 2.0, 0.25], np.float32)
  out = _run("fang_trmean", _TR_X, _TR_MAL, global_params=g0, b=3.0, space="model")
  w = g0[None, :] - _TR_X[2:].astype(np.float64)          # benign local models
  s = np.sign(w.mean(0) - g0)                              # the model's change
  wmax, wmin = w.max(0), w.min(0)
  lo = np.where(s < 0, wmax, np.where(wmin > 0, wmin / 3, 3 * wmin))
  hi = np.where(s < 0, np.where(wmax > 0, 3 * wmax, wmax / 3), wmin)
  for row in out[:2]:
    wp = g0 - row
    assert np.all(wp >= lo - 1e-5) and np.all(wp <= hi + 1e-5)


# ----------------------------------------------------------- fang_krum ----

def _np_krum_pick(pop, f):
  k = len(pop)
  d2 = ((pop[:, None] - pop[None]) ** 2).sum(-1)
  np.fill_diagonal(d2, np.inf)
  return int(np.argmin(np.sort(d2, 1)[:, :k - f - 2].sum(1)))


def _np_fang_krum(x, mal, f=None, threshold=1e-5):
  """Fang et al. section 4.2 as a numpy loop: the upper bound, then halving."""
  x = np.asarray(x, np.float64)
  k, c = len(x), int(mal.sum())
  f = c if f is None else f
  g = x[~mal]
  s = np.sign(g.mean(0))
  dist = np.sqrt(((g[:, None] - g[None]) ** 2).sum(-1))
  np.fill_diagonal(dist, np.inf)
  near = np.sort(dist, 1)[:, :k - c - 2].sum(1)
  lam = (near.min() / ((k - 2 * c - 1) * np.linalg.norm(s))
         + np.linalg.norm(g, axis=1).max() / np.linalg.norm(s))
  halvings = 0
  while lam >= threshold:
    pop = x.copy()
    pop[mal] = -lam * s
    if mal[_np_krum_pick(pop, f)]:
      return lam, s, halvings, True
    lam /= 2
    halvings += 1
  return lam, s, halvings, False


@pytest.mark.parametrize("seed", [1, 3, 7])
def test_fang_krum_matches_oracle_and_krum_selects_it(seed):
  x = _random(7, 6, seed)
  mal = _mal(7, [1, 4])
  lam, s, halvings, found = _np_fang_krum(x, mal)
  assert found and halvings >= 2          # the bound alone is not selected
  out = _run("fang_krum", x, mal)
  np.testing.assert_allclose(out[1], -lam * s, rtol=1e-5)
  np.testing.assert_array_equal(out[1], out[4])
  krum = G.get("krum")(f=2)
  agg, _ = krum.apply(krum.init(6), jnp.asarray(out), None, jnp.ones(7),
                      jax.random.key(0), AggContext(round=jnp.int32(0), num_clients=7))
  assert np.asarray(agg.acceptance)[mal].sum() == 1
  # The halving stops at the first selected lambda: twice it was tried and
  # not selected.
  assert not A.krum_selects_crafted(
      *_krum_inputs(x, mal, 2 * lam, s), jnp.asarray(mal), 2)


def _krum_inputs(x, mal, lam, s):
  x = np.asarray(x, np.float64)
  pair = ((x[:, None] - x[None]) ** 2).sum(-1)
  crafted = ((x + lam * s) ** 2).sum(1)
  return jnp.asarray(pair, jnp.float32), jnp.asarray(crafted, jnp.float32)


def test_fang_krum_threshold_when_never_selected():
  # Seed 0: Krum (f = 2, K = 7) never picks the crafted copies; the loop
  # ends at the first lambda below the threshold, as the oracle does.
  x = _random(7, 6, 0)
  mal = _mal(7, [1, 4])
  lam, s, _, found = _np_fang_krum(x, mal)
  assert not found and lam < 1e-5
  out = _run("fang_krum", x, mal)
  np.testing.assert_allclose(out[1], -lam * s, rtol=1e-4)


# -------------------------------------------------------- mask_mimicry ----

# Benign rows 2-5 keep (top 3 of 6): {0,1,2}, {0,1,3}, {0,2,4}, {1,2,5};
# counts 3,3,3,1,1,1 -> M = {0,1,2}. The attackers' own masks are {3,4,5}.
_MM_X = np.array([[0, 0, 0, 5, 5, 5],
                  [0, 0, 0, -4, 6, 1],
                  [3, 2, 1, .1, .1, .1],
                  [3, 2, .1, 1, .1, .1],
                  [-3, .1, 2, .1, 1, .1],
                  [.1, 3, 2, .1, .1, -1]], np.float32)
_MM_MAL = _mal(6, [0, 1])


def _jaccard(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_mask_mimicry_hand_case():
  out = _run("mask_mimicry", _MM_X, _MM_MAL, topk_ratio=0.5)
  mu = _MM_X[2:].astype(np.float64).mean(0)       # [0.775, 1.775, 1.275, ...]
  expected = np.array([-0.4 * 0.775, -0.4 * 1.775, -0.4 * 1.275, 0, 0, 0])
  np.testing.assert_allclose(out[0], expected, rtol=1e-5)
  np.testing.assert_allclose(out[1], expected, rtol=1e-5)
  np.testing.assert_allclose(out[0, :3], -0.4 * mu[:3], rtol=1e-5)
  sparse, masks = _sparsify(jnp.asarray(out), 0.5, 1)
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
  x = _random(k_rows, d, seed)
  mal = _mal(k_rows, [0, 5])
  out = _run("mask_mimicry", x, mal, pack_size=p, topk_ratio=ratio)
  sparse, masks = _sparsify(jnp.asarray(out), ratio, p)
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
  x = _random(7, 8, 4)
  mal = _mal(7, [2, 3, 6])
  out = _run("mask_mimicry", x, mal, values="alie", knowledge="own", topk_ratio=0.5)
  _, masks = _sparsify(jnp.asarray(out), 0.5, 1)
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
  out = _run("mask_mimicry", x, _mal(6, [0, 1]), topk_ratio=0.5)
  _, masks = _sparsify(jnp.asarray(out), 0.5, 1)
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
  out = _run("sign_camouflage", _SC_X, _mal(5, [0, 1]), agree=agree, scale=3.0,
             topk_ratio=1.0, disagree_on=disagree_on)
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
  x = _random(k_rows, d, 11)
  mal = _mal(k_rows, [1, 2, 6])
  out = _run("sign_camouflage", x, mal, pack_size=p, agree=agree, topk_ratio=ratio,
             disagree_on=disagree_on)
  sparse, masks = _sparsify(jnp.asarray(out), ratio, p)
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


# ---------------------------------------------- end to end, experiment ----

@pytest.mark.slow  # the unit tests above cover each attack; kept for make test-all
def test_each_attack_end_to_end():
  from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment
  base = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=7,
                          clients_per_round=7, rounds=2, local_epochs=1,
                          batch_size=16, lr=0.1, model="mlp", model_width="8",
                          eval_every=2, eval_batch_size=100, attack_start=1,
                          malicious_fraction=0.29)
  for attack, aggregator, extra in [
      ("fang_trmean", "trimmed_mean", {}),
      ("fang_krum", "krum", {}),
      ("mask_mimicry", "safesparse",
       dict(sparsify="topk", topk_ratio=0.5, attack_args="topk_ratio=0.5")),
      ("sign_camouflage", "safesparse",
       dict(sparsify="topk", topk_ratio=0.5, attack_args="topk_ratio=0.5")),
  ]:
    cfg = dataclasses.replace(base, attack=attack, aggregator=aggregator, **extra)
    summary = run_experiment(cfg, progress=False)
    assert math.isfinite(summary["final_test_loss"]), (attack, summary)
