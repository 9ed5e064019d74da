"""Communication totals (ALGORITHMS.md section 7).

The round step reports ``uplink_bits`` (the values and masks every sampled
client uploads) and ``downlink_bits`` (the dense model sent to each sampled
client) per round; these helpers add them up over a run and compare them with
dense uploads.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


def communication_totals(records: Iterable[Mapping]) -> dict:
  """Totals over the per-round records of ``rounds.jsonl``.

  Args:
    records: dicts with ``uplink_bits`` and ``downlink_bits`` (missing ones
      count as 0).

  Returns:
    ``uplink_bits_total``, ``downlink_bits_total``, ``total_bits`` (floats)
    and ``rounds`` (how many records were summed).
  """
  up = down = 0.0
  n = 0
  for r in records:
    up += float(r.get("uplink_bits", 0.0))
    down += float(r.get("downlink_bits", 0.0))
    n += 1
  return {"uplink_bits_total": up, "downlink_bits_total": down,
          "total_bits": up + down, "rounds": n}


def dense_uplink_bits(d: int, clients_per_round: int, rounds: int,
                      value_bits: int = 32) -> float:
  """Uplink of dense float uploads: ``value_bits * d * K * rounds``."""
  return float(value_bits) * d * clients_per_round * rounds


def compression_ratio(uplink_bits: float, dense_bits: float) -> float:
  """``dense / actual`` uplink (2 means half the dense traffic)."""
  if uplink_bits <= 0:
    raise ValueError(f"uplink_bits must be > 0, got {uplink_bits}")
  return float(dense_bits) / float(uplink_bits)


def bits_to_megabytes(bits) -> float:
  """Bits to megabytes (10^6 bytes)."""
  return float(np.asarray(bits, np.float64)) / 8e6
