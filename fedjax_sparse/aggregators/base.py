"""The aggregator contract shared by every rule.

An aggregator is a pair of pure functions in the spirit of optax::

  agg = fedjax_sparse.aggregators.get("fedavg")()
  state = agg.init(d)
  out, state = agg.apply(state, updates, masks, weights, key, ctx)

* ``updates``: ``f32[K, d]`` flattened client updates (``global - local``, a
  descent direction). Under sparsification these are the zero-filled dense
  vectors ("dense view") of ALGORITHMS.md section 1.
* ``masks``: ``bool[K, n_packs]`` pack masks of the sparse uploads, or ``None``
  for dense uploads. ``ctx.pack_size`` maps packs to coordinates.
* ``weights``: ``f32[K]`` aggregation weights (dataset sizes, or ones).
* ``key``: a PRNG key for randomised rules (GAS, DnC, bucketing).
* ``ctx``: an :class:`AggContext` with the round number, the global model and
  static facts (layout, pack size, number of attackers a rule may assume).

``apply`` returns an :class:`AggOut` with the aggregated update ``f32[d]``, the
per-client acceptance or weight ``f32[K]`` (1 accepted, 0 rejected, or a soft
weight) used by the detection and escape metrics, and a small dict of
diagnostics (scalars or small arrays, all jittable).

Selection rules (Krum, SafeSparse, FedSign, ...) compute an acceptance vector
and hand it to :func:`combine`, which is plain weighted averaging for dense
uploads and FLARE's sparse aggregation (Alg. 2) for sparse uploads.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_sparse.layout import Layout

Array = jax.Array
PyTree = Any


class AggOut(NamedTuple):
  """What an aggregator returns each round.

  Attributes:
    update: ``f32[d]`` aggregated update; the server applies
      ``global - server_lr * update``.
    acceptance: ``f32[K]`` per-client acceptance (0/1) or weight.
    diagnostics: dict of small jittable values (scores, thresholds, ...).
  """

  update: Array
  acceptance: Array
  diagnostics: dict


@flax.struct.dataclass
class AggContext:
  """Everything an aggregator may know besides the updates.

  Traced fields: ``round`` (int32 scalar), ``global_params`` (``f32[d]``, the
  flat global model before this round's update), ``extra`` (a dict of arrays
  for rules that need more, e.g. FLTrust's server update).
  Static fields: ``layout``, ``pack_size``, ``num_byzantine`` (f, the number
  of attackers a rule such as Krum is told to tolerate) and ``num_clients``
  (K).
  """

  round: Array
  global_params: Optional[Array] = None
  extra: dict = flax.struct.field(default_factory=dict)
  layout: Optional[Layout] = flax.struct.field(pytree_node=False, default=None)
  pack_size: int = flax.struct.field(pytree_node=False, default=1)
  num_byzantine: int = flax.struct.field(pytree_node=False, default=0)
  num_clients: int = flax.struct.field(pytree_node=False, default=0)


InitFn = Callable[[int], PyTree]
ApplyFn = Callable[..., tuple[AggOut, PyTree]]


class Aggregator(NamedTuple):
  """A pure ``init``/``apply`` pair (see the module docstring)."""

  init: InitFn
  apply: ApplyFn


def expand_pack_mask(masks: Array, pack_size: int, d: int) -> Array:
  """``[..., n_packs]`` per-pack values -> ``[..., d]`` per-coordinate values.

  Broadcast + reshape, which XLA fuses as index arithmetic (``jnp.repeat``
  with ``total_repeat_length`` lowers to a scatter, two cumulative sums and a
  gather: about 25x slower on CPU).
  """
  if pack_size == 1:
    return masks[..., :d]
  n = masks.shape[-1]
  out = jnp.broadcast_to(masks[..., None], masks.shape + (pack_size,))
  return out.reshape(masks.shape[:-1] + (n * pack_size,))[..., :d]


_GROUP = 50  # clients summed per fused loop (mask rows streamed at once)


def pack_weight_sums(masks: Array, w: Array) -> Array:
  """``sum_i w_i * masks[i]``: ``(bool[K, n], f32[K]) -> f32[n]``.

  An unrolled sum of selects, so XLA fuses each group of clients into one
  elementwise loop over the 1-byte masks (no converted float copy of the
  masks, whose matrix-vector product costs several dense means on CPU).
  An optimization barrier closes each group's loop: one loop over all of
  K = 100 mask rows at once ran 5-15% slower on CPU than two of 50 (the
  sums are exact for integer weights, whatever the grouping).
  """
  total = None
  for s in range(0, masks.shape[0], _GROUP):
    part = None
    for i in range(s, min(s + _GROUP, masks.shape[0])):
      term = jnp.where(masks[i], w[i], jnp.zeros((), w.dtype))
      part = term if part is None else part + term
    total = part if total is None else total + part
    if s + _GROUP < masks.shape[0]:
      total = jax.lax.optimization_barrier(total)
  return total


def combine(updates: Array, masks: Optional[Array], weights: Array,
            acceptance: Array, pack_size: int = 1) -> Array:
  """Weighted average of the accepted clients (FLARE Alg. 2 when sparse).

  Dense (``masks is None``): ``sum_i a_i w_i u_i / sum_i a_i w_i``, or zero if no
  client is accepted.

  Sparse: for every coordinate ``j`` of pack ``p``, the average is taken over
  the accepted clients whose mask selects ``p``:
  ``sum_{i in S_p} a_i w_i u_i(j) / sum_{i in S_p} a_i w_i``. Coordinates that no
  accepted client selected get 0, so the global model keeps its previous value
  there (ALGORITHMS.md section 1; the paper lets each client refill them
  locally, which would give every client a different model).

  Args:
    updates: ``f32[K, d]``; with masks, the dense view (zero off-mask).
    masks: ``bool[K, n_packs]`` or ``None``.
    weights: ``f32[K]`` aggregation weights (dataset sizes or ones).
    acceptance: ``f32[K]`` acceptance (0/1) or soft weights from a rule.
    pack_size: parameters per pack.

  Returns:
    ``f32[d]``.
  """
  w = (weights * acceptance).astype(updates.dtype)
  if masks is None:
    total = jnp.sum(w)
    return jnp.where(total > 0, (w @ updates) / jnp.where(total > 0, total, 1.0), 0.0)
  d = updates.shape[1]
  # The dense view is zero off-mask, so the numerator needs no mask.
  num = w @ updates
  den = pack_weight_sums(masks, w)
  if pack_size > 1:
    # The barrier keeps the per-pack sums from being recomputed for every
    # coordinate of their pack.
    den = expand_pack_mask(jax.lax.optimization_barrier(den), pack_size, d)
  den = den[:d]
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
