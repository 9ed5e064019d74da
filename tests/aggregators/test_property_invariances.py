"""Properties every registered aggregation rule keeps, whatever it is sent:
weights, pre-aggregators, invariances and small shapes (bounds under
outliers, a finite state and what each rule claims:
test_property_bounds.py; the claims, the runner and the inputs:
tests/helpers.py).

* Weights: all zero, or zero on a non-finite row, give a finite output.
* The pre-aggregators (bucketing, NNM, clip, ARC) around median and fedavg
  stay finite.
* Permutation invariance with equal weights (the same PRNG key).
* Translation equivariance ``rule(u + c) = rule(u) + c`` for the rules that
  have it (:data:`TRANSLATION`): median, trimmed mean, fedavg, nwfedavg,
  fednova (equal step counts), Krum, Multi-Krum, Bulyan, bulyan_fast, RFA,
  GAS, DnC, MDA, MoNNA, Meamed, CAF, SMEA, and centered clipping with its
  reference shifted too.
* Small shapes: ``K = 1``, ``K = 2`` and ``d = 1`` give finite outputs; only
  the Krum-based rules refuse ``K < 3`` (:data:`MIN_K`), with a
  ``ValueError`` that says what to change.

Sizes are tiny (``K = 9``, ``d = 6``; Bulyan ``K = 11``) and examples few, with
``derandomize=True``, so that the two files run in about a minute on 2 cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_sparse.aggregators as agg_lib
from tests.helpers import KINDS, RULES
# Under the names the tests use: Hypothesis derives a test's examples from its
# source, so new names would draw other examples.
from tests.helpers import PROPERTY_D as D, PROPERTY_K as K, PROPERTY_KEY as KEY
from tests.helpers import breakdown_f as _breakdown_f, claim_or_skip as _claim
from tests.helpers import honest_rows as _honest, outlier_weights as _weights
from tests.helpers import poison_rows as _poison, property_apply as _apply
from tests.helpers import property_ctx as _ctx, property_jitted as _jitted
from tests.helpers import state_finite as _state_finite

TRANSLATION = ("median", "trimmed_mean", "fedavg", "nwfedavg", "fednova",
               "krum", "multi_krum", "bulyan", "bulyan_fast", "rfa", "gas",
               "dnc", "centered_clipping", "mda", "monna", "meamed", "caf",
               "smea")


@functools.lru_cache(maxsize=None)
def _jitted_pre(pre, base):
  agg = agg_lib.get_pre(pre)(agg_lib.get(base)())
  return agg.init, jax.jit(agg.apply)


@pytest.mark.parametrize("base", ["median", "fedavg"])
@pytest.mark.parametrize("pre", agg_lib.pre_names())
def test_pre_aggregators_stay_finite(pre, base):
  # Bucketing and NNM around a robust and a plain base: finite only (a
  # bucket of s clients spreads one outlier to s rows).
  init, apply = _jitted_pre(pre, base)
  f = 2
  for seed, kind in enumerate(KINDS):
    rs = np.random.RandomState(seed)
    honest, spread = _honest(rs, K, D)
    u, bad = _poison(rs, honest, spread, f, kind)
    w = _weights(rs, K, bad, zero_bad=bool(seed % 2))
    out, _ = apply(init(D), jnp.asarray(u), None, jnp.asarray(w), KEY,
                   _ctx(K, f))
    assert np.all(np.isfinite(np.asarray(out.update))), (pre, base, kind)
    assert np.all(np.isfinite(np.asarray(out.acceptance))), (pre, base, kind)


@pytest.mark.parametrize("name", RULES)
def test_zero_weights(name):
  claim = _claim(name)
  k = claim.k
  f = _breakdown_f(name, claim.hp, k)
  rs = np.random.RandomState(0)
  honest, _ = _honest(rs, k, D)
  out, acc, state = _apply(name, claim.hp, honest, np.zeros(k), f,
                           server_update=honest.mean(0))
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(acc)), (out, acc)
  assert _state_finite(state)
  u = honest.copy()
  u[0] = np.nan
  u[1, 2] = np.inf
  w = np.ones(k, np.float32)
  w[:2] = 0.0
  out, acc, state = _apply(name, claim.hp, u, w, f,
                           server_update=honest.mean(0))
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(acc)), (out, acc)
  assert _state_finite(state)


@pytest.mark.parametrize("name", RULES)
def test_permutation_invariance(name):
  claim = _claim(name)
  k = claim.k
  f = _breakdown_f(name, claim.hp, k)

  @settings(max_examples=6, deadline=None, derandomize=True)
  @given(seed=st.integers(0, 2**31 - 1),
         kind=st.sampled_from(("none",) + KINDS))
  def check(seed, kind):
    rs = np.random.RandomState(seed)
    honest, spread = _honest(rs, k, D)
    n_bad = 0 if kind == "none" else f
    u, _ = _poison(rs, honest, spread, n_bad, kind if n_bad else "nan")
    w = np.ones(k, np.float32)
    steps = rs.randint(1, 5, k).astype(np.float32)
    g0 = honest.mean(0)
    perm = rs.permutation(k)
    out1, acc1, _ = _apply(name, claim.hp, u, w, f, steps=steps,
                           server_update=g0)
    out2, acc2, _ = _apply(name, claim.hp, u[perm], w, f, steps=steps[perm],
                           server_update=g0)
    scale = 1.0 + np.abs(honest).max()
    np.testing.assert_allclose(out1, out2, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f"{name} {kind}")
    # Soft weights (RFA) may take one Weiszfeld step more or less.
    np.testing.assert_allclose(np.sort(acc1), np.sort(acc2), rtol=0,
                               atol=1e-3, err_msg=f"{name} {kind}")

  check()


@pytest.mark.parametrize("name", TRANSLATION)
def test_translation_equivariance(name):
  claim = _claim(name)
  k = claim.k
  f = _breakdown_f(name, claim.hp, k)
  init, _ = _jitted(name, claim.hp)

  @settings(max_examples=6, deadline=None, derandomize=True)
  @given(seed=st.integers(0, 2**31 - 1))
  def check(seed):
    rs = np.random.RandomState(seed)
    honest, spread = _honest(rs, k, D)
    u = honest
    w = rs.uniform(0.5, 2.0, k).astype(np.float32)
    c = rs.uniform(-5, 5, D).astype(np.float32)
    state = init(D)
    if name == "centered_clipping":  # the reference moves with the rows
      state = jnp.asarray(honest.mean(0) + 0.3 * rs.randn(D), jnp.float32)
      shifted_state = state + c
    else:
      shifted_state = state
    out1, _, _ = _apply(name, claim.hp, u, w, f, state=state)
    out2, _, _ = _apply(name, claim.hp, u + c, w, f, state=shifted_state)
    scale = 1.0 + np.abs(u).max() + np.abs(c).max()
    np.testing.assert_allclose(out2, out1 + c, rtol=0, atol=2e-5 * scale,
                               err_msg=name)

  check()


# Rules that refuse fewer clients (Krum's K >= 2f + 3 at f = 0); every other
# rule must run at K = 1.
MIN_K = {"krum": 3, "multi_krum": 3, "bulyan": 3, "bulyan_fast": 3, "gas": 3}


@pytest.mark.parametrize("shape", [(1, D), (2, 1)],
                         ids=lambda s: f"K{s[0]}_d{s[1]}")
@pytest.mark.parametrize("name", RULES)
def test_small_shapes(name, shape):
  claim = _claim(name)
  k, d = shape
  rs = np.random.RandomState(k * 10 + d)
  u = rs.randn(k, d).astype(np.float32)
  w = rs.uniform(0.5, 2.0, k).astype(np.float32)
  if k < MIN_K.get(name, 1):
    with pytest.raises(ValueError, match=rf"K >= .*K={k}, f=0"):
      _apply(name, claim.hp, u, w, 0, server_update=u.mean(0))
    return
  out, acc, state = _apply(name, claim.hp, u, w, 0, server_update=u.mean(0))
  assert out.shape == (d,) and acc.shape == (k,)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(acc)), (out, acc)
  assert _state_finite(state)
