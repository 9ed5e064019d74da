"""Tests of fedjax_sparse.data: partitioning and federated tables."""

from __future__ import annotations

import importlib
import time

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from fedjax_sparse import data

# The package rebinds ``partition`` to the function; fetch the module itself.
partition_lib = importlib.import_module("fedjax_sparse.data.partition")

# ---------------------------------------------------------------------------
# Helpers.


def _check_partition(ci: data.ClientIndex, n: int, num_clients: int) -> None:
  """Every sample in exactly one client; table well formed."""
  assert ci.idx.dtype == np.int32 and ci.counts.dtype == np.int32
  assert ci.idx.shape == (num_clients, int(ci.counts.max()))
  assert ci.counts.shape == (num_clients,)
  assert ci.counts.min() >= 1
  mask = ci.mask()
  np.testing.assert_array_equal(mask.sum(axis=1), ci.counts)
  assert np.all(ci.idx[~mask] == 0), "padding must be 0"
  np.testing.assert_array_equal(np.sort(ci.idx[mask]), np.arange(n))
  owner = ci.owner(n)
  assert owner.min() >= 0


def _label_hist(ci: data.ClientIndex, labels: np.ndarray,
                k: int) -> np.ndarray:
  hist = np.zeros((ci.num_clients, k), dtype=np.int64)
  rows = np.broadcast_to(np.arange(ci.num_clients)[:, None], ci.idx.shape)
  m = ci.mask()
  np.add.at(hist, (rows[m], labels[ci.idx[m]]), 1)
  return hist


def _mean_entropy(ci: data.ClientIndex, labels: np.ndarray, k: int) -> float:
  p = _label_hist(ci, labels, k) / ci.counts[:, None]
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
  return float(h.mean())


# ---------------------------------------------------------------------------
# Partitioning: properties.

_SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def _problem(draw, min_clients_per_class=False):
  n = draw(st.integers(20, 300))
  k = draw(st.integers(1, 8))
  seed = draw(st.integers(0, 2**31 - 1))
  labels = np.random.default_rng(seed).integers(0, k, n)
  lo = len(np.unique(labels)) if min_clients_per_class else 1
  num_clients = draw(st.integers(lo, min(n, 40)))
  return labels, num_clients, seed


@_SETTINGS
@given(_problem())
def test_iid_covers_every_sample_once(p):
  labels, c, seed = p
  ci = data.partition(labels, c, "iid", seed=seed)
  _check_partition(ci, len(labels), c)
  assert ci.counts.max() - ci.counts.min() <= 1


@_SETTINGS
@given(_problem(), st.sampled_from([0.05, 0.5, 5.0]), st.integers(0, 5))
def test_dirichlet_covers_every_sample_once(p, alpha, min_samples):
  labels, c, seed = p
  min_samples = min(min_samples, len(labels) // c)
  ci = data.partition(labels, c, "dirichlet", alpha=alpha,
                      min_samples=min_samples, seed=seed)
  _check_partition(ci, len(labels), c)
  assert ci.counts.min() >= max(min_samples, 1)


@_SETTINGS
@given(_problem(), st.integers(1, 4))
def test_shards_cover_every_sample_once(p, s):
  labels, c, seed = p
  s = max(1, min(s, len(labels) // c))
  ci = data.partition(labels, c, "shards", shards_per_client=s, seed=seed)
  _check_partition(ci, len(labels), c)
  if c * s >= len(np.unique(labels)):
    classes = (_label_hist(ci, labels, labels.max() + 1) > 0).sum(axis=1)
    assert classes.max() <= s


@_SETTINGS
@given(_problem(min_clients_per_class=True))
def test_one_class_covers_every_sample_once(p):
  labels, c, seed = p
  ci = data.partition(labels, c, "one_class", seed=seed)
  _check_partition(ci, len(labels), c)
  classes = (_label_hist(ci, labels, labels.max() + 1) > 0).sum(axis=1)
  np.testing.assert_array_equal(classes, 1)


# ---------------------------------------------------------------------------
# Partitioning: behaviour.


def test_dirichlet_min_samples_honoured_under_strong_skew():
  labels = np.random.default_rng(1).integers(0, 10, 2000)
  for alpha in (0.01, 0.1):
    ci = data.partition(labels, 100, "dirichlet", alpha=alpha, min_samples=15,
                        seed=3)
    _check_partition(ci, 2000, 100)
    assert ci.counts.min() >= 15


def test_dirichlet_skew_grows_as_alpha_falls():
  labels = np.random.default_rng(0).integers(0, 10, 6000)
  ent = [
      _mean_entropy(
          data.partition(labels, 30, "dirichlet", alpha=a, seed=0), labels, 10)
      for a in (100.0, 1.0, 0.1)
  ]
  assert ent[0] > ent[1] > ent[2], ent
  assert ent[0] > 0.95 * np.log(10)  # Nearly IID.


def test_shards_match_mcmahan_sizes():
  labels = np.repeat(np.arange(10), 100)
  ci = data.partition(labels, 50, "shards", shards_per_client=2, seed=0)
  np.testing.assert_array_equal(ci.counts, 20)
  classes = (_label_hist(ci, labels, 10) > 0).sum(axis=1)
  assert classes.max() <= 2


def test_shards_fewer_shards_than_classes_still_covers():
  labels = np.repeat(np.arange(10), 7)
  ci = data.partition(labels, 2, "shards", shards_per_client=2, seed=0)
  _check_partition(ci, 70, 2)


def test_one_class_many_clients_is_fast():
  labels = np.random.default_rng(0).integers(0, 10, 200_000)
  t0 = time.perf_counter()
  ci = data.partition(labels, 100_000, "one_class", seed=0)
  elapsed = time.perf_counter() - t0
  assert elapsed < 5.0, elapsed
  _check_partition(ci, 200_000, 100_000)
  first = labels[ci.idx[:, 0]]
  same = labels[ci.idx] == first[:, None]
  assert np.all(same | ~ci.mask())


@pytest.mark.parametrize("method", data.PARTITION_METHODS)
def test_partition_deterministic_given_seed(method):
  labels = np.random.default_rng(0).integers(0, 5, 500)
  a = data.partition(labels, 20, method, alpha=0.3, seed=7)
  b = data.partition(labels, 20, method, alpha=0.3, seed=7)
  c = data.partition(labels, 20, method, alpha=0.3, seed=8)
  np.testing.assert_array_equal(a.idx, b.idx)
  np.testing.assert_array_equal(a.counts, b.counts)
  assert not np.array_equal(a.idx, c.idx)


def test_client_index_helpers():
  ci = partition_lib.from_assignment(np.array([1, 0, 1, 2, 1]), 3)
  np.testing.assert_array_equal(ci.counts, [1, 3, 1])
  np.testing.assert_array_equal(ci.idx, [[1, 0, 0], [0, 2, 4], [3, 0, 0]])
  np.testing.assert_array_equal(ci.client(1), [0, 2, 4])
  np.testing.assert_array_equal(ci.owner(), [1, 0, 1, 2, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clients=4, method="nope"), "iid, dirichlet, shards, one_class"),
    (dict(num_clients=11, method="iid"), "exceeds the number of samples"),
    (dict(num_clients=0, method="iid"), "num_clients must be >= 1"),
    (dict(num_clients=2, method="dirichlet", alpha=0.0), "alpha > 0"),
    (dict(num_clients=2, method="dirichlet", alpha=-1.0), "alpha > 0"),
    (dict(num_clients=2, method="dirichlet", min_samples=6), "lower"),
    (dict(num_clients=6, method="shards", shards_per_client=2), "shards"),
    (dict(num_clients=2, method="one_class"), "one client per class"),
])
def test_partition_errors(kwargs, match):
  labels = np.arange(10) % 3
  with pytest.raises(ValueError, match=match):
    data.partition(labels, **kwargs)


# ---------------------------------------------------------------------------
# Federated data.


def test_build_splits_and_partitions():
  fd = data.build("synthetic", 8, "dirichlet", alpha=0.5, min_samples=5,
                  val_size=50, seed=1, max_train=200, num_train=300,
                  num_test=20, input_shape=(4,), num_classes=3)
  assert fd.x_val.shape == (50, 4) and fd.y_val.shape == (50,)
  assert fd.x_train.shape == (200, 4) and fd.x_test.shape == (20, 4)
  assert fd.num_clients == 8 and fd.num_classes == 3
  _check_partition(fd.clients, 200, 8)
  assert fd.clients.counts.min() >= 5
  # Synthetic rows are distinct: the validation split never reaches clients.
  train_rows = {r.tobytes() for r in fd.x_train}
  assert not any(r.tobytes() in train_rows for r in fd.x_val)
  x0, y0 = fd.client_data(0)
  assert len(x0) == fd.clients.counts[0] and len(y0) == len(x0)
  again = data.build("synthetic", 8, "dirichlet", alpha=0.5, min_samples=5,
                     val_size=50, seed=1, max_train=200, num_train=300,
                     num_test=20, input_shape=(4,), num_classes=3)
  np.testing.assert_array_equal(fd.clients.idx, again.clients.idx)
  np.testing.assert_array_equal(fd.x_val, again.x_val)


def test_build_without_val_keeps_everything():
  fd = data.build("synthetic", 5, num_train=60, num_test=10)
  assert fd.x_val.shape == (0, 8, 8, 1) and fd.y_val.shape == (0,)
  assert len(fd.x_train) == 60
  _check_partition(fd.clients, 60, 5)


def test_build_errors():
  with pytest.raises(ValueError, match="known methods"):
    data.build("synthetic", 5, "pathological")
  with pytest.raises(ValueError, match="known datasets"):
    data.build("cifar", 5)
  with pytest.raises(ValueError, match="lower val_size"):
    data.build("synthetic", 5, val_size=100, num_train=100)


def test_per_class_validation():
  fd = data.build("synthetic", 4, val_size=120, num_train=400,
                  input_shape=(3,), num_classes=4, seed=2)
  x, y = data.per_class_validation(fd, 10)
  assert x.shape == (4, 10, 3) and y.shape == (4, 10)
  np.testing.assert_array_equal(y, np.repeat(np.arange(4)[:, None], 10, 1))
  lookup = {r.tobytes(): c for r, c in zip(fd.x_val, fd.y_val)}
  for c in range(4):
    assert all(lookup[r.tobytes()] == c for r in x[c])
  with pytest.raises(ValueError, match="raise val_size"):
    data.per_class_validation(fd, 100)
