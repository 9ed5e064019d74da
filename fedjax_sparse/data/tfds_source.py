"""TensorFlow Datasets through ``tfds.data_source`` (array_record, no TensorFlow).

Random access to the prepared array_record files; ``tfds.load`` is avoided
on purpose: it needs TensorFlow. Nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from fedjax_sparse.data.dataset import (ArrayDataset, DatasetNotFoundError,
                                        scale_and_standardize, scale_only)

# TFDS datasets this package knows how to read (any other TFDS name with an
# ``image`` and a ``label`` feature is attempted as well).
TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "emnist")

TFDS_PREFIX = "tfds:"


def import_tfds():
  """The tensorflow_datasets module, or an ImportError saying how to get it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TFDS datasets ('tfds:<name>') need tensorflow_datasets: "
        "pip install fedjax_sparse[tfds]  (TensorFlow itself is not needed)"
    ) from e
  return tfds


def tfds_not_prepared(name: str, data_dir: str | os.PathLike | None,
                      builder: Any) -> DatasetNotFoundError:
  """The error of a TFDS dataset that is not prepared, saying how to prepare it."""
  where = os.fspath(data_dir) if data_dir else str(builder.data_dir)
  dir_flag = f" --data_dir={os.fspath(data_dir)}" if data_dir else ""
  return DatasetNotFoundError(
      f"TFDS dataset {name!r} is not prepared in array_record format (looked "
      f"in {where}). To fix: run `tfds build {name} "
      f"--file_format=array_record{dir_flag}` on a machine with network "
      "access (copy the folder over if needed), or pass --data_dir=DIR "
      "(data_dir=DIR in Python) naming the TFDS data folder that holds it.")


def tfds_builder(tfds: Any, name: str, data_dir: str | os.PathLike | None):
  """The TFDS builder of ``name``; an unknown name is a ValueError."""
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
  tfds = import_tfds()
  try:
    train_src, test_src = tfds.data_source(
        name, split=[train_split, test_split], data_dir=data_dir,
        download=False)
  except tfds.core.DatasetNotFoundError:
    tfds_builder(tfds, name, data_dir)  # Raises the ValueError.
    raise
  except (AssertionError, FileNotFoundError, NotImplementedError,
          ValueError) as e:
    builder = tfds_builder(tfds, name, data_dir)
    if not builder.is_prepared():
      raise tfds_not_prepared(name, data_dir, builder) from e
    raise
  num_classes = int(train_src.dataset_info.features[label_key].num_classes)
  x_train, y_train = _read_all(train_src, (image_key, label_key))
  x_test, y_test = _read_all(test_src, (image_key, label_key))
  if name.split("/")[0] == "emnist":
    x_train, x_test = x_train.swapaxes(1, 2), x_test.swapaxes(1, 2)
  fix = scale_and_standardize if standardize else scale_only
  x_train, x_test = fix(x_train, x_test, 255.0)
  full = TFDS_PREFIX + name
  return (ArrayDataset(x_train, y_train.astype(np.int32), num_classes, full),
          ArrayDataset(x_test, y_test.astype(np.int32), num_classes, full))
