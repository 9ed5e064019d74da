"""The aggregator property suite's claims, inputs and runner (see
:mod:`tests.helpers`)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse import attacks as attacks_lib
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.layout import layout_of
from fedjax_sparse.models import get_model
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment
from fedjax_sparse.simulation.round import RoundData
from fedjax_sparse.sparsify.topk import pack_topk_batch
from fedjax_sparse.testing import aggregator_refs as refs

from tests.helpers.common import *  # noqa: F401,F403

# ------------------------------------------- the aggregator property suite --
# What each rule claims and the inputs of the property tests
# (tests/aggregators/test_property_bounds.py says what the bounds mean;
# tests/aggregators/test_property_invariances.py). Sizes are tiny (K = 9,
# d = 6; Bulyan K = 11).

PROPERTY_K, PROPERTY_D = 9, 6
HUGE = 1e30
PROPERTY_KEY = jax.random.PRNGKey(3)
KINDS = ("+huge", "-huge", "nan", "inf", "-inf", "nan_coord", "copies",
         "mixed")
NUMERIC_KINDS = ("+huge", "-huge", "nan", "inf", "-inf", "nan_coord")
CLIP = 1.0  # L of clipping, SparseFed and FetchSGD
RHO = 0.9


@dataclasses.dataclass(frozen=True)
class Claim:
  """What a rule promises (see tests/aggregators/test_property_bounds.py).

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
  k: int = PROPERTY_K
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
    "foolsgold": Claim(hp=(("num_clients", PROPERTY_K),), bound="finite",
                       why="weights from the direction of histories"),
    "rlr": Claim(bound="finite", why="a mean with sign-flipped coordinates"),
    "signguard": Claim(bound="norm",
                       why="accepted rows clipped to the median norm"),
    "crfl": Claim(hp=(("rho", CLIP), ("rho_growth", 0.0), ("rho_max", CLIP),
                      ("sigma", 0.0)), bound="clip",
                  why="the new model is clipped to rho (noise off)"),
    "mda": Claim(why="the K - f rows of smallest diameter are honest when the "
                     "outliers are far"),
    "smea": Claim(why="the K - f rows of smallest covariance are honest when "
                      "the outliers are far"),
    "caf": Claim(why="far rows are filtered first; the best pass weighs "
                     "honest rows only"),
    # The default pivot (row 0) is trusted, not checked: a Byzantine row 0
    # moves the output anywhere (tests/aggregators/test_byzfl_rules.py).
    "monna": Claim(hp=(("pivot", None),),
                   why="the tightest K - f neighbourhood is honest"),
    "meamed": Claim(bound="ball", why="the K - f values closest to the median "
                                      "lie within the honest width of it"),
}
SKIP = {
    "class_aware_masking": "needs the model (apply_fn, unravel) and the "
                           "server's per-class validation data; its "
                           "non-finite rows are tested in "
                           "tests/aggregators/test_class_aware_masking.py",
}
RULES = sorted(agg_lib.names())


def claim_or_skip(name):
  """The claim of rule ``name``; skips the test for the rules in SKIP."""
  if name in SKIP:
    pytest.skip(SKIP[name])
  return CLAIMS[name]


@functools.lru_cache(maxsize=None)
def property_jitted(name, hp):
  agg = agg_lib.get(name)(**dict(hp))
  return agg.init, jax.jit(agg.apply)


def property_ctx(k, f, steps=None, server_update=None, round_=0):
  steps = jnp.asarray(np.ones(k) if steps is None else steps, jnp.float32)
  if server_update is not None:
    server_update = jnp.asarray(server_update, jnp.float32)
  # A global model of zeros where the rule may need one (CRFL clips the
  # new model w - mean: here the mean itself).
  return AggContext(round=jnp.int32(round_), local_steps=steps,
                    server_update=server_update,
                    global_params=(None if server_update is None
                                   else jnp.zeros_like(server_update)),
                    num_byzantine=f, num_clients=k)


def property_apply(name, hp, u, w, f, state=None, steps=None,
                   server_update=None, round_=0):
  """Rule ``name`` with factory arguments ``hp`` applied once: its update,
  acceptance (numpy) and state."""
  init, apply = property_jitted(name, hp)
  u = jnp.asarray(u, jnp.float32)
  k, d = u.shape
  if server_update is None:
    server_update = np.zeros(d, np.float32)
  state = init(d) if state is None else state
  out, state = apply(state, u, None, jnp.asarray(w, jnp.float32), PROPERTY_KEY,
                     property_ctx(k, f, steps, server_update, round_))
  return np.asarray(out.update), np.asarray(out.acceptance), state


@functools.lru_cache(maxsize=None)
def breakdown_f(name, hp, k, d=PROPERTY_D):
  """The largest ``f < k/2`` the rule accepts at ``k`` clients (its claim).

  Rules that do not read ``f`` accept every value; the others raise
  ValueError when tracing with an ``f`` they cannot tolerate.
  """
  init, apply = property_jitted(name, hp)
  for f in range((k - 1) // 2, -1, -1):
    try:
      jax.eval_shape(apply, init(d), jnp.zeros((k, d)), None, jnp.ones((k,)),
                     PROPERTY_KEY, property_ctx(k, f, server_update=np.zeros(d)))
      return f
    except ValueError:
      continue
  raise AssertionError(f"{name} accepts no f at K={k}")


def honest_rows(rs, k, d):
  """``k`` rows around a random centre, and their spread."""
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


def poison_rows(rs, honest, spread, n_bad, kind):
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


def outlier_weights(rs, k, bad, zero_bad):
  """Random client weights; zero on the rows ``bad`` with ``zero_bad``."""
  w = rs.uniform(0.5, 2.0, k).astype(np.float32)
  if zero_bad:
    w[bad] = 0.0
  return w


def state_finite(state):
  return all(np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree.leaves(state))
