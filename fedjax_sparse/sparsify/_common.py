"""The ``k`` of a global top-k, as SparseFed and FetchSGD take it.

An absolute number of coordinates or a fraction of ``d``; checked when the
aggregator is built (:func:`check_k_spec`) and resolved once ``d`` is known
(:func:`resolve_k`).
"""

from __future__ import annotations

import math
import numbers

from fedjax_sparse.sparsify.topk import check_k


def check_k_spec(k) -> None:
  """``k`` is an absolute int >= 1 or a fraction of ``d`` in (0, 1]."""
  if isinstance(k, bool) or not isinstance(k, numbers.Real):
    raise ValueError(f"k must be an int >= 1 (coordinates kept) or a float in "
                     f"(0, 1] (fraction of d), got {k!r}")
  if isinstance(k, numbers.Integral):
    if k < 1:
      raise ValueError(f"k must be >= 1 (coordinates kept each round), got {k}")
  elif not (0.0 < float(k) <= 1.0):
    raise ValueError(f"a fractional k must be in (0, 1] (fraction of d kept), "
                     f"got {k!r}; pass an int for an absolute number")


def resolve_k(k, d: int) -> int:
  """Absolute ``k`` for a model of ``d`` parameters (``ceil(k * d)`` if a fraction)."""
  check_k_spec(k)
  if isinstance(k, numbers.Integral):
    check_k(d, int(k))
    return int(k)
  return min(d, max(1, math.ceil(round(float(k) * d, 9))))
