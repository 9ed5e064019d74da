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

import os
from typing import Any, Callable, Sequence

import numpy as np

from fedjax_sparse.data.dataset import (ArrayDataset, DatasetNotFoundError,
                                        IDXFormatError, scale_and_standardize,
                                        scale_only)
from fedjax_sparse.data.idx import (DEFAULT_FASHION_MNIST_DIR,
                                    DEFAULT_MNIST_DIR, IDX_FILES,
                                    check_idx_headers, idx_paths,
                                    load_fashion_mnist, load_mnist, read_idx,
                                    read_idx_header)
from fedjax_sparse.data.tfds_source import (TFDS_NAMES, TFDS_PREFIX,
                                            import_tfds, load_tfds,
                                            tfds_builder, tfds_not_prepared)
from fedjax_sparse.registry import Registry

# Names of the source modules, importable from here as before.
__all__ = ["DEFAULT_FASHION_MNIST_DIR", "DEFAULT_MNIST_DIR", "IDX_FILES",
           "TFDS_NAMES", "ArrayDataset", "DatasetNotFoundError",
           "IDXFormatError", "check_available", "load", "load_digits",
           "load_fashion_mnist", "load_mnist", "load_tfds", "names",
           "read_idx", "read_idx_header", "synthetic"]


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
  fix = scale_and_standardize if standardize else scale_only
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
# Registry.

_LOADERS: Registry[Callable[..., tuple[ArrayDataset, ArrayDataset]]] = \
    Registry("dataset")
_LOADERS.register("fashion_mnist", load_fashion_mnist)
_LOADERS.register("mnist", load_mnist)
_LOADERS.register("digits", load_digits)
_LOADERS.register("synthetic", lambda data_dir=None, **kw: synthetic(**kw))


def names() -> list[str]:
  """Known dataset names (any ``tfds:<name>`` is accepted as well)."""
  return _LOADERS.names() + [TFDS_PREFIX + n for n in TFDS_NAMES]


def _split_name(name: str) -> tuple[str, str | None]:
  """Returns ("tfds", tfds_name) or (name, None); raises on unknown names."""
  if name.startswith(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX):]
    if not tfds_name:
      raise ValueError(f"dataset {name!r}: give a TFDS name after 'tfds:', "
                       f"e.g. {', '.join(TFDS_PREFIX + n for n in TFDS_NAMES)}")
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
    check_idx_headers(kind, idx_paths(kind, data_dir or default))
  elif kind == "digits":
    _import_sklearn_datasets()
  elif kind == "tfds":
    tfds = import_tfds()
    builder = tfds_builder(tfds, tfds_name, data_dir)
    if not builder.is_prepared():
      raise tfds_not_prepared(tfds_name, data_dir, builder)
