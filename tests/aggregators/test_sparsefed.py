"""SparseFed and FetchSGD (fedjax_sparse/aggregators/{sparsefed,fetchsgd}.py):
their settings, loop oracles, error feedback and clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators
from fedjax_sparse.aggregators.clipping import clip_by_l2_norm
from fedjax_sparse.aggregators.fetchsgd import fetchsgd
from fedjax_sparse.aggregators.sparsefed import sparsefed
from fedjax_sparse.sparsify import CountSketch, pack_topk_batch
from tests.helpers import np_alg2, np_topk_mask, pack_ctx


# ---------------------------------------------------------------------------
# Configuration errors (plain Python, before anything is traced)


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
    out, state = apply(state, jnp.asarray(U), None, w, None, pack_ctx(P, t, **side_inputs))
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
    want, _ = mean.apply((), jnp.asarray(U), None, jnp.ones(5), None, pack_ctx())
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
  out, _ = jax.jit(agg.apply)(agg.init(12), dense, masks, jnp.ones(4), None, pack_ctx(3))
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
    agg.apply(agg.init(4), jnp.asarray(U), None, jnp.ones(2), None, pack_ctx())


def test_clip_by_l2_norm():
  U = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
  c, s = jax.jit(clip_by_l2_norm)(U, 1.0)
  np.testing.assert_allclose(np.asarray(c), [[0.6, 0.8], [0, 0], [0.3, 0.4]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s), [0.2, 1.0, 1.0], rtol=1e-6)
  c, _ = clip_by_l2_norm(U, math.inf)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(U))


# ---------------------------------------------------------------------------
# FetchSGD


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
