"""Tests of fedjax_sparse.data: sources (IDX files, digits, synthetic, TFDS)
and the registry."""

from __future__ import annotations

import gzip
import os
import struct
import sys

import numpy as np
import pytest

from fedjax_sparse import data
from fedjax_sparse.data import sources

FASHION_DIR = sources.DEFAULT_FASHION_MNIST_DIR

# ---------------------------------------------------------------------------
# Helpers.


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
