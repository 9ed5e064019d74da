"""Pack-level and scalar top-k sparsification (FLARE IV-C; ALGORITHMS.md s. 1).

A client flattens its update ``u: f32[d]``, cuts it into ``n_packs =
ceil(d / P)`` packs of ``P`` consecutive parameters (the last pack is padded
with zeros), scores each pack by the L1 norm of its values and keeps the
``ceil(r * n_packs)`` best packs (FLARE IV-C: "the client determines a
sparsification threshold and assigns a mask value of 1 to packs whose
aggregated values exceed this threshold"). ``P = 1`` is scalar top-k by
magnitude (Aji and Heafield). The upload is the kept values plus a 1-bit mask
over packs; the "dense view" handed to aggregators is ``u`` on the kept packs
and 0 elsewhere.

Exactly ``k`` packs are kept, always. Ties are broken deterministically: among
packs with equal scores the one with the lower pack index wins (the order of
``jax.lax.top_k``). NaN scores rank above every number, like ``lax.top_k``.

Selection methods (``method=``), all exact and all giving the same mask:

* ``"radix"`` (default, by far the fastest on CPU): radix select on the
  scores' IEEE bit patterns (for non-negative floats the int32 bit pattern is
  monotone in the value). One scatter-add pass histograms the top 15 bits,
  which fixes the bin of the k-th largest score; a second pass histograms the
  low 16 bits of the scores in that bin. Two passes over the row whatever k.
* ``"sort"``: threshold = ``sort(scores)[n - k]``.
* ``"top_k"``: threshold = last of ``jax.lax.top_k(scores, k)``.
* ``"approx_max_k"``: ``jax.lax.approx_max_k(..., recall_target=1.0)``, i.e.
  no approximation; on CPU it gives the exact top-k at the cost of ``top_k``
  (the tests check the mask, the benchmark the time).

Measured on the 2-core CPU dev machine for one row of 11M scores with
k = n / 2: ``"top_k"`` and ``"approx_max_k"`` about 4.7 s, ``"sort"`` 1.0 s
(XLA's CPU sort and top-k call a comparator per comparison), ``"radix"``
0.05-0.1 s; for 20 rows of 270k: 1.3 s, 0.38 s and 0.027 s. A variant that
bracketed the threshold from a 1/8 sample and histogrammed only the bracket
(one full pass instead of two) was slower than ``"radix"``: XLA:CPU's scatter
costs the same per element whether it writes or drops, and counting the keys
above the bracket needs a write each. See ``benchmarks/sparsify.py``.

Every method returns the threshold as a key ``t`` (int32 bit pattern) and a
tie cut-off position ``cut``; the mask is ``key > t | (key == t & pos <= cut)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fedjax_sparse.sparsify._kth import (TOPK_METHODS, _check_method,
                                         _score_keys, _threshold_row)

__all__ = ["TOPK_METHODS", "check_k", "check_topk_config", "num_kept",
           "num_packs", "pack_scores", "pack_topk", "pack_topk_batch",
           "pack_topk_numpy", "scalar_topk", "topk_by_magnitude", "topk_mask"]

Array = jax.Array


# --------------------------------------------------------------------------
# Configuration checks (plain Python: they run before anything is traced).


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_topk_config(d: int, ratio: float, pack_size: int = 1) -> None:
  """Raises ``ValueError`` unless pack top-k with these settings is defined.

  Args:
    d: number of parameters (length of the flat update), an int >= 1.
    ratio: top-k ratio r, the fraction of packs kept, in (0, 1].
    pack_size: parameters per pack P, an int >= 1.
  """
  if not _is_int(d) or d < 1:
    raise ValueError(f"the update length d must be an int >= 1, got {d!r}")
  if not _is_int(pack_size) or pack_size < 1:
    raise ValueError(
        f"pack_size (P, parameters per pack) must be an int >= 1, got "
        f"{pack_size!r}; use pack_size=1 for scalar top-k")
  if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
    raise ValueError(f"the top-k ratio r must be a number in (0, 1], got {ratio!r}")
  if not (0.0 < float(ratio) <= 1.0) or math.isnan(float(ratio)):
    raise ValueError(
        f"the top-k ratio r (fraction of packs kept) must be in (0, 1], got "
        f"{ratio!r}; e.g. r=0.5 keeps half of the packs, r=1 keeps all")


def check_k(d: int, k: int, what: str = "k") -> None:
  """Raises ``ValueError`` unless ``k`` is an int with ``1 <= k <= d``."""
  if not _is_int(d) or d < 1:
    raise ValueError(f"the vector length d must be an int >= 1, got {d!r}")
  if not _is_int(k):
    raise ValueError(f"{what} must be an int (number of coordinates kept), got {k!r}")
  if k < 1 or k > d:
    raise ValueError(
        f"{what} must satisfy 1 <= {what} <= d = {d}, got {what}={k}; "
        f"{what} is the number of coordinates kept")


def num_packs(d: int, pack_size: int) -> int:
  """``ceil(d / P)``: packs of ``P`` consecutive parameters (last one padded)."""
  return -(-int(d) // int(pack_size))


def num_kept(d: int, ratio: float, pack_size: int = 1) -> int:
  """``ceil(r * n_packs)``: packs kept by pack top-k (at least 1, at most all).

  The product is rounded to 9 significant decimals first so that e.g.
  ``r = 0.1, n_packs = 30`` keeps 3 packs and not 4 (``0.1 * 30 =
  3.0000000000000004`` in binary floating point).
  """
  check_topk_config(d, ratio, pack_size)
  n = num_packs(d, pack_size)
  k = math.ceil(round(float(ratio) * n, 9))
  return min(max(k, 1), n)


# --------------------------------------------------------------------------
# Scores and keys.


def pack_scores(u: Array, pack_size: int) -> Array:
  """L1 norm of every pack: ``f32[..., d] -> f32[..., n_packs]``.

  The last pack is padded with zeros (so its score is the L1 norm of the
  values it has).
  """
  d = u.shape[-1]
  if pack_size == 1:
    return jnp.abs(u)
  n_full = d // pack_size
  end = n_full * pack_size
  if pack_size <= 32:
    # A sum of P strided slices: one elementwise loop that XLA:CPU vectorises,
    # 3-4x faster than reshape + sum over a short minor axis.
    main = jnp.abs(u[..., 0:end:pack_size])
    for j in range(1, pack_size):
      main = main + jnp.abs(u[..., j:end:pack_size])
  else:
    main = jnp.sum(jnp.abs(u[..., :end].reshape(u.shape[:-1] + (n_full, pack_size))),
                   axis=-1)
  if end == d:
    return main
  tail = jnp.sum(jnp.abs(u[..., end:]), axis=-1, keepdims=True)
  return jnp.concatenate([main, tail], axis=-1)


def topk_mask(scores: Array, k: int, method: str = "radix") -> Array:
  """Exact top-k mask of scores: ``f32[..., n] -> bool[..., n]``.

  Keeps exactly ``k`` entries per row: the ``k`` largest magnitudes, ties
  broken towards the lower index. Leading axes are mapped over with
  ``lax.map`` (one row at a time, so that the tie-break scan stays a branch
  taken only when the threshold is tied, instead of a select under ``vmap``).

  Args:
    scores: ``f32[..., n]`` non-negative scores (the sign is ignored).
    k: static number kept per row, ``1 <= k <= n``.
    method: one of :data:`TOPK_METHODS`.

  Returns:
    ``bool[..., n]``.
  """
  _check_method(method)
  n = scores.shape[-1]
  check_k(n, k)
  if k == n:
    return jnp.ones(scores.shape, bool)
  if scores.ndim == 1:
    return _mask_row(scores, k, method)
  lead = scores.shape[:-1]
  rows = scores.reshape(-1, n)
  return lax.map(lambda s: _mask_row(s, k, method), rows).reshape(lead + (n,))


def _mask_row(scores: Array, k: int, method: str) -> Array:
  key = _score_keys(scores)
  t, cut = _threshold_row(key, k, method)
  pos = jnp.arange(key.shape[0], dtype=jnp.int32)
  return (key > t) | ((key == t) & (pos <= cut))


def _expand(mask: Array, pack_size: int, d: int) -> Array:
  if pack_size == 1:
    return mask
  n_packs = mask.shape[-1]
  full = jnp.broadcast_to(mask[..., None], mask.shape + (pack_size,))
  return full.reshape(mask.shape[:-1] + (n_packs * pack_size,))[..., :d]


def _dense_view(u: Array, mask: Array, pack_size: int) -> Array:
  return jnp.where(_expand(mask, pack_size, u.shape[-1]), u, jnp.zeros((), u.dtype))


def pack_topk(u: Array, ratio: float, pack_size: int = 1,
              method: str = "radix") -> tuple[Array, Array]:
  """Pack-level top-k of one update (FLARE IV-C; ALGORITHMS.md s. 1).

  Args:
    u: ``f32[d]`` flat update.
    ratio: top-k ratio r in (0, 1]: ``ceil(r * n_packs)`` packs are kept.
    pack_size: P, parameters per pack (1 = scalar top-k).
    method: selection method, one of :data:`TOPK_METHODS` (all exact).

  Returns:
    ``(dense_view f32[d], mask bool[n_packs])``: ``u`` on the kept packs and 0
    elsewhere, and the 1-bit pack mask that is uploaded with the values.
  """
  if u.ndim != 1:
    raise ValueError(f"pack_topk expects f32[d], got shape {u.shape}; "
                     "use pack_topk_batch for f32[K, d]")
  return _pack_topk(u, ratio, pack_size, method)


def _pack_topk(u, ratio, pack_size, method):
  d = u.shape[-1]
  k = num_kept(d, ratio, pack_size)
  _check_method(method)
  # Scores and dense view over the whole batch, the selection row by row.
  # (Doing all three per row inside the lax.map was no faster for P = 1 and
  # 4x slower for P = 16: the strided pack sums vectorise across the batch.)
  mask = topk_mask(pack_scores(u, pack_size), k, method)
  return _dense_view(u, mask, pack_size), mask


def pack_topk_batch(u: Array, ratio: float, pack_size: int = 1,
                    method: str = "radix") -> tuple[Array, Array]:
  """Pack top-k of every client: ``f32[K, d] -> (f32[K, d], bool[K, n_packs])``.

  Each row is sparsified independently, exactly as :func:`pack_topk` (rows
  are processed by ``lax.map``; see :func:`topk_mask`).
  """
  if u.ndim != 2:
    raise ValueError(f"pack_topk_batch expects f32[K, d], got shape {u.shape}")
  return _pack_topk(u, ratio, pack_size, method)


def scalar_topk(u: Array, k: int, method: str = "radix") -> tuple[Array, Array]:
  """Scalar top-k with an absolute ``k``: ``(dense_view f32[..., d], mask bool[..., d])``.

  Keeps the ``k`` coordinates of largest magnitude (pack top-k with ``P = 1``).
  """
  check_k(u.shape[-1], k)
  mask = topk_mask(u, k, method)
  return _dense_view(u, mask, 1), mask


def topk_by_magnitude(v: Array, k: int, method: str = "radix") -> Array:
  """``top_k(v)`` of SparseFed (Alg. 1): ``v`` on its ``k`` largest-magnitude
  coordinates, 0 elsewhere (ties towards the lower index)."""
  return scalar_topk(v, k, method)[0]


# --------------------------------------------------------------------------
# numpy reference (tests and benchmarks).


def pack_topk_numpy(u: np.ndarray, ratio: float, pack_size: int = 1,
                    scores: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
  """numpy reference of :func:`pack_topk_batch` built on ``np.argpartition``.

  Ties may be broken differently from :func:`pack_topk` (argpartition is not
  stable); the benchmark uses it as the speed reference, the tests use a
  stable oracle.
  """
  u = np.asarray(u)
  squeeze = u.ndim == 1
  u2 = u[None] if squeeze else u
  K, d = u2.shape
  n = num_packs(d, pack_size)
  k = num_kept(d, ratio, pack_size)
  if scores is None:
    if pack_size == 1:
      scores = np.abs(u2)
    else:
      pad = n * pack_size - d
      up = np.pad(u2, ((0, 0), (0, pad))) if pad else u2
      scores = np.abs(up.reshape(K, n, pack_size)).sum(axis=2)
  mask = np.zeros((K, n), bool)
  for i in range(K):
    mask[i, np.argpartition(-scores[i], k - 1)[:k]] = True
  full = np.repeat(mask, pack_size, axis=1)[:, :d] if pack_size > 1 else mask
  dense = np.where(full, u2, 0).astype(u2.dtype)
  if squeeze:
    return dense[0], mask[0]
  return dense, mask
