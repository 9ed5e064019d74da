"""Data attacks (fedjax_sparse/attacks/data.py): label flips, backdoors and
the choice of the malicious clients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import attacks as A


def test_label_flips():
  y = jnp.arange(10, dtype=jnp.int32)
  x = jnp.zeros((10, 4, 4, 1))
  key = jax.random.key(0)
  _, yr = A.label_flip(10, "reverse").apply(x, y, key, None)
  np.testing.assert_array_equal(yr, 9 - np.arange(10))
  _, yc = A.label_flip(10, "circular").apply(x, y, key, None)
  np.testing.assert_array_equal(yc, (np.arange(10) + 1) % 10)
  with pytest.raises(ValueError, match="reverse, circular"):
    A.label_flip(10, "other")


def test_dba_triggers_and_fraction():
  b = 20
  x = jnp.asarray(np.random.default_rng(0).random((b, 28, 28, 1)) * 0.5, jnp.float32)
  y = jnp.full((b,), 3, jnp.int32)
  attack = A.dba(10, target_label=0, poison_fraction=0.2)
  trig = A.dba_triggers((28, 28, 1))
  assert len(trig) == 4
  assert not np.any(trig[0].mask & trig[1].mask)
  apply = jax.jit(attack.apply)
  for rank in range(8):
    ctx = A.AttackContext(client_rank=jnp.int32(rank))
    xp, yp = apply(x, y, jax.random.key(rank), ctx)
    xp, yp = np.asarray(xp), np.asarray(yp)
    poisoned = yp == 0
    assert poisoned.sum() == 4                           # 20% of 20, exactly
    stamped = np.any(xp != np.asarray(x), axis=(1, 2, 3))
    np.testing.assert_array_equal(stamped, poisoned)
    for i in np.flatnonzero(poisoned):
      np.testing.assert_array_equal(xp[i, :, :, 0] != np.asarray(x)[i, :, :, 0],
                                    trig[rank % 4].mask)
      assert np.all(xp[i, trig[rank % 4].mask, 0] == np.asarray(x).max())
  # Deterministic from the key.
  a1 = apply(x, y, jax.random.key(5), ctx)[1]
  np.testing.assert_array_equal(a1, apply(x, y, jax.random.key(5), ctx)[1])
  # The ASR test set: non-target samples, global trigger, target label.
  xt = np.random.default_rng(0).random((30, 28, 28, 1)).astype(np.float32)
  yt = np.arange(30) % 10
  xs, ys = A.backdoor_test_set(xt, yt, A.global_trigger(trig), 0)
  assert xs.shape[0] == 27 and np.all(ys == 0)
  g = A.global_trigger(trig).mask
  assert np.all(xs[:, g, 0] == xt.max())


def test_other_data_attacks():
  y = jnp.asarray(np.arange(50) % 10, jnp.int32)
  x = jnp.zeros((50, 28, 28, 1))
  key = jax.random.key(0)
  _, ys = A.semantic_backdoor(10, 7, 1).apply(x, y, key, None)
  np.testing.assert_array_equal(ys, np.where(np.asarray(y) == 7, 1, y))
  _, yc = A.convergence_prevention(10).apply(x, y, key, None)
  assert np.sum(np.asarray(yc) != np.asarray(y)) == 20   # 40% changed
  xp, yp = A.pixel_backdoor(10, target_label=2, poison_fraction=0.5).apply(
      x + 0.5, y, key, None)
  assert np.sum(np.asarray(yp) == 2) >= 25


def test_choose_malicious():
  np.testing.assert_array_equal(A.choose_malicious(5, 2), [1, 1, 0, 0, 0])
  r = A.choose_malicious(100, 40, "random", seed=3)
  assert r.sum() == 40
  np.testing.assert_array_equal(r, A.choose_malicious(100, 40, "random", seed=3))
  np.testing.assert_array_equal(A.malicious_rank(np.array([0, 1, 0, 1, 1], bool)),
                                [-1, 0, -1, 1, 2])
  with pytest.raises(ValueError, match="first, random"):
    A.choose_malicious(5, 2, "last")
