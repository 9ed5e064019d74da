"""Tests for fedjax_sparse.sparsify: pack top-k, Alg. 2, SparseFed, count sketch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators
from fedjax_sparse.aggregators import AggContext, combine
from fedjax_sparse import sparsify
from fedjax_sparse.aggregators.clipping import clip_by_l2_norm
from fedjax_sparse.aggregators.fetchsgd import fetchsgd
from fedjax_sparse.aggregators.sparsefed import sparsefed
from fedjax_sparse.sparsify import (CountSketch, check_topk_config, num_kept,
                                    num_packs, pack_topk, pack_topk_batch,
                                    scalar_topk, topk_by_magnitude, topk_mask)


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


def np_topk_mask(scores, k):
  """Loop oracle: k largest scores, ties to the lower index."""
  n = len(scores)
  order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
  m = np.zeros(n, bool)
  for i in order[:k]:
    m[i] = True
  return m


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


def np_alg2(updates, masks, weights, acceptance, P):
  """FLARE Alg. 2, pack by pack, client by client (accepted = a > 0)."""
  K, d = updates.shape
  n = masks.shape[1]
  out = np.zeros(d, np.float64)
  for p in range(n):
    S = [j for j in range(K) if acceptance[j] > 0 and masks[j, p]]
    A = sum(weights[j] * acceptance[j] for j in S)
    if not S or A == 0:
      continue
    for c in range(p * P, min((p + 1) * P, d)):
      out[c] = sum(weights[j] * acceptance[j] * updates[j, c] for j in S) / A
  return out


def ctx(P=1, rnd=0, **side_inputs):
  return AggContext(round=jnp.int32(rnd), pack_size=P, **side_inputs)


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


def test_bad_aggregator_settings_raise():
  for kw in ({"k": 0}, {"k": -3}, {"k": 1.5}, {"k": 0.0}, {"k": None}, {"k": True},
             {"k": 5, "rho": 1.0}, {"k": 5, "rho": -0.1}, {"k": 5, "clip_norm": 0.0},
             {"k": 5, "clip_norm": -1.0}, {"k": 5, "adaptive_clip": True},
             {"k": 5, "topk_method": "nope"}):
    with pytest.raises(ValueError):
      sparsefed(**kw)
  with pytest.raises(ValueError, match="k"):
    sparsefed(k=11).init(10)
  for kw in ({"rows": 0, "cols": 10, "k": 1}, {"rows": 3, "cols": None, "k": 1},
             {"rows": 3, "cols": 0, "k": 1}, {"rows": 1.5, "cols": 10, "k": 1},
             {"rows": 3, "cols": 10, "k": 0}, {"rows": 3, "cols": 10, "k": 1, "mode": "x"},
             {"rows": 3, "cols": 10, "k": 1, "error_reset": "x"}):
    with pytest.raises(ValueError):
      fetchsgd(**kw)
  with pytest.raises(ValueError, match="k"):
    fetchsgd(rows=3, cols=10, k=11).init(10)
  # The registry builds the same factories.
  with pytest.raises(ValueError):
    aggregators.get("sparsefed")(k=0)
  assert {"sparsefed", "fetchsgd"} <= set(aggregators.names())


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
# FLARE Alg. 2 = aggregators.base.combine with masks


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
  out, _ = jax.jit(agg.apply)(agg.init(d), updates, masks, sizes, None, ctx(P))
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


# ---------------------------------------------------------------------------
# SparseFed


def np_sparsefed(rounds, L, k, rho):
  """Loop oracle of SparseFed (Alg. 5 with momentum factor masking)."""
  d = rounds[0].shape[1]
  R = np.zeros(d)
  W = np.zeros(d)
  deltas = []
  for U in rounds:
    U = U.astype(np.float64)
    norms = np.linalg.norm(U, axis=1)
    U = U * np.minimum(1.0, L / np.maximum(norms, 1e-30))[:, None]
    u = U.mean(axis=0)
    R = rho * R + u
    W = W + R
    sel = np_topk_mask(np.abs(W), k)
    delta = np.where(sel, W, 0)
    W = W - delta
    R = np.where(sel, 0, R)
    deltas.append(delta)
  return deltas, R, W


def _run(agg, rounds, P=1, weights=None, **side_inputs):
  apply = jax.jit(agg.apply)
  state = agg.init(rounds[0].shape[1])
  outs, states = [], [state]
  for t, U in enumerate(rounds):
    w = np.ones(U.shape[0], np.float32) if weights is None else weights
    out, state = apply(state, jnp.asarray(U), None, w, None, ctx(P, t, **side_inputs))
    outs.append(out)
    states.append(state)
  return outs, states


def test_sparsefed_matches_oracle():
  rs = np.random.default_rng(2)
  rounds = [rs.standard_normal((4, 40)).astype(np.float32) * s for s in (1, 3, 0.5, 2)]
  outs, states = _run(sparsefed(clip_norm=4.0, k=6, rho=0.9), rounds)
  deltas, R, W = np_sparsefed(rounds, 4.0, 6, 0.9)
  for out, want in zip(outs, deltas):
    np.testing.assert_allclose(np.asarray(out.update), want, rtol=1e-4, atol=1e-5)
    assert int((np.asarray(out.update) != 0).sum()) == 6
  np.testing.assert_allclose(np.asarray(states[-1].momentum), R, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(states[-1].error), W, rtol=1e-4, atol=1e-5)
  scale = np.asarray(outs[1].diagnostics["clip_scale"])
  np.testing.assert_allclose(scale, np.minimum(1, 4.0 / np.linalg.norm(rounds[1], axis=1)),
                             rtol=1e-5)


def test_sparsefed_is_fedavg_without_clipping_sparsity_momentum():
  rs = np.random.default_rng(3)
  rounds = [rs.standard_normal((5, 30)).astype(np.float32) for _ in range(3)]
  outs, states = _run(sparsefed(clip_norm=math.inf, k=30, rho=0.0), rounds)
  mean = aggregators.get("nwfedavg")()
  for U, out, st in zip(rounds, outs, states[1:]):
    want, _ = mean.apply((), jnp.asarray(U), None, jnp.ones(5), None, ctx())
    np.testing.assert_allclose(np.asarray(out.update), np.asarray(want.update), rtol=1e-6)
    assert not np.asarray(st.error).any()
  # k given as the fraction 1.0 is the same.
  outs2, _ = _run(sparsefed(k=1.0, rho=0.0), rounds)
  np.testing.assert_array_equal(np.asarray(outs2[0].update), np.asarray(outs[0].update))


def test_sparsefed_weighted_mean():
  rs = np.random.default_rng(4)
  U = rs.standard_normal((3, 10)).astype(np.float32)
  w = np.array([1.0, 2.0, 7.0], np.float32)
  outs, _ = _run(sparsefed(k=10, rho=0.0, weighted=True), [U], weights=w)
  np.testing.assert_allclose(np.asarray(outs[0].update), (w[:, None] * U).sum(0) / w.sum(),
                             rtol=1e-5)


def test_sparsefed_mask_aware_mean_is_alg2():
  rs = np.random.default_rng(10)
  U = rs.standard_normal((4, 12)).astype(np.float32)
  dense, masks = pack_topk_batch(jnp.asarray(U), 0.5, 3)
  agg = sparsefed(k=12, rho=0.0, mask_aware=True)
  out, _ = jax.jit(agg.apply)(agg.init(12), dense, masks, jnp.ones(4), None, ctx(3))
  np.testing.assert_allclose(np.asarray(out.update),
                             np_alg2(np.asarray(dense), np.asarray(masks), np.ones(4),
                                     np.ones(4), 3), rtol=1e-5, atol=1e-6)


def test_error_feedback_conserves_mass():
  rs = np.random.default_rng(5)
  rounds = [rs.standard_normal((4, 64)).astype(np.float32) for _ in range(6)]
  # rho = 0: sum of applied Deltas + residual W == sum of the mean updates.
  outs, states = _run(sparsefed(clip_norm=math.inf, k=5, rho=0.0), rounds)
  applied = sum(np.asarray(o.update, np.float64) for o in outs)
  total = sum(U.astype(np.float64).mean(axis=0) for U in rounds)
  np.testing.assert_allclose(applied + np.asarray(states[-1].error), total, rtol=1e-5, atol=1e-5)
  # rho > 0: sum Delta_t + W_T == sum_t (u_t + rho * R'_{t-1}), R'_{t-1} the
  # masked momentum carried into round t (state.momentum before the call).
  rho = 0.9
  outs, states = _run(sparsefed(clip_norm=math.inf, k=5, rho=rho), rounds)
  applied = sum(np.asarray(o.update, np.float64) for o in outs)
  total = sum(U.astype(np.float64).mean(axis=0) + rho * np.asarray(st.momentum)
              for U, st in zip(rounds, states[:-1]))
  np.testing.assert_allclose(applied + np.asarray(states[-1].error), total, rtol=1e-5, atol=1e-5)
  # Momentum factor masking: R is 0 exactly where Delta was applied.
  for o, st in zip(outs, states[1:]):
    assert not np.asarray(st.momentum)[np.asarray(o.update) != 0].any()


def test_adaptive_clipping():
  U = np.stack([np.full(4, 3.0), np.full(4, 0.1)]).astype(np.float32)  # norms 6, 0.2
  agg = sparsefed(clip_norm=2.0, k=4, rho=0.0, adaptive_clip=True,
                  lr_schedule=lambda t: 0.5 / (1.0 + t))
  outs, _ = _run(agg, [U, U])
  np.testing.assert_allclose(np.asarray(outs[0].diagnostics["clip_norm"]), 1.0)
  np.testing.assert_allclose(np.asarray(outs[1].diagnostics["clip_norm"]), 0.5)
  np.testing.assert_allclose(np.asarray(outs[1].diagnostics["clip_scale"]), [0.5 / 6, 1.0],
                             rtol=1e-6)
  agg = sparsefed(clip_norm=2.0, k=4, rho=0.0, adaptive_clip=True)
  outs, _ = _run(agg, [U], lr=jnp.float32(0.25))
  np.testing.assert_allclose(np.asarray(outs[0].diagnostics["clip_norm"]), 0.5)
  with pytest.raises(ValueError, match="lr"):
    agg.apply(agg.init(4), jnp.asarray(U), None, jnp.ones(2), None, ctx())


def test_clip_by_l2_norm():
  U = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
  c, s = jax.jit(clip_by_l2_norm)(U, 1.0)
  np.testing.assert_allclose(np.asarray(c), [[0.6, 0.8], [0, 0], [0.3, 0.4]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s), [0.2, 1.0, 1.0], rtol=1e-6)
  c, _ = clip_by_l2_norm(U, math.inf)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(U))


# ---------------------------------------------------------------------------
# Count sketch and FetchSGD


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


def test_fetchsgd_true_topk_equals_sparsefed():
  rs = np.random.default_rng(8)
  rounds = [rs.standard_normal((4, 50)).astype(np.float32) * s for s in (1, 2, 0.5)]
  kw = dict(clip_norm=3.0, k=7, rho=0.9)
  outs_f, states_f = _run(fetchsgd(rows=3, cols=70, mode="true_topk", **kw), rounds)
  outs_s, states_s = _run(sparsefed(**kw), rounds)
  for a, b in zip(outs_f, outs_s):
    np.testing.assert_array_equal(np.asarray(a.update), np.asarray(b.update))
  np.testing.assert_array_equal(np.asarray(states_f[-1].error), np.asarray(states_s[-1].error))
  np.testing.assert_array_equal(np.asarray(states_f[-1].momentum),
                                np.asarray(states_s[-1].momentum))


def test_fetchsgd_sketch_mode():
  d, k, K = 5000, 8, 4
  rs = np.random.default_rng(9)
  heavy = rs.choice(d, k, replace=False)
  base = np.zeros(d, np.float32)
  base[heavy] = rs.uniform(2, 4, k)
  rounds = [base + 0.01 * rs.standard_normal((K, d)).astype(np.float32) for _ in range(2)]
  rows, cols = 7, 40 * k
  agg = fetchsgd(rows=rows, cols=cols, k=k, rho=0.9, seed=3)
  outs, states = _run(agg, rounds)
  delta = np.asarray(outs[0].update)
  assert set(np.flatnonzero(delta)) == set(heavy)
  np.testing.assert_allclose(delta[heavy], rounds[0].mean(0)[heavy], atol=0.2)
  # The cells of Delta's own sketch are zeroed in both sketches.
  sk = CountSketch.create(d, rows, cols, jax.random.PRNGKey(3))
  touched = np.asarray(sk.support(jnp.asarray(delta != 0)))
  assert not np.asarray(states[1].error)[touched].any()
  assert not np.asarray(states[1].momentum)[touched].any()
  assert states[1].error.shape == (rows, cols)
  # Alg. 10's subtraction variant also runs under jit.
  outs2, _ = _run(fetchsgd(rows=rows, cols=cols, k=k, seed=3, error_reset="subtract"), rounds)
  assert set(np.flatnonzero(np.asarray(outs2[0].update))) == set(heavy)


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
