"""The typed round context (fedjax_sparse/context.py) and how the round step
fills it."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators, attacks
from fedjax_sparse.aggregators.base import AggOut, combine, stateless
from fedjax_sparse.attacks.base import DataAttack, UpdateAttack, no_state
from fedjax_sparse.client.local import ClientConfig
from fedjax_sparse.context import SIDE_INPUTS, RoundContext
from fedjax_sparse.layout import layout_of
from fedjax_sparse.simulation.round import (RoundConfig, RoundData,
                                            init_server_state, make_round_step)


def test_one_class_under_both_contract_names():
  assert aggregators.AggContext is RoundContext
  assert attacks.AttackContext is RoundContext


def test_side_inputs_are_typed_fields_not_extra_keys():
  ctx = RoundContext(round=jnp.int32(3), clients=jnp.arange(4),
                     lr=jnp.float32(0.5), num_clients=4)
  for name in SIDE_INPUTS:
    assert name in RoundContext.__dataclass_fields__, name
  assert ctx.extra is None  # nothing untyped is stored
  assert ctx.malicious is None and ctx.server_update is None
  np.testing.assert_array_equal(ctx.clients, np.arange(4))
  # Traced fields are leaves, static fields part of the tree structure.
  leaves = jax.tree.leaves(ctx)
  assert len(leaves) == 3
  other = ctx.replace(num_clients=5)
  assert jax.tree.structure(other) != jax.tree.structure(ctx)
  doubled = jax.jit(lambda c: c.replace(lr=2 * c.lr))(ctx)
  assert float(doubled.lr) == 1.0 and doubled.num_clients == 4
  with pytest.raises(TypeError):
    RoundContext(jnp.int32(0), jnp.zeros(3))  # only round is positional


def test_the_old_extra_argument_maps_onto_the_fields():
  mal = jnp.asarray([True, False])
  with pytest.warns(DeprecationWarning, match="malicious="):
    ctx = RoundContext(extra={"malicious": mal, "lr": jnp.float32(0.1)})
  assert ctx.malicious is mal and float(ctx.lr) == pytest.approx(0.1)
  assert ctx.extra is None
  with pytest.raises(TypeError, match="unknown extra key.*'foo'"):
    RoundContext(extra={"foo": 1})
  with pytest.raises(TypeError, match="both"):
    RoundContext(lr=jnp.float32(1), extra={"lr": jnp.float32(2)})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    RoundContext(extra={})  # nothing given, nothing said


def test_missing_side_inputs_say_which_field():
  u = jnp.ones((3, 4))
  w = jnp.ones((3,))
  ctx = RoundContext(round=jnp.int32(0), num_clients=3)
  key = jax.random.key(0)
  for name, hp, field in (("fednova", {}, "ctx.local_steps"),
                          ("fltrust", {}, "ctx.server_update"),
                          ("foolsgold", {"num_clients": 2}, "ctx.clients")):
    agg = aggregators.get(name)(**hp)
    with pytest.raises(ValueError, match=field):
      agg.apply(agg.init(4), u, None, w, key, ctx)
  clip = aggregators.get_pre("clip")(aggregators.get("fedavg")(),
                                     adaptive_clip=True)
  with pytest.raises(ValueError, match="AggContext.lr"):
    clip.apply((), u, None, w, key, ctx)
  pgd = attacks.get_update_attack("targeted_pgd")()
  with pytest.raises(ValueError, match="ctx.targeted_update"):
    pgd.apply((), u, jnp.asarray([True, False, False]), key, ctx)
  out, _ = pgd.apply((), u, jnp.asarray([True, False, False]), key,
                     ctx.replace(targeted_update=jnp.full((4,), 7.0)))
  np.testing.assert_array_equal(out[0], np.full(4, 7.0))


# ------------------------------------------------- the round step fills it


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _data(num_clients=6, per_client=8):
  rng = np.random.default_rng(0)
  n = num_clients * per_client
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  idx = np.arange(n, dtype=np.int32).reshape(num_clients, per_client)
  mal = np.array([True, False, True, False, False, True])
  rank = np.where(mal, np.cumsum(mal) - 1, -1).astype(np.int32)
  return RoundData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx),
                   jnp.full((num_clients,), per_client, jnp.int32),
                   malicious=jnp.asarray(mal), rank=jnp.asarray(rank))


def _spy_rule():
  """A selection rule (every other client) that reports what it was given."""

  def apply(updates, masks, weights, key, ctx):
    k = updates.shape[0]
    acceptance = (jnp.arange(k) % 2 == 0).astype(jnp.float32)
    diagnostics = {"seen_clients": ctx.clients, "seen_lr": ctx.lr,
                   "seen_malicious": ctx.malicious,
                   "seen_steps": ctx.local_steps}
    return AggOut(combine(updates, masks, weights, acceptance), acceptance,
                  diagnostics)

  return stateless(apply, selection_escape="escape_ratio")


def test_the_round_step_fills_the_typed_fields_and_the_escape_ratio():
  data = _data()
  model = _MLP()
  variables = model.init(jax.random.key(0), data.x[:1])
  seen = {}

  def attack_apply(state, updates, is_malicious, key, ctx):
    seen["agg_state"] = ctx.agg_state
    seen["weights"] = ctx.weights
    return updates, state

  def poison(x, y, key, ctx):
    seen["client_rank"] = ctx.client_rank
    return x, y

  cfg = RoundConfig(num_clients=6, clients_per_round=4, engine="vmap",
                    client_devices=1, server_lr=0.5, attack_start=1,
                    client=ClientConfig(lr=0.1, batch_size=4, local_epochs=1))
  agg = _spy_rule()
  update_attack = UpdateAttack(no_state, attack_apply)
  step = make_round_step(cfg, model.apply, agg,
                         layout_of(variables["params"]), data.idx.shape[1],
                         update_attack=update_attack,
                         data_attack=DataAttack(poison, 3))
  state = init_server_state(cfg, variables, agg, jax.random.key(1),
                            update_attack)
  rates = []
  for _ in range(3):
    state, m = step(state, data)
    np.testing.assert_array_equal(m["agg/seen_clients"], m["clients"])
    np.testing.assert_array_equal(m["agg/seen_malicious"], m["malicious"])
    assert float(m["agg/seen_lr"]) == 0.5
    np.testing.assert_array_equal(m["agg/seen_steps"], np.full(4, 2.0))
    acc, mal = np.asarray(m["acceptance"]), np.asarray(m["malicious"])
    expect = ((acc > 0) & mal).sum() / mal.sum() if mal.any() else 0.0
    np.testing.assert_allclose(m["agg/escape_ratio"], expect)
    rates.append(float(m["agg/escape_ratio"]))
  assert len(set(rates)) > 1  # the sampled clients changed
  assert seen["agg_state"] == () and seen["weights"] is not None
  assert seen["client_rank"] is not None
