"""Paths, subprocesses, small runs, sweeps and aggregators at fixed shapes
(see :mod:`tests.helpers`)."""

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
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
