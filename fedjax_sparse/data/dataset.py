"""One split of a dataset held once in memory, the errors of the sources,
and the pixel preprocessing the image loaders share.

Images are scaled to ``[0, 1]`` and then standardised per channel with the
mean and standard deviation of the *training* split (the test split reuses
the training statistics): :func:`scale_and_standardize`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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


def scale_and_standardize(x_train: np.ndarray, x_test: np.ndarray,
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


def scale_only(x_train: np.ndarray, x_test: np.ndarray,
               scale: float) -> tuple[np.ndarray, np.ndarray]:
  return (x_train.astype(np.float32) / np.float32(scale),
          x_test.astype(np.float32) / np.float32(scale))
