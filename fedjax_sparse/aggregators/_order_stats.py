"""Order statistics over the client axis with compare-exchange sorting networks.

``jnp.sort`` / ``jnp.median`` over the client axis of an ``f32[K, d]`` array is
slow on XLA:CPU (DESIGN.md, performance rules: 640 ms for 25 x 270k); a
compare-exchange network over the K rows, which XLA fuses into elementwise
loops, does the same median in a few milliseconds. Every coordinate-wise rule
(median, trimmed mean, Bulyan) goes through this module.

The network is Batcher's odd-even merge sort for the next power of two
``N >= K``. The ``N - K`` missing rows are virtual ``+inf`` rows simulated at
trace time: a comparator whose upper wire holds ``+inf`` is a no-op and one
whose lower wire holds ``+inf`` is a swap of references, so only comparators
between two real rows are emitted and no padded array is materialised.
Comparators that do not feed a requested output are dropped (the median needs
only the middle rows). Every ``_BARRIER_EVERY`` comparators the live rows pass
through ``lax.optimization_barrier``: one huge fusion with many outputs made
XLA:CPU compile for minutes at K = 64 (10 s) and K = 100 (75 s), while fusions
of 64 comparators compile in about a second and run faster (measured on the
2-core dev machine: trimmed mean at K = 25, d = 270k in 4.5 ms; K = 128,
d = 20k in 17 ms after 3 s of compiling).

NaN is treated as ``+inf`` so that a NaN row sorts to the top like any other
outlier and can be trimmed away (IEEE ``min``/``max`` would otherwise let NaN
spread through the network).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# Above this many rows ``jnp.sort`` is used instead of the unrolled network.
MAX_NETWORK_ROWS = 128
# Comparators per fusion between optimisation barriers (see module docstring).
_BARRIER_EVERY = 64


@functools.lru_cache(maxsize=None)
def batcher_comparators(n: int) -> tuple[tuple[int, int], ...]:
  """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort.

  Args:
    n: number of wires, a power of two.

  Returns:
    The comparators in execution order; each puts the minimum on wire ``i``.
  """
  if n & (n - 1):
    raise ValueError(f"n must be a power of two, got {n}")
  pairs = []
  p = 1
  while p < n:
    k = p
    while k >= 1:
      for j in range(k % p, n - k, 2 * k):
        for i in range(min(k, n - j - k)):
          if (i + j) // (2 * p) == (i + j + k) // (2 * p):
            pairs.append((i + j, i + j + k))
      k //= 2
    p *= 2
  return tuple(pairs)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _program(k: int, needed: tuple[int, ...]):
  """Static compare-exchange program sorting ``k`` rows.

  Values are named by integers: ``0..k-1`` are the inputs, each comparator
  defines two new names. Returns ``(ops, outputs)``: ``ops`` is a tuple of
  ``(a, b, lo, hi)`` (``lo``/``hi`` is ``None`` when unused) and ``outputs``
  names the value at each sorted position in ``needed``.
  """
  n = _next_pow2(k)
  wires: list[Optional[int]] = list(range(k)) + [None] * (n - k)
  ops = []
  fresh = k
  for i, j in batcher_comparators(n):
    if wires[j] is None:
      continue
    if wires[i] is None:
      wires[i], wires[j] = wires[j], None
      continue
    ops.append([wires[i], wires[j], fresh, fresh + 1])
    wires[i], wires[j] = fresh, fresh + 1
    fresh += 2
  outputs = tuple(wires[p] for p in needed)
  # Backward liveness: keep only comparators that feed a requested output.
  live = set(outputs)
  kept = []
  for a, b, lo, hi in reversed(ops):
    use_lo, use_hi = lo in live, hi in live
    if not (use_lo or use_hi):
      continue
    live.update((a, b))
    kept.append((a, b, lo if use_lo else None, hi if use_hi else None))
  return tuple(reversed(kept)), outputs


def sort_row_list(rows: Sequence[Array],
                  needed: Optional[Sequence[int]] = None) -> list[Optional[Array]]:
  """Sorts a list of same-shaped arrays elementwise, ascending along the list.

  Args:
    rows: ``K`` arrays of one shape, NaN already replaced.
    needed: sorted positions wanted (all by default).

  Returns:
    ``K`` entries; entry ``p`` holds the ``p``-th smallest value of every
    element when ``p`` is in ``needed`` and is ``None`` otherwise.
  """
  k = len(rows)
  needed = tuple(range(k)) if needed is None else tuple(sorted(set(needed)))
  ops, outputs = _program(k, needed)
  env = dict(enumerate(rows))
  # lax.min/max: the ops jnp.minimum/maximum emit for same-typed arrays,
  # without their argument checks (the network traces ~30% faster).
  for count, (a, b, lo, hi) in enumerate(ops, 1):
    xa, xb = env[a], env[b]
    if lo is not None:
      env[lo] = jax.lax.min(xa, xb)
    if hi is not None:
      env[hi] = jax.lax.max(xa, xb)
    if count % _BARRIER_EVERY == 0 and count < len(ops):
      # Names still read by a later comparator, or outputs.
      later = {v for op in ops[count:] for v in op[:2]} | set(outputs)
      names = [v for v in env if v in later]
      vals = jax.lax.optimization_barrier([env[v] for v in names])
      env = dict(zip(names, vals))
  result: list[Optional[Array]] = [None] * k
  for p, name in zip(needed, outputs):
    result[p] = env[name]
  return result


def nan_to_inf(x: Array) -> Array:
  """NaN -> ``+inf``, so that NaN sorts above every number."""
  return jnp.where(jnp.isnan(x), jnp.inf, x)


def sort_rows(x: Array, needed: Optional[Sequence[int]] = None) -> list[Optional[Array]]:
  """Sorts ``f32[K, d]`` along the client axis (NaN counts as ``+inf``).

  Uses the sorting network for ``K <= MAX_NETWORK_ROWS`` and ``jnp.sort``
  above.

  Args:
    x: ``f32[K, d]``.
    needed: sorted positions wanted (all by default); others come back None.

  Returns:
    A list of ``K`` entries, ``f32[d]`` or None.
  """
  x = nan_to_inf(x)
  k = x.shape[0]
  if k > MAX_NETWORK_ROWS:
    s = jnp.sort(x, axis=0)
    return [s[i] for i in range(k)]
  return sort_row_list(_rows(x), needed)


def _rows(x: Array) -> list[Array]:
  """``[x[0], ..., x[K-1]]`` (the same slices as ``x[i]``, traced faster)."""
  return [jax.lax.index_in_dim(x, i, keepdims=False) for i in range(x.shape[0])]


def sum_rows(x: Array) -> Array:
  """``sum_i x[i]`` over the client axis of ``[K, ...]`` as one fused loop.

  ``jnp.sum(x, axis=0)`` over the leading axis of ``f32[25, 270k]`` took
  70-100 ms on XLA:CPU; the unrolled sum of the K rows takes 1-2 ms.
  """
  k = x.shape[0]
  if k > MAX_NETWORK_ROWS:
    return jnp.sum(x, axis=0)
  rows = _rows(x)
  total = rows[0]
  for row in rows[1:]:
    total = jax.lax.add(total, row)
  return total


def materialize(v: Array) -> Array:
  """Returns ``v`` unchanged, computed once into its own buffer.

  XLA:CPU fuses the whole elementwise sorting network into any consumer,
  including one that broadcasts the result over the K clients
  (``updates - median[None]``), and then recomputes the network for every
  client: 25x the work (110 ms instead of 15 ms at K = 25, d = 270k).
  ``optimization_barrier`` did not prevent it; ending in a reduction does,
  as XLA:CPU does not fuse a reduction into its consumers. ``v + 0`` keeps
  every value, ``inf`` and ``nan`` included (``-0.0`` becomes ``+0.0``).
  """
  return jnp.sum(jnp.stack([v, jnp.zeros_like(v)]), axis=0)


def _pick(rows: Sequence[Optional[Array]], index: Array,
          positions: Sequence[int]) -> Array:
  """``rows[index[j]][j]`` per coordinate, ``index`` known to be in ``positions``."""
  out = jnp.zeros_like(rows[positions[0]])
  for p in positions:
    out = jnp.where(index == p, rows[p], out)
  return out


def closest_window(rows: Sequence[Array], beta: int) -> tuple[Array, Array]:
  """Start ``int32[d]`` of the ``beta``-window of sorted ``rows`` closest to
  the median (Bulyan's stage 2, Meamed).

  ``rows``: the ``theta`` sorted values per coordinate (``f32[d]`` each).
  The cost of a window is the distance of its farther end from the median
  (NaN as ``inf``); of equal costs the lower window wins. Returns
  ``(start, median)``.
  """
  theta = len(rows)
  lo, hi = (theta - 1) // 2, theta // 2
  med = rows[lo] if theta % 2 else 0.5 * rows[lo] + 0.5 * rows[hi]
  best = jnp.zeros(med.shape, jnp.int32)
  best_cost = None
  for s in range(theta - beta + 1):
    cost = jnp.maximum(med - rows[s], rows[s + beta - 1] - med)
    cost = jnp.where(jnp.isnan(cost), jnp.inf, cost)
    if best_cost is None:
      best_cost = cost
      continue
    better = cost < best_cost  # strict: the lower window wins ties
    best = jnp.where(better, s, best)
    best_cost = jnp.where(better, cost, best_cost)
  return best, med


def _balanced_infinities(x: Array, contrib: Array) -> tuple[list[Array], Array, Array]:
  """Fills non-contributors with ``-inf``/``+inf`` in equal numbers.

  Of the ``K - c_j`` non-contributors of coordinate ``j`` the first
  ``p_j = (K - c_j) // 2`` (in client order) get ``-inf`` and the rest
  ``+inf``, so the contributors' sorted values sit at positions
  ``p_j .. p_j + c_j - 1`` of the full sort and their middle stays near the
  middle (only three network outputs are needed for a median).

  Returns:
    ``(filled rows, K arrays f32[d]; c int32[d]; p int32[d])``.
  """
  k = x.shape[0]
  count = sum_rows(contrib.astype(jnp.int32))
  pad = (k - count) // 2
  x = nan_to_inf(x)
  rows = []
  seen = jnp.zeros_like(count)  # non-contributors before client i
  for i in range(k):
    fill = jnp.where(seen < pad, -jnp.inf, jnp.inf)
    rows.append(jnp.where(contrib[i], x[i], fill))
    seen = seen + (~contrib[i]).astype(jnp.int32)
  return rows, count, pad


def _sort_filled(rows: list[Array], needed=None) -> list[Optional[Array]]:
  if len(rows) > MAX_NETWORK_ROWS:
    s = jnp.sort(jnp.stack(rows), axis=0)
    return [s[i] for i in range(len(rows))]
  return sort_row_list(rows, needed)


def coordinate_median(x: Array, contrib: Optional[Array] = None) -> Array:
  """Coordinate-wise median over the client axis (Yin et al., 2018).

  Args:
    x: ``f32[K, d]``.
    contrib: optional ``bool[K, d]``; when given, the median of coordinate
      ``j`` is taken over the clients with ``contrib[:, j]`` only, and is 0
      where no client contributes.

  Returns:
    ``f32[d]``; for an even count the mean of the two middle values.
  """
  k = x.shape[0]
  if contrib is None:
    lo_pos, hi_pos = (k - 1) // 2, k // 2
    rows = sort_rows(x, (lo_pos, hi_pos))
    lo, hi = rows[lo_pos], rows[hi_pos]
    return materialize(lo if k % 2 else 0.5 * lo + 0.5 * hi)
  filled, count, pad = _balanced_infinities(x, contrib)
  window = tuple(range(max(0, (k - 3) // 2), k // 2 + 1))
  rows = _sort_filled(filled, window)
  lo = _pick(rows, pad + (count - 1) // 2, window)
  hi = _pick(rows, pad + count // 2, window)
  return materialize(jnp.where(count > 0, 0.5 * lo + 0.5 * hi, 0.0))


def coordinate_trimmed_mean(x: Array, b: int | None = None,
                            contrib: Optional[Array] = None,
                            beta: float | None = None) -> Array:
  """Coordinate-wise trimmed mean over the client axis (Yin et al., 2018).

  Drops the ``b`` largest and ``b`` smallest values of every coordinate and
  averages the rest.

  Args:
    x: ``f32[K, d]``.
    b: values trimmed per side (dense mode, or the mask-aware cap).
    contrib: optional ``bool[K, d]``; when given, coordinate ``j`` is trimmed
      over its ``c_j`` contributors only, with ``b_j = floor(beta * c_j)``
      when ``beta`` is given, else ``b_j = b``, capped at ``(c_j - 1) // 2``
      so that at least one value is left; 0 where ``c_j = 0``.
    beta: fraction trimmed per side in mask-aware mode.

  Returns:
    ``f32[d]``.
  """
  k = x.shape[0]
  if contrib is None:
    if b is None or not 0 <= 2 * b < k:
      raise ValueError(f"trimmed mean needs 0 <= 2b < K; got b={b}, K={k}")
    rows = sort_rows(x, range(b, k - b))
    total = rows[b]
    for r in rows[b + 1:k - b]:
      total = total + r
    return materialize(total / (k - 2 * b))
  filled, count, pad = _balanced_infinities(x, contrib)
  rows = _sort_filled(filled)
  if beta is not None:
    bj = jnp.floor(beta * count.astype(jnp.float32)).astype(jnp.int32)
  else:
    bj = jnp.full_like(count, b)
  bj = jnp.minimum(bj, jnp.maximum(count - 1, 0) // 2)
  start, stop = pad + bj, pad + count - bj
  total = jnp.zeros_like(rows[0])
  for r, row in enumerate(rows):
    total = total + jnp.where((r >= start) & (r < stop), row, 0.0)
  kept = count - 2 * bj
  return materialize(jnp.where(kept > 0, total / jnp.maximum(kept, 1), 0.0))
