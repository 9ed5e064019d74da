"""The round step, engines and determinism (local training:
tests/client/test_local.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators
from fedjax_sparse.client.local import ClientConfig, make_client_train
from fedjax_sparse.layout import layout_of
from fedjax_sparse.simulation.round import (RoundConfig, init_server_state,
                                            make_evaluate, make_round_step)
from tests.helpers import TinyBN, TinyMLP, round_data


def _setup(model=TinyMLP(), **kw):
  data = round_data()
  variables = model.init(jax.random.key(0), data.x[:1])
  base = dict(num_clients=6, clients_per_round=4, engine="vmap",
              client_devices=1,
              client=ClientConfig(lr=0.1, batch_size=8, local_epochs=1))
  base.update(kw)
  cfg = RoundConfig(**base)
  agg = aggregators.get("fedavg")()
  step = make_round_step(cfg, model.apply, agg, layout_of(variables["params"]),
                         data.idx.shape[1],
                         has_model_state=len(variables) > 1)
  state = init_server_state(cfg, variables, agg, jax.random.key(1))
  return cfg, data, variables, step, state


def _run(step, state, data, rounds):
  losses = []
  for _ in range(rounds):
    state, m = step(state, data)
    losses.append(float(m["loss"]))
  return state, losses


@pytest.mark.parametrize("engine,chunk", [("map", 3), ("sequential", 1)])
def test_engines_agree_with_vmap(engine, chunk):
  _, data, _, step_v, state_v = _setup(engine="vmap")
  _, _, _, step_e, state_e = _setup(engine=engine, map_batch_size=chunk)
  state_v, lv = _run(step_v, state_v, data, 3)
  state_e, le = _run(step_e, state_e, data, 3)
  np.testing.assert_allclose(lv, le, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state_v.params),
                  jax.tree.leaves(state_e.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_same_seed_bitwise_identical():
  _, data, _, step, s1 = _setup()
  _, _, _, _, s2 = _setup()
  s1, l1 = _run(step, s1, data, 3)
  s2, l2 = _run(step, s2, data, 3)
  assert l1 == l2
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_round_step_matches_manual_fedavg():
  cfg, data, variables, step, state = _setup(server_lr=0.5)
  key = jax.random.key(1)  # the state's key (the step donates state)
  new_state, m = step(state, data)
  clients = np.asarray(m["clients"])
  assert len(set(clients.tolist())) == 4
  # Recompute the round by hand from the same keys.
  _, _, k_train, _, _, _ = jax.random.split(key, 6)
  keys = jax.random.split(k_train, 4)
  train = make_client_train(TinyMLP().apply, cfg.client, data.idx.shape[1])
  ups, ws = [], []
  for i, c in enumerate(clients):
    out = train(variables["params"], {}, (), data.x, data.y, data.idx[c],
                data.counts[c], keys[i])
    ups.append(np.asarray(out.update))
    ws.append(float(data.counts[c]))
  ws = np.array(ws)
  mean = (ws[:, None] * np.stack(ups)).sum(0) / ws.sum()
  flat0 = np.asarray(jax.flatten_util.ravel_pytree(variables["params"])[0])
  flat1 = np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0])
  np.testing.assert_allclose(flat1, flat0 - 0.5 * mean, rtol=1e-5, atol=1e-6)


def test_federated_training_improves_accuracy():
  _, data, _, step, state = _setup(clients_per_round=6)
  evaluate = make_evaluate(TinyMLP().apply, batch_size=64)
  acc0 = float(evaluate(state.params, {}, data.x, data.y)["accuracy"])
  state, _ = _run(step, state, data, 5)
  acc = float(evaluate(state.params, {}, data.x, data.y)["accuracy"])
  assert acc > max(0.8, acc0 + 0.2)


def test_momentum_mode_persists_client_buffers():
  cfg, data, variables, step, state = _setup(
      clients_per_round=6,
      client=ClientConfig(lr=0.1, batch_size=8, local_steps=1,
                          update_mode="momentum", momentum=0.9))
  g_state, m = step(state, data)
  # After one round with one local step, each buffer is (1 - beta) * g.
  buf = jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda a: a[0], g_state.client_state))[0]
  assert float(jnp.linalg.norm(buf)) > 0
  # The server applied lr * mean of the buffers (weighted by counts).
  flat0 = jax.flatten_util.ravel_pytree(variables["params"])[0]
  flat1 = jax.flatten_util.ravel_pytree(g_state.params)[0]
  bufs = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(
      g_state.client_state)
  w = data.counts.astype(jnp.float32)
  expect = flat0 - (w @ bufs) / w.sum()
  np.testing.assert_allclose(flat1, expect, rtol=1e-5, atol=1e-6)
  # Second round: the stored buffers decay by beta plus new gradients.
  g2, _ = step(g_state, data)
  bufs2 = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(
      g2.client_state)
  assert not np.allclose(bufs, bufs2)


def test_batchnorm_statistics_are_averaged():
  _, data, variables, step, state = _setup(model=TinyBN())
  assert "batch_stats" in state.model_state
  before = [np.asarray(a) for a in jax.tree.leaves(state.model_state)]
  state, _ = step(state, data)
  after = jax.tree.leaves(state.model_state)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  assert all(np.all(np.isfinite(np.asarray(a))) for a in after)


def test_fedprox_with_zero_mu_equals_fedavg():
  _, data, _, s1, st1 = _setup()
  _, _, _, s2, st2 = _setup(client=ClientConfig(lr=0.1, batch_size=8,
                                                local_epochs=1, prox_mu=0.0))
  st1, l1 = _run(s1, st1, data, 2)
  st2, l2 = _run(s2, st2, data, 2)
  assert l1 == l2


@pytest.mark.parametrize("kw,msg", [
    (dict(clients_per_round=7), "clients_per_round"),
    (dict(engine="pmap"), "unknown engine"),
    (dict(server_lr=0.0), "server_lr"),
    (dict(client=ClientConfig(optimizer="lamb")), "unknown client optimizer"),
    (dict(client=ClientConfig(batch_size=0)), "batch_size"),
    (dict(client=ClientConfig(update_mode="grad")), "update_mode"),
    (dict(lr_decay_round=-1), "lr_decay_round"),
    (dict(lr_decay_round=2.5), "lr_decay_round"),
    (dict(lr_decay_round=3, lr_decay_factor=0.0), "lr_decay_factor"),
])
def test_bad_round_config(kw, msg):
  cfg = RoundConfig(num_clients=6, clients_per_round=4)
  with pytest.raises(ValueError, match=msg):
    dataclasses.replace(cfg, **kw).validate()


@pytest.mark.parametrize("engine,k", [
    ("vmap", 4), pytest.param("map", 5, marks=pytest.mark.slow)])
def test_client_devices_agree_with_one_device(engine, k):
  assert jax.local_device_count() >= 2
  _, data, _, step_1, st_1 = _setup(engine=engine, map_batch_size=2,
                                    clients_per_round=k)
  _, _, _, step_2, st_2 = _setup(engine=engine, map_batch_size=2,
                                 clients_per_round=k, client_devices=2)
  st_1, l1 = _run(step_1, st_1, data, 2)
  st_2, l2 = _run(step_2, st_2, data, 2)
  np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(st_1.params), jax.tree.leaves(st_2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fednova_with_equal_steps_equals_fedavg():
  cfg_kw = dict(client=ClientConfig(lr=0.1, batch_size=8, local_steps=3))
  _, data, _, s1, st1 = _setup(**cfg_kw)
  data2 = round_data()
  model = TinyMLP()
  variables = model.init(jax.random.key(0), data2.x[:1])
  cfg = RoundConfig(num_clients=6, clients_per_round=4, engine="vmap",
                    client_devices=1, **cfg_kw)
  agg = aggregators.get("fednova")()
  s2 = make_round_step(cfg, model.apply, agg, layout_of(variables["params"]),
                       data2.idx.shape[1])
  st2 = init_server_state(cfg, variables, agg, jax.random.key(1))
  st1, l1 = _run(s1, st1, data, 2)
  st2, l2 = _run(s2, st2, data2, 2)
  for a, b in zip(jax.tree.leaves(st1.params), jax.tree.leaves(st2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fednova_formula_with_unequal_steps():
  rng = np.random.default_rng(0)
  u = rng.normal(size=(3, 5)).astype(np.float32)
  w = np.array([1.0, 2.0, 5.0], np.float32)
  tau = np.array([2.0, 4.0, 10.0], np.float32)
  agg = aggregators.get("fednova")()
  ctx = aggregators.AggContext(round=jnp.int32(0),
                               local_steps=jnp.asarray(tau))
  out, _ = jax.jit(agg.apply)((), jnp.asarray(u), None, jnp.asarray(w),
                              jax.random.key(0), ctx)
  p = w / w.sum()
  expect = (p * tau).sum() * (p[:, None] * u / tau[:, None]).sum(0)
  np.testing.assert_allclose(out.update, expect, rtol=1e-5, atol=1e-6)


def test_scaffold_first_round_equals_fedavg_then_corrects():
  _, data, _, s1, st1 = _setup(clients_per_round=6)
  _, _, _, s2, st2 = _setup(clients_per_round=6, client=ClientConfig(
      lr=0.1, batch_size=8, local_epochs=1, scaffold=True))
  st1, _ = s1(st1, data)
  st2, _ = s2(st2, data)
  # Zero control variates: the first round is FedAvg's.
  for a, b in zip(jax.tree.leaves(st1.params), jax.tree.leaves(st2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  c = jax.flatten_util.ravel_pytree(st2.server_control)[0]
  ci = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(st2.client_state)
  # c = mean of the c_i (all clients sampled, all started at zero).
  np.testing.assert_allclose(c, ci.mean(0), rtol=1e-5, atol=1e-6)
  assert float(jnp.linalg.norm(c)) > 0
  st1, _ = s1(st1, data)
  st2, _ = s2(st2, data)
  assert not np.allclose(jax.flatten_util.ravel_pytree(st1.params)[0],
                         jax.flatten_util.ravel_pytree(st2.params)[0])


def test_sample_clients_is_uniform_without_replacement():
  from fedjax_sparse.simulation.round import sample_clients
  draws = jax.jit(jax.vmap(lambda k: sample_clients(k, 10, 3)))(
      jax.random.split(jax.random.key(0), 4000))
  draws = np.asarray(draws)
  assert all(len(set(r)) == 3 for r in draws)
  freq = np.bincount(draws.ravel(), minlength=10) / draws.size
  np.testing.assert_allclose(freq, 0.1, atol=0.01)


# ------------------------------------------------------ learning-rate decay --


def _constant_aggregator(c):
  """An aggregator that ignores the clients and returns ``c`` every round."""
  from fedjax_sparse.aggregators.base import AggOut, Aggregator
  c = jnp.asarray(c, jnp.float32)
  return Aggregator(
      lambda d: (),
      lambda st, u, m, w, k, ctx: (AggOut(c, jnp.ones(u.shape[:1]),
                                          {"lr": ctx.lr}), st))


def _server_steps(server_optimizer, lr_decay_round, rounds=5):
  data = round_data()
  model = TinyMLP()
  variables = model.init(jax.random.key(0), data.x[:1])
  layout = layout_of(variables["params"])
  c = np.random.default_rng(5).normal(size=layout.d).astype(np.float32)
  cfg = RoundConfig(num_clients=6, clients_per_round=4, server_lr=0.5,
                    engine="vmap", client_devices=1,
                    server_optimizer=server_optimizer,
                    client=ClientConfig(lr=0.1, batch_size=8),
                    lr_decay_round=lr_decay_round, lr_decay_factor=0.1)
  agg = _constant_aggregator(c)
  step = make_round_step(cfg, model.apply, agg, layout, data.idx.shape[1])
  state = init_server_state(cfg, variables, agg, jax.random.key(1))
  flat = lambda p: np.asarray(jax.flatten_util.ravel_pytree(p)[0])
  deltas, lrs, prev = [], [], flat(state.params)
  for _ in range(rounds):
    state, m = step(state, data)
    now = flat(state.params)
    deltas.append(now - prev)
    lrs.append(float(m["agg/lr"]))
    prev = now
  return np.stack(deltas), lrs


@pytest.mark.parametrize("server_optimizer", ["sgd", "momentum", "adam"])
def test_lr_decay_multiplies_the_server_step_from_its_round(server_optimizer):
  # A fixed aggregate every round: with the decay from round index 2, rounds
  # 0-1 move the model as without a schedule and rounds 2-4 by 0.1 times the step they would have taken (momentum and Adam: their
  # moments are not scaled, only the step, as with an optax lr schedule).
  off, lrs_off = _server_steps(server_optimizer, None)
  on, lrs_on = _server_steps(server_optimizer, 2)
  # (deltas of f32 parameters of order 1: rounding of about 1e-7)
  np.testing.assert_allclose(on[:2], off[:2], rtol=0, atol=1e-7)
  np.testing.assert_allclose(on[2:], 0.1 * off[2:], rtol=1e-4, atol=1e-7)
  assert lrs_off == [0.5] * 5  # the aggregator sees the round's lr
  np.testing.assert_allclose(lrs_on, [0.5, 0.5, 0.05, 0.05, 0.05], rtol=1e-6)
  if server_optimizer == "sgd":
    c_step = off[0]
    np.testing.assert_allclose(on[3], 0.1 * c_step, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("update_mode", ["delta", "momentum"])
def test_lr_decay_from_round_zero_equals_smaller_learning_rates(update_mode):
  # Decay from the first round = a run with both learning rates x factor.
  client = ClientConfig(lr=0.1, batch_size=8, update_mode=update_mode)
  _, data, _, step_a, st_a = _setup(client=client, server_lr=0.5,
                                    lr_decay_round=0, lr_decay_factor=0.5)
  _, _, _, step_b, st_b = _setup(
      client=dataclasses.replace(client, lr=0.05), server_lr=0.25)
  st_a, la = _run(step_a, st_a, data, 2)
  st_b, lb = _run(step_b, st_b, data, 2)
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(st_a.params), jax.tree.leaves(st_b.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lr_decay_changes_nothing_before_the_boundary():
  # Full client training and FedAvg: before the boundary the multiplier is
  # exactly 1 (XLA may fuse the multiplication differently, so the runs
  # agree to float rounding rather than bit for bit); after it the round
  # moves the model by both factors.
  _, data, _, step_a, st_a = _setup(lr_decay_round=3)
  _, _, _, step_b, st_b = _setup()
  st_a, la = _run(step_a, st_a, data, 3)
  st_b, lb = _run(step_b, st_b, data, 3)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  flat = lambda s: np.asarray(jax.flatten_util.ravel_pytree(s.params)[0])
  np.testing.assert_allclose(flat(st_a), flat(st_b), rtol=1e-5, atol=1e-7)
  before = flat(st_b)
  st_a, _ = _run(step_a, st_a, data, 1)
  st_b, _ = _run(step_b, st_b, data, 1)
  # Server and client lr both x0.1: the round moves the model about 0.01x.
  ratio = (np.linalg.norm(flat(st_a) - before)
           / np.linalg.norm(flat(st_b) - before))
  assert 0.005 < ratio < 0.02, ratio
