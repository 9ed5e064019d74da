"""Properties every registered aggregation rule keeps, whatever it is sent:
bounds under outliers and a finite state (weights, pre-aggregators,
invariances and small shapes: test_property_invariances.py).

Run over ``aggregators.names()`` (a new rule fails :func:`test_every_rule_has_a_claim`
until it is listed in :data:`CLAIMS` in tests/helpers.py, which also holds
the runner and the inputs of both files), each rule built on its own through
``aggregators.get(name)(**hparams)`` and jitted once per shape:

* Finite and bounded under outliers (breakdown): ``n_bad <= f`` of the ``K``
  rows (``f < K/2``; ``f`` is the largest the rule accepts at that ``K``, see
  :func:`breakdown_f` in tests/helpers.py) are replaced by ``+-1e30``,
  ``nan``, ``+-inf``, one ``nan`` coordinate, copies of one far vector
  (``1e3`` times the honest spread or ``1e18``; their squared norms still
  fit ``f32``), or a mix; the output and the acceptance are finite and the
  output lies in the rule's bound (``Claim.bound``, checked by
  :func:`_check_bound`):

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

``rfa(variant="fixed_steps")`` (3 Weiszfeld steps from the mean, the
project's earlier rule, kept bit for bit) is not robust to huge rows: its
bound test is an expected failure (strict), which also shows that the
property catches it.

Sizes are tiny (``K = 9``, ``d = 6``; Bulyan ``K = 11``) and examples few, with
``derandomize=True``, so that the two files run in about a minute on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import CLAIMS, CLIP, KINDS, RHO, RULES, SKIP
# Under the names the tests use: Hypothesis derives a test's examples from its
# source, so new names would draw other examples.
from tests.helpers import PROPERTY_D as D
from tests.helpers import breakdown_f as _breakdown_f, claim_or_skip as _claim
from tests.helpers import honest_rows as _honest, outlier_weights as _weights
from tests.helpers import poison_rows as _poison, property_apply as _apply
from tests.helpers import property_jitted as _jitted, state_finite as _state_finite

ROUNDS = 20


def test_every_rule_has_a_claim():
  assert set(RULES) == set(CLAIMS) | set(SKIP)


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
