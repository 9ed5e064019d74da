"""Sparsification, clustering, rounds and attacks (see :mod:`tests.helpers`)."""

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
