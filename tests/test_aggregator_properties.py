"""Properties every registered aggregation rule keeps, whatever it is sent.

Run over ``aggregators.names()`` (a new rule fails :func:`test_every_rule_has_a_claim`
until it is listed in :data:`CLAIMS`), each rule built on its own through
``aggregators.get(name)(**hparams)`` and jitted once per shape:

* Finite and bounded under outliers (breakdown): ``n_bad <= f`` of the ``K``
  rows (``f < K/2``; ``f`` is the largest the rule accepts at that ``K``, see
  :func:`_breakdown_f`) are replaced by ``+-1e30``, ``nan``, ``+-inf``, one
  ``nan`` coordinate, copies of one far vector (``1e3`` times the honest
  spread or ``1e18``; their squared norms still fit ``f32``), or a mix; the
  output and the acceptance are finite and the output lies in the rule's
  bound (``Claim.bound``, checked by :func:`_check_bound`):

  - ``box``: inside the honest rows' coordinate range (median, trimmed mean,
    Krum, Multi-Krum, Bulyan, bulyan_fast, GAS, DnC, FLGuardian, MDA, SMEA,
    CAF, MoNNA with ``pivot=None`` and, for rows beyond ``f32``'s squared
    range only, Robust-DPFL);
  - ``ball``: within twice the diagonal of the honest rows' bounding box of
    their mean (RFA: the geometric median moves at most a constant times
    the honest spread; Meamed: each coordinate within the honest width of
    the median);
  - ``norm``: norm at most the largest honest norm (LASA and FLAME clip to
    the median norm; FLAME with its noise off, ``lamb=0``);
  - ``clip``: norm at most ``L`` (clipping: a mean of rows of norm <= L);
    ``topk``: SparseFed / FetchSGD, ``||Delta_t|| <= t L / (1 - rho)``
    (times ``d`` for a count sketch's estimates, each at most ``||u||_1``);
  - ``server``: norm at most the server update's (FLTrust);
  - ``step``: at most ``tau`` per clipping iteration from the reference
    (centered clipping);
  - ``vote``: signSGD's output is ``scale`` times a sign, and a coordinate on
    whose sign every honest row agrees gets that sign;
  - ``finite``: only finite (the means, weighted or FedNova, average what
    they are sent; SafeSparse and FedSign look at masks and signs, never at
    magnitudes; FoolsGold weighs by the direction of histories, RLR flips
    the sign of a mean).

* State: 20 rounds of such inputs, the state carried, leave every state leaf
  finite (and the bound of each round holds).
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

``rfa(variant="fixed_steps")`` (3 Weiszfeld steps from the mean, the
project's earlier rule, kept bit for bit) is not robust to huge rows: its
bound test is an expected failure (strict), which also shows that the
property catches it.

Sizes are tiny (``K = 9``, ``d = 6``; Bulyan ``K = 11``) and examples few, with
``derandomize=True``, so that the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators.base import AggContext

K, D = 9, 6
HUGE = 1e30
KEY = jax.random.PRNGKey(3)
ROUNDS = 20
KINDS = ("+huge", "-huge", "nan", "inf", "-inf", "nan_coord", "copies",
         "mixed")
# Kinds that a rule meets only as "beyond f32's squared range or non-finite".
NUMERIC_KINDS = ("+huge", "-huge", "nan", "inf", "-inf", "nan_coord")
CLIP = 1.0  # L of clipping, SparseFed and FetchSGD
RHO = 0.9


@dataclasses.dataclass(frozen=True)
class Claim:
  """What a rule promises (see the module docstring).

  Attributes:
    hp: factory keyword arguments, as ``(name, value)`` pairs.
    bound: the bound of the breakdown test.
    k: clients per round of the main tests.
    kinds: the outlier kinds the bound holds for (finiteness is checked for
      every kind).
    why: a sentence on the bound, shown when it fails.
  """

  hp: tuple = ()
  bound: str = "box"
  k: int = K
  kinds: tuple = KINDS
  why: str = ""


CLAIMS = {
    "median": Claim(why="coordinate-wise median, breakdown 1/2"),
    "trimmed_mean": Claim(why="b = f values trimmed per side"),
    "krum": Claim(why="Krum selects an honest row when K > 2f + 2"),
    "multi_krum": Claim(why="the K - f lowest Krum scores are honest"),
    "bulyan": Claim(k=11, why="K >= 4f + 3"),
    "bulyan_fast": Claim(why="Multi-Krum selection, then a trimmed mean"),
    "gas": Claim(hp=(("p", 3),), why="per-group Krum, K - f lowest scores"),
    "dnc": Claim(why="the c f highest spectral scores are removed"),
    "flguardian": Claim(why="the larger cluster is benign in each layer"),
    "robust_dpfl": Claim(kinds=NUMERIC_KINDS,
                         why="rows beyond f32's squared range are unusable; "
                             "the paper's rule keeps a high-scoring attacker"),
    "rfa": Claim(bound="ball", why="geometric median, breakdown 1/2"),
    "lasa": Claim(bound="norm", why="clipped to the median norm"),
    "clipping": Claim(hp=(("clip_norm", CLIP),), bound="clip",
                      why="a mean of rows of norm <= L"),
    "sparsefed": Claim(hp=(("k", 0.3), ("clip_norm", CLIP), ("rho", RHO)),
                       bound="topk", why="clipped mean, momentum, top-k"),
    "fetchsgd": Claim(hp=(("k", 0.3), ("clip_norm", CLIP), ("rho", RHO),
                          ("cols", 8), ("rows", 3)),
                      bound="topk", why="a count sketch of the clipped mean"),
    "fltrust": Claim(bound="server", why="rows rescaled to ||g0||"),
    "centered_clipping": Claim(bound="step", why="tau per iteration"),
    "signsgd": Claim(bound="vote", why="majority vote of signs"),
    "fedavg": Claim(bound="finite", why="a mean averages what it is sent"),
    "nwfedavg": Claim(bound="finite", why="a mean averages what it is sent"),
    "fednova": Claim(bound="finite", why="a mean averages what it is sent"),
    "safesparse": Claim(bound="finite", why="masks and signs only"),
    "fedsign": Claim(bound="finite", why="signs only"),
    "flame": Claim(hp=(("lamb", 0.0),), bound="norm",
                   why="kept rows clipped to the median norm (noise off)"),
    # Without ctx.clients the K rows are history rows 0..K-1, and a
    # fresh state each call keeps the permutation test meaningful.
    "foolsgold": Claim(hp=(("num_clients", K),), bound="finite",
                       why="weights from the direction of histories"),
    "rlr": Claim(bound="finite", why="a mean with sign-flipped coordinates"),
    "signguard": Claim(bound="norm",
                       why="accepted rows clipped to the median norm"),
    "mda": Claim(why="the K - f rows of smallest diameter are honest when the "
                     "outliers are far"),
    "smea": Claim(why="the K - f rows of smallest covariance are honest when "
                      "the outliers are far"),
    "caf": Claim(why="far rows are filtered first; the best pass weighs "
                     "honest rows only"),
    # The default pivot (row 0) is trusted, not checked: a Byzantine row 0
    # moves the output anywhere (tests/test_aggregators_byzfl_rules.py).
    "monna": Claim(hp=(("pivot", None),),
                   why="the tightest K - f neighbourhood is honest"),
    "meamed": Claim(bound="ball", why="the K - f values closest to the median "
                                      "lie within the honest width of it"),
}
SKIP = {
    "class_aware_masking": "needs the model (apply_fn, unravel) and the "
                           "server's per-class validation data; its "
                           "non-finite rows are tested in "
                           "tests/test_aggregators_class_aware.py",
}
TRANSLATION = ("median", "trimmed_mean", "fedavg", "nwfedavg", "fednova",
               "krum", "multi_krum", "bulyan", "bulyan_fast", "rfa", "gas",
               "dnc", "centered_clipping", "mda", "monna", "meamed", "caf",
               "smea")
RULES = sorted(agg_lib.names())


def test_every_rule_has_a_claim():
  assert set(RULES) == set(CLAIMS) | set(SKIP)


def _claim(name):
  if name in SKIP:
    pytest.skip(SKIP[name])
  return CLAIMS[name]


# ---------------------------------------------------------------- running


@functools.lru_cache(maxsize=None)
def _jitted(name, hp):
  agg = agg_lib.get(name)(**dict(hp))
  return agg.init, jax.jit(agg.apply)


def _ctx(k, f, steps=None, server_update=None, round_=0):
  steps = jnp.asarray(np.ones(k) if steps is None else steps, jnp.float32)
  if server_update is not None:
    server_update = jnp.asarray(server_update, jnp.float32)
  return AggContext(round=jnp.int32(round_), local_steps=steps,
                    server_update=server_update, num_byzantine=f,
                    num_clients=k)


def _apply(name, hp, u, w, f, state=None, steps=None, server_update=None,
           round_=0):
  init, apply = _jitted(name, hp)
  u = jnp.asarray(u, jnp.float32)
  k, d = u.shape
  if server_update is None:
    server_update = np.zeros(d, np.float32)
  state = init(d) if state is None else state
  out, state = apply(state, u, None, jnp.asarray(w, jnp.float32), KEY,
                     _ctx(k, f, steps, server_update, round_))
  return np.asarray(out.update), np.asarray(out.acceptance), state


@functools.lru_cache(maxsize=None)
def _breakdown_f(name, hp, k, d=D):
  """The largest ``f < k/2`` the rule accepts at ``k`` clients (its claim).

  Rules that do not read ``f`` accept every value; the others raise
  ValueError when tracing with an ``f`` they cannot tolerate.
  """
  init, apply = _jitted(name, hp)
  for f in range((k - 1) // 2, -1, -1):
    try:
      jax.eval_shape(apply, init(d), jnp.zeros((k, d)), None, jnp.ones((k,)),
                     KEY, _ctx(k, f, server_update=np.zeros(d)))
      return f
    except ValueError:
      continue
  raise AssertionError(f"{name} accepts no f at K={k}")


# ---------------------------------------------------------------- inputs


def _honest(rs, k, d):
  centre = rs.uniform(-3, 3, d)
  spread = rs.choice([1e-3, 0.1, 1.0, 10.0])
  return (centre + spread * rs.randn(k, d)).astype(np.float32), spread


def _bad_row(rs, kind, honest_row, spread, far):
  d = honest_row.shape[0]
  if kind == "+huge":
    return np.full(d, HUGE)
  if kind == "-huge":
    return np.full(d, -HUGE)
  if kind == "nan":
    return np.full(d, np.nan)
  if kind == "inf":
    return np.full(d, np.inf)
  if kind == "-inf":
    return np.full(d, -np.inf)
  if kind == "nan_coord":
    row = honest_row.copy()
    row[rs.randint(d)] = np.nan
    return row
  if kind == "copies":
    return far
  raise ValueError(kind)


def _poison(rs, honest, spread, n_bad, kind):
  """Rows ``bad`` of ``honest`` replaced by outliers of ``kind``."""
  k, d = honest.shape
  bad = rs.choice(k, n_bad, replace=False)
  direction = rs.randn(d)
  direction /= np.linalg.norm(direction)
  scale = rs.choice([1e3 * max(spread, 1.0) * math.sqrt(d), 1e18])
  far = honest.mean(0) + scale * direction
  u = honest.copy()
  for i in bad:
    kd = kind if kind != "mixed" else rs.choice(NUMERIC_KINDS)
    u[i] = _bad_row(rs, kd, honest[i], spread, far)
  return u.astype(np.float32), bad


def _weights(rs, k, bad, zero_bad):
  w = rs.uniform(0.5, 2.0, k).astype(np.float32)
  if zero_bad:
    w[bad] = 0.0
  return w


# ---------------------------------------------------------------- bounds


def _check_bound(name, claim, kind, out, honest, state_before, round_, d,
                 server_update):
  """Asserts the bound of ``claim`` (see the module docstring)."""
  assert np.all(np.isfinite(out)), (name, kind, out)
  if claim.bound == "finite" or kind not in claim.kinds:
    return
  h = honest.astype(np.float64)
  out = out.astype(np.float64)
  lo, hi = h.min(0), h.max(0)
  scale = 1.0 + np.abs(h).max()
  msg = (name, kind, claim.why, out, lo, hi)
  if claim.bound == "box":
    tol = 1e-5 * scale
    assert np.all((out >= lo - tol) & (out <= hi + tol)), msg
  elif claim.bound == "ball":
    centre = h.mean(0)
    radius = 2.0 * np.linalg.norm(hi - lo) + 1e-5 * scale
    assert np.linalg.norm(out - centre) <= radius, msg
  elif claim.bound == "norm":
    top = np.linalg.norm(h, axis=1).max()
    assert np.linalg.norm(out) <= top * (1 + 1e-5) + 1e-6, msg
  elif claim.bound == "clip":
    assert np.linalg.norm(out) <= CLIP * (1 + 1e-5), msg
  elif claim.bound == "topk":
    lim = round_ * CLIP / (1 - RHO)
    if name == "fetchsgd":  # estimates <= ||u||_1 <= sqrt(d) ||u|| each
      lim *= d
    assert np.linalg.norm(out) <= lim * (1 + 1e-4), msg
  elif claim.bound == "server":
    top = np.linalg.norm(server_update.astype(np.float64))
    assert np.linalg.norm(out) <= top * (1 + 1e-5) + 1e-6, msg
  elif claim.bound == "step":
    prev = np.asarray(state_before, np.float64)
    assert np.linalg.norm(out - prev) <= 1.0 * (1 + 1e-5), msg
  elif claim.bound == "vote":
    assert np.all(np.isin(out, [-1.0, 0.0, 1.0])), msg
    agree = np.all(h > 0, axis=0) | np.all(h < 0, axis=0)
    np.testing.assert_array_equal(out[agree], np.sign(h[0, agree]),
                                  err_msg=str(msg))
  else:
    raise ValueError(claim.bound)


def _state_finite(state):
  return all(np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree.leaves(state))


_SETTINGS = settings(max_examples=4, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


def _breakdown_case(name, claim, seed, kind, n_frac, zero_bad, hp=None):
  hp = claim.hp if hp is None else hp
  k = claim.k
  f = _breakdown_f(name, hp, k)
  rs = np.random.RandomState(seed)
  honest, spread = _honest(rs, k, D)
  n_bad = int(round(n_frac * f))
  u, bad = _poison(rs, honest, spread, n_bad, kind)
  w = _weights(rs, k, bad, zero_bad)
  g0 = honest.mean(0)
  init, _ = _jitted(name, hp)
  state0 = init(D)
  out, acc, state = _apply(name, hp, u, w, f, state=state0, server_update=g0,
                           round_=0)
  keep = np.setdiff1d(np.arange(k), bad)
  _check_bound(name, claim, kind, out, honest[keep], state0, 1, D, g0)
  assert np.all(np.isfinite(acc)), (name, kind, acc)
  assert _state_finite(state), (name, kind, state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", RULES)
def test_breakdown(name, kind):
  claim = _claim(name)

  @_SETTINGS
  @given(seed=st.integers(0, 2**31 - 1), n_frac=st.sampled_from([1.0, 0.5]),
         zero_bad=st.booleans())
  def check(seed, n_frac, zero_bad):
    _breakdown_case(name, claim, seed, kind, n_frac, zero_bad)

  check()


@pytest.mark.xfail(strict=True, reason="rfa(variant='fixed_steps') starts "
                   "from the mean and runs 3 steps: one 1e30 row leaves it "
                   "near 1e26 (fedjax_sparse/aggregators/rfa.py)")
def test_breakdown_rfa_fixed_steps_is_not_robust():
  for seed in range(5):
    _breakdown_case("rfa", CLAIMS["rfa"], seed, "+huge", 1.0, False,
                    hp=(("variant", "fixed_steps"),))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", RULES)
def test_state_stays_finite_over_rounds(name, kind):
  claim = _claim(name)
  k = claim.k
  f = _breakdown_f(name, claim.hp, k)
  init, _ = _jitted(name, claim.hp)

  @settings(max_examples=2, deadline=None, derandomize=True)
  @given(seed=st.integers(0, 2**31 - 1))
  def check(seed):
    rs = np.random.RandomState(seed)
    state = init(D)
    for r in range(ROUNDS):
      honest, spread = _honest(rs, k, D)
      u, bad = _poison(rs, honest, spread, f, kind)
      w = _weights(rs, k, bad, zero_bad=bool(r % 2))
      g0 = honest.mean(0)
      before = state
      out, acc, state = _apply(name, claim.hp, u, w, f, state=state,
                               server_update=g0, round_=r)
      keep = np.setdiff1d(np.arange(k), bad)
      _check_bound(name, claim, kind, out, honest[keep], before, r + 1, D, g0)
      assert np.all(np.isfinite(acc)), (name, kind, r, acc)
      assert _state_finite(state), (name, kind, r, state)

  check()


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
