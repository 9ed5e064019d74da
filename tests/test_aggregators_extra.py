"""GAS, DnC, FLTrust, LASA, FLGuardian: numpy references and properties.

Same fixed shapes and module-level compile cache as test_aggregators.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.layout import layout_of
from test_aggregators import (D, F, K, KEY, _data,
                              np_combine, np_krum_scores, np_trimmed, run)

LAYOUT = layout_of({"dense": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)},
                    "out": {"kernel": np.zeros((3, 3))}})
assert LAYOUT.d == D


def _lctx(server_update=None, f=F):
  extra = {} if server_update is None else {"server_update": jnp.asarray(server_update)}
  return agg_lib.AggContext(round=jnp.int32(0), layout=LAYOUT, pack_size=3,
                            num_byzantine=f, num_clients=K, extra=extra)


def _attacked(seed, n_bad=2, scale=-4.0):
  u, _, w = _data(seed)
  if n_bad:
    u[:n_bad] = scale * u[:n_bad].mean(0) + 0.1 * u[:n_bad]
  return u, w


# ---------------------------------------------------------------- GAS


def np_gas(u, w, p, base, f, key):
  k, d = u.shape
  perm = np.asarray(jax.random.permutation(key, d))
  size = -(-d // p)
  scores = np.zeros(k)
  for g in range(p):
    cols = perm[g * size:(g + 1) * size]
    sub = u[:, cols].astype(np.float64)
    krum = np_krum_scores(sub, f)
    if base == "krum":
      agg = sub[np.argmin(krum)]
    else:
      sel = np.argsort(krum, kind="stable")[:k - 2 * f]
      agg = np_trimmed(sub[sel], min(f, (len(sel) - 1) // 2))
    scores += np.linalg.norm(sub - agg, axis=1)
  accept = np.zeros(k)
  accept[np.argsort(scores, kind="stable")[:k - f]] = 1
  return np_combine(u, None, w, accept), accept, scores


@pytest.mark.parametrize("base", ["krum", "bulyan"])
def test_gas_reference(base):
  u, w = _attacked(40)
  p = 5  # d = 24 -> groups of 5 (the last one padded)
  expect, accept, scores = np_gas(u, w, p, base, F, KEY)
  got, acc, diag, _ = run("gas", u, None, w, base=base, p=p)
  np.testing.assert_allclose(diag["scores"], scores, rtol=1e-4)
  np.testing.assert_array_equal(acc, accept)
  np.testing.assert_allclose(got, expect, atol=1e-5)
  assert not acc[:2].any()


# ---------------------------------------------------------------- DnC


def np_dnc(u, w, f, cols_list, c=1.0):
  k = len(u)
  good = np.ones(k, bool)
  for cols in cols_list:
    sub = u[:, cols].astype(np.float64)
    centred = sub - sub.mean(0)
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    scores = (centred @ v) ** 2
    keep = np.zeros(k, bool)
    keep[np.argsort(scores, kind="stable")[:k - int(c * f)]] = True
    good &= keep
  return np_combine(u, None, w, good.astype(float)), good


def test_dnc_reference():
  u, w = _attacked(41)
  expect, good = np_dnc(u, w, F, [np.arange(D)])
  got, acc, _, _ = run("dnc", u, None, w)
  np.testing.assert_array_equal(acc, good.astype(float))
  np.testing.assert_allclose(got, expect, atol=1e-5)
  # Subsampled coordinates, two iterations: the same draws as the rule.
  keys = jax.random.split(KEY, 2)
  cols = [np.asarray(jax.random.choice(kk, D, (10,), replace=False)) for kk in keys]
  expect, good = np_dnc(u, w, F, cols)
  got, acc, _, _ = run("dnc", u, None, w, num_coords=10, num_iters=2)
  np.testing.assert_array_equal(acc, good.astype(float))
  np.testing.assert_allclose(got, expect, atol=1e-5)


# ---------------------------------------------------------------- FLTrust


def test_fltrust_reference():
  u, w = _attacked(42)
  g0 = u[2:].mean(0) + 0.1
  cos = (u @ g0) / (np.linalg.norm(u, axis=1) * np.linalg.norm(g0))
  trust = np.maximum(cos, 0)
  expect = (trust[:, None] * u / np.linalg.norm(u, axis=1)[:, None]).sum(0)
  expect *= np.linalg.norm(g0) / trust.sum()
  got, acc, _, _ = run("fltrust", u, None, w, ctx=_lctx(g0))
  np.testing.assert_allclose(acc, trust, atol=1e-6)
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="server_update"):
    run("fltrust", u, None, w)


# ---------------------------------------------------------------- LASA


def np_lasa(u, sparsity=0.3, lm=1.0, ld=1.0, layout=LAYOUT):
  u = u.astype(np.float64)
  d = u.shape[1]
  norms = np.linalg.norm(u, axis=1)
  med = np.median(norms)
  u = u * np.minimum(1, med / norms)[:, None]
  n_keep = math.ceil(sparsity * d)
  thr = np.sort(np.abs(u), axis=1)[:, d - n_keep]
  u = np.where(np.abs(u) >= thr[:, None], u, 0)

  def mz(x):
    return (x - np.median(x)) / x.std() if x.std() > 0 else np.zeros_like(x)

  out, kept_all = [], []
  for sl in layout.slices():
    xl = u[:, sl]
    s = np.sign(xl)
    rho = 0.5 * (1 + s.sum(1) / np.maximum(np.abs(s).sum(1), 1e-30))
    kept = (np.abs(mz(np.linalg.norm(xl, axis=1))) <= lm) & (np.abs(mz(rho)) <= ld)
    if not kept.any():
      kept[:] = True
    out.append(xl[kept].mean(0))
    kept_all.append(kept)
  return np.concatenate(out), np.mean(kept_all, axis=0)


def test_lasa_reference():
  u, w = _attacked(43)
  expect, acc_expect = np_lasa(u)
  got, acc, _, _ = run("lasa", u, None, w, ctx=_lctx())
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc, acc_expect)
  # Without a layout the whole vector is one layer.
  from fedjax_sparse.layout import Layout
  one = Layout(("all",), ((D,),), (0,), (D,), ("dense",))
  expect, _ = np_lasa(u, layout=one)
  np.testing.assert_allclose(run("lasa", u, None, w)[0], expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- FLGuardian


def np_flguardian_trust(u, layout=LAYOUT):
  u = u.astype(np.float64)
  benign = []
  for sl in layout.slices():
    xl = u[:, sl]
    n = np.linalg.norm(xl, axis=1)
    cos = xl @ xl.T / (n[:, None] * n[None])
    dist = np.linalg.norm(xl[:, None] - xl[None], axis=2)
    feats = np.concatenate([cos, dist / dist.max()], axis=1)
    labels = KMeans(n_clusters=2, n_init=10, random_state=0).fit(feats).labels_
    big = np.argmax(np.bincount(labels, minlength=2))
    benign.append(labels == big)
  return np.mean(benign, axis=0)


def test_flguardian_reference():
  # Clear structure in every layer, so that 2-means has one optimum.
  rs = np.random.RandomState(44)
  u = (1.0 + 0.3 * rs.randn(K, D)).astype(np.float32)
  u[:3] = -1.0 + 0.05 * rs.randn(3, D)
  w = rs.uniform(0.5, 2.0, K).astype(np.float32)
  trust = np_flguardian_trust(u)
  accept = trust >= np.median(trust)
  got, acc, diag, _ = run("flguardian", u, None, w, ctx=_lctx())
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
  out1, acc1, _, _ = run(name, u, None, w, ctx=ctx, **hp)
  out2, acc2, _, _ = run(name, u[perm], None, w[perm], ctx=ctx, **hp)
  np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc1[perm], acc2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,hp", RULES)
def test_extra_identical_inputs(name, hp):
  c = np.random.RandomState(3).randn(D).astype(np.float32)
  u = np.tile(c, (K, 1))
  _, _, w = _data(0)
  got = run(name, u, None, w, ctx=_lctx(c), **hp)[0]
  if name == "lasa":  # LASA keeps the top 30% of every update
    n_keep = math.ceil(0.3 * D)
    c = np.where(np.abs(c) >= np.sort(np.abs(c))[D - n_keep], c, 0)
  np.testing.assert_allclose(got, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,hp", RULES)
@pytest.mark.parametrize("bad", ["inf", "nan", "huge"])
def test_extra_finite_with_f_bad_rows(name, hp, bad):
  u, w = _attacked(46, n_bad=0)
  u[[1, 6]] = {"inf": np.inf, "nan": np.nan, "huge": 1e30}[bad]
  got, acc, _, _ = run(name, u, None, w, ctx=_lctx(u[2:6].mean(0)), **hp)
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(acc))
  if bad != "huge" or name not in ("lasa", "fltrust"):  # both rescale norms
    assert acc[1] == 0 and acc[6] == 0
