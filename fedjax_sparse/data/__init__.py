"""Datasets, partitioning among clients, and federated data tables.

Each dataset is stored once as arrays ``[N, ...]``; a client is a padded row
of indices ``i32[C, n_max]`` plus a count (DESIGN.md, "Data at scale").

Typical use::

  from fedjax_sparse import data
  data.check_available("fashion_mnist")          # cheap, before compiling
  fd = data.build("fashion_mnist", num_clients=100,
                  partition_method="dirichlet", alpha=0.5, val_size=1000)
"""

from __future__ import annotations

from fedjax_sparse.data.client_index import ClientIndex
from fedjax_sparse.data.dataset import ArrayDataset
from fedjax_sparse.data.dataset import DatasetNotFoundError
from fedjax_sparse.data.dataset import IDXFormatError
from fedjax_sparse.data.federated import build
from fedjax_sparse.data.federated import FederatedData
from fedjax_sparse.data.federated import per_class_validation
from fedjax_sparse.data.idx import read_idx
from fedjax_sparse.data.partition import METHODS as PARTITION_METHODS
from fedjax_sparse.data.partition import partition
from fedjax_sparse.data.sources import check_available
from fedjax_sparse.data.sources import load
from fedjax_sparse.data.sources import names
from fedjax_sparse.data.sources import synthetic

__all__ = [
    "ArrayDataset",
    "ClientIndex",
    "DatasetNotFoundError",
    "FederatedData",
    "IDXFormatError",
    "PARTITION_METHODS",
    "build",
    "check_available",
    "load",
    "names",
    "partition",
    "per_class_validation",
    "read_idx",
    "synthetic",
]
