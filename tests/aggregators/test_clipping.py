"""The l2 clipping aggregator ("clipping only", sparsefed.txt B.1.4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from numpy.testing import assert_allclose
import pytest

from fedjax_sparse import aggregators
from fedjax_sparse.aggregators import AggContext
from fedjax_sparse.aggregators.clipping import clipping


def _ctx(pack_size=1):
  return AggContext(round=jnp.int32(0), pack_size=pack_size)


def _apply(agg, updates, masks=None, weights=None, pack_size=1):
  k, d = updates.shape
  weights = np.ones(k, np.float32) if weights is None else weights
  out, _ = agg.apply(agg.init(d), jnp.asarray(updates),
                     None if masks is None else jnp.asarray(masks),
                     jnp.asarray(weights, jnp.float32), jax.random.key(0),
                     _ctx(pack_size))
  return out


def _oracle(updates, weights, clip_norm, masks=None, pack_size=1):
  """A numpy loop: clip every row, then the (FLARE Alg. 2) weighted mean."""
  k, d = updates.shape
  clipped = np.zeros_like(updates, dtype=np.float64)
  for i in range(k):
    norm = np.linalg.norm(updates[i].astype(np.float64))
    s = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped[i] = updates[i] * s
  out = np.zeros(d)
  for j in range(d):
    num = den = 0.0
    for i in range(k):
      if masks is None or masks[i, j // pack_size]:
        num += weights[i] * clipped[i, j]
        den += weights[i]
    out[j] = num / den if den > 0 else 0.0
  return out


def _case(k=5, d=12, seed=0):
  rng = np.random.default_rng(seed)
  scales = np.array([0.1, 1.0, 3.0, 10.0, 50.0][:k])
  updates = (rng.normal(size=(k, d)) * scales[:, None]).astype(np.float32)
  weights = rng.integers(1, 20, k).astype(np.float32)
  return updates, weights


def test_registered_with_the_paper_default():
  assert "clipping" in aggregators.names()
  agg = aggregators.get("clipping")()
  updates, weights = _case()
  out = _apply(agg, updates, weights=weights)
  assert_allclose(out.update, _oracle(updates, weights, 5.0), rtol=1e-5,
                  atol=1e-6)


@pytest.mark.parametrize("clip_norm", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("weighted", [True, False])
def test_dense_matches_numpy_oracle(clip_norm, weighted):
  updates, weights = _case()
  out = _apply(clipping(clip_norm, weighted=weighted), updates, weights=weights)
  w = weights if weighted else np.ones_like(weights)
  assert_allclose(out.update, _oracle(updates, w, clip_norm), rtol=1e-5,
                  atol=1e-6)
  assert_allclose(out.acceptance, np.ones(5))
  norms = np.linalg.norm(updates, axis=1)
  assert_allclose(out.diagnostics["clip_scale"],
                  np.minimum(1.0, clip_norm / norms), rtol=1e-5)


@pytest.mark.parametrize("pack_size", [1, 3])
def test_sparse_masks_match_numpy_oracle(pack_size):
  from fedjax_sparse.sparsify import pack_topk_batch
  updates, weights = _case(d=12)
  sparse, masks = pack_topk_batch(jnp.asarray(updates), 0.5, pack_size)
  sparse, masks = np.asarray(sparse), np.asarray(masks)
  out = _apply(clipping(2.0), sparse, masks, weights, pack_size)
  assert_allclose(out.update,
                  _oracle(sparse, weights, 2.0, masks, pack_size),
                  rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_huge_clip_norm_equals_fedavg(masked):
  updates, weights = _case()
  masks = None
  if masked:
    from fedjax_sparse.sparsify import pack_topk_batch
    updates, masks = (np.asarray(a) for a in
                      pack_topk_batch(jnp.asarray(updates), 0.5, 1))
  fedavg = aggregators.get("fedavg")()
  for clip_norm in (1e9, math.inf):
    out = _apply(clipping(clip_norm), updates, masks, weights)
    ref = _apply(fedavg, updates, masks, weights)
    assert_allclose(out.update, ref.update, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weighted", [True, False])
def test_equals_sparsefed_with_all_coordinates_and_no_momentum(weighted):
  updates, weights = _case()
  d = updates.shape[1]
  sf = aggregators.get("sparsefed")(clip_norm=2.0, k=d, rho=0.0,
                                    weighted=weighted)
  out = _apply(clipping(2.0, weighted=weighted), updates, weights=weights)
  ref = _apply(sf, updates, weights=weights)
  assert_allclose(out.update, ref.update, rtol=1e-6, atol=1e-7)
  assert_allclose(out.diagnostics["clip_scale"], ref.diagnostics["clip_scale"])


def test_bounds_the_influence_of_a_scaled_update():
  updates = np.zeros((4, 3), np.float32)
  updates[:3] = [1.0, 0.0, 0.0]
  updates[3] = [0.0, 1e6, 0.0]  # a scaling attacker
  out = _apply(clipping(1.0), updates)
  assert_allclose(out.update, [0.75, 0.25, 0.0], rtol=1e-6)


def test_jits_and_keeps_zero_rows():
  agg = clipping(1.0)
  updates = jnp.zeros((3, 4)).at[0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
  f = jax.jit(lambda u: agg.apply((), u, None, jnp.ones(3), jax.random.key(0),
                                  _ctx())[0])
  out = f(updates)
  # [3, 4] has norm 5 -> [0.6, 0.8]; the zero rows stay zero; mean of 3.
  assert_allclose(out.update, [0.2, 0.8 / 3, 0.0, 0.0], rtol=1e-6)
  assert_allclose(out.diagnostics["clip_scale"], [0.2, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, "5", True])
def test_bad_clip_norm_fails(bad):
  with pytest.raises(ValueError, match="clip_norm"):
    clipping(bad)
