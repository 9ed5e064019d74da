"""Tests of fedjax_sparse.data: sources, partitioning, federated tables."""

from __future__ import annotations

import gzip
import importlib
import os
import struct
import sys
import time

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from fedjax_sparse import data
from fedjax_sparse.data import sources

# The package rebinds ``partition`` to the function; fetch the module itself.
partition_lib = importlib.import_module("fedjax_sparse.data.partition")

FASHION_DIR = sources.DEFAULT_FASHION_MNIST_DIR

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


def _write_idx(path, arr: np.ndarray, code: int, compress: bool = True):
  dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
  payload = (bytes([0, 0, code, arr.ndim]) +
             struct.pack(f">{arr.ndim}I", *arr.shape) +
             arr.astype(dtype).tobytes())
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(payload)


def _write_fake_mnist(folder, n_train=30, n_test=12, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  arrays = [
      rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      rng.integers(0, 10, n_train, dtype=np.uint8),
      rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      rng.integers(0, 10, n_test, dtype=np.uint8),
  ]
  for fname, arr in zip(sources.IDX_FILES, arrays):
    _write_idx(os.path.join(folder, fname), arr, 0x08)
  return arrays


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
# IDX files.


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
  u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  i32 = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
  f32 = np.array([0.5, -1.25], dtype=np.float32)
  for name, arr, code in (("u8", u8, 0x08), ("i32", i32, 0x0C),
                          ("f32", f32, 0x0D)):
    path = tmp_path / name
    _write_idx(path, arr, code, compress)
    got = data.read_idx(path)
    np.testing.assert_array_equal(got, arr)
    assert got.shape == arr.shape and got.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
  bad_magic = tmp_path / "bad_magic"
  bad_magic.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
  with pytest.raises(data.IDXFormatError, match="magic"):
    data.read_idx(bad_magic)
  bad_type = tmp_path / "bad_type"
  bad_type.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
  with pytest.raises(data.IDXFormatError, match="type code"):
    data.read_idx(bad_type)
  truncated = tmp_path / "truncated"
  truncated.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03\x05")
  with pytest.raises(data.IDXFormatError, match="holds 1"):
    data.read_idx(truncated)


def test_idx_loader_on_fake_files(tmp_path):
  arrays = _write_fake_mnist(tmp_path)
  data.check_available("fashion_mnist", data_dir=tmp_path)
  train, test = data.load("fashion_mnist", data_dir=tmp_path)
  assert train.x.shape == (30, 28, 28, 1) and test.x.shape == (12, 28, 28, 1)
  assert train.x.dtype == np.float32 and train.y.dtype == np.int32
  np.testing.assert_array_equal(train.y, arrays[1])
  np.testing.assert_allclose(train.x.mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(train.x.std(), 1.0, atol=1e-4)
  raw, _ = data.load("mnist", data_dir=tmp_path, standardize=False)
  np.testing.assert_allclose(raw.x[..., 0], arrays[0] / 255.0, atol=1e-6)
  assert raw.name == "mnist" and train.num_classes == 10


def test_idx_loader_rejects_wrong_rank(tmp_path):
  _write_fake_mnist(tmp_path)
  _write_idx(tmp_path / sources.IDX_FILES[1], np.zeros((30, 2), np.uint8),
             0x08)
  with pytest.raises(data.IDXFormatError, match="labels"):
    data.check_available("mnist", data_dir=tmp_path)


@pytest.fixture(scope="module")
def fashion():
  if not os.path.isdir(FASHION_DIR):
    pytest.skip(f"{FASHION_DIR} is missing (apt-get install "
                "dataset-fashion-mnist)")
  return data.load("fashion_mnist")


def test_fashion_mnist_loads(fashion):
  train, test = fashion
  assert train.x.shape == (60000, 28, 28, 1)
  assert test.x.shape == (10000, 28, 28, 1)
  assert train.y.shape == (60000,) and test.y.shape == (10000,)
  assert train.num_classes == test.num_classes == 10
  assert train.x.dtype == np.float32 and train.y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train.y), 6000)
  np.testing.assert_allclose(train.x.mean(), 0.0, atol=1e-3)
  np.testing.assert_allclose(train.x.std(), 1.0, atol=1e-3)
  assert abs(float(test.x.mean())) < 0.05


# ---------------------------------------------------------------------------
# Errors and the registry.


def test_missing_dataset_error_says_what_to_do(tmp_path):
  missing = tmp_path / "nowhere"
  for call in (data.check_available, data.load):
    with pytest.raises(data.DatasetNotFoundError) as e:
      call("fashion_mnist", data_dir=missing)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data_dir" in msg and str(missing) in msg


def test_missing_single_file_is_named(tmp_path):
  _write_fake_mnist(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(data.DatasetNotFoundError,
                     match="t10k-labels-idx1-ubyte.gz"):
    data.check_available("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("call", [data.load, data.check_available])
def test_unknown_name_lists_known_names(call):
  with pytest.raises(ValueError) as e:
    call("imagenet")
  for known in ("fashion_mnist", "mnist", "digits", "synthetic",
                "tfds:cifar10", "tfds:emnist"):
    assert known in str(e.value)
  with pytest.raises(ValueError, match="tfds:cifar10"):
    call("tfds:")


# ---------------------------------------------------------------------------
# digits and synthetic.


def test_digits_split_is_deterministic():
  pytest.importorskip("sklearn", reason="digits needs scikit-learn")
  train, test = data.load("digits")
  assert train.x.shape[1:] == (8, 8, 1) and len(train) + len(test) == 1797
  assert len(test) == 359 and train.num_classes == 10
  again, _ = data.load("digits")
  np.testing.assert_array_equal(train.y, again.y)
  np.testing.assert_allclose(train.x.mean(), 0.0, atol=1e-4)


def test_synthetic_shapes_and_determinism():
  train, test = data.synthetic(100, 40, (5, 5, 2), 4, seed=3)
  assert train.x.shape == (100, 5, 5, 2) and test.x.shape == (40, 5, 5, 2)
  assert train.x.dtype == np.float32 and train.y.dtype == np.int32
  assert train.y.max() < 4 and train.num_classes == 4
  again, _ = data.load("synthetic", num_train=100, num_test=40,
                       input_shape=(5, 5, 2), num_classes=4, seed=3)
  np.testing.assert_array_equal(train.x, again.x)
  flat, _ = data.synthetic(10, 0, (7,), 3)
  assert flat.x.shape == (10, 7)


def test_synthetic_is_learnable():
  train, test = data.synthetic(400, 200, (6, 6, 1), 5, seed=0)
  x, y = train.x.reshape(len(train), -1), train.y
  w = np.zeros((x.shape[1], 5), np.float32)

  def loss_grad(w):
    logits = x @ w
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    p[np.arange(len(y)), y] -= 1.0
    return loss, x.T @ p / len(y)

  first, _ = loss_grad(w)
  for _ in range(20):
    loss, g = loss_grad(w)
    w -= 0.1 * g
  assert loss < 0.5 * first
  acc = ((test.x.reshape(len(test), -1) @ w).argmax(axis=1) == test.y).mean()
  assert acc > 0.8


# ---------------------------------------------------------------------------
# TFDS.


def test_tfds_missing_package_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  for call in (data.load, data.check_available):
    with pytest.raises(ImportError, match=r"pip install fedjax_sparse\[tfds\]"):
      call("tfds:cifar10")


@pytest.fixture
def tfds():
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("tensorflow_datasets is not installed (pip install "
                "fedjax_sparse[tfds]); TFDS loaders untested")
  return tensorflow_datasets


@pytest.mark.parametrize("name, shape, num_classes", [
    ("mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
    ("emnist", (28, 28, 1), 62),
])
def test_tfds_loader_with_mock_data(tfds, name, shape, num_classes):
  with tfds.testing.mock_data(num_examples=12):
    train, test = data.load(f"tfds:{name}")
  assert train.x.shape == (12,) + shape and test.x.shape == (12,) + shape
  assert train.x.dtype == np.float32 and train.y.dtype == np.int32
  assert train.num_classes == num_classes and train.name == f"tfds:{name}"
  assert 0 <= train.y.min() and train.y.max() < num_classes


def test_tfds_emnist_is_transposed_upright(tfds):
  with tfds.testing.mock_data(num_examples=4):
    src = tfds.data_source("emnist", split="train")
    raw = np.stack([src[i]["image"] for i in range(len(src))])
    train, _ = data.load("tfds:emnist", standardize=False)
  np.testing.assert_allclose(train.x, raw.swapaxes(1, 2) / 255.0, atol=1e-6)


def test_tfds_not_prepared(tfds, tmp_path):
  for call in (data.check_available, data.load):
    with pytest.raises(data.DatasetNotFoundError, match="tfds build cifar10"):
      call("tfds:cifar10", data_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown TFDS dataset"):
    data.check_available("tfds:no_such_dataset_xyz", data_dir=tmp_path)


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
