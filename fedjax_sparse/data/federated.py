"""A federated dataset: the training set once, plus who holds what.

:func:`build` loads a source, takes a server validation split out of the
training set, optionally subsamples the rest, and partitions it among clients.
The result, :class:`FederatedData`, stores every array once; a client is a row
of ``clients.idx`` (``i32[C, n_max]``) into ``x_train`` and ``y_train``, so
memory grows with ``N + C * n_max``, never with ``C`` copies of the data.

The validation split is what FLTrust's root dataset (Cao et al., 2021,
section 3.2) and class-aware masking's per-class validation set draw on; it
never reaches any client.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from fedjax_sparse.data import sources
# Names, not the module: the package namespace rebinds ``partition`` to the
# function of that name.
from fedjax_sparse.data.partition import ClientIndex
from fedjax_sparse.data.partition import METHODS
from fedjax_sparse.data.partition import partition


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
  """A partitioned training set with test and server validation splits.

  Attributes:
    x_train: ``f32[N, ...]``, the clients' samples, held once.
    y_train: ``i32[N]``.
    clients: which rows of ``x_train`` each client holds.
    x_test: ``f32[N_test, ...]``.
    y_test: ``i32[N_test]``.
    x_val: ``f32[N_val, ...]``, the server's validation split (``N_val`` may
      be 0); disjoint from ``x_train``.
    y_val: ``i32[N_val]``.
    num_classes: number of classes.
    name: the dataset's registry name.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  clients: ClientIndex
  x_test: np.ndarray
  y_test: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  num_classes: int
  name: str

  @property
  def num_clients(self) -> int:
    return self.clients.num_clients

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  def client_data(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``i``'s samples ``(x, y)`` (a copy; for inspection, not the
    round step, which gathers by index inside jit)."""
    rows = self.clients.client(i)
    return self.x_train[rows], self.y_train[rows]


def _child_seeds(seed: int, n: int) -> list[np.random.Generator]:
  return [np.random.default_rng(s)
          for s in np.random.SeedSequence(seed).spawn(n)]


def build(name: str,
          num_clients: int,
          partition_method: str = "iid",
          *,
          alpha: float = 1.0,
          shards_per_client: int = 2,
          min_samples: int = 10,
          val_size: int = 0,
          data_dir: str | os.PathLike | None = None,
          seed: int = 0,
          max_train: int | None = None,
          allow_empty: bool = False,
          **load_kwargs: Any) -> FederatedData:
  """Loads a dataset and partitions its training split among clients.

  Steps, all seeded by ``seed`` (independent streams for each):

  1. load ``name`` with :func:`fedjax_sparse.data.load`;
  2. take ``val_size`` random training samples out as the server's
     validation split;
  3. if ``max_train`` is set, keep a random subset of at most ``max_train``
     of the remaining samples (for fast tests);
  4. partition what remains with
     :func:`fedjax_sparse.data.partition`.

  Args:
    name: dataset name, as for :func:`fedjax_sparse.data.load`.
    num_clients: ``C``.
    partition_method: ``"iid"``, ``"dirichlet"``, ``"shards"`` or
      ``"one_class"``.
    alpha: Dirichlet concentration.
    shards_per_client: shards per client.
    min_samples: least samples per client (Dirichlet).
    val_size: size of the server validation split, ``>= 0``.
    data_dir: folder of the dataset files.
    seed: seed of the split, the subsample and the partition.
    max_train: cap on the number of samples the clients share.
    allow_empty: allow clients without data (more clients than samples,
      cross-device populations); see :func:`partition`.
    **load_kwargs: passed to the loader (e.g. ``num_train=`` for
      ``"synthetic"``).

  Returns:
    The :class:`FederatedData`.

  Raises:
    ValueError: bad sizes or names (the message says what to change).
    DatasetNotFoundError: the dataset's files are missing.
  """
  if val_size < 0:
    raise ValueError(f"val_size must be >= 0, got {val_size}")
  if max_train is not None and max_train < 1:
    raise ValueError(f"max_train must be >= 1 or None, got {max_train}")
  if partition_method not in METHODS:
    raise ValueError(f"unknown partition method {partition_method!r}; known "
                     f"methods: {', '.join(METHODS)}")
  train, test = sources.load(name, data_dir, **load_kwargs)
  n = len(train)
  if val_size >= n:
    raise ValueError(f"val_size={val_size} leaves no training samples out of "
                     f"{n}; lower val_size")
  val_rng, sub_rng, part_rng = _child_seeds(seed, 3)
  perm = val_rng.permutation(n)
  val_rows, rest = np.sort(perm[:val_size]), np.sort(perm[val_size:])
  if max_train is not None and max_train < len(rest):
    rest = np.sort(sub_rng.choice(rest, size=max_train, replace=False))
  clients = partition(
      train.y[rest], num_clients, partition_method, alpha=alpha,
      shards_per_client=shards_per_client, min_samples=min_samples,
      seed=int(part_rng.integers(2**63 - 1)), allow_empty=allow_empty)
  if len(rest) == n:
    x_train, y_train = train.x, train.y
  else:
    x_train, y_train = train.x[rest], train.y[rest]
  return FederatedData(
      x_train=x_train,
      y_train=y_train,
      clients=clients,
      x_test=test.x,
      y_test=test.y,
      x_val=train.x[val_rows],
      y_val=train.y[val_rows],
      num_classes=train.num_classes,
      name=train.name)


def per_class_validation(fd: FederatedData,
                         per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-shape per-class validation arrays from the server split.

  Takes, for every class ``c``, the first ``per_class`` validation samples of
  class ``c`` (the split is already in random order).

  Args:
    fd: the federated data; ``fd.x_val`` must hold at least ``per_class``
      samples of every class.
    per_class: samples per class, ``>= 1``.

  Returns:
    ``(x, y)`` with ``x: f32[num_classes, per_class, ...]`` and
    ``y: i32[num_classes, per_class]`` where ``y[c, :] == c``.

  Raises:
    ValueError: some class has fewer than ``per_class`` validation samples
      (the message says which and how to fix it).
  """
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  k = fd.num_classes
  have = np.bincount(fd.y_val, minlength=k)[:k]
  short = np.flatnonzero(have < per_class)
  if short.size:
    raise ValueError(
        f"per_class_validation needs {per_class} validation samples of every "
        f"class but classes {short.tolist()} have {have[short].tolist()} "
        f"(val_size={len(fd.y_val)}); raise val_size in build() or lower "
        "per_class")
  order = np.argsort(fd.y_val, kind="stable")
  starts = np.concatenate([[0], np.cumsum(have)[:-1]])
  rows = order[starts[:, None] + np.arange(per_class)[None, :]]  # [k, per]
  y = np.broadcast_to(np.arange(k, dtype=np.int32)[:, None],
                      (k, per_class)).copy()
  return fd.x_val[rows], y
