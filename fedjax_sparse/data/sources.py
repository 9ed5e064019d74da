"""Dataset sources: every loader returns a ``(train, test)`` pair of arrays.

Each split is an :class:`ArrayDataset` holding the whole split once, as numpy
arrays (``x: f32[N, H, W, C]`` for images or ``f32[N, F]`` for features,
``y: i32[N]``). Clients never copy it: they are rows of indices into it (see
:mod:`fedjax_sparse.data.partition`).

Sources:

* ``"fashion_mnist"`` and ``"mnist"``: the IDX ``.gz`` files of LeCun et al.
  (1998) and Xiao et al. (2017), read by a small parser (:func:`read_idx`).
  FashionMNIST ships as the Debian package ``dataset-fashion-mnist``.
* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images).
* ``"synthetic"``: class-dependent Gaussians, learnable, any input shape.
* ``"tfds:<name>"``: TensorFlow Datasets through ``tfds.data_source``
  (array_record random access, no TensorFlow needed). ``tfds.load`` is avoided
  on purpose: it needs TensorFlow.

Images are scaled to ``[0, 1]`` and then standardised per channel with the mean
and standard deviation of the *training* split (the test split reuses the
training statistics), unless ``standardize=False``.

Missing files raise :class:`DatasetNotFoundError` with the command that fixes
it; :func:`check_available` raises the same error without reading any arrays,
so that command-line binaries can validate their flags before compiling.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from typing import Any, Callable, Sequence

import numpy as np

from fedjax_sparse.registry import Registry

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

# TFDS datasets this package knows how to read (any other TFDS name with an
# ``image`` and a ``label`` feature is attempted as well).
TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "emnist")

_TFDS_PREFIX = "tfds:"


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files cannot be found; the message says how to get them."""


class IDXFormatError(ValueError):
  """A file is not a well-formed IDX file."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """One split of a dataset, held once in memory.

  Attributes:
    x: ``f32[N, H, W, C]`` images or ``f32[N, F]`` feature vectors.
    y: ``i32[N]`` labels in ``[0, num_classes)``.
    num_classes: number of classes.
    name: the registry name the split was loaded under, e.g. ``"mnist"``.
  """

  x: np.ndarray
  y: np.ndarray
  num_classes: int
  name: str

  def __post_init__(self):
    if self.x.shape[0] != self.y.shape[0]:
      raise ValueError(f"{self.name}: x has {self.x.shape[0]} rows but y has "
                       f"{self.y.shape[0]}")
    if self.y.ndim != 1:
      raise ValueError(f"{self.name}: y must be 1-D, got shape {self.y.shape}")

  def __len__(self) -> int:
    return int(self.y.shape[0])

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example, e.g. ``(28, 28, 1)``."""
    return tuple(self.x.shape[1:])


# ----------------------------------------------------------------------------
# IDX files.

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
# Helpers shared by the image loaders.


def _standardize(x_train: np.ndarray, x_test: np.ndarray,
                 scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Scales to [0, 1], then standardises per channel with train statistics."""
  x_train = x_train.astype(np.float32) / np.float32(scale)
  x_test = x_test.astype(np.float32) / np.float32(scale)
  axes = tuple(range(x_train.ndim - 1))
  mean = x_train.mean(axis=axes, dtype=np.float64)
  std = x_train.std(axis=axes, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)
  mean, inv = mean.astype(np.float32), (1.0 / std).astype(np.float32)
  x_train -= mean
  x_train *= inv
  x_test -= mean
  x_test *= inv
  return x_train, x_test


def _scale_only(x_train: np.ndarray, x_test: np.ndarray,
                scale: float) -> tuple[np.ndarray, np.ndarray]:
  return (x_train.astype(np.float32) / np.float32(scale),
          x_test.astype(np.float32) / np.float32(scale))


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


def _idx_paths(name: str, data_dir: str | os.PathLike) -> list[str]:
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


def _check_idx_headers(name: str, paths: Sequence[str]) -> tuple[int, int]:
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
  paths = _idx_paths(name, data_dir)
  _check_idx_headers(name, paths)
  x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
  for y, p in ((y_train, paths[1]), (y_test, paths[3])):
    if y.size and int(y.max()) >= 10:
      raise IDXFormatError(f"{p}: labels must lie in [0, 10), found {y.max()}")
  fix = _standardize if standardize else _scale_only
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

  Same layout and preprocessing as :func:`load_fashion_mnist` (train mean
  about 0.131, standard deviation about 0.308).

  Args:
    data_dir: folder holding the four IDX files; defaults to
      ``/usr/share/datasets/mnist``.
    standardize: if False, pixels are only scaled to ``[0, 1]``.

  Returns:
    ``(train, test)`` with 60000 and 10000 examples and 10 classes.

  Raises:
    DatasetNotFoundError: a file is missing.
    IDXFormatError: a file is malformed.
  """
  return _load_idx_dataset("mnist", data_dir or DEFAULT_MNIST_DIR, standardize)


# ----------------------------------------------------------------------------
# scikit-learn digits.


def _import_sklearn_datasets():
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "dataset 'digits' needs scikit-learn: pip install scikit-learn "
        "(or pip install fedjax_sparse[test])") from e
  return datasets


def load_digits(data_dir: str | os.PathLike | None = None,
                *,
                test_fraction: float = 0.2,
                split_seed: int = 0,
                standardize: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
  """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

  The split is a fixed random permutation (``split_seed``): the last
  ``round(test_fraction * 1797)`` examples form the test split. Pixels (0..16)
  are scaled to ``[0, 1]`` and standardised with the training statistics.

  Args:
    data_dir: ignored (the data ships with scikit-learn); accepted so that
      every source shares one signature.
    test_fraction: share of the examples held out for testing, in (0, 1).
    split_seed: seed of the train/test permutation.
    standardize: if False, pixels are only scaled to ``[0, 1]``.

  Returns:
    ``(train, test)`` of ``f32[N, 8, 8, 1]`` images.
  """
  del data_dir
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  bunch = _import_sklearn_datasets().load_digits()
  images = np.asarray(bunch.images, dtype=np.float32)[..., None]
  labels = np.asarray(bunch.target, dtype=np.int32)
  perm = np.random.default_rng(split_seed).permutation(len(labels))
  n_test = max(1, int(round(test_fraction * len(labels))))
  tr, te = perm[:-n_test], perm[-n_test:]
  fix = _standardize if standardize else _scale_only
  x_train, x_test = fix(images[tr], images[te], 16.0)
  return (ArrayDataset(x_train, labels[tr], 10, "digits"),
          ArrayDataset(x_test, labels[te], 10, "digits"))


# ----------------------------------------------------------------------------
# Synthetic data.


def synthetic(num_train: int = 1000,
              num_test: int = 200,
              input_shape: Sequence[int] = (8, 8, 1),
              num_classes: int = 10,
              seed: int = 0,
              *,
              separation: float = 1.0,
              noise: float = 1.0) -> tuple[ArrayDataset, ArrayDataset]:
  """Class-conditional Gaussians: learnable data of any shape.

  Class ``c`` has a mean ``mu_c ~ separation * N(0, I)`` drawn once from
  ``seed``; an example of class ``c`` is ``mu_c + noise * N(0, I)``. Labels
  are uniform. With the defaults the classes are linearly separable with high
  probability, so a few steps of training visibly lower the loss.

  Args:
    num_train: training examples.
    num_test: test examples.
    input_shape: shape of one example, e.g. ``(28, 28, 1)`` or ``(20,)``.
    num_classes: number of classes (>= 2).
    seed: seed of the means, the labels and the noise.
    separation: scale of the class means.
    noise: standard deviation of the within-class noise.

  Returns:
    ``(train, test)`` named ``"synthetic"``.
  """
  if num_train < 1 or num_test < 0:
    raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, "
                     f"{num_test}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  input_shape = tuple(int(s) for s in input_shape)
  if not input_shape or min(input_shape) < 1:
    raise ValueError(f"input_shape must be non-empty and positive, got "
                     f"{input_shape}")
  rng = np.random.default_rng(seed)
  means = (separation * rng.standard_normal(
      (num_classes,) + input_shape)).astype(np.float32)

  def draw(n: int) -> ArrayDataset:
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    x = means[y] + np.float32(noise) * rng.standard_normal(
        (n,) + input_shape, dtype=np.float32)
    return ArrayDataset(x, y, num_classes, "synthetic")

  return draw(num_train), draw(num_test)


# ----------------------------------------------------------------------------
# TensorFlow Datasets (array_record, no TensorFlow).


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TFDS datasets ('tfds:<name>') need tensorflow_datasets: "
        "pip install fedjax_sparse[tfds]  (TensorFlow itself is not needed)"
    ) from e
  return tfds


def _tfds_not_prepared(name: str, data_dir: str | os.PathLike | None,
                       builder: Any) -> DatasetNotFoundError:
  where = os.fspath(data_dir) if data_dir else str(builder.data_dir)
  dir_flag = f" --data_dir={os.fspath(data_dir)}" if data_dir else ""
  return DatasetNotFoundError(
      f"TFDS dataset {name!r} is not prepared in array_record format (looked "
      f"in {where}). To fix: run `tfds build {name} "
      f"--file_format=array_record{dir_flag}` on a machine with network "
      "access (copy the folder over if needed), or pass --data_dir=DIR "
      "(data_dir=DIR in Python) naming the TFDS data folder that holds it.")


def _tfds_builder(tfds: Any, name: str, data_dir: str | os.PathLike | None):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(
        f"unknown TFDS dataset {name!r}; this package reads "
        f"{', '.join(TFDS_NAMES)} (and other image/label datasets); see "
        "https://www.tensorflow.org/datasets/catalog") from None


def _read_all(source: Any, keys: Sequence[str]) -> list[np.ndarray]:
  """Stacks features ``keys`` of every record of a TFDS data source."""
  n = len(source)
  cols: list[list[Any]] = [[] for _ in keys]
  chunk = 4096
  batched = hasattr(source, "__getitems__")
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    records = None
    if batched:
      try:
        records = source.__getitems__(idx)
      except TypeError:
        # tfds.testing.mock_data's sources do not implement batched reads.
        batched = False
    if records is None:
      records = [source[i] for i in idx]
    for col, key in zip(cols, keys):
      col.extend(r[key] for r in records)
  return [np.stack(col) if col else np.zeros((0,)) for col in cols]


def load_tfds(name: str,
              data_dir: str | os.PathLike | None = None,
              *,
              train_split: str = "train",
              test_split: str = "test",
              image_key: str = "image",
              label_key: str = "label",
              standardize: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
  """A TFDS image-classification dataset through ``tfds.data_source``.

  Reads the prepared array_record files with random access; TensorFlow is not
  needed and nothing is downloaded. EMNIST images are transposed back to the
  upright orientation (TFDS keeps the original transposed storage). Pixels are
  scaled to ``[0, 1]`` and standardised per channel with training statistics.

  Args:
    name: TFDS name, optionally with a config, e.g. ``"cifar10"`` or
      ``"emnist/balanced"``.
    data_dir: TFDS data folder; defaults to TFDS's own (``TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    train_split: TFDS split used for training.
    test_split: TFDS split used for testing.
    image_key: feature holding the ``uint8[H, W, C]`` image.
    label_key: feature holding the ``ClassLabel``.
    standardize: if False, pixels are only scaled to ``[0, 1]``.

  Returns:
    ``(train, test)`` named ``"tfds:<name>"``.

  Raises:
    ImportError: tensorflow_datasets is not installed.
    ValueError: TFDS does not know ``name``.
    DatasetNotFoundError: the dataset is not prepared under ``data_dir``.
  """
  tfds = _import_tfds()
  try:
    train_src, test_src = tfds.data_source(
        name, split=[train_split, test_split], data_dir=data_dir,
        download=False)
  except tfds.core.DatasetNotFoundError:
    _tfds_builder(tfds, name, data_dir)  # Raises the ValueError.
    raise
  except (AssertionError, FileNotFoundError, NotImplementedError,
          ValueError) as e:
    builder = _tfds_builder(tfds, name, data_dir)
    if not builder.is_prepared():
      raise _tfds_not_prepared(name, data_dir, builder) from e
    raise
  num_classes = int(train_src.dataset_info.features[label_key].num_classes)
  x_train, y_train = _read_all(train_src, (image_key, label_key))
  x_test, y_test = _read_all(test_src, (image_key, label_key))
  if name.split("/")[0] == "emnist":
    x_train, x_test = x_train.swapaxes(1, 2), x_test.swapaxes(1, 2)
  fix = _standardize if standardize else _scale_only
  x_train, x_test = fix(x_train, x_test, 255.0)
  full = _TFDS_PREFIX + name
  return (ArrayDataset(x_train, y_train.astype(np.int32), num_classes, full),
          ArrayDataset(x_test, y_test.astype(np.int32), num_classes, full))


# ----------------------------------------------------------------------------
# Registry.

_LOADERS: Registry[Callable[..., tuple[ArrayDataset, ArrayDataset]]] = \
    Registry("dataset")
_LOADERS.register("fashion_mnist", load_fashion_mnist)
_LOADERS.register("mnist", load_mnist)
_LOADERS.register("digits", load_digits)
_LOADERS.register("synthetic", lambda data_dir=None, **kw: synthetic(**kw))


def names() -> list[str]:
  """Known dataset names (any ``tfds:<name>`` is accepted as well)."""
  return _LOADERS.names() + [_TFDS_PREFIX + n for n in TFDS_NAMES]


def _split_name(name: str) -> tuple[str, str | None]:
  """Returns ("tfds", tfds_name) or (name, None); raises on unknown names."""
  if name.startswith(_TFDS_PREFIX):
    tfds_name = name[len(_TFDS_PREFIX):]
    if not tfds_name:
      raise ValueError(f"dataset {name!r}: give a TFDS name after 'tfds:', "
                       f"e.g. {', '.join(_TFDS_PREFIX + n for n in TFDS_NAMES)}")
    return "tfds", tfds_name
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: "
                     f"{', '.join(names())} (or tfds:<any TFDS name>)")
  return _LOADERS.canonical(name), None


def load(name: str,
         data_dir: str | os.PathLike | None = None,
         **kwargs: Any) -> tuple[ArrayDataset, ArrayDataset]:
  """Loads a dataset by name.

  Args:
    name: ``"fashion_mnist"``, ``"mnist"``, ``"digits"``, ``"synthetic"`` or
      ``"tfds:<tfds_name>"`` (e.g. ``"tfds:cifar10"``).
    data_dir: folder of the files; None uses each source's default.
    **kwargs: passed to the source (e.g. ``num_train=`` for ``synthetic``,
      ``standardize=False``).

  Returns:
    ``(train, test)`` :class:`ArrayDataset` pair.

  Raises:
    ValueError: unknown name (the message lists the known ones).
    DatasetNotFoundError: the files are missing (the message says how to get
      them).
  """
  kind, tfds_name = _split_name(name)
  if kind == "tfds":
    return load_tfds(tfds_name, data_dir, **kwargs)
  return _LOADERS.get(kind)(data_dir, **kwargs)


def check_available(name: str, data_dir: str | os.PathLike | None = None) -> None:
  """Checks that :func:`load` would find the dataset, without loading it.

  Cheap: it checks names, that the files exist and (for IDX files) their
  headers; for TFDS that the dataset is prepared.

  Args:
    name: as for :func:`load`.
    data_dir: as for :func:`load`.

  Raises:
    ValueError: unknown name.
    DatasetNotFoundError: the files are missing.
    ImportError: an optional dependency (tensorflow_datasets, scikit-learn)
      is missing.
  """
  kind, tfds_name = _split_name(name)
  if kind in ("fashion_mnist", "mnist"):
    default = (DEFAULT_FASHION_MNIST_DIR
               if kind == "fashion_mnist" else DEFAULT_MNIST_DIR)
    _check_idx_headers(kind, _idx_paths(kind, data_dir or default))
  elif kind == "digits":
    _import_sklearn_datasets()
  elif kind == "tfds":
    tfds = _import_tfds()
    builder = _tfds_builder(tfds, tfds_name, data_dir)
    if not builder.is_prepared():
      raise _tfds_not_prepared(tfds_name, data_dir, builder)
