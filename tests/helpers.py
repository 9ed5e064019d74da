"""What several test modules share, in one place.

Import as ``from tests.helpers import ...`` (pytest puts the repository's
root on ``sys.path``: ``tests/`` and its folders are packages). Sections:

* paths and subprocesses: ``ROOT``, ``subprocess_env``;
* small runs: ``TWO_ROUND_RUN``, ``FOUR_ROUND_RUN``, ``snapshot``,
  ``run_and_resume``;
* sweeps: ``SWEEP_BASE``, ``parse_sweep_flags``;
* aggregators at fixed shapes (``AGG_K`` clients, ``AGG_D`` coordinates,
  packs of ``AGG_P``): ``agg_ctx``, ``run_rule`` (``jitted_rule``),
  ``aggregator_data``, ``coord_mask``, ``np_combine``, ``np_safesparse``;
  and ``jitted_agg``, ``assert_close``;
* the aggregator property suite (tests/aggregators/test_property_*.py): the
  claims, the inputs with outliers and the runner;
* sparsification: ``np_topk_mask``, ``np_alg2``, ``pack_ctx``;
* clustering: ``same_partition``;
* rounds: ``TinyMLP``, ``TinyBN``, ``round_data``;
* attacks: on a real layout (``ATTACK_K``, ``ATTACK_LAYOUT``, ``HSA_MASK``,
  ``attack_updates``, ``attack_malicious``, ``attack_ctx``) and the adaptive
  attacks' runner (``run_attack``, ``adaptive_ctx``, ``malicious_rows``,
  ``random_updates``, ``sparsify_batch``).

Importing this module runs JAX (PRNG keys, a model's ``init``): a module
that a subprocess imports before ``jax.distributed.initialize`` must not
import it (tests/simulation/test_scale.py).
"""

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

# ------------------------------------------------- paths and subprocesses --

# The repository's root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(cache_dir=None):
  """The environment of a binary run in a subprocess: the CPU, the
  repository on ``PYTHONPATH`` and, with ``cache_dir``, a persistent
  compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  if cache_dir:
    # The runs after the first load its compiled programs instead of
    # compiling them again (most of a run's time on a small machine).
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


# ------------------------------------------------------------- small runs --

# Two rounds on one client device, evaluated every round.
TWO_ROUND_RUN = ExperimentConfig(dataset="synthetic", partition="iid",
                                 num_clients=6, clients_per_round=4, rounds=2,
                                 local_epochs=1, batch_size=16, lr=0.1,
                                 model="mlp", eval_every=1,
                                 eval_batch_size=100, client_devices=1)
# Four rounds, evaluated every second round (resumed after round 2 by
# run_and_resume).
FOUR_ROUND_RUN = ExperimentConfig(dataset="synthetic", partition="iid",
                                  num_clients=6, clients_per_round=4, rounds=4,
                                  local_epochs=1, batch_size=16, lr=0.1,
                                  model="mlp", eval_every=2,
                                  eval_batch_size=100)
RESULT_FILES = ("config.json", "rounds.jsonl", "summary.json")


def snapshot(directory):
  """The bytes of every result file of a run directory."""
  out = {}
  for name in RESULT_FILES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out


def run_and_resume(cfg, tmp_path):
  """``cfg`` run for 4 rounds in ``tmp_path/a``, and for 2 rounds in
  ``tmp_path/b`` then resumed to 4; asserts that both wrote the same round
  records (but their times). Returns the uninterrupted run's summary, the
  resumed run's summary and the round records."""
  full = run_experiment(dataclasses.replace(cfg, output_dir=str(tmp_path / "a")),
                        progress=False)
  part = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"), rounds=2)
  run_experiment(part, progress=False)
  resumed = run_experiment(dataclasses.replace(part, rounds=4), progress=False)
  a = io.read_jsonl(tmp_path / "a" / "rounds.jsonl")
  b = io.read_jsonl(tmp_path / "b" / "rounds.jsonl")
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(a) == strip(b)
  return full, resumed, a


# ----------------------------------------------------------------- sweeps --

SWEEP_BASE = ExperimentConfig(dataset="synthetic", partition="iid",
                              num_clients=6, clients_per_round=4, rounds=3,
                              local_epochs=1, batch_size=16, lr=0.1,
                              model="mlp", eval_every=1, eval_batch_size=100,
                              attack_start=2)


def parse_sweep_flags(*argv):
  """The sweep's flags parsed from ``argv`` into a copy of FLAGS."""
  from absl import flags

  from experiments import sweep  # noqa: F401  (defines the flags read here)
  fv = copy.deepcopy(flags.FLAGS)
  fv(["sweep", *argv])
  return fv


# ------------------------------------------- aggregators at fixed shapes --
# Shapes are fixed (K = 10 clients, d = 24, packs of 3) so that every rule
# compiles once per variant; compiled functions are cached at module level.

AGG_K, AGG_D, AGG_P, AGG_F = 10, 24, 3, 2
KEY = jax.random.PRNGKey(0)


def agg_ctx(f=AGG_F, pack_size=AGG_P, global_params=None, k=AGG_K):
  return AggContext(round=jnp.int32(0), global_params=global_params,
                    pack_size=pack_size, num_byzantine=f, num_clients=k)


@functools.lru_cache(maxsize=None)
def jitted_rule(name, pre=(), **hparams):
  """(init, jitted apply) of a registered rule, optionally wrapped."""
  agg = agg_lib.get(name)(**hparams)
  for pre_name, pre_hparams in pre:
    agg = agg_lib.get_pre(pre_name)(agg, **dict(pre_hparams))
  return agg.init, jax.jit(agg.apply)


def run_rule(name, updates, masks=None, weights=None, ctx=None, state=None,
             pre=(), key=KEY, **hparams):
  """The registered rule ``name`` (wrapped by ``pre``) applied once: its
  update, acceptance, diagnostics (numpy) and state."""
  init, apply = jitted_rule(name, pre, **hparams)
  updates = jnp.asarray(updates, jnp.float32)
  k, d = updates.shape
  weights = jnp.ones((k,)) if weights is None else jnp.asarray(weights, jnp.float32)
  masks = None if masks is None else jnp.asarray(masks, bool)
  state = init(d) if state is None else state
  out, state = apply(state, updates, masks, weights, key, ctx or agg_ctx(k=k))
  return (np.asarray(out.update), np.asarray(out.acceptance),
          jax.tree.map(np.asarray, out.diagnostics), state)


def aggregator_data(seed, k=AGG_K, d=AGG_D, sparse=False, r=0.5):
  """Random updates, pack masks (a fraction ``r`` of the packs of each row,
  with ``sparse``; else None) and weights."""
  rs = np.random.RandomState(seed)
  u = rs.randn(k, d).astype(np.float32)
  w = rs.uniform(0.5, 2.0, k).astype(np.float32)
  if not sparse:
    return u, None, w
  n_packs = -(-d // AGG_P)
  masks = np.zeros((k, n_packs), bool)
  for i in range(k):
    masks[i, rs.choice(n_packs, int(math.ceil(r * n_packs)), replace=False)] = True
  return u * coord_mask(masks, d), masks, w


def coord_mask(masks, d=AGG_D, pack_size=AGG_P):
  """Pack masks ``(K, n_packs)`` as coordinate masks ``(K, d)``."""
  return refs.coord(masks, d, pack_size)


# The numpy references live in fedjax_sparse/testing/aggregator_refs/ (shared
# with benchmarks/aggregators.py); these wrappers add the default pack size.


def np_combine(u, masks, w, a, pack_size=AGG_P):
  return refs.np_combine(u, masks, w, a, pack_size)


def np_safesparse(u, masks, beta=0.6, gamma=0.2, guard=False, pack_size=AGG_P):
  return refs.np_safesparse(u, masks, beta, gamma, guard, pack_size)


@functools.lru_cache(maxsize=None)
def jitted_agg(name, **hp):
  """(the rule, its jitted apply) of registered rule ``name``."""
  agg = agg_lib.get(name)(**hp)
  return agg, jax.jit(agg.apply)


def assert_close(got, want, tol=2e-5):
  """``got`` equals an oracle's float32 ``want`` to ``tol``."""
  np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=tol,
                             atol=tol)


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


# --------------------------------------------------------- sparsification --


def np_topk_mask(scores, k):
  """Loop oracle: k largest scores, ties to the lower index."""
  n = len(scores)
  order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
  m = np.zeros(n, bool)
  for i in order[:k]:
    m[i] = True
  return m


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


def pack_ctx(P=1, rnd=0, **side_inputs):
  """An aggregation context with packs of ``P`` at round ``rnd``."""
  return AggContext(round=jnp.int32(rnd), pack_size=P, **side_inputs)


# ------------------------------------------------------------- clustering --


def same_partition(a, b):
  """Same unclustered (noise) points and the same clusters up to
  relabelling."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or not np.array_equal(a < 0, b < 0):
    return False
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ----------------------------------------------------------------- rounds --


class TinyMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


class TinyBN(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(4)(nn.relu(x))


def round_data(num_clients=6, n=240, seed=0, ragged=True):
  """Four Gaussian classes in 12 dimensions split over ``num_clients``
  clients (of random sizes with ``ragged``), as the round step reads them."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(4, 12)).astype(np.float32) * 2
  y = rng.integers(0, 4, n).astype(np.int32)
  x = (means[y] + rng.normal(size=(n, 12))).astype(np.float32)
  if ragged:
    counts = rng.integers(10, n // num_clients + 1, num_clients)
  else:
    counts = np.full(num_clients, n // num_clients)
  n_max = int(counts.max())
  perm = rng.permutation(n)
  idx = np.zeros((num_clients, n_max), np.int32)
  start = 0
  for c, k in enumerate(counts):
    idx[c, :k] = perm[start:start + k]
    start += k
  return RoundData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx),
                   jnp.asarray(counts.astype(np.int32)))


# ---------------------------------------------------- attacks on a layout --

ATTACK_K = 12
# The flat size of get_model("mlp", 10, width=(16,)) on 8x8x1 inputs, so that
# layer-wise attacks (C-LASA) see a real layout.
ATTACK_LAYOUT = layout_of(get_model("mlp", 10, width=(16,)).init(
    jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"])
ATTACK_D = ATTACK_LAYOUT.d
# HSA's coordinate mask: every 20th coordinate.
HSA_MASK = np.zeros(ATTACK_D, bool)
HSA_MASK[::20] = True


def attack_updates(k=ATTACK_K, d=ATTACK_D, seed=0):
  """``k`` correlated updates with coordinate scales of different sizes."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.normal(size=d) * 0.5)
  common = rng.normal(size=d) * 0.3
  x = (common + rng.normal(size=(k, d))) * scale
  return jnp.asarray(x, jnp.float32)


def attack_malicious(idx, k=ATTACK_K):
  """The malicious mask of rows ``idx`` (a jax array)."""
  m = np.zeros(k, bool)
  m[list(idx)] = True
  return jnp.asarray(m)


def attack_ctx(d=ATTACK_D, k=ATTACK_K, layout=ATTACK_LAYOUT, pack_size=1):
  return attacks_lib.AttackContext(
      round=jnp.int32(12), global_params=jnp.zeros(d),
      prev_aggregate=jnp.zeros(d), weights=jnp.ones(k), layout=layout,
      num_clients=k, pack_size=pack_size)


# ------------------------------------------------------- adaptive attacks --


def adaptive_ctx(d, k, pack_size=1, global_params=None):
  g = jnp.zeros(d) if global_params is None else jnp.asarray(global_params, jnp.float32)
  return attacks_lib.AttackContext(round=jnp.int32(3), global_params=g,
                                   prev_aggregate=jnp.zeros(d),
                                   weights=jnp.ones(k), num_clients=k,
                                   pack_size=pack_size)


def malicious_rows(k, idx):
  """The malicious mask of rows ``idx`` of ``k`` (numpy)."""
  m = np.zeros(k, bool)
  m[list(idx)] = True
  return m


@functools.lru_cache(maxsize=None)
def _jitted_attack(name, items):
  """The jitted ``apply`` of attack ``name`` (cached: one compile per shape)."""
  return jax.jit(attacks_lib.get_update_attack(name)(**dict(items)).apply)


def run_attack(name, x, mal, key=0, pack_size=1, global_params=None, **kwargs):
  """Update attack ``name`` applied once to the rows ``x``."""
  x = jnp.asarray(x, jnp.float32)
  apply = _jitted_attack(name, tuple(sorted(kwargs.items())))
  out, _ = apply((), x, jnp.asarray(mal), jax.random.key(key),
                 adaptive_ctx(x.shape[1], x.shape[0], pack_size, global_params))
  return np.asarray(out)


# The round step's sparsifier, compiled once per (ratio, pack size).
sparsify_batch = jax.jit(pack_topk_batch, static_argnums=(1, 2))


def random_updates(k, d, seed):
  """``k`` normal rows around a common random row."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(k, d)) + rng.normal(size=d)).astype(np.float32)
