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
* ``ctx``: an :class:`AggContext` (the typed
  :class:`~fedjax_sparse.context.RoundContext`) with the round number, the
  global model, the side inputs some rules need (``ctx.clients``,
  ``ctx.lr``, ``ctx.local_steps``, ``ctx.server_update``; None when not
  given) and static facts (layout, pack size, number of attackers a rule
  may assume).

``apply`` returns an :class:`AggOut` with the aggregated update ``f32[d]``, the
per-client acceptance or weight ``f32[K]`` (1 accepted, 0 rejected, or a soft
weight) used by the detection and escape metrics, and a small dict of
diagnostics (scalars or small arrays, all jittable). A rule whose acceptance
is a selection names the key of its selection escape ratio in
``Aggregator.selection_escape``; the round step computes that ratio from the
acceptance and the ground truth (:mod:`fedjax_sparse.metrics.escape`).

Selection rules (Krum, SafeSparse, FedSign, ...) compute an acceptance vector
and hand it to :func:`combine`, which is plain weighted averaging for dense
uploads and FLARE's sparse aggregation (Alg. 2) for sparse uploads.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_sparse.context import RoundContext

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


# The typed round context under the name of the aggregator contract (one
# class for rules and attacks; see fedjax_sparse/context.py for its fields).
AggContext = RoundContext


InitFn = Callable[[int], PyTree]
ApplyFn = Callable[..., tuple[AggOut, PyTree]]


class Aggregator(NamedTuple):
  """A pure ``init``/``apply`` pair (see the module docstring).

  Attributes:
    init: ``init(d) -> state``.
    apply: ``apply(state, updates, masks, weights, key, ctx) -> (AggOut,
      state)``.
    selection_escape: for a rule whose acceptance is a selection (Krum,
      SafeSparse, ...), the diagnostic name under which the round step
      reports the share of the malicious clients it accepted
      (:func:`fedjax_sparse.metrics.escape.selection_escape_ratio` of
      ``AggOut.acceptance`` and ``ctx.malicious``), e.g. ``"escape_ratio"``;
      None for rules whose acceptance is not a selection. Pre-aggregators
      pass their base's on.
  """

  init: InitFn
  apply: ApplyFn
  selection_escape: Optional[str] = None


def empty_state(d: int) -> tuple:
  """The ``init`` of a rule without state: ``()`` whatever ``d``."""
  del d
  return ()


def stateless(apply: Callable[..., AggOut],
              selection_escape: Optional[str] = None) -> Aggregator:
  """An :class:`Aggregator` for a rule without state (optax's ``stateless``).

  Args:
    apply: ``apply(updates, masks, weights, key, ctx) -> AggOut``, the rule
      without the state argument.
    selection_escape: see :class:`Aggregator`.

  Returns:
    ``Aggregator(empty_state, ...)`` whose ``apply`` takes and returns the
    state ``()`` unchanged: ``(out, state) = agg.apply(state, updates, masks,
    weights, key, ctx)`` like every rule, so wrappers (pre-aggregators, the
    round step) need not tell the two kinds apart.
  """

  def apply_with_state(state, updates, masks, weights, key, ctx):
    return apply(updates, masks, weights, key, ctx), state

  return Aggregator(empty_state, apply_with_state, selection_escape)


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


_GROUP = 50  # clients per partial sum


def pack_weight_sums(masks: Array, w: Array) -> Array:
  """``sum_i w_i * masks[i]``: ``(bool[K, n], f32[K]) -> f32[n]``.

  An unrolled chain ``part = where(masks[i], part + w[i], part)``, so XLA
  fuses each group of clients into one elementwise loop over the 1-byte
  masks (no converted float copy of the masks, whose matrix-vector product
  costs several dense means on CPU) and LLVM emits one masked add per client
  and vector (``select(m, w, 0)`` then an add took a masked move more:
  15-20% slower on an AVX-512 CPU). Groups of ``_GROUP`` clients are summed
  separately and then added (the summation order of earlier versions, kept
  so that results reproduce); the sums are exact for integer weights,
  whatever the order.
  """
  zero = jnp.zeros((), w.dtype)
  total = None
  for s in range(0, masks.shape[0], _GROUP):
    part = jnp.where(masks[s], w[s], zero)
    for i in range(s + 1, min(s + _GROUP, masks.shape[0])):
      part = jnp.where(masks[i], part + w[i], part)
    total = part if total is None else total + part
  return total


def combine(updates: Array, masks: Optional[Array], weights: Array,
            acceptance: Array, pack_size: int = 1,
            assume_finite: bool = False) -> Array:
  """Weighted average of the accepted clients (FLARE Alg. 2 when sparse).

  Dense (``masks is None``): ``sum_i a_i w_i u_i / sum_i a_i w_i``, or zero if no
  client is accepted.

  Sparse: for every coordinate ``j`` of pack ``p``, the average is taken over
  the accepted clients whose mask selects ``p``:
  ``sum_{i in S_p} a_i w_i u_i(j) / sum_{i in S_p} a_i w_i``. Coordinates that no
  accepted client selected get 0, so the global model keeps its previous value
  there (ALGORITHMS.md section 1; the paper lets each client refill them
  locally, which would give every client a different model).

  Rows with ``inf``/``nan`` are absent (see :func:`combine_finite`, which also
  says which rows were used, and for ``assume_finite``).

  Args:
    updates: ``f32[K, d]``; with masks, the dense view (zero off-mask).
    masks: ``bool[K, n_packs]`` or ``None``.
    weights: ``f32[K]`` aggregation weights (dataset sizes or ones).
    acceptance: ``f32[K]`` acceptance (0/1) or soft weights from a rule.
    pack_size: parameters per pack.

  Returns:
    ``f32[d]``.
  """
  return combine_finite(updates, masks, weights, acceptance, pack_size,
                        assume_finite)[0]


def combine_finite(updates: Array, masks: Optional[Array], weights: Array,
                   acceptance: Array, pack_size: int = 1,
                   assume_finite: bool = False) -> tuple[Array, Array]:
  """:func:`combine` with the rows that hold ``inf``/``nan`` left out.

  The one place where the weighted means of the library meet non-finite
  uploads: a client may send ``inf`` or ``nan`` (a diverged local model, an
  attack), and ``w @ updates`` would spread it to the whole result, even
  with ``w_i = 0`` (``0 * inf = nan``). Such a row is treated as absent:
  zeroed with ``jnp.where`` (never multiplied by 0) and given acceptance 0,
  and the others are averaged as if it had not been sent. Finite rows are
  averaged exactly as before: the plain product is computed first and only
  when its result is not finite (which happens exactly when some row holds
  ``inf``/``nan``, or when finite rows overflow the ``f32`` range) is it
  recomputed without the non-finite rows (``lax.cond``: a check of ``d``
  values in the common case, not another pass over the ``K x d`` updates).
  Under ``vmap`` with batched updates both branches run.

  ``assume_finite=True`` (``ctx.finite_uploads``: the round step has
  screened the rows already) skips the check and the ``lax.cond``. Not only
  to save the check: the conditional takes the updates as an operand, which
  makes XLA write them out instead of fusing their computation into the
  mean, and in a fused round step that changed the last bits of FedAvg's
  dense mean. Skipped, the round step's numbers are those of the plain mean,
  bit for bit.

  Returns:
    ``(f32[d] average, f32[K] acceptance)``: the acceptance as given, 0 for
    the rows left out.
  """
  acceptance = acceptance.astype(updates.dtype)
  out = _combine(updates, masks, weights, acceptance, pack_size)
  if assume_finite:
    return out, acceptance

  def without_nonfinite_rows(_):
    ok = jnp.all(jnp.isfinite(updates), axis=1)
    used = jnp.where(ok, acceptance, jnp.zeros((), acceptance.dtype))
    clean = jnp.where(ok[:, None], updates, jnp.zeros((), updates.dtype))
    return _combine(clean, masks, weights, used, pack_size), used

  return jax.lax.cond(jnp.all(jnp.isfinite(out)),
                      lambda _: (out, acceptance), without_nonfinite_rows,
                      None)


def _combine(updates: Array, masks: Optional[Array], weights: Array,
             acceptance: Array, pack_size: int) -> Array:
  """:func:`combine`'s arithmetic, for rows known (or hoped) to be finite."""
  w = (weights * acceptance).astype(updates.dtype)
  if masks is None:
    total = jnp.sum(w)
    return jnp.where(total > 0, (w @ updates) / jnp.where(total > 0, total, 1.0), 0.0)
  d = updates.shape[1]
  # The dense view is zero off-mask, so the numerator needs no mask.
  num = w @ updates
  den = expand_pack_mask(pack_sums_once(masks, w, pack_size), pack_size, d)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def combine_scaled(updates: Array, masks: Optional[Array], weights: Array,
                   row_scale: Array, pack_size: int = 1) -> Array:
  """``_combine(updates * row_scale[:, None], masks, weights, 1)`` without
  writing the scaled rows: the numerator is ``(w * s) @ U``, the
  denominators those of the unscaled weights (a clipped mean: one pass over
  the updates instead of three). For finite rows only."""
  w = weights.astype(updates.dtype)
  num = (w * row_scale.astype(updates.dtype)) @ updates
  if masks is None:
    total = jnp.sum(w)
    return jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), 0.0)
  d = updates.shape[1]
  den = expand_pack_mask(pack_sums_once(masks, w, pack_size), pack_size, d)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


_DOT_MIN_PACK = 8  # from this pack size on, per-pack sums as a matrix product


def pack_sums_once(masks: Array, w: Array, pack_size: int) -> Array:
  """:func:`pack_weight_sums`, computed once per pack, not per coordinate.

  At ``P = 1`` the sums fuse one to one into the division, which costs
  nothing extra. Left to itself at ``P > 1``, XLA fuses the sums of selects
  into the division of every coordinate of the pack, which repeats the
  ``K`` selects ``P`` times
  (``jax.lax.optimization_barrier`` around the sums did not stop it on
  XLA:CPU, jax 0.10: the compiled program had one fusion). Two ways keep
  the per-pack sums a buffer of their own: for ``P >= 8`` the matrix
  product ``w @ masks`` at full f32 precision (the float copy of the masks
  then costs at most an eighth of the updates' bytes), and for smaller
  packs the loop of selects as a branch of ``lax.cond`` (taken when some
  client has a nonzero weight; otherwise the sums are zero without reading
  the masks). At K = 100, d = 270k on a 2-core CPU this took Alg. 2 from
  2.3x / 1.9x / 1.6x the dense mean to 1.3x / 1.3x / 1.1x at P = 2 / 4 / 16.
  Under ``vmap`` with a batched weight vector the branch becomes a select of
  both sides and the sums may be fused again: slower, never different. The
  branch is taken on CPU only: XLA:GPU reads a conditional's predicate on
  the host, a synchronisation each round, so accelerators get the plain
  loop (whose fusion there is XLA's to judge; unmeasured, no GPU was lent).
  """
  if pack_size == 1:
    return pack_weight_sums(masks, w)
  if pack_size >= _DOT_MIN_PACK:
    return jnp.matmul(w, masks.astype(w.dtype),
                      precision=jax.lax.Precision.HIGHEST)
  if jax.default_backend() != "cpu":
    return pack_weight_sums(masks, w)
  return jax.lax.cond(jnp.any(w != 0), pack_weight_sums,
                      lambda m, v: jnp.zeros(m.shape[-1], v.dtype), masks, w)
