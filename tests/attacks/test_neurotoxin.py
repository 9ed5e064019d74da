"""Neurotoxin (fedjax_sparse/attacks/neurotoxin.py) and the data attacks'
gradient projection (``DataAttack.grad_mask``) in local training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from fedjax_sparse.attacks import AttackContext, DataAttack, get_data_attack
from fedjax_sparse.attacks.neurotoxin import neurotoxin_mask
from fedjax_sparse.client.local import ClientConfig, make_client_train


def np_mask(g, top_fraction):
  d = len(g)
  k = int(np.ceil(round(top_fraction * d, 9)))
  out = np.ones(d, np.float32)
  if k == 0 or not np.any(g != 0):
    return out
  order = np.argsort(-np.abs(g), kind="stable")  # ties: the lower index
  out[order[:k]] = 0
  return out


@pytest.mark.parametrize("d,frac", [(50, 0.1), (7, 0.01), (200, 0.25),
                                    (30, 0.0)])
def test_mask_against_numpy(d, frac):
  rs = np.random.RandomState(d)
  g = rs.randn(d).astype(np.float32)
  g[3:9] = g[2]  # ties at the threshold
  got = np.asarray(jax.jit(lambda v: neurotoxin_mask(v, frac))(g))
  np.testing.assert_array_equal(got, np_mask(g, frac))
  assert got.sum() == d - int(np.ceil(round(frac * d, 9)))
  # No previous update yet: nothing masked.
  np.testing.assert_array_equal(
      np.asarray(neurotoxin_mask(jnp.zeros((d,)), frac)), np.ones(d))


def test_factory_checks_and_needs_the_previous_update():
  with pytest.raises(ValueError, match="top_fraction"):
    get_data_attack("neurotoxin")(10, top_fraction=1.0)
  attack = get_data_attack("neurotoxin")(10, top_fraction=0.5)
  with pytest.raises(ValueError, match="prev_aggregate"):
    attack.grad_mask(AttackContext(round=jnp.int32(0)))
  g = jnp.asarray([3.0, -4.0, 1.0, 0.5])
  np.testing.assert_array_equal(
      np.asarray(attack.grad_mask(AttackContext(round=jnp.int32(1),
                                                prev_aggregate=g))),
      [0.0, 0.0, 1.0, 1.0])
  # The batches are pixel_backdoor's: the trigger stamped, the target label.
  x = jnp.zeros((10, 8, 8, 1))
  y = jnp.arange(10, dtype=jnp.int32) % 10
  xa, ya = attack.apply(x, y, jax.random.PRNGKey(0), None)
  base = get_data_attack("pixel_backdoor")(10)
  xb, yb = base.apply(x, y, jax.random.PRNGKey(0), None)
  np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
  np.testing.assert_array_equal(np.asarray(ya), np.asarray(yb))


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("update_mode", ["delta", "momentum"])
def test_grad_mask_confines_the_poisoning_clients_training(update_mode):
  rs = np.random.RandomState(0)
  x = rs.randn(40, 5).astype(np.float32)
  y = rs.randint(0, 3, 40).astype(np.int32)
  model = _MLP()
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  flat, _ = ravel_pytree(params)
  d = flat.shape[0]
  keep = (rs.rand(d) < 0.5).astype(np.float32)
  attack = DataAttack(lambda xb, yb, key, ctx: (xb, yb), 3,
                      lambda ctx: jnp.asarray(keep) * (ctx.round >= 0))
  cfg = ClientConfig(lr=0.1, batch_size=8, local_epochs=2,
                     update_mode=update_mode)
  train = jax.jit(make_client_train(model.apply, cfg, 40, data_attack=attack),
                  static_argnames=())
  cstate = (jax.tree.map(jnp.zeros_like, params) if update_mode == "momentum"
            else ())
  ctx = AttackContext(round=jnp.int32(2), prev_aggregate=jnp.zeros((d,)))
  idx = jnp.arange(40, dtype=jnp.int32)
  outs = {}
  for poison in (True, False):
    out = train(params, {}, cstate, x, y, idx, jnp.int32(40),
                jax.random.PRNGKey(1), jnp.bool_(poison), ctx)
    outs[poison] = np.asarray(out.update)
  masked = keep == 0
  assert np.all(outs[True][masked] == 0)
  assert np.abs(outs[True][~masked]).max() > 0
  assert np.abs(outs[False][masked]).max() > 0  # honest clients unmasked
