"""Tests of fedjax_sparse.saliency: FORCE, SNIP, ERK, random masks, SLC."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import saliency as S
from fedjax_sparse.saliency import pruning as P
from fedjax_sparse.layout import layout_of
from fedjax_sparse.models import get_model


def _cnn():
  model = get_model("cnn2", 10, width=(4, 8, 16))
  x = jax.random.normal(jax.random.key(0), (3, 8, 16, 16, 1))
  y = jax.random.randint(jax.random.key(1), (3, 8), 0, 10)
  params = model.init(jax.random.key(2), x[0])["params"]
  return model, params, x, y


@pytest.mark.slow
def test_force_exact_count_critical_and_caps():
  model, params, x, y = _cnn()
  layout = layout_of(params)
  caps = {"first_conv": 0.2, "last_dense": 0.25, "Conv_1": 0.02}
  delta = 0.05
  r = S.force_mask(S.cross_entropy_loss(model), params, x, y, delta, steps=12,
                   layer_caps=caps, include_critical=True)
  prunable = S.prunable_mask(layout)
  d_p = int(prunable.sum())
  assert int(r.mask[prunable].sum()) == math.floor(delta * d_p)
  assert r.mask[S.critical_mask(layout)].all()
  caps_l = dict(zip([layout.names[i] for i in S.prunable_leaves(layout)],
                    S.resolve_layer_caps(layout, caps)))
  assert caps_l["Conv_0/kernel"] == 0.2 and caps_l["Dense_1/kernel"] == 0.25
  for name, cap in caps_l.items():
    size = layout.sizes[layout.names.index(name)]
    assert r.counts[name] <= math.floor(size * cap + 1e-9), name
  # The Conv_1 cap binds (FORCE would keep more there without it).
  assert r.counts["Conv_1/kernel"] == math.floor(0.02 * 800)


def test_snip_matches_numpy_saliency():
  model = get_model("mlp", 10, width=(16,))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=12).astype(np.int32)
  params = model.init(jax.random.key(3), jnp.asarray(x))["params"]
  delta = 0.1
  r = S.snip_mask(S.cross_entropy_loss(model), params, x, y, delta)
  # Hand-written backward pass of the 1-hidden-layer MLP with softmax CE.
  w1 = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b1 = np.asarray(params["Dense_0"]["bias"], np.float64)
  w2 = np.asarray(params["Dense_1"]["kernel"], np.float64)
  b2 = np.asarray(params["Dense_1"]["bias"], np.float64)
  xf = x.reshape(12, -1).astype(np.float64)
  pre = xf @ w1 + b1
  h = np.maximum(pre, 0)
  logits = h @ w2 + b2
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dlog = (p - np.eye(10)[y]) / 12
  dw2 = h.T @ dlog
  dw1 = xf.T @ ((dlog @ w2.T) * (pre > 0))
  # Ravel order: Dense_0/bias, Dense_0/kernel, Dense_1/bias, Dense_1/kernel.
  sal = np.concatenate([np.abs(w1 * dw1).ravel(), np.abs(w2 * dw2).ravel()])
  n = math.floor(delta * sal.size)
  expect = np.zeros(sal.size, bool)
  expect[np.argsort(-sal, kind="stable")[:n]] = True
  layout = layout_of(params)
  got = r.mask[S.prunable_mask(layout)]
  np.testing.assert_array_equal(got, expect)
  assert not r.mask[S.critical_mask(layout)].any()


def test_erk_total_and_proportions():
  _, params, _, _ = _cnn()
  layout = layout_of(params)
  leaves = S.prunable_leaves(layout)
  sizes = np.array([layout.sizes[i] for i in leaves])
  for delta in (0.05, 0.5):
    dens = S.erk_densities(layout, delta)
    total = math.floor(delta * sizes.sum())
    assert np.sum(dens * sizes) == pytest.approx(total, rel=1e-9)
    raw = np.array([sum(layout.shapes[i]) / math.prod(layout.shapes[i]) for i in leaves])
    free = dens < 1
    ratio = dens[free] / raw[free]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)   # density ∝ raw
    r = S.compute_mask("erk_plus", delta, layout=layout, seed=1)
    assert int(r.mask[S.prunable_mask(layout)].sum()) == total
    assert r.mask[S.critical_mask(layout)].all()
  # At delta = 0.5 the small first convolution would exceed 1: it is dense.
  assert S.erk_densities(layout, 0.5)[0] == 1.0


def test_random_masks():
  _, params, _, _ = _cnn()
  layout = layout_of(params)
  r = S.compute_mask("random", 0.1, layout=layout, seed=0)
  assert r.num_kept == math.floor(0.1 * layout.d)
  rp = S.compute_mask("random_plus", 0.1, layout=layout, seed=0)
  pm = S.prunable_mask(layout)
  assert int(rp.mask[pm].sum()) == math.floor(0.1 * pm.sum())
  assert rp.mask[~pm].all()


def test_layerwise_select_by_hand():
  sal = jnp.asarray([9, 8, 7, 6, 1, 2, 3, 4, 5, 0.5], jnp.float32)
  sizes = (4, 6)
  sel = jax.jit(lambda s, n, caps: S.layerwise_select(s, sizes, n, caps, (True, False)))
  # Global top-5 = 9, 8, 7, 6, 5: layer 0 has 4 > cap 2, so it keeps its own
  # top-2 (9, 8) and leaves; the remaining 3 come from layer 1: 5, 4, 3.
  got = np.asarray(sel(sal, 5, jnp.asarray([2, 6])))
  np.testing.assert_array_equal(np.flatnonzero(got), [0, 1, 6, 7, 8])
  got = np.asarray(sel(sal, 5, jnp.asarray([4, 6])))   # cap not violated
  np.testing.assert_array_equal(np.flatnonzero(got), [0, 1, 2, 3, 8])
  ties = jnp.zeros((10,), jnp.float32)                 # ties -> lower index
  np.testing.assert_array_equal(np.flatnonzero(sel(ties, 3, jnp.asarray([4, 6]))), [0, 1, 2])


def test_schedule():
  counts, frac = S.schedule(10000, 5e-3, 100)
  assert counts[-1] == 50 and np.all(np.diff(counts) <= 0) and counts[0] < 10000
  assert counts[0] == math.floor(math.exp(0.01 * math.log(50) + 0.99 * math.log(10000)))
  caps = S.scheduled_caps(np.array([100, 1000]), np.array([0.2, 1.0]), frac)
  np.testing.assert_array_equal(caps[-1], [20, 1000])
  assert caps[0, 0] == 100                              # min(delta_t/delta * 0.2, 1)


def test_reports_and_errors(tmp_path):
  _, params, _, _ = _cnn()
  layout = layout_of(params)
  rs = {"erk+": S.compute_mask("erk_plus", 0.05, layout=layout),
        "random+": S.compute_mask("random_plus", 0.05, layout=layout)}
  S.write_densities_json(str(tmp_path / "d.json"), rs, meta={"model": "cnn2"})
  rec = json.loads((tmp_path / "d.json").read_text())
  assert rec["masks"]["erk+"]["num_kept"] == rs["erk+"].num_kept
  S.plot_densities(str(tmp_path / "d.png"), rs)
  assert (tmp_path / "d.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="known mask methods: .*force_plus"):
    S.compute_mask("nope", 0.1, layout=layout)
  with pytest.raises(ValueError, match="matches no prunable kernel"):
    S.resolve_layer_caps(layout, {"Conv_9": 0.1})


def _mlp_data(n=48, seed=0):
  """A tiny MLP and ``n`` random examples (random labels: batches differ)."""
  model = get_model("mlp", 4, width=(16,))
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, 4, size=n).astype(np.int32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))["params"]
  return model, params, x, y


@pytest.mark.parametrize("fresh", [True, False])
def test_force_plus_keeps_every_bias_and_respects_the_cap(fresh):
  model, params, x, y = _mlp_data()
  layout = layout_of(params)
  loss = S.cross_entropy_loss(model)
  xb, yb = x.reshape(6, 8, 6, 6, 1), y.reshape(6, 8)
  delta, caps = 0.2, {"last_dense": 0.25}     # caps=last_dense:0.25
  kw = dict(params=params, loss_fn=loss, x=xb, y=yb, steps=10, fresh_batches=fresh)
  free = S.compute_mask("force_plus", delta, **kw)
  r = S.compute_mask("force_plus", delta, layer_caps=caps, **kw)
  last = "Dense_1/kernel"
  size = layout.sizes[layout.names.index(last)]
  # Without the cap FORCE puts more than 25% of its mask on the last layer,
  # so the cap binds.
  assert free.densities[last] > 0.25
  assert r.densities[last] <= 0.25 and r.counts[last] == math.floor(0.25 * size)
  biases = [n for n, k in zip(layout.names, layout.kinds) if k == "bias"]
  assert biases == ["Dense_0/bias", "Dense_1/bias"]
  for m in (free, r):
    assert m.method == "force_plus"
    for b in biases:
      assert m.densities[b] == 1.0, b
    assert m.mask[S.critical_mask(layout)].all()
    pm = S.prunable_mask(layout)
    assert int(m.mask[pm].sum()) == math.floor(delta * pm.sum())
  # Pi_F (no "+") keeps no bias.
  plain = S.compute_mask("force", delta, layer_caps=caps, **kw)
  assert not plain.mask[S.critical_mask(layout)].any()
  np.testing.assert_array_equal(plain.mask[S.prunable_mask(layout)],
                                r.mask[S.prunable_mask(layout)])


def test_force_batch_indices():
  idx = P.force_batch_indices(100, steps=7, num_batches=3, batch_size=8, seed=5)
  assert idx.shape == (7, 3, 8) and idx.dtype == np.int32
  assert idx.min() >= 0 and idx.max() < 100
  np.testing.assert_array_equal(idx, P.force_batch_indices(100, 7, 3, 8, seed=5))
  assert not np.array_equal(idx, P.force_batch_indices(100, 7, 3, 8, seed=6))
  # Without replacement within a step when the pool is large enough ...
  assert all(len(set(idx[t].ravel())) == 24 for t in range(7))
  # ... T * num_batches distinct batches over the T steps.
  assert len({tuple(b) for b in idx.reshape(21, 8)}) == 21
  # A pool smaller than a step's draw: with replacement.
  small = P.force_batch_indices(5, 4, 2, 4, seed=0)
  assert small.shape == (4, 2, 4) and set(np.unique(small)) <= set(range(5))
  with pytest.raises(ValueError):
    P.force_batch_indices(0, 4, 2, 4)


def _recording_loss(loss, record):
  """``loss`` that records the first pixel of each example of every batch."""

  def loss_fn(params, x, y):
    jax.debug.callback(lambda v: record.append(tuple(np.asarray(v).tolist())),
                       x[:, 0, 0, 0])
    return loss(params, x, y)

  return loss_fn


def test_force_fresh_batches_consumes_t_times_num_batches_batches():
  model, params, x, y = _mlp_data(n=40)
  loss = S.cross_entropy_loss(model)
  steps, nb, bs = 6, 3, 5
  seen = []
  S.force_mask(_recording_loss(loss, seen), params, x, y, 0.1, steps=steps,
               num_batches=nb, batch_size=bs, seed=11)
  idx = P.force_batch_indices(40, steps, nb, bs, seed=11)
  expect = [tuple(x[idx[t, j], 0, 0, 0].tolist()) for t in range(steps) for j in range(nb)]
  assert len(seen) == steps * nb
  assert len(set(seen)) == steps * nb            # every step draws new batches
  assert sorted(seen) == sorted(expect)          # the sampler's rows, nothing else
  # The old behaviour: the same num_batches batches at every step.
  seen_fixed = []
  S.force_mask(_recording_loss(loss, seen_fixed), params, x[:15].reshape(3, 5, 6, 6, 1),
               y[:15].reshape(3, 5), 0.1, steps=steps, num_batches=nb,
               fresh_batches=False)
  assert len(seen_fixed) == steps * nb and len(set(seen_fixed)) == nb


def test_force_fresh_batches_mask_differs_and_is_deterministic():
  model, params, x, y = _mlp_data(n=64)
  loss = S.cross_entropy_loss(model)
  xb, yb = x.reshape(8, 8, 6, 6, 1), y.reshape(8, 8)
  kw = dict(steps=10, num_batches=2)
  # The old behaviour with the builder's shape: num_batches batches reused.
  fixed = S.force_mask(loss, params, xb[:2], yb[:2], 0.1, fresh_batches=False, **kw)
  fresh = S.force_mask(loss, params, xb, yb, 0.1, seed=0, **kw)
  again = S.force_mask(loss, params, xb, yb, 0.1, seed=0, **kw)
  other = S.force_mask(loss, params, xb, yb, 0.1, seed=1, **kw)
  assert fresh.num_kept == fixed.num_kept == math.floor(0.1 * 640)
  assert np.any(fresh.mask != fixed.mask)
  np.testing.assert_array_equal(fresh.mask, again.mask)
  assert np.any(fresh.mask != other.mask)
  # The default is fresh batches, and compute_mask passes the seed through.
  via_registry = S.compute_mask("force", 0.1, params=params, loss_fn=loss, x=xb, y=yb,
                                seed=0, **kw)
  np.testing.assert_array_equal(via_registry.mask, fresh.mask)
