"""Saliency-based masks: SNIP and FORCE with the layer-wise constraint.

hybrid_sparse_attack.txt App. B.2-B.3 (eqs. 26-33, Alg. 4-7); ALGORITHMS.md
section 6. The mask is computed once, on the initial global model, from the
colluding attackers' data.

* SNIP (Lee et al. 2019): ``s = |theta * grad F(theta)|`` (eq. 28), global
  top-``floor(delta d_prunable)`` over the prunable kernels.
* FORCE (de Jorge et al. 2021): ``T`` steps; at step ``t`` the kept number
  follows the exponential schedule ``n_t`` (eq. 32), the saliency is
  ``s_t = |theta0 * grad F(c_t * theta0)|`` (eq. 30): the gradient is taken
  at the masked network and averaged over ``num_batches`` batches, but it is
  multiplied by the *dense* ``theta0``, so weights pruned earlier can come
  back. ``c_{t+1}`` is the layer-constrained top-``n_t`` of ``s_t`` (Alg. 5)
  with caps scaled by the schedule (eq. 33). Critical parameters (biases,
  norms) stay in the network during pruning; whether they are 1 in the
  returned ``c`` is ``include_critical`` (the ``"+"`` variants).
* FORCE's data: Alg. 4 line 7 samples a fresh mini-batch of the colluding
  attackers' data ``D_mal`` at every step. ``fresh_batches=True`` (default)
  does that: the examples given form the pool and step ``t`` draws its own
  ``num_batches`` batches from it with a seeded numpy RNG
  (:func:`force_batch_indices`). ``fresh_batches=False`` is the earlier
  behaviour of this module (ours, not the paper's): every step cycles
  through the same few given batches.

The whole FORCE loop is one jitted ``lax.fori_loop``; the fresh batches are
gathered inside it from the pool by a precomputed index array, so the loop
compiles once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from fedjax_sparse.layout import Layout, layout_of
from fedjax_sparse.saliency import masks as _masks
from fedjax_sparse.saliency._select import layerwise_select

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Array, Array], Array]


def cross_entropy_loss(model) -> LossFn:
  """``loss_fn(params, x, y)``: mean softmax cross-entropy of a Linen model.

  For models without mutable collections (``model.apply({"params": p}, x)``).
  """

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return loss_fn


def _as_batches(x, y):
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  if y.ndim == 1:  # a single batch
    x, y = x[None], y[None]
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"batches of x ({x.shape[0]}) and y ({y.shape[0]}) differ")
  return x, y


class _Setup:
  """Static facts about the prunable part of a model."""

  def __init__(self, params, layer_caps, delta):
    self.flat0, self.unravel = ravel_pytree(params)
    self.layout: Layout = layout_of(params)
    self.leaves = _masks.prunable_leaves(self.layout)
    if not self.leaves:
      raise ValueError("the model has no prunable kernel (conv or dense)")
    self.slices = [self.layout.slices()[i] for i in self.leaves]
    self.sizes = np.array([self.layout.sizes[i] for i in self.leaves], np.int64)
    self.d_prunable = int(self.sizes.sum())
    self.n_final = _masks.num_target(self.d_prunable, delta)
    self.caps = _masks.resolve_layer_caps(self.layout, layer_caps)
    self.capped = tuple(bool(c < 1.0) for c in self.caps)

  def prunable(self, v: Array) -> Array:
    return jnp.concatenate([v[sl] for sl in self.slices])

  def full(self, part: Array) -> Array:
    """Flat vector with ``part`` on the prunable kernels and 1 elsewhere."""
    pieces, pos, off = [], 0, 0
    for sl, size in zip(self.slices, self.sizes):
      if sl.start > pos:
        pieces.append(jnp.ones((sl.start - pos,), part.dtype))
      pieces.append(part[off:off + int(size)])
      off += int(size)
      pos = sl.stop
    if pos < self.layout.d:
      pieces.append(jnp.ones((self.layout.d - pos,), part.dtype))
    return jnp.concatenate(pieces)


def _as_pool(x, y):
  """The examples of ``x``, ``y`` as one pool ``[N, ...]``, ``[N]``.

  One batch ``[B, ...]``/``[B]`` is a pool of ``B``; batches
  ``[n, B, ...]``/``[n, B]`` are a pool of ``n * B``. Also returns ``B``.
  """
  xb, yb = _as_batches(x, y)
  n, b = yb.shape[0], yb.shape[1]
  return xb.reshape((n * b,) + xb.shape[2:]), yb.reshape((n * b,)), b


def force_batch_indices(num_examples: int, steps: int, num_batches: int,
                        batch_size: int, seed: int = 0) -> np.ndarray:
  """Rows of the pool that FORCE step ``t`` uses (Alg. 4 line 7).

  Each step draws ``num_batches * batch_size`` rows of the pool, without
  replacement when the pool holds that many and with replacement otherwise
  (as :func:`fedjax_sparse.attacks.builder.attacker_batches`), from one
  ``numpy.random.default_rng(seed)``: deterministic for a fixed seed, and
  every step gets its own draw.

  Returns:
    ``int32[steps, num_batches, batch_size]``.
  """
  if num_examples < 1:
    raise ValueError("FORCE needs at least one example of the attackers' data")
  if steps < 1 or num_batches < 1 or batch_size < 1:
    raise ValueError(f"steps, num_batches and batch_size must be >= 1, got {steps}, "
                     f"{num_batches}, {batch_size}")
  rng = np.random.default_rng(seed)
  per_step = num_batches * batch_size
  replace = num_examples < per_step
  out = np.empty((steps, per_step), np.int32)
  for t in range(steps):
    out[t] = rng.choice(num_examples, size=per_step, replace=replace)
  return out.reshape((steps, num_batches, batch_size))


def _mean_grad(loss_fn, unravel, flat, xb, yb, first, count):
  """Gradient w.r.t. the flat parameters averaged over ``count`` batches."""
  grad = jax.grad(lambda f, x, y: loss_fn(unravel(f), x, y))
  nb = xb.shape[0]
  g = jnp.zeros_like(flat)
  for j in range(count):
    b = (first + j) % nb
    g = g + grad(flat, xb[b], yb[b])
  return g / count


def snip_mask(loss_fn: LossFn, params: PyTree, x, y, delta: float, *,
              layer_caps: Optional[Mapping[str, float]] = None,
              include_critical: bool = False) -> _masks.MaskResult:
  """SNIP mask (App. B.2, eq. 28): ``|theta * grad F(theta)|``, global top-k.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``.
    params: the initial model (pytree).
    x, y: one batch ``[B, ...]``/``[B]`` or batches ``[n, B, ...]``/``[n, B]``
      (the gradient is averaged over them).
    delta: kept fraction of the prunable parameters.
    layer_caps: optional per-layer maximum densities (Alg. 5).
    include_critical: 1 on biases and norms (``"snip_plus"``).

  Returns:
    :class:`~fedjax_sparse.saliency.MaskResult`.
  """
  xb, yb = _as_batches(x, y)
  st = _Setup(params, layer_caps, delta)
  caps_count = np.floor(st.caps * st.sizes + 1e-9).astype(np.int64)

  @jax.jit
  def run(flat0, xb, yb):
    g = _mean_grad(loss_fn, st.unravel, flat0, xb, yb, 0, xb.shape[0])
    s = jnp.abs(st.prunable(flat0 * g))
    return layerwise_select(s, st.sizes, st.n_final, caps_count, st.capped)

  part = np.asarray(run(st.flat0, xb, yb))
  name = "snip_plus" if include_critical else "snip"
  return _masks.make_result(st.layout, _masks.assemble(st.layout, part, include_critical),
                            name, delta)


def force_mask(loss_fn: LossFn, params: PyTree, x, y, delta: float, *,
               steps: int = 100, num_batches: int = 3,
               layer_caps: Optional[Mapping[str, float]] = None,
               include_critical: bool = False, fresh_batches: bool = True,
               batch_size: Optional[int] = None,
               seed: int = 0) -> _masks.MaskResult:
  """FORCE mask with the layer-wise constraint (Alg. 4; see module docstring).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``.
    params: the initial model ``theta0`` (pytree).
    x, y: the colluding attackers' data ``D_mal``: batches ``[n, B, ...]``,
      ``int32[n, B]``, or one batch ``[B, ...]``, ``int32[B]``.
    delta: final kept fraction of the prunable parameters (paper: 5e-3).
    steps: T (100).
    num_batches: batches whose gradients are averaged at each step (3,
      ALGORITHMS.md section 6).
    layer_caps: ``{name or alias: max density}``, e.g.
      ``{"first_conv": 0.2, "last_dense": 0.25}``.
    include_critical: 1 on biases and norms (``"force_plus"``).
    fresh_batches: True (default, Alg. 4 line 7 "sample mini-batch
      ``zeta in D_mal``" at every step): all the examples of ``x``, ``y``
      form a pool and step ``t`` averages over ``num_batches`` batches of
      ``batch_size`` rows drawn afresh from it,
      ``force_batch_indices(N, steps, num_batches, batch_size, seed)[t]``,
      so the T steps see ``T * num_batches`` batches. False (the earlier
      behaviour, ours): step ``t`` averages over the given batches
      ``t * num_batches + j (mod n)``, ``j < num_batches``; with
      ``n == num_batches`` every step sees the same batches.
    batch_size: rows per fresh batch; None: ``B``, the size of the given
      batches. Only with ``fresh_batches``.
    seed: numpy seed of the fresh batches. Only with ``fresh_batches``.

  Returns:
    :class:`~fedjax_sparse.saliency.MaskResult` with exactly
    ``floor(delta * d_prunable)`` prunable parameters kept (when the caps
    allow it).
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  st = _Setup(params, layer_caps, delta)
  counts, fractions = _masks.schedule(st.d_prunable, delta, steps)
  caps_t = _masks.scheduled_caps(st.sizes, st.caps, fractions)
  counts_j = jnp.asarray(counts.astype(np.int32))
  caps_j = jnp.asarray(caps_t.astype(np.int32))

  def select(t, c_part, flat0, xb, yb, first):
    c_full = st.full(c_part.astype(flat0.dtype))
    g = _mean_grad(loss_fn, st.unravel, flat0 * c_full, xb, yb, first, num_batches)
    s = jnp.abs(st.prunable(flat0 * g))
    return layerwise_select(s, st.sizes, counts_j[t], caps_j[t], st.capped)

  if fresh_batches:
    xp, yp, b = _as_pool(x, y)
    b = b if batch_size is None else int(batch_size)
    idx = jnp.asarray(force_batch_indices(int(yp.shape[0]), steps, num_batches, b,
                                          seed))

    @jax.jit
    def run_fresh(flat0, xp, yp, idx):
      def step(t, c_part):
        rows = idx[t]                       # [num_batches, batch_size]
        return select(t, c_part, flat0, jnp.take(xp, rows, axis=0),
                      jnp.take(yp, rows, axis=0), 0)

      return lax.fori_loop(0, steps, step, jnp.ones((st.d_prunable,), bool))

    part = np.asarray(run_fresh(st.flat0, xp, yp, idx))
  else:
    xb, yb = _as_batches(x, y)

    @jax.jit
    def run(flat0, xb, yb):
      def step(t, c_part):
        return select(t, c_part, flat0, xb, yb, t * num_batches)

      return lax.fori_loop(0, steps, step, jnp.ones((st.d_prunable,), bool))

    part = np.asarray(run(st.flat0, xb, yb))
  name = "force_plus" if include_critical else "force"
  return _masks.make_result(st.layout, _masks.assemble(st.layout, part, include_critical),
                            name, delta)
