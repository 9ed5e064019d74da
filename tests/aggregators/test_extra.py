"""GAS, DnC, FLTrust, LASA, FLGuardian: numpy references and properties.

Same fixed shapes and compile cache as test_references.py (tests/helpers.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators import _common
from fedjax_sparse.layout import layout_of
from fedjax_sparse.testing import aggregator_refs as refs
from tests.helpers import KEY, aggregator_data, np_combine, run_rule
from tests.helpers import AGG_D as D, AGG_F as F, AGG_K as K

LAYOUT = layout_of({"dense": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)},
                    "out": {"kernel": np.zeros((3, 3))}})
assert LAYOUT.d == D


def _lctx(server_update=None, f=F):
  g0 = None if server_update is None else jnp.asarray(server_update)
  return agg_lib.AggContext(round=jnp.int32(0), layout=LAYOUT, pack_size=3,
                            num_byzantine=f, num_clients=K, server_update=g0)


def _attacked(seed, n_bad=2, scale=-4.0):
  u, _, w = aggregator_data(seed)
  if n_bad:
    u[:n_bad] = scale * u[:n_bad].mean(0) + 0.1 * u[:n_bad]
  return u, w


# ---------------------------------------------------------------- GAS


def np_gas(u, w, p, base, f, key):
  perm = np.asarray(jax.random.permutation(key, u.shape[1]))
  return refs.np_gas(u, w, p, base, f, perm)


@pytest.mark.parametrize("base", ["krum", "bulyan"])
def test_gas_reference(base):
  u, w = _attacked(40)
  p = 5  # d = 24 -> groups of 5 (the last one padded)
  expect, accept, scores = np_gas(u, w, p, base, F, KEY)
  got, acc, diag, _ = run_rule("gas", u, None, w, base=base, p=p)
  np.testing.assert_allclose(diag["scores"], scores, rtol=1e-4)
  np.testing.assert_array_equal(acc, accept)
  np.testing.assert_allclose(got, expect, atol=1e-5)
  assert not acc[:2].any()


# ---------------------------------------------------------------- DnC


np_dnc = refs.np_dnc


def test_dnc_reference():
  u, w = _attacked(41)
  expect, good = np_dnc(u, w, F, [np.arange(D)])
  got, acc, _, _ = run_rule("dnc", u, None, w)
  np.testing.assert_array_equal(acc, good.astype(float))
  np.testing.assert_allclose(got, expect, atol=1e-5)
  # Subsampled coordinates, two iterations: the same draws as the rule.
  keys = jax.random.split(KEY, 2)
  cols = [np.asarray(_common.sample_coordinates(kk, D, 10)) for kk in keys]
  expect, good = np_dnc(u, w, F, cols)
  got, acc, _, _ = run_rule("dnc", u, None, w, num_coords=10, num_iters=2)
  np.testing.assert_array_equal(acc, good.astype(float))
  np.testing.assert_allclose(got, expect, atol=1e-5)


@pytest.mark.parametrize("d,b", [(1000, 10), (400, 50), (100, 50), (7, 7),
                                 (700_000, 10_000)])
def test_sample_coordinates_distinct(d, b):
  key = jax.random.PRNGKey(d + b)
  got = np.asarray(jax.jit(_common.sample_coordinates, static_argnums=(1, 2))(
      key, d, b))
  assert got.shape == (b,) and got.dtype == np.int32
  assert len(np.unique(got)) == b and got.min() >= 0 and got.max() < d
  if 8 * b <= d:  # the first b distinct of the same draws, in draw order
    key_draws, _ = jax.random.split(key)
    c = b * b / (2.0 * d)
    m = int(b + 2 * c + 10 * c ** 0.5 + 32)
    draws = np.asarray(jax.random.randint(key_draws, (m,), 0, d, jnp.int32))
    _, first = np.unique(draws, return_index=True)
    np.testing.assert_array_equal(got, draws[np.sort(first)][:b])
  with pytest.raises(ValueError, match="b <= d"):
    _common.sample_coordinates(key, 5, 6)


@pytest.mark.parametrize("d,b", [(400, 20), (40, 20)])  # draws, then keys
def test_sample_coordinates_uniform(d, b):
  n = 2000
  keys = jax.random.split(jax.random.PRNGKey(3), n)
  subsets = np.asarray(jax.vmap(
      lambda k: _common.sample_coordinates(k, d, b))(keys))
  counts = np.bincount(subsets.ravel(), minlength=d)
  expect = n * b / d
  chi2 = ((counts - expect) ** 2 / expect).sum()
  # d - 1 degrees of freedom: mean d - 1, sd sqrt(2 (d - 1)); 6 sd.
  assert chi2 < (d - 1) + 6 * math.sqrt(2 * (d - 1)), chi2
  # Every position of the subset is itself uniform (no position bias).
  first = np.bincount(subsets[:, 0], minlength=d)
  chi2 = ((first - n / d) ** 2 / (n / d)).sum()
  assert chi2 < (d - 1) + 6 * math.sqrt(2 * (d - 1)), chi2


# ---------------------------------------------------------------- FLTrust


def test_fltrust_reference():
  u, w = _attacked(42)
  g0 = u[2:].mean(0) + 0.1
  expect, trust = refs.np_fltrust(u, g0)
  got, acc, _, _ = run_rule("fltrust", u, None, w, ctx=_lctx(g0))
  np.testing.assert_allclose(acc, trust, atol=1e-6)
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="server_update"):
    run_rule("fltrust", u, None, w)


# ---------------------------------------------------------------- LASA


def np_lasa(u, sparsity=0.3, lm=1.0, ld=1.0, layout=LAYOUT):
  return refs.np_lasa(u, layout.slices(), sparsity, lm, ld)


def test_lasa_reference():
  u, w = _attacked(43)
  expect, acc_expect = np_lasa(u)
  got, acc, _, _ = run_rule("lasa", u, None, w, ctx=_lctx())
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc, acc_expect)
  # Without a layout the whole vector is one layer.
  from fedjax_sparse.layout import Layout
  one = Layout(("all",), ((D,),), (0,), (D,), ("dense",))
  expect, _ = np_lasa(u, layout=one)
  np.testing.assert_allclose(run_rule("lasa", u, None, w)[0], expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- FLGuardian


def np_flguardian_trust(u, layout=LAYOUT):
  return refs.np_flguardian_trust(u, layout.slices())


def test_flguardian_reference():
  # Clear structure in every layer, so that 2-means has one optimum.
  rs = np.random.RandomState(44)
  u = (1.0 + 0.3 * rs.randn(K, D)).astype(np.float32)
  u[:3] = -1.0 + 0.05 * rs.randn(3, D)
  w = rs.uniform(0.5, 2.0, K).astype(np.float32)
  trust = np_flguardian_trust(u)
  accept = trust >= np.median(trust)
  got, acc, diag, _ = run_rule("flguardian", u, None, w, ctx=_lctx())
  np.testing.assert_allclose(diag["trust"], trust)
  np.testing.assert_array_equal(acc, accept.astype(float))
  np.testing.assert_allclose(got, np_combine(u, None, w, accept.astype(float)), atol=1e-6)
  assert not acc[:3].any()


# ---------------------------------------------------------------- properties

RULES = [("gas", {"p": 5}), ("gas", {"p": 5, "base": "bulyan"}), ("dnc", {}),
         ("fltrust", {}), ("lasa", {}), ("flguardian", {})]


@pytest.mark.parametrize("name,hp", RULES)
def test_extra_permutation_invariance(name, hp):
  u, w = _attacked(45, n_bad=3)
  perm = np.random.RandomState(1).permutation(K)
  ctx = _lctx(u[3:].mean(0))
  out1, acc1, _, _ = run_rule(name, u, None, w, ctx=ctx, **hp)
  out2, acc2, _, _ = run_rule(name, u[perm], None, w[perm], ctx=ctx, **hp)
  np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc1[perm], acc2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,hp", RULES)
def test_extra_identical_inputs(name, hp):
  c = np.random.RandomState(3).randn(D).astype(np.float32)
  u = np.tile(c, (K, 1))
  _, _, w = aggregator_data(0)
  got = run_rule(name, u, None, w, ctx=_lctx(c), **hp)[0]
  if name == "lasa":  # LASA keeps the top 30% of every update
    n_keep = math.ceil(0.3 * D)
    c = np.where(np.abs(c) >= np.sort(np.abs(c))[D - n_keep], c, 0)
  np.testing.assert_allclose(got, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,hp", RULES)
@pytest.mark.parametrize("bad", ["inf", "nan", "huge"])
def test_extra_finite_with_f_bad_rows(name, hp, bad):
  u, w = _attacked(46, n_bad=0)
  u[[1, 6]] = {"inf": np.inf, "nan": np.nan, "huge": 1e30}[bad]
  got, acc, _, _ = run_rule(name, u, None, w, ctx=_lctx(u[2:6].mean(0)), **hp)
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(acc))
  if bad != "huge" or name not in ("lasa", "fltrust"):  # both rescale norms
    assert acc[1] == 0 and acc[6] == 0


@pytest.mark.parametrize("shape,k", [((3, 50), 1), ((3, 50), 15), ((4, 7), 7),
                                     ((2, 3, 40), 12)])
def test_lasa_kth_largest_abs_host_and_bisection(shape, k):
  from fedjax_sparse.aggregators import lasa as lasa_lib
  rs = np.random.RandomState(k)
  x = rs.randn(*shape).astype(np.float32)
  x[..., :3] = x[..., 3:6]  # ties
  x[0, 0] = -1e30
  want = -np.sort(-np.abs(x), axis=-1)[..., k - 1]
  got = jax.jit(lambda v: lasa_lib.kth_largest_abs(v, k))(x)
  np.testing.assert_array_equal(np.asarray(got), want)
  flat = x.reshape(-1, shape[-1])
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda v: lasa_lib.kth_largest_abs_bisect(v, k))(flat)),
      want.reshape(-1))
  # Under vmap (seed batches) as well.
  np.testing.assert_array_equal(
      np.asarray(jax.vmap(lambda v: lasa_lib.kth_largest_abs(v, k))(x)), want)
