"""FoolsGold (Fung, Yoon and Beschastnikh, "The Limitations of Federated
Learning in Sybil Settings", RAID 2020, the FoolsGold algorithm, Alg. 1).

Sybils that push one poisoning objective send updates that point the same
way round after round; honest clients with different data do not. FoolsGold
keeps, per client, the sum of all its past updates (its history ``H_i``) and
down-weights clients whose histories are too similar to another's:

1. ``H_i <- H_i + u_i`` for this round's clients.
2. ``cs_ij = cos(H_i, H_j)`` among this round's clients, ``cs_ii = 0``;
   ``v_i = max_j cs_ij``.
3. Pardoning: ``cs_ij <- cs_ij * v_i / v_j`` when ``v_j > v_i``.
4. ``alpha_i = 1 - max_j cs_ij`` clipped to [0, 1]; rescaled so that the
   largest is 1, ``alpha_i <- alpha_i / max_j alpha_j``, and a weight of
   exactly 1 set to 0.99 (the authors' code, so that the logit is finite).
5. Logit with confidence ``kappa``:
   ``alpha_i <- kappa (ln(alpha_i / (1 - alpha_i)) + 0.5)``, clipped to
   [0, 1] (``-inf`` for ``alpha_i = 0`` becomes 0).
6. The aggregate is the weighted average of this round's updates,
   ``sum_i alpha_i w_i u_i / sum_i alpha_i w_i`` (0 when every alpha is 0),
   FLARE's Alg. 2 under sparse uploads.

Defaults and departures:

* ``kappa = 1`` (the paper's default confidence).
* ``cs_ii = 0`` follows the authors' reference code
  (DistributedSystemsGroup/FoolsGold, ``cosine_similarity(...) - eye``);
  it keeps ``v_i >= 0``, so pardoning never divides by 0 and never flips a
  sign.
* Step 6: the paper and the reference code add the weighted updates
  (``w + sum_i alpha_i Delta_i``); here they are averaged, like every rule
  of the library, so that ``--server_lr`` means the same for all rules.
* The paper's optional feature-importance weighting (of the output
  layer's features) is not implemented: similarity is over the whole
  update.
* Similarities are among the ``K`` clients sampled this round (the paper's
  experiments have every client in every round).

State: the histories ``f32[num_clients, d]``, one row per client of the
federation, read and written at the rows ``ctx.clients`` (the
sampled client ids that the round step passes); without them (a caller
outside the round step) rows ``0..K-1`` are this round's clients in order.
``num_clients`` must cover every client id: ids outside ``[0,
num_clients)`` are not checked inside jit (their history is read from the
last row and not written). From experiments/run.py:
``--aggregator=foolsgold`` (the run passes ``--num_clients``: the rule
declares the population need, :mod:`fedjax_sparse.requirements`).

Non-finite rows: a row with inf/nan is absent this round (its history is
left as it was, its similarities are 0, its weight 0); a history that would
overflow ``f32`` keeps its previous value. Similarities come from rows
scaled by their largest entry (:func:`.flame.cosine_and_norms`), so huge
finite rows cannot overflow them; the output averages what it is sent (a
huge row with a nonzero weight makes it huge, and finite).

Acceptance is ``alpha_i`` (0 = flagged). Diagnostics: ``max_similarity
f32[K]`` (``v_i`` before pardoning).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.flame import cosine_and_norms
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.requirements import POPULATION, declare

Array = jax.Array


class FoolsGoldState(NamedTuple):
  """``history``: ``f32[num_clients, d]``, the sum of each client's updates."""

  history: Array


def foolsgold_weights(history: Array, present: Array, kappa: float) -> tuple[Array, Array]:
  """Alg. 1 lines 6-13 on the histories of this round's clients.

  Args:
    history: ``f32[K, d]`` histories (this round's updates included).
    present: ``bool[K]``; absent rows get similarity 0 and weight 0.
    kappa: logit confidence.

  Returns:
    ``(alpha f32[K], v f32[K])``: the weights and the max similarities.
  """
  k = history.shape[0]
  pair = present[:, None] & present[None, :] & ~jnp.eye(k, dtype=bool)
  cs = jnp.where(pair, cosine_and_norms(history, present)[0], 0.0)
  v = jnp.max(cs, axis=1)
  # Pardoning: v_j > v_i >= 0, so the ratio is in [0, 1).
  ratio = v[:, None] / jnp.where(v[None, :] > 0, v[None, :], 1.0)
  cs = jnp.where(v[None, :] > v[:, None], cs * ratio, cs)
  alpha = jnp.where(present, jnp.clip(1.0 - jnp.max(cs, axis=1), 0.0, 1.0), 0.0)
  top = jnp.max(alpha)
  alpha = jnp.where(top > 0, alpha / jnp.where(top > 0, top, 1.0), 0.0)
  alpha = jnp.where(alpha >= 1.0, 0.99, alpha)
  logit = kappa * (jnp.log(alpha) - jnp.log1p(-alpha) + 0.5)
  alpha = jnp.clip(jnp.where(jnp.isnan(logit), 0.0, logit), 0.0, 1.0)
  return jnp.where(present, alpha, 0.0), v


@register("foolsgold")
@declare(POPULATION)
def foolsgold(num_clients: int, kappa: float = 1.0) -> Aggregator:
  """FoolsGold: weights from the cosine similarity of update histories.

  Args:
    num_clients: clients in the federation (rows of the history state);
      the run passes ``--num_clients`` (declared need).
    kappa: confidence of the logit (paper default 1).

  Returns:
    An :class:`Aggregator` whose state is a :class:`FoolsGoldState`.
  """
  if int(num_clients) < 1:
    raise ValueError(f"foolsgold: num_clients must be >= 1, got {num_clients}")
  if kappa <= 0:
    raise ValueError(f"foolsgold: kappa must be > 0, got {kappa}")
  num_clients = int(num_clients)

  def init(d):
    return FoolsGoldState(history=jnp.zeros((num_clients, d), jnp.float32))

  def apply(state, updates, masks, weights, key, ctx):
    del key
    k, d = updates.shape
    if state.history.shape != (num_clients, d):
      raise ValueError(f"foolsgold: state history has shape "
                       f"{state.history.shape}, expected {(num_clients, d)}")
    if ctx.clients is not None:
      clients = jnp.asarray(ctx.clients, jnp.int32)
    elif k <= num_clients:
      clients = jnp.arange(k, dtype=jnp.int32)
    else:
      raise ValueError(
          f"foolsgold: K={k} updates but num_clients={num_clients} history "
          "rows and no ctx.clients; raise num_clients")
    ok = _common.usable_rows(updates, ctx)
    prev = state.history[clients]
    new = prev + _common.zero_rows(updates, ok).astype(prev.dtype)
    # max |row| is finite exactly when the row is (NaN and inf propagate).
    fits = jnp.isfinite(jnp.max(jnp.abs(new), axis=1))
    new = jnp.where(fits[:, None], new, prev)
    alpha, v = foolsgold_weights(new, ok, kappa)
    update = _common.combine_accepted(updates, masks, weights, alpha,
                                      ctx.pack_size, ctx.finite_uploads)
    history = state.history.at[clients].set(new)
    return (AggOut(update, alpha, {"max_similarity": v}),
            FoolsGoldState(history=history))

  return Aggregator(init, apply)
