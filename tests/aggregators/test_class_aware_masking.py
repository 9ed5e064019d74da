"""Class-aware gradient masking against a numpy loop reference.

A one-hidden-layer MLP (4x4x1 inputs, 8 hidden units, 3 classes) whose
forward pass and backpropagation are written out in numpy; the reference
loops over the sampled clients and keeps its own mask table.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.models import get_model

NUM_CLIENTS, K, C, PER_CLASS = 6, 4, 3, 5


@functools.lru_cache(maxsize=None)
def _setup():
  model = get_model("mlp", C, width=(8,))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))["params"]
  flat, unravel = ravel_pytree(params)
  rs = np.random.RandomState(0)
  # Class-dependent inputs so that local models differ in per-class accuracy.
  val_x = (rs.randn(C, PER_CLASS, 4, 4, 1)
           + 1.5 * np.arange(C)[:, None, None, None, None]).astype(np.float32)
  val_y = np.repeat(np.arange(C, dtype=np.int32)[:, None], PER_CLASS, axis=1)
  return model, np.asarray(flat), unravel, val_x, val_y


@functools.lru_cache(maxsize=None)
def _jitted(mode, **hp):
  model, _, unravel, val_x, val_y = _setup()
  agg = agg_lib.get("class_aware_masking")(
      model.apply, unravel, val_x, val_y, NUM_CLIENTS, mode=mode, **hp)
  return agg.init, jax.jit(agg.apply)


def _ctx(global_params, clients, malicious=None):
  return AggContext(round=jnp.int32(0), global_params=jnp.asarray(global_params),
                    clients=jnp.asarray(clients, jnp.int32),
                    lr=jnp.float32(1.0),
                    malicious=(None if malicious is None
                               else jnp.asarray(malicious)),
                    num_clients=len(clients))


# ---------------------------------------------------------------- reference


def _np_params(theta, unravel):
  p = jax.tree.map(np.asarray, unravel(jnp.asarray(theta, jnp.float32)))
  return {k: {n: v.astype(np.float64) for n, v in d.items()} for k, d in p.items()}


def np_forward(prm, x):
  x = x.reshape(len(x), -1).astype(np.float64)
  pre = x @ prm["Dense_0"]["kernel"] + prm["Dense_0"]["bias"]
  h = np.maximum(pre, 0.0)
  return x, pre, h, h @ prm["Dense_1"]["kernel"] + prm["Dense_1"]["bias"]


def np_grad(prm, x, y):
  """Gradient of the mean softmax cross-entropy, as a flat vector."""
  x, pre, h, logits = np_forward(prm, x)
  z = logits - logits.max(1, keepdims=True)
  prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  dlog = (prob - np.eye(logits.shape[1])[y]) / len(y)
  dh = dlog @ prm["Dense_1"]["kernel"].T
  dpre = dh * (pre > 0)
  grads = {"Dense_0": {"bias": dpre.sum(0), "kernel": x.T @ dpre},
           "Dense_1": {"bias": dlog.sum(0), "kernel": h.T @ dlog}}
  return np.asarray(ravel_pytree(grads)[0], np.float64)


def np_class_aware(global_params, updates, clients, masks, val_x, val_y, unravel,
                   p=0.5, beta=0.4, gamma=0.5, mode="model"):
  """Alg. 1 client by client. Returns (update, acceptance, classes, new masks)."""
  masks = masks.copy()
  d = len(global_params)
  n_keep = math.ceil(p * d)
  locals_, cur, classes = [], [], []
  for i, c in enumerate(clients):
    lm = global_params.astype(np.float64) - updates[i]
    prm = _np_params(lm, unravel)
    acc = [np.mean(np.argmax(np_forward(prm, val_x[cl])[3], 1) == val_y[cl])
           for cl in range(len(val_y))]
    cstar = int(np.argmax(acc))
    g = np.abs(np_grad(prm, val_x[cstar], val_y[cstar]))
    new = np.full(d, gamma)
    new[np.argsort(-g, kind="stable")[:n_keep]] = 1.0
    m = (1 - beta) * new + beta * masks[c]
    masks[c] = m
    locals_.append(lm)
    cur.append(m)
    classes.append(cstar)
  cur = np.array(cur)
  omega = cur.sum(1)
  if mode == "model":
    gm = (omega[:, None] * np.array(locals_) * cur).sum(0) / omega.sum()
    update = global_params - gm
  else:
    update = (omega[:, None] * updates * cur).sum(0) / omega.sum()
  return update, omega / omega.max(), np.array(classes), masks


def _round_inputs(seed):
  _, flat, _, _, _ = _setup()
  rs = np.random.RandomState(seed)
  g = (flat + 0.1 * rs.randn(len(flat))).astype(np.float32)
  u = (0.3 * rs.randn(K, len(flat))).astype(np.float32)
  return g, u


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["model", "delta"])
def test_matches_reference_over_two_rounds(mode):
  _, flat, unravel, val_x, val_y = _setup()
  d = len(flat)
  init, apply = _jitted(mode)
  state = init(d)
  ref_masks = np.ones((NUM_CLIENTS, d))
  # Clients 1 and 4 take part in both rounds; 0 and 3 only in the first,
  # 2 and 5 only in the second.
  seen_classes = set()
  for rnd, clients in enumerate([[4, 1, 3, 0], [1, 5, 2, 4]]):
    g, u = _round_inputs(rnd)
    before = np.asarray(state.masks)
    out, state = apply(state, jnp.asarray(u), None, jnp.ones(K), None,
                       _ctx(g, clients))
    upd, acc, classes, ref_masks = np_class_aware(
        g, u, clients, ref_masks, val_x, val_y, unravel, mode=mode)
    got_masks = np.asarray(state.masks)
    np.testing.assert_allclose(got_masks, ref_masks, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out.diagnostics["dominant_class"], classes)
    np.testing.assert_allclose(out.acceptance, acc, rtol=1e-6)
    np.testing.assert_allclose(out.update, upd, rtol=1e-4, atol=1e-5)
    # Rows of clients not sampled this round are untouched.
    others = np.setdiff1d(np.arange(NUM_CLIENTS), clients)
    np.testing.assert_array_equal(got_masks[others], before[others])
    seen_classes.update(classes.tolist())
    if rnd == 0:
      # First round: M = (1 - beta) M_new + beta * 1, values 1 or 0.7.
      np.testing.assert_allclose(np.unique(got_masks[clients]), [0.7, 1.0], rtol=1e-6)
    else:
      # Returning clients blend with their round-1 masks: 4 distinct values.
      assert len(np.unique(got_masks[[1, 4]])) > 2
      np.testing.assert_array_equal(got_masks[[2, 5]] <= 1.0, True)
  assert len(seen_classes) >= 2  # the dominant class is not a constant


def test_model_mode_lands_on_the_masked_average():
  _, flat, unravel, val_x, val_y = _setup()
  init, apply = _jitted("model")
  g, u = _round_inputs(3)
  out, _ = apply(init(len(flat)), jnp.asarray(u), None, jnp.ones(K), None,
                 _ctx(g, [0, 1, 2, 3]))
  # The server step theta - 1.0 * update gives GM.
  gm = g - np.asarray(out.update)
  _, _, _, masks = np_class_aware(g, u, [0, 1, 2, 3], np.ones((NUM_CLIENTS, len(g))),
                                  val_x, val_y, unravel)
  omega = masks[:K].sum(1)
  expect = (omega[:, None] * (g[None] - u) * masks[:K]).sum(0) / omega.sum()
  np.testing.assert_allclose(gm, expect, rtol=1e-4, atol=1e-5)


def test_gamma_one_is_plain_averaging():
  # All masks 1: "model" gives the mean local model, "delta" the mean update.
  _, flat, _, _, _ = _setup()
  g, u = _round_inputs(4)
  for mode in ("model", "delta"):
    init, apply = _jitted(mode, gamma=1.0)
    out, state = apply(init(len(flat)), jnp.asarray(u), None, jnp.ones(K), None,
                       _ctx(g, [5, 0, 2, 1]))
    np.testing.assert_allclose(out.update, u.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.acceptance, 1.0)
    np.testing.assert_allclose(state.masks, 1.0)


def test_client_batch_matches_vmap():
  _, flat, _, _, _ = _setup()
  g, u = _round_inputs(6)
  outs = []
  for hp in ({}, {"client_batch": 3}):
    init, apply = _jitted("model", **hp)
    out, state = apply(init(len(flat)), jnp.asarray(u), None, jnp.ones(K), None,
                       _ctx(g, [2, 0, 5, 1]))
    outs.append((np.asarray(out.update), np.asarray(state.masks)))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_non_finite_row_gets_no_weight():
  _, flat, _, _, _ = _setup()
  g, u = _round_inputs(5)
  u[2, 3] = np.nan
  init, apply = _jitted("delta")
  state = init(len(flat))
  out, new_state = apply(state, jnp.asarray(u), None, jnp.ones(K), None,
                         _ctx(g, [0, 1, 2, 3]))
  assert np.all(np.isfinite(out.update))
  assert out.acceptance[2] == 0 and np.all(np.asarray(out.acceptance)[[0, 1, 3]] > 0)
  np.testing.assert_array_equal(new_state.masks[2], 1.0)


def test_configuration_errors():
  model, flat, unravel, val_x, val_y = _setup()
  make = functools.partial(agg_lib.get("class_aware_masking"), model.apply, unravel,
                           val_x, val_y, NUM_CLIENTS)
  with pytest.raises(ValueError, match="zip percentage"):
    make(p=0.0)
  with pytest.raises(ValueError, match="beta"):
    make(beta=1.5)
  with pytest.raises(ValueError, match="unknown mode"):
    make(mode="models")
  with pytest.raises(ValueError, match="per_class_validation"):
    agg_lib.get("class_aware_masking")(model.apply, unravel, val_x[0], val_y,
                                       NUM_CLIENTS)
  agg = make()
  g, u = _round_inputs(0)
  ctx = AggContext(round=jnp.int32(0), global_params=jnp.asarray(g))
  with pytest.raises(ValueError, match="clients"):
    agg.apply(agg.init(len(flat)), jnp.asarray(u), None, jnp.ones(K), None, ctx)


def test_inside_the_round_step():
  # Two rounds of the jitted round step: the mask table is carried in the
  # aggregator state and only the sampled rows change.
  from fedjax_sparse.client.local import ClientConfig
  from fedjax_sparse.layout import layout_of
  from fedjax_sparse.simulation.round import (RoundConfig, RoundData,
                                              init_server_state, make_round_step)
  model, _, _, val_x, val_y = _setup()
  rs = np.random.RandomState(7)
  n = 120
  y = rs.randint(0, C, n).astype(np.int32)
  x = (rs.randn(n, 4, 4, 1) + 1.5 * y[:, None, None, None]).astype(np.float32)
  idx = rs.permutation(n).reshape(NUM_CLIENTS, -1).astype(np.int32)
  data = RoundData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx),
                   jnp.full((NUM_CLIENTS,), idx.shape[1], jnp.int32))
  variables = model.init(jax.random.key(0), data.x[:1])
  _, unravel = ravel_pytree(variables["params"])
  agg = agg_lib.get("class_aware_masking")(model.apply, unravel, val_x, val_y,
                                           NUM_CLIENTS)
  cfg = RoundConfig(num_clients=NUM_CLIENTS, clients_per_round=K,
                    engine="vmap", client_devices=1,
                    client=ClientConfig(lr=0.1, batch_size=8, local_epochs=1))
  step = make_round_step(cfg, model.apply, agg, layout_of(variables["params"]),
                         idx.shape[1])
  state = init_server_state(cfg, variables, agg, jax.random.key(1))
  sampled = set()
  for _ in range(2):
    state, metrics = step(state, data)
    sampled.update(np.asarray(metrics["clients"]).tolist())
    assert np.all(np.asarray(metrics["acceptance"]) > 0)
  masks = np.asarray(state.agg_state.masks)
  for c in range(NUM_CLIENTS):
    assert (c in sampled) == bool(np.any(masks[c] < 1.0))
  assert np.all(np.isfinite(ravel_pytree(state.params)[0]))


def test_local_models_are_evaluated_with_their_own_batchnorm_statistics():
  """With BatchNorm, LM_i is evaluated with client i's statistics
  (ctx.client_model_state), not the ones given at construction."""
  model = get_model("mlp_bn", C, width=(8,))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 4, 1)))
  flat, unravel = ravel_pytree(variables["params"])
  _, _, _, val_x, val_y = _setup()
  agg = agg_lib.get("class_aware_masking")(
      model.apply, unravel, val_x, val_y, NUM_CLIENTS, mode="delta",
      model_state={"batch_stats": variables["batch_stats"]})
  rs = np.random.RandomState(3)
  updates = jnp.asarray(rs.randn(K, flat.size) * 0.1, jnp.float32)
  ctx = _ctx(flat, [0, 1, 2, 3])
  stats = variables["batch_stats"]
  # Client statistics far from the initial (mean 0, var 1) ones.
  shifted = jax.tree.map(
      lambda a: jnp.stack([a + 3.0 * (i + 1) for i in range(K)]), stats)
  apply = jax.jit(agg.apply)
  fixed, _ = apply(agg.init(flat.size), updates, None, jnp.ones(K),
                   jax.random.PRNGKey(0), ctx)
  own, _ = apply(agg.init(flat.size), updates, None, jnp.ones(K),
                 jax.random.PRNGKey(0),
                 ctx.replace(client_model_state={"batch_stats": shifted}))
  same = jax.tree.map(lambda a: jnp.stack([a] * K), stats)
  again, _ = apply(agg.init(flat.size), updates, None, jnp.ones(K),
                   jax.random.PRNGKey(0),
                   ctx.replace(client_model_state={"batch_stats": same}))
  np.testing.assert_array_equal(np.asarray(again.update), np.asarray(fixed.update))
  assert not np.allclose(np.asarray(own.update), np.asarray(fixed.update))
