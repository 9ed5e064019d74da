"""Count sketch and FetchSGD (sparsefed.txt App. B.1.4, Alg. 10).

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

FetchSGD (Alg. 10, with ALGORITHMS.md section 3's reading)::

  S     <- (1/K) sum_i S(clip(u_i))       # = S(mean_i clip(u_i)) by linearity
  S_u   <- rho * S_u + S                  # momentum sketch
  S_e   <- S_e + S_u                      # error sketch
  Delta <- top_k(U(S_e))                  # estimated values on k coordinates
  S_e, S_u <- 0 on the cells of S(Delta)  # the cells Delta's own sketch touches
  return Delta                            # server: theta <- theta - lr * Delta

Notes:

* The aggregator sketches the mean of the clipped updates once instead of
  summing ``K`` client sketches; by linearity the two are equal up to float
  rounding (tested), and it costs one scatter instead of ``K``. Each client
  still uploads ``32 * r * c`` bits (:func:`fetchsgd_round_comm`).
* Alg. 10 writes the learning rate into the error sketch (``S_e = eta S_u +
  S_e``) and subtracts ``S(Delta)``; here the server applies the learning rate
  (``theta - lr * Delta``, like every aggregator of the library) and the cells
  touched by ``Delta`` are zeroed in both sketches, as in FetchSGD's reference
  code. ``error_reset="subtract"`` gives Alg. 10's ``S_e - S(Delta)`` (the
  momentum cells are still zeroed).
* ``mode="true_topk"`` runs the same steps with exact ``f32[d]`` vectors in
  place of sketches: zeroing the selected coordinates of ``W`` is ``W -
  Delta``, so this is SparseFed (tested).
* Non-finite and huge rows (ours), as in SparseFed: a row at ``1e30`` is
  clipped to norm ``L``, a row with ``inf``/``nan`` is left out of the mean
  (acceptance 0), so the sketches never hold ``nan``. With clipping every
  cell of ``S`` is at most ``||u||_1 <= sqrt(d) L``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.aggregators.base import AggOut, Aggregator, combine_finite
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.sparsify import comm
from fedjax_sparse.sparsify._common import (check_clip_config, check_k_spec,
                                            check_rho, clip_by_l2_norm,
                                            clip_threshold, resolve_k)
from fedjax_sparse.sparsify.topk import TOPK_METHODS, topk_mask

Array = jax.Array

FETCHSGD_MODES = ("sketch", "true_topk")

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


@flax.struct.dataclass
class FetchSGDState:
  """Server state: ``f32[rows, cols]`` sketches, or ``f32[d]`` in true_topk mode.

  Attributes:
    momentum: momentum ``S_u`` (``R``).
    error: error accumulator ``S_e`` (``W``).
  """

  momentum: Array
  error: Array


def fetchsgd_round_comm(d: int, rows: int, cols: int, k,
                        num_clients: int) -> comm.RoundComm:
  """Bits per round of FetchSGD: ``32 r c`` up, a top-k update down, per client."""
  return comm.round_comm(d, num_clients, sketch=(rows, cols),
                         downlink_k=resolve_k(k, d))


@register("fetchsgd")
def fetchsgd(rows: int = 5, cols: Optional[int] = None, k=None, rho: float = 0.9,
             clip_norm: float = math.inf, mode: str = "sketch", seed: int = 0,
             adaptive_clip: bool = False,
             lr_schedule: Optional[Callable[[Array], Array]] = None,
             weighted: bool = False, error_reset: str = "zero",
             topk_method: str = "radix") -> Aggregator:
  """SparseFed with FetchSGD (sparsefed.txt Alg. 10; ALGORITHMS.md section 3).

  Args:
    rows: sketch rows r.
    cols: sketch columns c (required; FetchSGD recovers the top-k well with
      ``c >= 10 k``).
    k: coordinates updated per round (required): int >= 1 or a fraction of d.
    rho: momentum (0.9).
    clip_norm: ``L`` per client (``inf``: no clipping).
    mode: ``"sketch"`` (FetchSGD) or ``"true_topk"`` (same steps on exact
      vectors; equals SparseFed).
    seed: seed of the sketch's hashes.
    adaptive_clip, lr_schedule: as :func:`~fedjax_sparse.sparsify.sparsefed`.
    weighted: weight the mean by dataset sizes (ours; Alg. 10 averages).
    error_reset: ``"zero"`` (zero the touched cells) or ``"subtract"``
      (``S_e - S(Delta)``, Alg. 10 line 15).
    topk_method: see :data:`fedjax_sparse.sparsify.topk.TOPK_METHODS`.

  Returns:
    An :class:`~fedjax_sparse.aggregators.Aggregator` with a
    :class:`FetchSGDState`; ``update`` is ``Delta``. Diagnostics:
    ``clip_scale`` (f32[K]), ``clip_norm``, ``error_norm``.
  """
  check_sketch_config(rows, cols)
  check_k_spec(k)
  check_rho(rho)
  check_clip_config(clip_norm, adaptive_clip)
  if mode not in FETCHSGD_MODES:
    raise ValueError(f"unknown FetchSGD mode {mode!r}; known: "
                     f"{', '.join(FETCHSGD_MODES)}")
  if error_reset not in ("zero", "subtract"):
    raise ValueError(f"error_reset must be 'zero' or 'subtract', got {error_reset!r}")
  if topk_method not in TOPK_METHODS:
    raise ValueError(f"unknown top-k method {topk_method!r}; known: "
                     f"{', '.join(TOPK_METHODS)}")
  no_clip = math.isinf(float(clip_norm)) and not adaptive_clip

  def make_sketch(d):
    return CountSketch.create(d, rows, cols, jax.random.PRNGKey(seed))

  def init(d: int) -> FetchSGDState:
    resolve_k(k, d)  # fails here, before anything is compiled
    shape = (rows, cols) if mode == "sketch" else (d,)
    z = jnp.zeros(shape, jnp.float32)
    return FetchSGDState(momentum=z, error=z)

  def apply(state, updates, masks, weights, key, ctx):
    del key
    d = updates.shape[1]
    kk = resolve_k(k, d)
    lim = clip_threshold(clip_norm, adaptive_clip, lr_schedule, ctx)
    if no_clip:
      clipped, scale = updates, jnp.ones((updates.shape[0],), updates.dtype)
    else:
      clipped, scale = clip_by_l2_norm(updates, lim)
    del masks  # clients upload sketches of their dense updates
    w = weights if weighted else jnp.ones((clipped.shape[0],), clipped.dtype)
    u, acceptance = combine_finite(clipped, None, w, jnp.ones_like(w), 1,
                                   ctx.finite_uploads)
    if mode == "sketch":
      sk = make_sketch(d)
      momentum = rho * state.momentum + sk.sketch(u)
      error = state.error + momentum
      est = sk.unsketch(error)
      selected = topk_mask(est, kk, topk_method)
      delta = jnp.where(selected, est, 0.0)
      touched = sk.support(selected)
      if error_reset == "zero":
        error = jnp.where(touched, 0.0, error)
      else:
        error = error - sk.sketch(delta)
      momentum = jnp.where(touched, 0.0, momentum)
    else:
      momentum = rho * state.momentum + u
      error = state.error + momentum
      selected = topk_mask(error, kk, topk_method)
      delta = jnp.where(selected, error, 0.0)
      error = jnp.where(selected, 0.0, error)
      momentum = jnp.where(selected, 0.0, momentum)
    diagnostics = {"clip_scale": scale,
                   "clip_norm": jnp.asarray(lim, jnp.float32),
                   "error_norm": jnp.linalg.norm(error)}
    return AggOut(delta, acceptance, diagnostics), FetchSGDState(momentum, error)

  return Aggregator(init, apply)
