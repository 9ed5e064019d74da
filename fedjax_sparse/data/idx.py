"""MNIST and FashionMNIST from their IDX files, read by a small parser.

The IDX ``.gz`` files of LeCun et al. (1998) and Xiao et al. (2017):
:func:`read_idx` reads one (gzip detected from its first bytes),
:func:`load_fashion_mnist` and :func:`load_mnist` the four files of a
dataset. FashionMNIST ships as the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Sequence

import numpy as np

from fedjax_sparse.data.dataset import (ArrayDataset, DatasetNotFoundError,
                                        IDXFormatError, scale_and_standardize,
                                        scale_only)

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_MNIST_DIR = "/usr/share/datasets/mnist"

# The four files of the MNIST/FashionMNIST distribution, in the order
# train images, train labels, test images, test labels.
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open_maybe_gzip(path: str):
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _parse_idx_header(head: bytes, path: str) -> tuple[np.dtype, tuple[int, ...],
                                                       int]:
  """Returns (dtype, dims, header_size) from the first bytes of an IDX file."""
  if len(head) < 4 or head[0] != 0 or head[1] != 0:
    raise IDXFormatError(
        f"{path}: not an IDX file (magic number must start with two zero "
        f"bytes, got {head[:4].hex() or 'an empty file'})")
  code, ndim = head[2], head[3]
  if code not in _IDX_DTYPES:
    raise IDXFormatError(f"{path}: unknown IDX type code 0x{code:02x}; known: "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}")
  header_size = 4 + 4 * ndim
  if len(head) < header_size:
    raise IDXFormatError(f"{path}: truncated IDX header ({ndim} dimensions "
                         f"need {header_size} bytes, got {len(head)})")
  dims = struct.unpack(f">{ndim}I", head[4:header_size])
  return _IDX_DTYPES[code], tuple(int(d) for d in dims), header_size


def read_idx_header(path: str | os.PathLike) -> tuple[np.dtype,
                                                       tuple[int, ...]]:
  """Reads only the header of an IDX file (optionally gzipped).

  Args:
    path: the file.

  Returns:
    ``(dtype, dims)``: the element type and the array shape.

  Raises:
    IDXFormatError: the magic number or header is malformed.
  """
  path = os.fspath(path)
  with _open_maybe_gzip(path) as f:
    head = f.read(4)
    if len(head) == 4:
      head += f.read(4 * head[3])
  dtype, dims, _ = _parse_idx_header(head, path)
  return dtype, dims


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a numpy array.

  The format (LeCun et al.): a 4-byte magic number ``00 00 TT DD`` (``TT`` the
  element type, ``DD`` the number of dimensions), ``DD`` big-endian uint32
  sizes, then the elements in C order, big-endian.

  Args:
    path: the file; gzip compression is detected from its first bytes.

  Returns:
    The array, in native byte order.

  Raises:
    IDXFormatError: bad magic number, unknown type, or a size that does not
      match the header.
  """
  path = os.fspath(path)
  with _open_maybe_gzip(path) as f:
    data = f.read()
  dtype, dims, header_size = _parse_idx_header(data, path)
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  got = len(data) - header_size
  if got != expected:
    raise IDXFormatError(f"{path}: header announces shape {dims} "
                         f"({expected} bytes of data) but the file holds {got}")
  arr = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)
  return arr.astype(dtype.newbyteorder("="))



# ----------------------------------------------------------------------------
# MNIST and FashionMNIST from IDX files.


_IDX_HINTS = {
    "fashion_mnist":
        ("install it with `apt-get install dataset-fashion-mnist` (files go to "
         f"{DEFAULT_FASHION_MNIST_DIR}), or download the four files from "
         "https://github.com/zalandoresearch/fashion-mnist and pass "
         "--data_dir=DIR (data_dir=DIR in Python) naming the folder that "
         "holds them; 'tfds:fashion_mnist' reads a prepared TFDS copy "
         "instead"),
    "mnist":
        ("download the four files from http://yann.lecun.com/exdb/mnist/ "
         f"into {DEFAULT_MNIST_DIR}, or pass --data_dir=DIR (data_dir=DIR in "
         "Python) naming the folder that holds them; 'tfds:mnist' reads a "
         "prepared TFDS copy instead"),
}


def idx_paths(name: str, data_dir: str | os.PathLike) -> list[str]:
  """The four IDX paths under data_dir; raises if any is missing.

  Each file may also be present without its ``.gz`` suffix.
  """
  data_dir = os.fspath(data_dir)
  paths, missing = [], []
  for fname in IDX_FILES:
    gz = os.path.join(data_dir, fname)
    plain = gz[:-len(".gz")]
    if os.path.isfile(gz):
      paths.append(gz)
    elif os.path.isfile(plain):
      paths.append(plain)
    else:
      missing.append(gz)
  if missing:
    where = (f"the folder {data_dir} does not exist"
             if not os.path.isdir(data_dir) else
             f"missing {', '.join(missing)}")
    raise DatasetNotFoundError(
        f"dataset {name!r} not found: {where}. To fix: {_IDX_HINTS[name]}.")
  return paths


def check_idx_headers(name: str, paths: Sequence[str]) -> tuple[int, int]:
  """Validates the four headers; returns (num_train, num_test)."""
  sizes = []
  for img_path, lbl_path in ((paths[0], paths[1]), (paths[2], paths[3])):
    img_dtype, img_dims = read_idx_header(img_path)
    lbl_dtype, lbl_dims = read_idx_header(lbl_path)
    # Magic 2051 (0x00000803): ubyte images [N, rows, cols]; magic 2049
    # (0x00000801): ubyte labels [N].
    if img_dtype != np.uint8 or len(img_dims) != 3:
      raise IDXFormatError(f"{img_path}: expected ubyte images [N, rows, cols] "
                           f"(magic 2051), got {img_dtype} {img_dims}")
    if lbl_dtype != np.uint8 or len(lbl_dims) != 1:
      raise IDXFormatError(f"{lbl_path}: expected ubyte labels [N] (magic "
                           f"2049), got {lbl_dtype} {lbl_dims}")
    if img_dims[0] != lbl_dims[0]:
      raise IDXFormatError(f"{name}: {img_path} holds {img_dims[0]} images but "
                           f"{lbl_path} holds {lbl_dims[0]} labels")
    sizes.append(img_dims[0])
  return sizes[0], sizes[1]


def _load_idx_dataset(name: str, data_dir: str | os.PathLike,
                      standardize: bool) -> tuple[ArrayDataset, ArrayDataset]:
  paths = idx_paths(name, data_dir)
  check_idx_headers(name, paths)
  x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
  for y, p in ((y_train, paths[1]), (y_test, paths[3])):
    if y.size and int(y.max()) >= 10:
      raise IDXFormatError(f"{p}: labels must lie in [0, 10), found {y.max()}")
  fix = scale_and_standardize if standardize else scale_only
  x_train, x_test = fix(x_train[..., None], x_test[..., None], 255.0)
  return (ArrayDataset(x_train, y_train.astype(np.int32), 10, name),
          ArrayDataset(x_test, y_test.astype(np.int32), 10, name))


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    standardize: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
  """FashionMNIST (Xiao et al., 2017) from its IDX files.

  Images become ``f32[N, 28, 28, 1]``: pixels scaled to ``[0, 1]``, then
  standardised with the training split's mean and standard deviation (about
  0.286 and 0.353), which the test split reuses.

  Args:
    data_dir: folder holding ``train-images-idx3-ubyte.gz`` and the three
      other files; defaults to ``/usr/share/datasets/fashion-mnist`` (the
      Debian package ``dataset-fashion-mnist``).
    standardize: if False, pixels are only scaled to ``[0, 1]``.

  Returns:
    ``(train, test)`` with 60000 and 10000 examples and 10 classes.

  Raises:
    DatasetNotFoundError: a file is missing.
    IDXFormatError: a file is malformed.
  """
  return _load_idx_dataset("fashion_mnist",
                           data_dir or DEFAULT_FASHION_MNIST_DIR, standardize)


def load_mnist(data_dir: str | os.PathLike | None = None,
               *,
               standardize: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
  """MNIST (LeCun et al., 1998) from its IDX files.

  Same layout, preprocessing, sizes and errors as
  :func:`load_fashion_mnist` (train mean about 0.131, standard deviation
  about 0.308).

  Args:
    data_dir: folder holding the four IDX files; defaults to
      ``/usr/share/datasets/mnist``.
    standardize: if False, pixels are only scaled to ``[0, 1]``.

  Returns:
    ``(train, test)``, as :func:`load_fashion_mnist` returns them.
  """
  return _load_idx_dataset("mnist", data_dir or DEFAULT_MNIST_DIR, standardize)
