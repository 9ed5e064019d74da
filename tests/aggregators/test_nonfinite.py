"""Known failures of the rules under non-finite and huge uploads, one test each.

Each case was seen to fail before its fix (the property suite,
tests/aggregators/test_property_*.py, covers every rule more broadly). Tiny
fixed shapes so that each rule compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators.base import AggContext, combine, combine_finite
from fedjax_sparse.aggregators.clipping import clip_by_l2_norm
from tests.helpers import KEY

K, D = 6, 5


@functools.lru_cache(maxsize=None)
def _jitted(name, hp=(), pre=()):
  agg = agg_lib.get(name)(**dict(hp))
  for pre_name, pre_hp in pre:
    agg = agg_lib.get_pre(pre_name)(agg, **dict(pre_hp))
  return agg.init, jax.jit(agg.apply)


def run(name, u, w=None, f=0, state=None, hp=(), pre=(), masks=None,
        local_steps=None):
  init, apply = _jitted(name, hp, pre)
  u = jnp.asarray(u, jnp.float32)
  k, d = u.shape
  w = jnp.ones((k,)) if w is None else jnp.asarray(w, jnp.float32)
  steps = jnp.ones((k,)) if local_steps is None else jnp.asarray(local_steps)
  ctx = AggContext(round=jnp.int32(0), local_steps=steps,
                   num_byzantine=f, num_clients=k)
  state = init(d) if state is None else state
  out, state = apply(state, u, masks, w, KEY, ctx)
  return np.asarray(out.update), np.asarray(out.acceptance), state


def _honest(seed=0, k=K, d=D):
  rs = np.random.RandomState(seed)
  return (0.5 + 0.1 * rs.randn(k, d)).astype(np.float32)


def _finite_tree(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- the means


@pytest.mark.parametrize("masks", [False, True])
def test_combine_leaves_nonfinite_rows_out_even_with_zero_weight(masks):
  u = _honest()
  u[1] = np.nan
  u[3, 2] = np.inf
  w = np.array([1.0, 0.0, 2.0, 0.0, 1.0, 3.0], np.float32)  # 0 * nan = nan
  m = np.ones((K, D), bool) if masks else None
  out, used = jax.jit(combine_finite, static_argnums=4)(
      jnp.asarray(u), None if m is None else jnp.asarray(m), jnp.asarray(w),
      jnp.ones((K,)), 1)
  keep = np.array([0, 2, 4, 5])
  expect = (w[keep] @ u[keep]) / w[keep].sum()
  np.testing.assert_allclose(out, expect, rtol=1e-6)
  np.testing.assert_array_equal(used, [1, 0, 1, 0, 1, 1])
  np.testing.assert_allclose(combine(jnp.asarray(u), None, jnp.asarray(w),
                                     jnp.ones((K,))), expect, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "nwfedavg", "fednova"])
def test_means_leave_nonfinite_rows_out(name):
  u = _honest()
  u[0] = np.inf
  u[4, 1] = np.nan
  w = np.array([0.0, 1.0, 2.0, 1.0, 0.0, 1.0], np.float32)
  out, acc, _ = run(name, u, w)
  keep = np.array([1, 2, 3, 5])
  wk = w[keep] if name != "nwfedavg" else np.ones(4, np.float32)
  np.testing.assert_allclose(out, wk @ u[keep] / wk.sum(), rtol=1e-6)
  np.testing.assert_array_equal(acc, [0, 1, 1, 1, 0, 1])


def test_fednova_with_all_weights_zero_is_zero_not_nan():
  out, acc, _ = run("fednova", _honest(), np.zeros(K))
  np.testing.assert_array_equal(out, 0.0)
  assert np.all(np.isfinite(acc))


def test_fednova_renormalises_over_the_finite_rows():
  u = _honest()
  steps = np.array([1, 2, 3, 1, 2, 4], np.float32)
  w = np.array([1, 2, 1, 3, 1, 1], np.float32)
  bad = u.copy()
  bad[2] = np.nan
  got, _, _ = run("fednova", bad, w, local_steps=steps)
  keep = np.array([0, 1, 3, 4, 5])
  want, _, _ = run("fednova", u[keep], w[keep], local_steps=steps[keep])
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------- clipping


def test_clip_by_l2_norm_clips_huge_rows_and_leaves_finite_ones_as_before():
  u = _honest()
  u[1] = 1e30
  u[2] = -3e20
  clipped, scale = map(np.asarray, jax.jit(clip_by_l2_norm)(jnp.asarray(u), 1.0))
  norms = np.linalg.norm(np.asarray(clipped, np.float64), axis=1)
  np.testing.assert_allclose(norms[[1, 2]], 1.0, rtol=1e-6)
  np.testing.assert_allclose(clipped[1], np.full(D, 1 / np.sqrt(D)), rtol=1e-6)
  # Rows whose plain norm is finite: the same numbers as the plain formula.
  plain = np.sqrt(np.sum(np.square(u[[0, 3, 4, 5]]), axis=1))
  np.testing.assert_allclose(scale[[0, 3, 4, 5]], np.minimum(1.0, 1.0 / plain),
                             rtol=1e-6)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_clipping_leaves_a_nonfinite_row_out(bad):
  u = _honest()
  u[3] = bad
  out, acc, _ = run("clipping", u, hp=(("clip_norm", 1.0),))
  assert np.all(np.isfinite(out)), out
  assert acc[3] == 0 and np.all(acc[[0, 1, 2, 4, 5]] == 1)
  keep = [0, 1, 2, 4, 5]
  want, _, _ = run("clipping", u[keep], hp=(("clip_norm", 1.0),))
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_clipping_clips_a_huge_row_to_the_bound():
  u = _honest()
  u[0] = -1e30
  out, _, _ = run("clipping", u, hp=(("clip_norm", 1.0),))
  clipped = u.copy()
  norms = np.linalg.norm(u[1:].astype(np.float64), axis=1)
  clipped[1:] = u[1:] * np.minimum(1, 1 / norms)[:, None]
  clipped[0] = -1 / np.sqrt(D)
  np.testing.assert_allclose(out, clipped.mean(0), rtol=1e-5)


# ---------------------------------------------------------------- SparseFed


SPARSEFED = [("sparsefed", (("k", 2), ("clip_norm", 1.0))),
             ("fetchsgd", (("k", 2), ("clip_norm", 1.0), ("cols", 16))),
             ("fetchsgd", (("k", 2), ("clip_norm", 1.0), ("cols", 16),
                           ("mode", "true_topk")))]


@pytest.mark.parametrize("bad", [np.inf, np.nan, 1e30])
@pytest.mark.parametrize("name,hp", SPARSEFED)
def test_sparsefed_state_stays_finite_after_one_bad_update(name, hp, bad):
  state = None
  for r in range(4):
    u = _honest(r)
    if r == 0:
      u[2] = bad
    out, acc, state = run(name, u, state=state, hp=hp)
    assert np.all(np.isfinite(out)), (r, out)
    assert _finite_tree(state), (r, state)
    assert np.linalg.norm(out) <= (r + 1) * 1.0 / (1 - 0.9) * D + 1e-4
  if name == "sparsefed" and not np.isfinite(bad):
    # The honest rounds after the bad one are unaffected by it.
    assert acc.min() == 1


# ---------------------------------------------------------------- others


@pytest.mark.parametrize("base", ["fedavg", "median"])
def test_nnm_does_not_spread_one_nan_coordinate(base):
  # f = 0: every client mixes all K rows; one nan coordinate used to make
  # every mixed row nan, so the output was nan (or 0) in every coordinate.
  u = _honest()
  u[0, 1] = np.nan
  w = np.arange(1, K + 1, dtype=np.float32)
  out, _, _ = run(base, u, w, f=0, pre=(("nnm", ()),))
  mean = w[1:] @ u[1:] / w[1:].sum()
  np.testing.assert_allclose(out, mean, rtol=1e-5)


def test_bucketing_averages_the_finite_members_of_a_bucket():
  u = _honest()
  u[2] = np.nan
  out, _, _ = run("fedavg", u, pre=(("bucketing", (("s", 2),)),))
  assert np.all(np.isfinite(out)), out


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan_fast", "gas"])
def test_krum_rules_need_2f_plus_3(name):
  # K = 2f + 1: f copies of one far vector score 0 and used to be selected.
  u = _honest(0, k=7)
  u[:3] = 50.0
  hp = (("p", 2),) if name == "gas" else ()
  with pytest.raises(ValueError, match=r"K >= 2f \+ 3.*K=7, f=3"):
    run(name, u, f=3, hp=hp)
  u[2] = _honest(1, k=1)[0]
  out, _, _ = run(name, u, f=2, hp=hp)  # K = 2f + 3, two copies
  h = u[2:]
  assert np.all((out >= h.min(0) - 1e-6) & (out <= h.max(0) + 1e-6)), out


@pytest.mark.parametrize("bad", [-1e30, 1e30, np.nan, -np.inf])
def test_robust_dpfl_does_not_keep_a_huge_row(bad):
  # One row at -1e30 (local-model score +1e30) used to be the higher
  # cluster on its own: the output was 1e30.
  u = _honest()
  u[1, :] = bad
  out, acc, _ = run("robust_dpfl", u)
  assert acc[1] == 0
  h = np.delete(u, 1, axis=0)
  assert np.all((out >= h.min(0) - 1e-6) & (out <= h.max(0) + 1e-6)), out
  # The other clients are split as if the bad row had not been sent.
  want, acc_h, _ = run("robust_dpfl", h)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  np.testing.assert_array_equal(np.delete(acc, 1), acc_h)


def test_flguardian_accepts_the_one_client_of_a_round():
  u = _honest(k=1)
  out, acc, _ = run("flguardian", u)  # was: "k must be in [1, n=1], got 2"
  np.testing.assert_allclose(out, u[0])
  np.testing.assert_array_equal(acc, [1.0])


@pytest.mark.parametrize("bad", [1e30, -1e30, np.nan])
def test_flguardian_leaves_unusable_rows_out_of_the_clustering(bad):
  # Four identical huge rows among nine used to join a cluster of honest
  # rows with similar cosines and be averaged in.
  rs = np.random.RandomState(4)
  u = (rs.uniform(-3, 3, D) + 10.0 * rs.randn(9, D)).astype(np.float32)
  h = u[4:].copy()
  u[:4] = bad
  out, acc, _ = run("flguardian", u)
  assert not acc[:4].any()
  assert np.all((out >= h.min(0) - 1e-5) & (out <= h.max(0) + 1e-5)), out
  want, acc_h, _ = run("flguardian", h)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  np.testing.assert_array_equal(acc[4:], acc_h)
