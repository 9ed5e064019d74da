"""Optimal IPM and ALIE: the attack factor found by a line search against the
deployed aggregation (ByzFL's ``Optimal_InnerProductManipulation`` and
``Optimal_ALittleIsEnough``; Allouah et al., AISTATS 2023, "Fixing by
mixing", which uses them).

With ``mu`` the mean and ``sigma`` the per-coordinate standard deviation
(``ddof = 1``) of the benign updates, every attacker uploads

* ``optimal_ipm``: ``-tau mu`` (IPM, Xie et al. 2020);
* ``optimal_alie``: ``mu + tau sigma`` (ALIE, Baruch et al. 2019, in
  ByzFL's form),

where ``tau`` maximises ``||AGG(U(tau)) - mu||``: the distance between the
output of the run's own rule (with its pre-aggregators, on the uploads as
the server receives them: pack top-k sparsified when the run sparsifies)
and the benign mean. The search is ByzFL's: ``evals`` evaluations, from
``start`` with step ``delta``; expansion (the step doubles while the
distance grows; at the first miss it shrinks by ``ratio`` and the
contraction starts), then contraction (``best + delta`` is tried, kept if
better, and the step shrinks by ``ratio`` each time). ``tau`` is searched
on one side (``delta > 0``: increasing), as in ByzFL.

Knowledge: omniscient (the benign updates of the round, the rule, its state
and the clients' weights); all attackers upload the same vector. The rule
runs inside the jitted attack once per evaluation (a ``lax.fori_loop``, so
it is compiled once); rules that need run-time side inputs of the round
context (FLTrust's ``ctx.server_update``, FedNova's ``ctx.local_steps``)
cannot be simulated and are refused when the attack is built.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.attacks.base import UpdateAttack, no_state, replace_malicious
from fedjax_sparse.attacks.registry import register_update
from fedjax_sparse.requirements import AGGREGATOR, declare

Array = jax.Array
DIRECTIONS = ("ipm", "alie")


def benign_stats(updates: Array, is_malicious: Array) -> tuple[Array, Array]:
  """``(mu, sigma)`` over the benign rows (``sigma`` with ``ddof = 1``, 0 for
  fewer than two benign rows)."""
  benign = (~is_malicious).astype(updates.dtype)
  n = jnp.sum(benign)
  mu = (benign @ updates) / jnp.maximum(n, 1.0)
  sq = benign @ jnp.square(updates - mu[None, :])
  sigma = jnp.sqrt(sq / jnp.maximum(n - 1.0, 1.0))
  return mu, sigma


def line_search(objective, start: float, delta: float, ratio: float,
                evals: int) -> tuple[Array, Array]:
  """ByzFL's expansion-contraction search of ``argmax objective(tau)``.

  Returns ``(best_tau, best_value)`` after ``evals`` evaluations (the first
  at ``start``)."""
  best_y0 = objective(jnp.float32(start))

  def body(_, carry):
    best_x, best_y, step, expanding = carry
    prop = best_x + step
    y = objective(prop)
    better = y > best_y
    new_x = jnp.where(better, prop, best_x)
    new_y = jnp.where(better, y, best_y)
    grow = expanding & better
    new_step = jnp.where(grow, step * 2.0, step * ratio)
    return new_x, new_y, new_step, grow

  carry = (jnp.float32(start), best_y0, jnp.float32(delta), jnp.bool_(True))
  best_x, best_y, _, _ = jax.lax.fori_loop(0, evals - 1, body, carry)
  return best_x, best_y


def optimal_attack(direction: str, aggregator: Any = None,
                   num_byzantine: int = 0, topk_ratio: float = 1.0,
                   pack_size: int = 1, evals: int = 20, start: float = 0.0,
                   delta: float = 10.0, ratio: float = 0.8) -> UpdateAttack:
  """Optimal IPM or ALIE: the attack factor searched against the deployed
  rule (the registered ``optimal_ipm`` and ``optimal_alie`` are this with
  ``direction`` set).

  Args:
    direction: ``"ipm"`` (attackers upload ``-tau mu``) or ``"alie"``
      (``mu + tau sigma``).
    aggregator: the run's rule (an ``Aggregator``; given by the run).
    num_byzantine: ``f`` the rule is told (given by the run).
    topk_ratio, pack_size: the run's pack top-k (1: dense uploads).
    evals, start, delta, ratio: the line search (ByzFL's defaults).
  """
  if direction not in DIRECTIONS:
    raise ValueError(f"unknown direction {direction!r}; choose one of "
                     f"{', '.join(DIRECTIONS)}")
  if aggregator is None:
    raise ValueError(f"optimal_{direction} needs the run's aggregator "
                     "(aggregator=...); the run passes it")
  if evals < 1:
    raise ValueError(f"optimal_{direction}: evals must be >= 1, got {evals}")
  if delta == 0:
    raise ValueError(f"optimal_{direction}: delta must be nonzero")
  if not 0.5 < ratio < 1.0:
    raise ValueError(f"optimal_{direction}: ratio must be in (0.5, 1), got "
                     f"{ratio}")
  if not 0.0 < topk_ratio <= 1.0:
    raise ValueError(f"optimal_{direction}: topk_ratio must be in (0, 1], "
                     f"got {topk_ratio}")

  def crafted(mu, sigma, tau):
    return -tau * mu if direction == "ipm" else mu + tau * sigma

  def aggregate(agg_state, rows, weights, key, actx):
    masks = None
    if topk_ratio < 1.0:
      from fedjax_sparse.sparsify import pack_topk_batch
      rows, masks = pack_topk_batch(rows, topk_ratio, pack_size)
    k = rows.shape[0]
    ctx = AggContext(round=actx.round, global_params=actx.global_params,
                     layout=actx.layout, pack_size=pack_size,
                     num_byzantine=num_byzantine, num_clients=k)
    out, _ = aggregator.apply(agg_state, rows, masks, weights, key, ctx)
    return out.update

  def init(d):
    # Trace the rule once as the attack will run it: a rule that needs
    # run-time inputs the attack cannot give fails here, before compiling.
    k = max(2 * num_byzantine + 3, 4)
    from fedjax_sparse.attacks.base import AttackContext
    actx = AttackContext(round=jnp.int32(0), global_params=jnp.zeros((d,)),
                         num_clients=k, pack_size=pack_size)
    try:
      jax.eval_shape(lambda: aggregate(aggregator.init(d), jnp.zeros((k, d)),
                                       jnp.ones((k,)), jax.random.PRNGKey(0),
                                       actx))
    except (KeyError, ValueError) as e:
      raise ValueError(f"optimal_{direction} cannot run the deployed rule "
                       f"inside its search: {e}") from e
    return no_state(d)

  def apply(state, updates, is_malicious, key, ctx):
    k, d = updates.shape
    mu, sigma = benign_stats(updates, is_malicious)
    weights = (ctx.weights if ctx.weights is not None
               else jnp.ones((k,), updates.dtype))
    agg_state = getattr(ctx, "agg_state", None)
    if agg_state is None:
      agg_state = aggregator.init(d)

    def objective(tau):
      rows = replace_malicious(updates, is_malicious, crafted(mu, sigma, tau))
      out = aggregate(agg_state, rows, weights, key, ctx)
      return jnp.linalg.norm(out - mu)

    tau, _ = line_search(objective, start, delta, ratio, evals)
    return replace_malicious(updates, is_malicious, crafted(mu, sigma, tau)), state

  return UpdateAttack(init, apply)


optimal_ipm = functools.partial(optimal_attack, "ipm")
optimal_ipm.__doc__ = """IPM (``-tau mu``) with ``tau`` searched against the
deployed rule; the arguments of :func:`optimal_attack` but ``direction``."""
register_update("optimal_ipm", declare(AGGREGATOR)(optimal_ipm))

optimal_alie = functools.partial(optimal_attack, "alie")
optimal_alie.__doc__ = """ALIE (``mu + tau sigma``) with ``tau`` searched
against the deployed rule; the arguments of :func:`optimal_attack` but
``direction``."""
register_update("optimal_alie", declare(AGGREGATOR)(optimal_alie))
