"""Which samples each client holds: a padded index table into the dataset.

Client ``i`` is the row ``idx[i, :counts[i]]`` of ``i32[C, n_max]`` (see
"Data at scale" in DESIGN.md); :func:`from_assignment` builds the table
from the client of every sample, vectorised.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ClientIndex:
  """Which samples each client holds, as a padded index table.

  Attributes:
    idx: ``i32[C, n_max]``; row ``i`` lists client ``i``'s sample indices in
      its first ``counts[i]`` entries and 0 beyond.
    counts: ``i32[C]``, number of samples of each client (all >= 1 unless
      the partition was built with ``allow_empty=True``).
  """

  idx: np.ndarray
  counts: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @property
  def n_max(self) -> int:
    return int(self.idx.shape[1])

  @property
  def num_samples(self) -> int:
    return int(self.counts.sum())

  def mask(self) -> np.ndarray:
    """``bool[C, n_max]``: True where ``idx`` holds a real sample."""
    return np.arange(self.n_max)[None, :] < self.counts[:, None]

  def client(self, i: int) -> np.ndarray:
    """The sample indices of client ``i`` (a view, not a copy)."""
    return self.idx[i, :self.counts[i]]

  def owner(self, num_samples: int | None = None) -> np.ndarray:
    """``i32[N]``: the client of every sample (-1 for samples of no client)."""
    n = self.num_samples if num_samples is None else num_samples
    out = np.full(n, -1, dtype=np.int32)
    rows = np.broadcast_to(
        np.arange(self.num_clients, dtype=np.int32)[:, None], self.idx.shape)
    m = self.mask()
    out[self.idx[m]] = rows[m]
    return out


def from_assignment(client_of: np.ndarray, num_clients: int) -> ClientIndex:
  """Builds the padded table from the client of every sample.

  Samples keep their order in ``client_of`` within each client.

  Args:
    client_of: ``int[N]``, the client of sample ``j`` in ``[0, num_clients)``.
    num_clients: ``C``.

  Returns:
    The :class:`ClientIndex`.
  """
  client_of = np.asarray(client_of)
  order = np.argsort(client_of, kind="stable").astype(np.int32)
  counts = np.bincount(client_of, minlength=num_clients).astype(np.int32)
  if counts.shape[0] != num_clients:
    raise ValueError(f"client ids must lie in [0, {num_clients})")
  n_max = int(counts.max()) if num_clients else 0
  starts = np.zeros(num_clients, dtype=np.int64)
  np.cumsum(counts[:-1], out=starts[1:])
  pos = np.arange(n_max, dtype=np.int64)[None, :]
  valid = pos < counts[:, None]
  idx = np.where(valid, order[np.where(valid, starts[:, None] + pos, 0)], 0)
  return ClientIndex(idx.astype(np.int32), counts)
