"""Scale: cross-device populations, 100,000 clients over 60,000 samples."""

import dataclasses
import importlib

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_sparse import data as data_lib
from fedjax_sparse.simulation.experiment import Experiment, ExperimentConfig

partition_lib = importlib.import_module("fedjax_sparse.data.partition")


def _fmnist_labels(n=60_000):
  return np.random.default_rng(0).integers(0, 10, n).astype(np.int32)


def _check_cover(ci, n):
  m = ci.mask()
  rows = ci.idx[m]
  assert rows.size == n and np.array_equal(np.sort(rows), np.arange(n))
  assert np.all(ci.idx[~m] == 0)


@pytest.mark.parametrize("method, kw, n_max_bound", [
    ("one_class", {}, 1),
    ("dirichlet", dict(alpha=0.5, min_samples=0), 16),
    ("dirichlet", dict(alpha=0.01, min_samples=0), 64),
    ("iid", {}, 1),
])
def test_100k_clients_over_60k_samples(method, kw, n_max_bound):
  labels = _fmnist_labels()
  ci = data_lib.partition(labels, 100_000, method, allow_empty=True, **kw)
  assert ci.num_clients == 100_000
  _check_cover(ci, len(labels))
  assert ci.counts.min() == 0 and ci.counts.sum() == len(labels)
  # The table stays small: at most a few bytes per client beyond N.
  assert ci.n_max <= n_max_bound, ci.n_max
  assert ci.idx.nbytes <= 100_000 * n_max_bound * 4
  if method == "one_class":
    hist = np.zeros((100_000, 10), int)
    np.add.at(hist, ci.owner(len(labels)), np.eye(10, dtype=int)[labels])
    assert (hist > 0).sum(axis=1).max() == 1


def test_more_clients_than_samples_needs_allow_empty():
  labels = _fmnist_labels(1000)
  for method in ("one_class", "dirichlet", "iid"):
    kw = dict(min_samples=0) if method == "dirichlet" else {}
    with pytest.raises(ValueError, match="allow_empty"):
      data_lib.partition(labels, 2000, method, **kw)


@pytest.mark.parametrize("method, kw", [
    ("one_class", {}), ("iid", {}),
    ("dirichlet", dict(alpha=0.5, min_samples=3))])
def test_allow_empty_changes_nothing_when_every_client_has_data(method, kw):
  labels = _fmnist_labels(3000)
  a = data_lib.partition(labels, 200, method, seed=4, **kw)
  b = data_lib.partition(labels, 200, method, seed=4, allow_empty=True, **kw)
  np.testing.assert_array_equal(a.idx, b.idx)
  np.testing.assert_array_equal(a.counts, b.counts)


def _fd_100k():
  n, c = 6000, 100_000
  train, test = data_lib.synthetic(num_train=n, num_test=100,
                                   input_shape=(6,), seed=0)
  ci = partition_lib.one_class(train.y, c, allow_empty=True)
  return data_lib.FederatedData(
      x_train=train.x, y_train=train.y, clients=ci, x_test=test.x,
      y_test=test.y, x_val=train.x[:0], y_val=train.y[:0],
      num_classes=train.num_classes, name="synthetic")


def test_fedavg_state_has_no_per_client_arrays_at_100k_clients():
  fd = _fd_100k()
  cfg = ExperimentConfig(dataset="synthetic", num_clients=100_000,
                         clients_per_round=100, rounds=1, local_steps=1,
                         batch_size=8, lr=0.1, engine="vmap", attack_start=1,
                         eval_every=1, client_devices=1)
  exp = Experiment(cfg, fd=fd)
  state = exp.init_state()
  for leaf in jax.tree.leaves(state):
    assert 100_000 not in np.shape(leaf), np.shape(leaf)
  state, m = exp.round_step(state, exp.data)
  assert np.isfinite(float(m["loss"]))
  assert np.isfinite(np.asarray(ravel_pytree(state.params)[0])).all()
  # Momentum uploads do keep a [C, ...] buffer per client.
  mom = Experiment(dataclasses.replace(cfg, update_mode="momentum"), fd=fd)
  shapes = jax.eval_shape(mom.init_state).client_state
  assert all(s.shape[0] == 100_000 for s in jax.tree.leaves(shapes))
