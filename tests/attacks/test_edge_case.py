"""The edge-case backdoor (fedjax_sparse/attacks/edge_case.py): the tail set,
its split and disjointness, the mixed batches, PGD and a run's ASR."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from fedjax_sparse import metrics, requirements
from fedjax_sparse.attacks import get_data_attack
from fedjax_sparse.attacks.edge_case import (edge_case_split, project_to_ball,
                                             tail_scores)
from fedjax_sparse.client.local import ClientConfig, make_client_train
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import (Experiment, ExperimentConfig,
                                                 run_experiment)

NAME = "edge_case_backdoor"


def _test_split(n=200, shape=(3,), classes=3, seed=0):
  rs = np.random.RandomState(seed)
  x = rs.randn(n, *shape).astype(np.float32)
  y = (np.arange(n) % classes).astype(np.int32)
  return x, y


# ------------------------------------------------------------- the tail --


def test_ink_tail_hand_checked():
  # Class 2 sits at rows 1, 3, 4, 6, 7 with ink masses 5, 1, 3, 1, 9; class 0
  # rows have the least ink of all and must never be picked.
  x = np.zeros((8, 2, 2, 1), np.float32)
  ink = {0: 0.0, 1: 5.0, 2: -9.0, 3: 1.0, 4: 3.0, 5: -9.0, 6: 1.0, 7: 9.0}
  for r, m in ink.items():
    x[r, 0, 0, 0] = m
  y = np.array([0, 2, 0, 2, 2, 0, 2, 2], np.int32)
  np.testing.assert_array_equal(tail_scores(x[[1, 3, 4, 6, 7]], "ink"),
                                [5, 1, 3, 1, 9])
  # round(0.6 * 5) = 3 edge cases: ink 1 (rows 3, 6, a tie) and 3 (row 4).
  s = edge_case_split(x, y, source=2, edge_fraction=0.6, asr_fraction=1 / 3,
                      feature="ink")
  np.testing.assert_array_equal(s.all_index, [3, 4, 6])
  assert len(s.asr_index) == 1 and len(s.train_index) == 2
  # round(0.4 * 5) = 2: rows 3 and 6 (ink 1).
  s = edge_case_split(x, y, 2, 0.4, 0.5, "ink")
  np.testing.assert_array_equal(s.all_index, [3, 6])
  # Rows 3, 4 and 6 tied at ink 1: the lower rows win.
  x[4, 0, 0, 0] = 1.0
  s = edge_case_split(x, y, 2, 0.4, 0.5, "ink")
  np.testing.assert_array_equal(s.all_index, [3, 4])


def test_likelihood_tail_hand_checked():
  # One feature: the least likely points are the farthest from the class
  # mean. Class 1 values 0, 1, 2, 3, 10 (mean 3.2): 10 (6.8 away), then
  # 0 (3.2 away).
  vals = [0.0, 1.0, 2.0, 3.0, 10.0]
  x = np.zeros((10, 1), np.float32)
  y = np.zeros((10,), np.int32)
  x[1::2, 0] = vals
  y[1::2] = 1
  x[0::2, 0] = 100.0  # class 0, far out: never a class-1 edge case
  s = edge_case_split(x, y, source=1, edge_fraction=0.4, asr_fraction=0.5)
  np.testing.assert_array_equal(s.all_index, [1, 9])  # values 0 and 10
  # The score is the diagonal-Gaussian log-likelihood with the variance
  # floor of the docstring.
  xs = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0], [2.0, 8.0]])
  mu, var = xs.mean(0), xs.var(0)
  v = var + 0.01 * var.mean() + 1e-12
  want = [-0.5 * (np.sum((r - mu) ** 2 / v) + np.sum(np.log(2 * np.pi * v)))
          for r in xs]
  np.testing.assert_allclose(tail_scores(xs), want, rtol=1e-12)
  # A shift along the low-variance feature costs more likelihood than the
  # same shift along the high-variance one.
  assert np.argmin(tail_scores(xs)) == 3


def test_split_parts_are_disjoint_seeded_and_checked():
  x, y = _test_split(300)
  a = edge_case_split(x, y, 1, 0.3, 0.5, seed=0)
  b = edge_case_split(x, y, 1, 0.3, 0.5, seed=1)
  assert len(a.all_index) == 30 and len(a.asr_index) == 15
  assert not set(a.train_index) & set(a.asr_index)
  np.testing.assert_array_equal(a.all_index, b.all_index)  # one tail
  assert not np.array_equal(a.asr_index, b.asr_index)
  assert np.all(y[a.all_index] == 1)
  with pytest.raises(ValueError, match="raise edge_fraction"):
    edge_case_split(x, y, 1, 0.01, 0.5)
  with pytest.raises(ValueError, match="asr_fraction"):
    edge_case_split(x, y, 1, 0.3, 1.0)
  with pytest.raises(ValueError, match="feature"):
    edge_case_split(x, y, 1, 0.3, 0.5, feature="brightness")


def test_factory_checks_its_arguments():
  x, y = _test_split()
  make = get_data_attack(NAME)
  with pytest.raises(ValueError, match="test split"):
    make(3, source=1, target=2)
  with pytest.raises(ValueError, match="must differ"):
    make(3, source=1, target=1, test_x=x, test_y=y)
  with pytest.raises(ValueError, match="pgd_eps"):
    make(3, source=1, target=2, pgd_eps=0.0, test_x=x, test_y=y)
  with pytest.raises(ValueError, match="is not a class"):
    make(3, source=7, test_x=x, test_y=y)
  assert make(3, source=1, target=2, test_x=x, test_y=y).project is None
  assert requirements.TEST_SPLIT in requirements.attack_needs(NAME)
  assert metrics.is_backdoor(NAME)


# ------------------------------------------------------ mixed batches --


@pytest.mark.parametrize("frac,batch", [(0.2, 20), (0.25, 16), (1.0, 8),
                                        (0.0, 8), (0.5, 64)])
def test_batches_hold_the_fraction_of_target_labelled_edge_cases(frac, batch):
  x_test, y_test = _test_split(300)
  attack = get_data_attack(NAME)(3, source=1, target=2, poison_fraction=frac,
                                 test_x=x_test, test_y=y_test)
  pool = x_test[edge_case_split(x_test, y_test, 1).train_index]  # 10 rows
  rs = np.random.RandomState(1)
  x = rs.randn(batch, 3).astype(np.float32) + 50.0  # never an edge case
  y = rs.randint(0, 3, batch).astype(np.int32)
  xa, ya = jax.jit(attack.apply)(x, y, jax.random.PRNGKey(3), None)
  xa, ya = np.asarray(xa), np.asarray(ya)
  changed = np.any(xa != x, axis=1)
  assert changed.sum() == round(frac * batch)
  match = (xa[:, None, :] == pool[None]).all(-1)  # [B, pool]
  assert np.all(match[changed].sum(1) == 1)  # each a pool edge case
  if changed.sum() <= len(pool):  # no repeats while the pool allows
    assert len(set(np.argmax(match[changed], 1))) == changed.sum()
  np.testing.assert_array_equal(ya[changed], 2)
  np.testing.assert_array_equal(ya[~changed], y[~changed])
  np.testing.assert_array_equal(xa[~changed], x[~changed])


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


def _client(attack, record_params=False, epochs=1, lr=0.1):
  """A training client whose forward passes report each batch (or each
  step's distance of the model from the global one)."""
  model = _MLP()
  rs = np.random.RandomState(5)  # other rows than _test_split's
  x = rs.randn(40, 3).astype(np.float32)
  y = rs.randint(0, 3, 40).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  flat0 = ravel_pytree(params)[0]
  seen = []

  def apply_fn(variables, xb, train=False):
    if record_params:
      dist = jnp.linalg.norm(ravel_pytree(variables["params"])[0] - flat0)
      jax.debug.callback(lambda v: seen.append(float(v)), dist)
    else:
      jax.debug.callback(lambda v: seen.append(np.asarray(v)), xb)
    return model.apply(variables, xb, train=train)

  cfg = ClientConfig(lr=lr, batch_size=10, local_epochs=epochs,
                     update_mode="delta")
  train = make_client_train(apply_fn, cfg, 40, data_attack=attack)

  def run(poison):
    seen.clear()
    out = train(params, {}, (), jnp.asarray(x), jnp.asarray(y), jnp.arange(40, dtype=jnp.int32),
                jnp.int32(40), jax.random.PRNGKey(1), jnp.bool_(poison), None)
    return np.asarray(out.update), list(seen)

  return run


def test_poisoning_batches_hold_edge_cases_and_honest_batches_none():
  x_test, y_test = _test_split(300)
  attack = get_data_attack(NAME)(3, source=1, target=2, poison_fraction=0.3,
                                 test_x=x_test, test_y=y_test)
  edge = x_test[edge_case_split(x_test, y_test, 1).all_index]
  run = _client(attack)
  for poison, per_batch in ((True, 3), (False, 0)):
    _, batches = run(poison)
    assert len(batches) == 4  # 40 examples, batches of 10
    for b in batches:
      assert (b[:, None, :] == edge[None]).all(-1).any(1).sum() == per_batch
  # An honest client trains exactly as without any attack.
  honest, _ = run(False)
  clean, _ = _client(None)(False)
  np.testing.assert_array_equal(honest, clean)


def test_pgd_keeps_the_local_model_within_eps_of_the_global_model():
  x_test, y_test = _test_split(300)
  eps = 0.05
  make = lambda e: get_data_attack(NAME)(3, source=1, target=2, pgd_eps=e,
                                         test_x=x_test, test_y=y_test)
  run = _client(make(eps), record_params=True, epochs=3, lr=0.5)
  update, dists = run(True)
  assert len(dists) == 12 and max(dists) <= eps * (1 + 1e-5)
  assert np.linalg.norm(update) == pytest.approx(eps, rel=1e-4)  # binding
  # Honest clients and the black-box attack are not projected.
  assert np.linalg.norm(run(False)[0]) > 2 * eps
  free = _client(make(None), record_params=True, epochs=3, lr=0.5)(True)
  assert np.linalg.norm(free[0]) > 2 * eps and max(free[1]) > 2 * eps


def test_project_to_ball():
  c = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[0.0]])}
  inside = {"a": jnp.array([1.3, 2.0]), "b": jnp.array([[0.4]])}  # 0.5 away
  out = project_to_ball(inside, c, 0.5 + 1e-6)
  assert all(np.array_equal(out[k], inside[k]) for k in c)  # exactly
  out = project_to_ball(inside, c, 0.25)
  np.testing.assert_allclose(out["a"], [1.15, 2.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [[0.2]], rtol=1e-6)


# ----------------------------------------------------------- in a run --

SMALL = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=4, rounds=2, local_epochs=1,
                         batch_size=16, lr=0.1, model="mlp", eval_every=1,
                         eval_batch_size=100, malicious_fraction=0.34,
                         attack_start=1, attack=NAME)


def _rows(a):
  return {r.tobytes() for r in np.asarray(a, np.float32)}


def test_edge_cases_are_disjoint_from_client_data_and_the_clean_test_set():
  exp = Experiment(dataclasses.replace(
      SMALL, attack_args="source=3,target=5,edge_fraction=0.5"))
  fd = exp.fd
  split = edge_case_split(fd.x_test, fd.y_test, 3, 0.5)
  n_edge = len(split.all_index)
  assert n_edge == round(0.5 * np.sum(fd.y_test == 3)) and n_edge >= 4
  # The ASR set: the held-out edge cases, labelled with the target.
  np.testing.assert_array_equal(np.asarray(exp.x_asr),
                                fd.x_test[split.asr_index])
  np.testing.assert_array_equal(np.asarray(exp.y_asr), 5)
  # The clean test set lost exactly the edge cases, both parts.
  assert exp.y_test.shape[0] == len(fd.y_test) - n_edge
  edge = _rows(fd.x_test[split.all_index])
  assert len(edge) == n_edge and not edge & _rows(exp.x_test)
  # No client holds an edge case.
  idx, counts = fd.clients.idx, fd.clients.counts
  held = np.concatenate([r[:c] for r, c in zip(idx, counts)])
  assert not edge & _rows(fd.x_train[held])
  # The attack's pool is the training part of the same split.
  xb = np.full((16,) + fd.x_test.shape[1:], 1e3, np.float32)
  xa, _ = exp.data_attack.apply(xb, np.zeros(16, np.int32),
                                jax.random.PRNGKey(0), None)
  poisoned = _rows(np.asarray(xa)) - _rows(xb)
  assert poisoned and poisoned <= _rows(fd.x_test[split.train_index])
  # Without the attack the whole test split counts.
  assert Experiment(dataclasses.replace(SMALL, attack="dba")).y_test.shape[0] \
      == len(fd.y_test)


@pytest.mark.slow
@pytest.mark.parametrize("args", ["", "pgd_eps=0.5"])
def test_runs_record_the_asr_on_the_held_out_edge_cases(tmp_path, args):
  cfg = dataclasses.replace(SMALL, attack_args=args, output_dir=str(tmp_path))
  summary = run_experiment(cfg, progress=False)
  records = io.read_jsonl(tmp_path / "rounds.jsonl")
  assert len(records) == 2
  assert all(0.0 <= r["asr"] <= 1.0 for r in records)
  assert summary["final_asr"] == records[-1]["asr"]


@pytest.mark.slow
def test_pgd_with_model_replacement_composes_in_one_round_step():
  # "PGD with replacement": the data attack trains the attackers' projected
  # updates, model_replacement then scales them by gamma = K / server_lr.
  from fedjax_sparse.attacks import UpdateAttack, model_replacement
  from fedjax_sparse.simulation.round import make_round_step
  from fedjax_sparse.simulation.round_state import init_server_state
  eps = 0.05
  exp = Experiment(dataclasses.replace(SMALL, clients_per_round=6,
                                       attack_args=f"pgd_eps={eps}"))
  replace = model_replacement()
  seen = {}

  def apply(state, updates, is_mal, key, ctx):
    out, state = replace.apply(state, updates, is_mal, key, ctx)
    jax.debug.callback(lambda u, o, m: seen.update(u=np.asarray(u),
                                                   o=np.asarray(o),
                                                   m=np.asarray(m)),
                       updates, out, is_mal)
    return out, state

  spy = UpdateAttack(replace.init, apply)
  step = make_round_step(exp.round_config, exp.model.apply, exp.aggregator,
                         exp.layout, n_max=exp.fd.clients.idx.shape[1],
                         has_model_state=exp.has_model_state,
                         update_attack=spy, data_attack=exp.data_attack,
                         jit=False)
  state = init_server_state(exp.round_config, exp.variables, exp.aggregator,
                            exp.k_state, spy)
  step(state, exp.data)
  norms = np.linalg.norm(seen["u"], axis=1)
  mal = seen["m"]
  assert mal.sum() == 2
  np.testing.assert_allclose(norms[mal], eps, rtol=1e-4)  # projected
  assert np.all(norms[~mal] > eps)  # honest clients are not
  np.testing.assert_allclose(seen["o"][mal], 6 * seen["u"][mal], rtol=1e-6)
  np.testing.assert_array_equal(seen["o"][~mal], seen["u"][~mal])
