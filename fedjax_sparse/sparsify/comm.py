"""Communication accounting (ALGORITHMS.md sections 1 and 7).

Bits on the wire per client and per round, counted the way the papers count
them:

* dense upload or download: ``32 * d`` bits (float32 values);
* pack top-k upload (FLARE IV-C): ``32`` bits per kept value plus a ``1``-bit
  mask entry per pack (``n_packs`` bits);
* sparse download (SparseFed's global top-k, FetchSGD's ``Delta``): the same
  format, ``32 * nnz + n_packs`` bits (with ``P = 1`` the mask has ``d`` bits);
* count-sketch upload (FetchSGD, sparsefed.txt Alg. 10): ``32 * rows * cols``.

Shapes are static, so the counts are plain Python ints, usable inside or
outside ``jit``. One caveat for pack top-k with ``d % P != 0``: whether the
short last pack is kept depends on the data, so :func:`sparse_uplink_bits`
counts ``min(k * P, d)`` values, an upper bound that is exact when
``P`` divides ``d`` and off by fewer than ``P`` values otherwise;
:func:`uplink_bits_from_masks` gives the exact traced count.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.sparsify._common import resolve_k
from fedjax_sparse.sparsify.topk import check_k, check_topk_config, num_kept, num_packs

Array = jax.Array

VALUE_BITS = 32


def dense_bits(d: int, value_bits: int = VALUE_BITS) -> int:
  """``32 * d``: a dense float32 vector."""
  return int(value_bits) * int(d)


def sparse_bits(num_values: int, num_mask_bits: int,
                value_bits: int = VALUE_BITS) -> int:
  """``32 * num_values + num_mask_bits``: values plus a 1-bit-per-entry mask."""
  return int(value_bits) * int(num_values) + int(num_mask_bits)


def sparse_uplink_bits(d: int, ratio: float, pack_size: int = 1,
                       value_bits: int = VALUE_BITS) -> int:
  """Pack top-k upload of one client: kept values plus the pack mask.

  ``32 * min(ceil(r * n_packs) * P, d) + n_packs`` (see the module note on
  ``d % P != 0``).
  """
  check_topk_config(d, ratio, pack_size)
  k = num_kept(d, ratio, pack_size)
  return sparse_bits(min(k * pack_size, d), num_packs(d, pack_size), value_bits)


def topk_bits(d: int, k: int, value_bits: int = VALUE_BITS) -> int:
  """A top-k vector sent as ``k`` values plus a ``d``-bit mask."""
  check_k(d, k)
  return sparse_bits(k, d, value_bits)


def sketch_bits(rows: int, cols: int, value_bits: int = VALUE_BITS) -> int:
  """``32 * rows * cols``: a float32 count sketch (FetchSGD upload)."""
  return int(value_bits) * int(rows) * int(cols)


def uplink_bits_from_masks(masks: Array, d: int, pack_size: int,
                           value_bits: int = VALUE_BITS) -> Array:
  """Exact pack top-k upload per client from the masks: ``int32[K]``.

  Counts the real values of the kept packs (the short last pack counts only
  the ``d - (n_packs - 1) * P`` values it has) plus ``n_packs`` mask bits.
  Per-client counts fit int32 for ``d`` up to 60M; sum them as float or in
  Python for round totals.
  """
  n = masks.shape[-1]
  sizes = jnp.full((n,), pack_size, jnp.int32)
  sizes = sizes.at[n - 1].set(d - (n - 1) * pack_size)
  values = jnp.sum(jnp.where(masks, sizes, 0), axis=-1, dtype=jnp.int32)
  return value_bits * values + n


@dataclasses.dataclass(frozen=True)
class RoundComm:
  """Bits moved in one round with ``num_clients`` participants.

  Attributes:
    uplink_bits_per_client: client -> server, one client.
    downlink_bits_per_client: server -> client, one client.
    num_clients: K.
  """

  uplink_bits_per_client: int
  downlink_bits_per_client: int
  num_clients: int

  @property
  def uplink_bits(self) -> int:
    return self.uplink_bits_per_client * self.num_clients

  @property
  def downlink_bits(self) -> int:
    return self.downlink_bits_per_client * self.num_clients

  @property
  def total_bits(self) -> int:
    return self.uplink_bits + self.downlink_bits

  def as_dict(self) -> dict:
    """JSON-ready dict (per-client and per-round counts)."""
    return {"uplink_bits_per_client": self.uplink_bits_per_client,
            "downlink_bits_per_client": self.downlink_bits_per_client,
            "num_clients": self.num_clients,
            "uplink_bits": self.uplink_bits,
            "downlink_bits": self.downlink_bits,
            "total_bits": self.total_bits}


def round_comm(d: int, num_clients: int, *, ratio: Optional[float] = None,
               pack_size: int = 1, sketch: Optional[tuple[int, int]] = None,
               downlink_k: Optional[int] = None,
               value_bits: int = VALUE_BITS) -> RoundComm:
  """Per-round communication of one configuration.

  Args:
    d: number of parameters.
    num_clients: K, participants of the round.
    ratio: pack top-k ratio r of the uploads; ``None`` for dense uploads.
    pack_size: P of the uploads (with ``ratio``).
    sketch: ``(rows, cols)`` for count-sketch uploads (FetchSGD); exclusive
      with ``ratio``.
    downlink_k: if set, the server broadcasts a top-k update (SparseFed,
      FetchSGD): ``32 * k + d`` bits; else the dense model, ``32 * d``.
    value_bits: bits per value (32 for float32).

  Returns:
    A :class:`RoundComm`.
  """
  if not isinstance(d, int) or d < 1:
    raise ValueError(f"d must be an int >= 1, got {d!r}")
  if ratio is not None and sketch is not None:
    raise ValueError("give either ratio (pack top-k uploads) or sketch "
                     "(count-sketch uploads), not both")
  if not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
  if sketch is not None:
    rows, cols = sketch
    if int(rows) < 1 or int(cols) < 1:
      raise ValueError(f"sketch must be (rows >= 1, cols >= 1), got {sketch!r}")
    up = sketch_bits(rows, cols, value_bits)
  elif ratio is not None:
    up = sparse_uplink_bits(d, ratio, pack_size, value_bits)
  else:
    up = dense_bits(d, value_bits)
  down = dense_bits(d, value_bits) if downlink_k is None else topk_bits(
      d, downlink_k, value_bits)
  return RoundComm(up, down, num_clients)


def fetchsgd_round_comm(d: int, rows: int, cols: int, k,
                        num_clients: int) -> RoundComm:
  """Bits per round of FetchSGD: ``32 r c`` up, a top-k update down, per client.

  ``k`` as FetchSGD takes it: an int >= 1 or a fraction of ``d``.
  """
  return round_comm(d, num_clients, sketch=(rows, cols),
                    downlink_k=resolve_k(k, d))
