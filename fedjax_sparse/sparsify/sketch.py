"""Count sketch (Charikar et al.), the primitive of FetchSGD (sparsefed.txt Alg. 10).

A count sketch of ``v: f32[d]`` with ``r`` rows and ``c`` columns is the table
``S[j, b] = sum_{i : h_j(i) = b} s_j(i) * v_i`` with a bucket hash ``h_j`` and
a sign hash ``s_j`` per row. It is linear (``S(a + b) = S(a) + S(b)``), and
``U(S)_i = median_j S[j, h_j(i)] * s_j(i)`` estimates every coordinate; the
``k`` heavy coordinates of a vector are recovered when ``c`` is about ``10 k``
or more (Charikar et al.; Rothchild et al., FetchSGD).

Hashes are computed on the fly from two 32-bit seeds per row drawn from a PRNG
key (murmur3's finaliser of ``i xor seed``), so a sketch of an 11M-parameter
model stores ``2 r`` integers, not an ``r x d`` table; sketching is one
scatter-add per row, unsketching one gather per row and a compare-exchange
median over the rows. The hashes are deterministic given the key and are not
cryptographic.

FetchSGD, the aggregator built on it, is
:func:`fedjax_sparse.aggregators.fetchsgd.fetchsgd`; its bits per round are
:func:`fedjax_sparse.sparsify.fetchsgd_round_comm`.
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_SCATTER_DNUMS = lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,),
    scatter_dims_to_operand_dims=(0,))


def _fmix32(h: Array) -> Array:
  """murmur3's 32-bit finaliser (a bijection with full avalanche)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _median_rows(rows: list[Array]) -> Array:
  """Elementwise median of a short list of arrays (numpy's convention).

  An odd-even transposition sorting network of min/max: XLA fuses it into
  one loop, where ``jnp.median`` over a small axis sorts (slow on CPU; see
  DESIGN.md).
  """
  r = len(rows)
  v = list(rows)
  for p in range(r):
    for i in range(p % 2, r - 1, 2):
      lo, hi = jnp.minimum(v[i], v[i + 1]), jnp.maximum(v[i], v[i + 1])
      v[i], v[i + 1] = lo, hi
  if r % 2:
    return v[r // 2]
  return 0.5 * (v[r // 2 - 1] + v[r // 2])


def check_sketch_config(rows, cols) -> None:
  for name, val in (("rows", rows), ("cols", cols)):
    if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
      raise ValueError(f"count sketch {name} must be an int >= 1, got {val!r}")


@flax.struct.dataclass
class CountSketch:
  """A count sketch for vectors of length ``d`` (see the module docstring).

  Attributes:
    seeds: ``uint32[rows, 2]`` bucket and sign seeds (a pytree leaf).
    d, rows, cols: static sizes.
  """

  seeds: Array
  d: int = flax.struct.field(pytree_node=False, default=1)
  rows: int = flax.struct.field(pytree_node=False, default=1)
  cols: int = flax.struct.field(pytree_node=False, default=1)

  @classmethod
  def create(cls, d: int, rows: int, cols: int, key: Array) -> "CountSketch":
    """A sketch whose hashes are drawn from ``key`` (deterministic)."""
    check_sketch_config(rows, cols)
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
      raise ValueError(f"the vector length d must be an int >= 1, got {d!r}")
    seeds = jax.random.bits(key, (rows, 2), jnp.uint32)
    return cls(seeds=seeds, d=int(d), rows=int(rows), cols=int(cols))

  def _hashes(self, j: int) -> tuple[Array, Array]:
    i = jnp.arange(self.d, dtype=jnp.uint32)
    bucket = (_fmix32(i ^ self.seeds[j, 0]) % jnp.uint32(self.cols)).astype(jnp.int32)
    sign = 1.0 - 2.0 * (_fmix32(i ^ self.seeds[j, 1]) >> 31).astype(jnp.float32)
    return bucket, sign

  def buckets(self) -> Array:
    """``int32[rows, d]`` bucket of every coordinate in every row."""
    return jnp.stack([self._hashes(j)[0] for j in range(self.rows)])

  def signs(self) -> Array:
    """``f32[rows, d]`` sign (+1 or -1) of every coordinate in every row."""
    return jnp.stack([self._hashes(j)[1] for j in range(self.rows)])

  def sketch(self, v: Array) -> Array:
    """``f32[d] -> f32[rows, cols]``, linear in ``v``."""
    if v.shape != (self.d,):
      raise ValueError(f"sketch expects f32[{self.d}], got shape {v.shape}")
    out = []
    for j in range(self.rows):
      bucket, sign = self._hashes(j)
      out.append(lax.scatter_add(
          jnp.zeros((self.cols,), v.dtype), bucket[:, None], sign * v,
          _SCATTER_DNUMS, indices_are_sorted=False,
          mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS))
    return jnp.stack(out)

  def unsketch(self, table: Array) -> Array:
    """``f32[rows, cols] -> f32[d]``: median over rows of ``table[j, h_j(i)] s_j(i)``."""
    if table.shape != (self.rows, self.cols):
      raise ValueError(f"unsketch expects f32[{self.rows}, {self.cols}], got "
                       f"shape {table.shape}")
    est = []
    for j in range(self.rows):
      bucket, sign = self._hashes(j)
      est.append(table[j][bucket] * sign)
    return _median_rows(est)

  def support(self, selected: Array) -> Array:
    """``bool[d] -> bool[rows, cols]``: the cells the selected coordinates hash to."""
    out = []
    for j in range(self.rows):
      bucket, _ = self._hashes(j)
      out.append(lax.scatter_add(
          jnp.zeros((self.cols,), jnp.int32), bucket[:, None],
          selected.astype(jnp.int32), _SCATTER_DNUMS,
          mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS) > 0)
    return jnp.stack(out)
