"""The unattacked twin: a run and its twin advanced by one jitted step.

:func:`make_twin_round_step` trains an attacked run and its unattacked twin
(same seed, no attackers) together, for the L1 distance between the two
models (ALGORITHMS.md section 7).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
from jax.flatten_util import ravel_pytree

from fedjax_sparse.aggregators.base import Aggregator
from fedjax_sparse.layout import Layout
from fedjax_sparse.simulation.round_config import RoundConfig
from fedjax_sparse.simulation.round_state import (RoundData, ServerState,
                                                  init_server_state)

PyTree = Any


@flax.struct.dataclass
class TwinState:
  """The state of a run and of its unattacked twin, advanced by one step.

  Attributes:
    main: the attacked run's :class:`ServerState`.
    twin: the unattacked twin's :class:`ServerState`; it starts identical to
      ``main`` (same parameters, same PRNG key), so both sample the same
      clients and use the same training and aggregation keys every round.
  """

  main: ServerState
  twin: ServerState

  @property
  def round(self) -> jax.Array:
    """Finished rounds (the same for both runs)."""
    return self.main.round


def init_twin_state(cfg: RoundConfig, variables: PyTree,
                    aggregator: Aggregator, key: jax.Array,
                    update_attack=None) -> TwinState:
  """The round-0 :class:`TwinState`: two copies of the same initial state.

  ``main`` is :func:`init_server_state` with ``update_attack``; ``twin`` the
  same without it. Every leaf has a buffer of its own (the step donates
  them).
  """
  return TwinState(
      main=init_server_state(cfg, variables, aggregator, key, update_attack),
      twin=init_server_state(cfg, variables, aggregator, key))


def make_twin_round_step(cfg: RoundConfig, apply_fn: Callable,
                         aggregator: Aggregator, layout: Layout, n_max: int,
                         has_model_state: bool = False, update_attack=None,
                         data_attack=None, server_size: int = 0,
                         jit: bool = True) -> Callable:
  """Builds ``twin_step(state, data) -> (state, metrics)`` over a TwinState.

  One jitted function advances the attacked run and an unattacked twin
  (ALGORITHMS.md section 7: "L1 distance between the poisoned model and an
  unattacked twin trained with the same seed"): the twin is the round step
  of :func:`make_round_step` with the same configuration, aggregator, server
  optimizer and sparsification, but no update attack, no data attack and
  nobody malicious (``data.malicious`` and ``data.rank`` are dropped for
  it). Starting from :func:`init_twin_state`, both runs carry the same PRNG
  key, so they sample the same clients and draw the same client and
  aggregation keys; without an attack the two stay bit for bit equal.

  Arguments are those of :func:`make_round_step`.

  Returns:
    The step. ``metrics`` are the attacked run's (see
    :func:`make_round_step`) plus ``l1_to_twin`` (``||theta - theta_twin||_1``
    over the flat parameters after the round, :func:`fedjax_sparse.metrics.
    l1_distance`) and ``twin/loss`` (the twin's mean client training loss).
  """
  from fedjax_sparse.metrics.impact import l1_distance
  # Lazily: simulation.round re-exports this module's names.
  from fedjax_sparse.simulation.round import make_round_step
  common = dict(n_max=n_max, has_model_state=has_model_state,
                server_size=server_size, jit=False)
  main_step = make_round_step(cfg, apply_fn, aggregator, layout,
                              update_attack=update_attack,
                              data_attack=data_attack, **common)
  twin_step = make_round_step(cfg, apply_fn, aggregator, layout, **common)

  def step(state: TwinState, data: RoundData):
    main, metrics = main_step(state.main, data)
    twin, twin_metrics = twin_step(
        state.twin, data._replace(malicious=None, rank=None))
    metrics = dict(metrics)
    metrics["l1_to_twin"] = l1_distance(ravel_pytree(main.params)[0],
                                        ravel_pytree(twin.params)[0])
    metrics["twin/loss"] = twin_metrics["loss"]
    return TwinState(main=main, twin=twin), metrics

  if jit:
    return jax.jit(step, donate_argnums=0)
  return step
