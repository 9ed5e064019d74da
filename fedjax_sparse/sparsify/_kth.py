"""Finding the k-th largest key of one row: radix select and the reference methods.

The selection methods of :func:`fedjax_sparse.sparsify.topk_mask` (described,
with their measured speeds, in :mod:`fedjax_sparse.sparsify.topk`). Every
method returns the threshold as a key ``t`` (int32 bit pattern) and a tie
cut-off position ``cut``; the mask is ``key > t | (key == t & pos <= cut)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

TOPK_METHODS = ("radix", "sort", "top_k", "approx_max_k")

_TIE_BLOCK = 1024         # block size of the tie-break scan


def _score_keys(scores: Array) -> Array:
  """Monotone int32 keys of non-negative float32 scores.

  For ``x >= 0`` (and NaN, which sorts above +inf) the IEEE-754 bit pattern
  read as an int32 is monotone in ``x``. The sign bit is cleared so that
  ``-0.0`` (and any negative input) is keyed by its magnitude.
  """
  bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
  return bits & jnp.int32(0x7FFFFFFF)


# --------------------------------------------------------------------------
# Finding the k-th largest key of one row.


def _rev_cumsum(x: Array) -> Array:
  return jnp.cumsum(x[::-1])[::-1]


def _crossing(counts: Array, base: Array, k) -> tuple[Array, Array, Array]:
  """Finds the bin of the k-th largest key from a histogram.

  Bins are in increasing key order; ``base`` keys lie above the last bin.
  Returns ``(b, above_b, count_b)``: ``b`` the largest bin with ``base +
  sum(counts[b:]) >= k``, ``above_b = base + sum(counts[b + 1:])`` and
  ``counts[b]``. Assumes ``base < k <= base + sum(counts)``. Two levels of
  blocks keep the cumulative sums short.
  """
  n = counts.shape[0]
  bs = 256 if n % 256 == 0 and n > 256 else n
  blk = counts.reshape(n // bs, bs).sum(axis=1)
  cb = base + _rev_cumsum(blk)
  i = jnp.maximum(jnp.sum(cb >= k) - 1, 0).astype(jnp.int32)
  above_blk = cb[i] - blk[i]
  c = lax.dynamic_slice(counts, (i * bs,), (bs,))
  cc = above_blk + _rev_cumsum(c)
  jj = jnp.maximum(jnp.sum(cc >= k) - 1, 0).astype(jnp.int32)
  cj = c[jj]
  return i * bs + jj, cc[jj] - cj, cj


_HIST_DNUMS = lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,),
    scatter_dims_to_operand_dims=(0,))


def _hist(idx: Array, nbins: int) -> Array:
  """Counts of ``idx`` in ``[0, nbins)``; other indices (negative too) are dropped.

  ``lax.scatter_add`` directly: ``.at[].add`` would first wrap negative
  indices NumPy-style, an extra select per element.
  """
  return lax.scatter_add(
      jnp.zeros((nbins,), jnp.int32), idx[:, None],
      jnp.ones(idx.shape, jnp.int32), _HIST_DNUMS,
      mode=lax.GatherScatterMode.FILL_OR_DROP)


def _kth_radix(key: Array, k: int) -> tuple[Array, Array, Array]:
  """Two-pass radix select: ``(t, n_gt, n_eq)`` of the k-th largest key."""
  top = key >> 16                                     # 15 bits (key >= 0)
  h1 = _hist(top, 1 << 15)
  b1, above1, _ = _crossing(h1, jnp.int32(0), k)
  idx2 = jnp.where(top == b1, key & 0xFFFF, 1 << 16)  # others dropped
  h2 = _hist(idx2, 1 << 16)
  b2, above2, c2 = _crossing(h2, above1, k)
  return (b1 << 16) | b2, above2, c2


def _kth_sort(key: Array, k: int):
  n = key.shape[0]
  t = jnp.sort(key)[n - k]
  return t, jnp.sum(key > t, dtype=jnp.int32), jnp.sum(key == t, dtype=jnp.int32)


def _kth_top_k(key: Array, k: int):
  t = lax.top_k(key, k)[0][k - 1]
  return t, jnp.sum(key > t, dtype=jnp.int32), jnp.sum(key == t, dtype=jnp.int32)


def _kth_approx(key: Array, k: int):
  vals = lax.bitcast_convert_type(key, jnp.float32)
  v = lax.approx_max_k(vals, k, recall_target=1.0)[0][k - 1]
  t = lax.bitcast_convert_type(v, jnp.int32)
  return t, jnp.sum(key > t, dtype=jnp.int32), jnp.sum(key == t, dtype=jnp.int32)


def _tie_cut(key: Array, t: Array, need: Array) -> Array:
  """Position of the ``need``-th key equal to ``t`` (lower positions first)."""
  n = key.shape[0]
  bs = _TIE_BLOCK
  pos_in = jnp.arange(min(bs, n), dtype=jnp.int32)
  if n <= bs:
    c = jnp.cumsum((key == t).astype(jnp.int32))
    return jnp.sum(c < need).astype(jnp.int32)
  nb = n // bs
  eq_main = (key[:nb * bs] == t).reshape(nb, bs).sum(axis=1, dtype=jnp.int32)
  if nb * bs < n:
    eq_main = jnp.concatenate(
        [eq_main, jnp.sum(key[nb * bs:] == t, dtype=jnp.int32, keepdims=True)])
  before = jnp.cumsum(eq_main) - eq_main                # exclusive
  blk = (jnp.sum(before < need) - 1).astype(jnp.int32)  # block holding the cut
  start = blk * bs
  wstart = jnp.minimum(start, n - bs)                   # window stays in range
  win = lax.dynamic_slice(key, (wstart,), (bs,))
  pos = wstart + pos_in
  c = jnp.cumsum(((win == t) & (pos >= start)).astype(jnp.int32))
  return wstart + jnp.sum(c < need - before[blk]).astype(jnp.int32)


_KTH = {"radix": _kth_radix, "sort": _kth_sort,
        "top_k": _kth_top_k, "approx_max_k": _kth_approx}


def _threshold_row(key: Array, k: int, method: str) -> tuple[Array, Array]:
  """``(t, cut)`` for one row: keep ``key > t | (key == t & pos <= cut)``."""
  n = key.shape[0]
  t, n_gt, n_eq = _KTH[method](key, k)
  need = k - n_gt
  cut = lax.cond(n_eq > need, lambda: _tie_cut(key, t, need),
                 lambda: jnp.int32(n))
  return t, cut


def _check_method(method: str) -> None:
  if method not in TOPK_METHODS:
    raise ValueError(f"unknown top-k method {method!r}; known methods: "
                     f"{', '.join(TOPK_METHODS)}")
