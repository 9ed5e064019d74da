"""Our shared rules against ByzFL (EPFL), an independent numpy/torch library.

Skipped when ByzFL is not installed (``fedjax_sparse/testing/byzfl.py`` says
how to install it beside a CPU-only torch). Conventions where the two differ,
as the rules' docstrings say:

* Krum and Multi-Krum: ours score with ``K - f - 2`` neighbours (Blanchard
  et al.), ByzFL with ``K - f - 1``: ByzFL's ``f`` is ours ``f - 1``, and
  ByzFL's Multi-Krum averages ``K - f`` rows (ours ``m``).
* RFA: ByzFL's ``GeometricMedian(nu, T)`` is ours
  ``variant="fixed_steps", init="zeros"`` (tests/aggregators/test_robust_defs.py).
* Centered clipping: ByzFL's ``tau`` defaults to 100, ours to 1; both start
  from zeros and take the unweighted mean of the clipped differences.
* Clipping: ByzFL's pre-aggregator clips each row to norm ``c``; with
  ``Average`` after it that is ours ``clipping(clip_norm=c, weighted=False)``.
* NNM: ByzFL's pre-aggregator mixes each row with its ``K - f`` nearest rows
  (itself included); followed by ``Average`` it is ours ``nnm(nwfedavg)``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.aggregators.nnm import nnm
from fedjax_sparse.testing import byzfl as byzfl_loader
from tests.helpers import assert_close

BYZFL = byzfl_loader.load()
pytestmark = pytest.mark.skipif(BYZFL is None, reason="ByzFL not installed")

# (K, d, f): K odd and even, d = 1 and a few thousand, f up to the rules'
# limits (Krum-family K > 2f + 2, trimmed mean 2f < K).
SHAPES = [(5, 7, 1), (10, 1, 2), (25, 1000, 5), (51, 300, 12)]


@functools.lru_cache(maxsize=None)
def _jitted(name, **hp):
  agg = agg_lib.get(name)(**hp)
  return agg.init, jax.jit(agg.apply)


def _ours(agg_init, agg_apply, u, f):
  k, d = u.shape
  ctx = AggContext(round=jnp.int32(0), num_byzantine=f, num_clients=k)
  out, _ = agg_apply(agg_init(d), jnp.asarray(u), None, jnp.ones((k,)),
                     jax.random.PRNGKey(0), ctx)
  return np.asarray(out.update)


def ours(name, u, f=0, **hp):
  return _ours(*_jitted(name, **hp), u, f)


def _inputs(k, d, seed, duplicates=False):
  rs = np.random.RandomState(seed)
  u = rs.randn(k, d).astype(np.float32)
  u[: max(1, k // 5)] *= 10.0  # a few far rows, as attackers would send
  if duplicates:
    u[1:3] = u[0]  # tied distances and order statistics
  return u


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("k,d,f", SHAPES)
def test_coordinate_rules(k, d, f, duplicates):
  u = _inputs(k, d, k + d, duplicates)
  assert_close(ours("nwfedavg", u), BYZFL.Average()(u.copy()))
  assert_close(ours("median", u), BYZFL.Median()(u.copy()))
  assert_close(ours("trimmed_mean", u, f=f), BYZFL.TrMean(f=f)(u.copy()))


@pytest.mark.parametrize("k,d,f", SHAPES)
def test_krum_family_with_byzfl_neighbour_count(k, d, f):
  u = _inputs(k, d, 7 * k + d)
  # ByzFL's f counts one neighbour fewer: ours f - 1 is its f.
  assert_close(ours("krum", u, f=f - 1), BYZFL.Krum(f=f)(u.copy()))
  assert_close(ours("multi_krum", u, f=f - 1, m=k - f),
               BYZFL.MultiKrum(f=f)(u.copy()))


@pytest.mark.parametrize("k,d,f", SHAPES)
def test_centered_clipping_and_clipping(k, d, f):
  del f
  u = _inputs(k, d, 3 * k + d)
  tau = float(np.median(np.linalg.norm(u, axis=1)))
  assert_close(ours("centered_clipping", u, tau=tau, num_iters=3),
               BYZFL.CenteredClipping(L=3, tau=tau)(u.copy()))
  assert_close(ours("clipping", u, clip_norm=tau, weighted=False),
               BYZFL.Average()(BYZFL.Clipping(c=tau)(u.copy())))


@pytest.mark.parametrize("k,d,f", SHAPES)
def test_nnm_then_mean(k, d, f):
  u = _inputs(k, d, 5 * k + d)
  agg = nnm(agg_lib.get("nwfedavg")(), f=f)
  got = _ours(agg.init, jax.jit(agg.apply), u, f)
  assert_close(got, BYZFL.Average()(BYZFL.NNM(f=f)(u.copy())))


def test_a_difference_is_seen():
  """The comparison can fail: trimming one value per side is not trimming
  two."""
  u = _inputs(10, 50, 3)
  u[:3] += np.linspace(1, 3, 50, dtype=np.float32)
  with pytest.raises(AssertionError):
    assert_close(ours("trimmed_mean", u, f=1), BYZFL.TrMean(f=2)(u.copy()))
