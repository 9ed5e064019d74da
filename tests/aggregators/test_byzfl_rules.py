"""ByzFL's rules as ours: MDA, MoNNA, Meamed, CAF, SMEA and the ARC
pre-aggregator (fedjax_sparse/aggregators/{mda,monna,meamed,caf,smea,arc}.py).

Hand-computed cases (ByzFL's docstring examples among them), the numpy
oracles of fedjax_sparse/testing/aggregator_refs.py (plain loops and enumerations), and
ByzFL itself (skipped when it is not installed). Where the rules differ from
ByzFL, by design (their docstrings say why):

* CAF: the top eigenpair is exact (ByzFL: one power step from a random
  vector, exact at ``d = 1``), and ``tau_max`` is taken over the clients still
  weighted (ByzFL: over all); compared at ``d = 1`` where both agree, and
  shown on a case where they do not.
* SMEA: the top eigenvalue is exact (ByzFL: ``||Sigma v||`` for a random unit
  ``v``); compared at ``d = 1``, where ByzFL's is exact, and where the
  outliers are so far that no estimate can prefer them.
* Meamed: equal distances to the median go to the smaller value (ByzFL: by
  position); the inputs have no such ties.

Shapes are tiny and shared between tests so that few programs compile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators import arc as arc_lib
from fedjax_sparse.aggregators.base import AggContext, AggOut, stateless
from fedjax_sparse.metrics.escape import selection_escape_metrics
from fedjax_sparse.testing import byzfl as byzfl_loader
from fedjax_sparse.testing import aggregator_refs as refs
from tests.helpers import KEY, assert_close

BYZFL = byzfl_loader.load()
needs_byzfl = pytest.mark.skipif(BYZFL is None, reason="ByzFL not installed")
RULES = ("mda", "monna", "meamed", "caf", "smea")
# ByzFL's docstring example (f = 1).
X3 = np.array([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]], np.float32)


@functools.lru_cache(maxsize=None)
def _jitted(name, hp):
  agg = agg_lib.get(name)(**dict(hp))
  return agg, jax.jit(agg.apply)


def run(name, u, f, masks=None, weights=None, pack_size=1, malicious=None,
        **hp):
  agg, apply = _jitted(name, tuple(sorted(hp.items())))
  u = jnp.asarray(u, jnp.float32)
  k, d = u.shape
  w = jnp.ones((k,)) if weights is None else jnp.asarray(weights, jnp.float32)
  # Always a malicious mask (no one by default): one program per shape.
  mal = np.zeros(k, bool) if malicious is None else malicious
  ctx = AggContext(round=jnp.int32(0), malicious=jnp.asarray(mal),
                   pack_size=pack_size, num_byzantine=f, num_clients=k)
  out, _ = apply(agg.init(d), u, None if masks is None else jnp.asarray(masks),
                 w, KEY, ctx)
  # The diagnostics as the round step records them.
  diagnostics = dict(out.diagnostics, **selection_escape_metrics(
      agg, out.acceptance, ctx.malicious))
  return (np.asarray(out.update), np.asarray(out.acceptance),
          jax.tree.map(np.asarray, diagnostics))


def _capture():
  """A base rule whose "update" is the flattened rows it is given (to read
  what a pre-aggregator hands on)."""
  return stateless(lambda u, m, w, key, ctx: AggOut(
      u.reshape(-1), jnp.ones((u.shape[0],)), {}))


@functools.lru_cache(maxsize=None)
def _jitted_arc(base_name):
  base = _capture() if base_name is None else agg_lib.get(base_name)()
  agg = agg_lib.get_pre("arc")(base)
  return agg.init, jax.jit(agg.apply)


def run_arc(u, f, base=None):
  init, apply = _jitted_arc(base)
  k, d = u.shape
  ctx = AggContext(round=jnp.int32(0), num_byzantine=f, num_clients=k)
  out, _ = apply(init(d), jnp.asarray(u, jnp.float32), None, jnp.ones((k,)),
                 KEY, ctx)
  upd = np.asarray(out.update)
  return (upd.reshape(k, d) if base is None else upd), out.diagnostics


def _inputs(k, d, seed, n_far=2):
  rs = np.random.RandomState(seed)
  u = rs.randn(k, d).astype(np.float32)
  u[:n_far] = u[:n_far] * 3 + 8  # far rows, as attackers would send
  return u


def _ref(name, u, f, **hp):
  """The oracle's output and selection (or weights)."""
  k = len(u)
  if name == "meamed":
    return refs.np_meamed(u, f), np.ones(k)
  if name == "caf":
    c, _ = refs.np_caf(u, f)
  elif name == "mda":
    c, _ = refs.np_mda(u, f, **hp)
  elif name == "smea":
    c, _ = refs.np_smea(u, f, **hp)
  else:
    c = refs.np_monna(u, f, **hp)
  ok = np.all(np.isfinite(u), axis=1)
  return refs.np_combine(np.where(ok[:, None], u, 0), None, np.ones(k), c, 1), c


# ---------------------------------------------------------------- hand cases


def test_byzfl_docstring_examples():
  # MDA / SMEA: {0, 1} and {1, 2} tie, the first wins. MoNNA(pivot=1): rows
  # 0 and 2 equally near, the lower index wins. Meamed: 1 and 7 equally far
  # from the median 4, the smaller wins. CAF: rows 0 and 2 are zeroed in the
  # first pass, which ends the loop: the mean. ARC: n_clip = 1, the largest
  # row clipped to norm sqrt(77).
  assert_close(run("mda", X3, 1)[0], [2.5, 3.5, 4.5])
  assert_close(run("smea", X3, 1)[0], [2.5, 3.5, 4.5])
  assert_close(run("monna", X3, 1, pivot=1)[0], [2.5, 3.5, 4.5])
  assert_close(run("meamed", X3, 1)[0], [2.5, 3.5, 4.5])
  out, acc, diag = run("caf", X3, 1)
  assert_close(out, [4.0, 5.0, 6.0])
  assert int(diag["passes"]) == 1
  rows, diag = run_arc(X3, 1)
  assert_close(rows, [[1, 2, 3], [4, 5, 6], [4.41004009, 5.04004582, 5.67005155]])
  assert_close(diag["arc_clip_norm"], np.sqrt(77.0))


def test_hand_cases_in_one_dimension():
  u = np.array([[0.], [1.], [3.], [10.]], np.float32)  # f = 1: drop the 10
  for name in ("mda", "smea"):
    out, acc, _ = run(name, u, 1)
    assert_close(out, [4.0 / 3.0])
    np.testing.assert_array_equal(acc, [1, 1, 1, 0])
  # Meamed: median 2, the 3 closest are 1 and 3 (1 away) and 0 (2 away).
  assert_close(run("meamed", u, 1)[0], [4.0 / 3.0])


def test_caf_two_passes_by_hand():
  # d = 1, K = 5, f = 1: the loop runs while sum(c) > 3.
  # Pass 1: mu = 1.6, tau = (x - 1.6)^2, tau_max = 40.96 (the 8), so
  # c = 1 - tau / 40.96 = [855, 1015, 855, 1015, 0] / 1024, sum 3.652 > 3.
  # Pass 2: mu = (2 * 1015 - 2 * 855) / (2 * 1015 + 2 * 855) = 320 / 3740,
  # the smaller lambda (0.993 against 11.04); the +-1 rows are then cut to
  # sum(c) = 0.576 and the loop ends.
  u = np.array([[-1.], [1.], [-1.], [1.], [8.]], np.float32)
  out, acc, diag = run("caf", u, 1)
  assert_close(out, [320.0 / 3740.0])
  assert_close(acc, np.array([855, 1015, 855, 1015, 0]) / 1024.0)
  assert int(diag["passes"]) == 2
  c, lam = refs.np_caf(u, 1)
  assert_close(acc, c)
  assert_close(diag["lambda_max"], lam, 1e-4)


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("case", [
    ("mda", ()), ("mda", (("max_subsets", 1),)), ("smea", ()),
    ("smea", (("max_subsets", 1),)), ("monna", ()), ("monna", (("pivot", None),)),
    ("meamed", ()), ("caf", ())], ids=lambda c: c[0] + "".join(
        f"_{k}={v}" for k, v in c[1]))
def test_against_the_numpy_oracles(case):
  name, hp = case
  hp = dict(hp)
  for seed in range(3):
    u = _inputs(8, 6, seed, n_far=2 if seed < 2 else 0)
    if seed == 2:  # f rows without a position
      u[3] = np.nan
      u[5, 1] = np.inf
    want, sel = _ref(name, u, 2, **hp)
    got, acc, diag = run(name, u, 2, **hp)
    assert_close(got, want, 1e-4)
    assert_close(acc, sel, 1e-4)
    assert np.all(np.isfinite(got))
    if "exact" in diag:
      assert bool(diag["exact"]) == ("max_subsets" not in hp)


def test_mda_scores_many_subsets_in_chunks():
  # C(15, 8) = 6435 subsets: scored in chunks of 4096 (lax.map).
  u = _inputs(15, 2, 9, n_far=5)
  got, acc, diag = run("mda", u, 7)
  sel, exact = refs.np_mda(u, 7)
  assert exact and bool(diag["exact"])
  np.testing.assert_array_equal(acc, sel)
  assert_close(got, u[sel > 0].mean(0), 1e-5)
  if BYZFL is not None:
    assert_close(got, BYZFL.MDA(f=7)(u.copy()), 1e-5)


@pytest.mark.parametrize("name", RULES)
def test_more_than_f_but_fewer_than_half_non_finite_rows(name):
  # f = 2 of K = 8 assumed, 3 rows without a position: the output stays
  # finite, no such row is averaged, and the oracles agree.
  u = _inputs(8, 6, 7, n_far=0)
  u[[1, 4]] = np.nan
  u[6] = np.inf
  got, acc, _ = run(name, u, 2)
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(acc))
  if name != "meamed":
    assert np.all(acc[[1, 4, 6]] == 0)
  assert_close(got, _ref(name, u, 2)[0], 1e-4)


def test_selection_rules_weigh_and_follow_sparse_uploads():
  # The selected clients are combined like every selection rule: weighted,
  # and per pack over the clients that sent it (FLARE Alg. 2).
  u = _inputs(8, 6, 11)
  rs = np.random.RandomState(0)
  w = rs.uniform(0.5, 2.0, 8).astype(np.float32)
  masks = rs.rand(8, 3) < 0.6
  dense = u * np.repeat(masks, 2, axis=1)
  for name in ("mda",):  # MoNNA and SMEA combine through the same code
    _, sel = _ref(name, dense, 2)
    got, _, _ = run(name, dense, 2, masks=masks, weights=w, pack_size=2)
    assert_close(got, refs.np_combine(dense, masks, w, sel, 2), 1e-4)
  c, _ = refs.np_caf(dense, 2)  # CAF ignores the weights
  got, _, _ = run("caf", dense, 2, masks=masks, weights=w, pack_size=2)
  assert_close(got, refs.np_combine(dense, masks, np.ones(8), c, 2), 1e-4)


def test_monna_pivot():
  u = _inputs(8, 6, 5)  # rows 0 and 1 are far
  # The default pivot, row 0, is far: its neighbourhood is what it is.
  got, acc, diag = run("monna", u, 2)
  assert int(diag["pivot"]) == 0 and acc[0] == 1 and acc[1] == 1
  # pivot=None picks an honest centre, whose neighbours are the honest rows.
  got, acc, diag = run("monna", u, 2, pivot=None)
  np.testing.assert_array_equal(acc, [0, 0, 1, 1, 1, 1, 1, 1])
  # A pivot without a position falls back to that choice.
  v = u.copy()
  v[0, 2] = np.nan
  got0, acc0, diag0 = run("monna", v, 2)
  np.testing.assert_array_equal(acc0, acc)
  assert int(diag0["pivot"]) == int(diag["pivot"])
  assert_close(got0, got)


def test_escape_ratio_and_diagnostics():
  u = _inputs(8, 6, 3)
  mal = np.arange(8) < 2
  for name, hp in (("mda", {}), ("monna", {"pivot": None}), ("smea", {})):
    _, _, diag = run(name, u, 2, malicious=mal, **hp)
    assert float(diag["escape_ratio"]) == 0.0
  _, _, diag = run("mda", u, 2)
  sel, _ = refs.np_mda(u, 2)
  d2, _ = refs.np_usable_sq_dists(u)
  idx = np.flatnonzero(sel)
  assert_close(diag["diameter"], np.sqrt(d2[np.ix_(idx, idx)].max()), 1e-4)


def test_errors_say_what_to_change():
  u = jnp.zeros((6, 3))
  for name in RULES:
    agg = agg_lib.get(name)()
    ctx = AggContext(round=jnp.int32(0), num_byzantine=3, num_clients=6)
    with pytest.raises(ValueError, match=rf"{name}: needs an honest majority, "
                       r"2f < K; got K=6, f=3"):
      jax.eval_shape(agg.apply, agg.init(3), u, None, jnp.ones(6), KEY, ctx)
  ctx = AggContext(round=jnp.int32(0), num_byzantine=1, num_clients=6)
  agg = agg_lib.get("monna")(pivot=6)
  with pytest.raises(ValueError, match="pivot=6 is not a row"):
    jax.eval_shape(agg.apply, (), u, None, jnp.ones(6), KEY, ctx)
  with pytest.raises(ValueError, match="pivot must be an index"):
    agg_lib.get("monna")(pivot=-1)
  with pytest.raises(ValueError, match="max_subsets must be an int >= 1"):
    agg_lib.get("mda")(max_subsets=0)
  agg = agg_lib.get_pre("arc")(agg_lib.get("median")(), f=7)
  with pytest.raises(ValueError, match="arc: f=7 exceeds the K=6"):
    jax.eval_shape(agg.apply, (), u, None, jnp.ones(6), KEY, ctx)


# ---------------------------------------------------------------- ARC


def test_arc_against_the_oracle_and_its_bound():
  assert [arc_lib.num_clipped(10, f) for f in range(6)] == [0, 1, 3, 4, 4, 5]
  for seed in range(3):
    u = _inputs(8, 6, seed)
    if seed == 2:
      u[0] = 1e30  # a huge row is clipped like any other
      u[1] = np.nan  # a row without a norm stays non-finite
    rows, _ = run_arc(u, 2)
    want = refs.np_arc(u, 2)
    np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5)
    # n_clip = 3 >= f = 2: every finite row ends within the honest norms.
    honest = np.linalg.norm(u[2:], axis=1).max()
    ok = np.all(np.isfinite(rows), axis=1)
    assert np.all(np.linalg.norm(rows[ok], axis=1) <= honest * (1 + 1e-6))
  # Composed with a rule: the mean of the clipped rows.
  u = _inputs(8, 6, 4)
  got, diag = run_arc(u, 2, base="nwfedavg")
  assert_close(got, refs.np_arc(u, 2).mean(0), 1e-5)
  assert np.isfinite(diag["arc_clip_norm"])


# ---------------------------------------------------------------- ByzFL


@needs_byzfl
def test_mda_monna_meamed_match_byzfl():
  for seed in range(3):
    u = _inputs(8, 6, 20 + seed)
    if seed == 1:
      u[3:5] = u[2]  # duplicate rows: tied distances
    assert_close(run("mda", u, 2)[0], BYZFL.MDA(f=2)(u.copy()))
    assert_close(run("monna", u, 2)[0], BYZFL.MoNNA(f=2, idx=0)(u.copy()))
    assert_close(run("monna", u, 2, pivot=4)[0], BYZFL.MoNNA(f=2, idx=4)(u.copy()))
    assert_close(run("meamed", u, 2)[0], BYZFL.Meamed(f=2)(u.copy()))


@needs_byzfl
def test_smea_matches_byzfl():
  np.random.seed(0)  # ByzFL's power step draws from numpy's global state
  for seed in range(3):
    # d = 1: ByzFL's eigenvalue estimate is the variance, exact.
    u = _inputs(8, 1, 50 + seed)
    assert_close(run("smea", u, 2)[0], BYZFL.SMEA(f=2)(u.copy()), 1e-4)
    # d = 6, outliers 1e3 away: any estimate avoids them.
    u = _inputs(8, 6, 60 + seed)
    u[:2] += 1e3
    assert_close(run("smea", u, 2)[0], BYZFL.SMEA(f=2)(u.copy()), 1e-4)


@needs_byzfl
def test_caf_against_byzfl_in_one_dimension():
  np.random.seed(0)
  rs = np.random.RandomState(2)
  for seed in range(4):
    u = (rs.randn(8, 1) * rs.choice([1.0, 5.0], (8, 1))).astype(np.float32)
    # The oracle with ByzFL's tau_max (over all rows) is ByzFL's loop.
    c, _ = refs.np_caf(u, 2, tau_max_over="all")
    assert_close(refs.np_combine(u, None, np.ones(8), c, 1), BYZFL.CAF(f=2)(u.copy()),
                 1e-4)
  # One pass (the loop stops at once): both return the mean.
  assert_close(run("caf", X3, 1)[0], BYZFL.CAF(f=1)(X3.copy()))
  # Where a removed row stays the farthest, ByzFL's steps shrink: the
  # results differ (see test_caf_two_passes_by_hand for ours).
  u = np.array([[-1.], [1.], [-1.], [1.], [8.]], np.float32)
  theirs = BYZFL.CAF(f=1)(u.copy())
  c, _ = refs.np_caf(u, 1, tau_max_over="all")
  assert_close(theirs, refs.np_combine(u, None, np.ones(5), c, 1), 1e-4)
  assert abs(float(theirs[0]) - 320.0 / 3740.0) > 1e-3


@needs_byzfl
def test_arc_matches_byzfl():
  for seed in range(3):
    u = _inputs(8, 6, 30 + seed)
    rows, _ = run_arc(u, 2)
    assert_close(rows, BYZFL.ARC(f=2)(u.copy()), 1e-5)


@needs_byzfl
def test_a_difference_is_seen():
  """The comparison can fail: MDA with f = 1 is not MDA with f = 2."""
  u = _inputs(8, 6, 40, n_far=1)
  u[1] += 2.0
  with pytest.raises(AssertionError):
    assert_close(run("mda", u, 1)[0], BYZFL.MDA(f=2)(u.copy()))
