"""What the round step carries from round to round and the data it reads.

:class:`ServerState` is the explicit pytree of all state (parameters,
optimizer, aggregator, per-client and attack state, PRNG key), donated to
each call of the round step; :class:`RoundData` the training data, stored
once and gathered by index.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_sparse.aggregators.base import Aggregator
from fedjax_sparse.simulation.round_config import (RoundConfig,
                                                   make_server_optimizer)

PyTree = Any


@flax.struct.dataclass
class ServerState:
  """Everything carried from round to round.

  Attributes:
    params: global model parameters.
    model_state: global non-parameter collections (BatchNorm statistics).
    opt_state: server optimizer state.
    agg_state: aggregator state.
    client_state: per-client persistent state with a leading ``[C]`` axis
      (momentum buffers in momentum mode), or ().
    attack_state: the update attack's state, or ().
    server_control: SCAFFOLD's server control variate ``c`` (params-shaped),
      or ().
    prev_aggregate: ``f32[d]`` last round's aggregated update (zeros at
      the start; ROP and similar attacks build on it).
    round: int32 number of finished rounds.
    key: PRNG key of the next round.
  """

  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  agg_state: PyTree
  client_state: PyTree
  attack_state: PyTree
  server_control: PyTree
  prev_aggregate: jax.Array
  round: jax.Array
  key: jax.Array


class RoundData(NamedTuple):
  """The training data every round reads (stored once, gathered by index).

  Attributes:
    x: ``[N, ...]`` training inputs.
    y: ``int32[N]`` labels.
    idx: ``int32[C, n_max]`` client index table.
    counts: ``int32[C]`` client sizes.
    malicious: ``bool[C]`` which clients are malicious (None: nobody).
    rank: ``int32[C]`` each malicious client's index among the attackers
      (-1 for benign clients; DBA picks its trigger by it), or None.
    x_server, y_server: data held by the server (FLTrust's root set), or
      None. When given, the server trains on it like a client every round
      and hands the result to the aggregator as ``ctx.server_update``.
  """

  x: jax.Array
  y: jax.Array
  idx: jax.Array
  counts: jax.Array
  malicious: Optional[jax.Array] = None
  rank: Optional[jax.Array] = None
  x_server: Optional[jax.Array] = None
  y_server: Optional[jax.Array] = None


def split_variables(variables: PyTree) -> tuple[PyTree, PyTree]:
  """Splits Linen variables into params and the other collections."""
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def init_server_state(cfg: RoundConfig, variables: PyTree,
                      aggregator: Aggregator, key: jax.Array,
                      update_attack=None) -> ServerState:
  """Builds the round-0 :class:`ServerState` from initial model variables.

  The state owns copies of ``variables``: the round step donates its state,
  and the caller's arrays must stay valid.
  """
  params, model_state = split_variables(variables)
  d = ravel_pytree(params)[0].size
  if cfg.client.update_mode == "momentum" or cfg.client.scaffold:
    client_state = jax.tree.map(
        lambda p: jnp.zeros((cfg.num_clients,) + p.shape, p.dtype), params)
  else:
    client_state = ()
  state = ServerState(
      params=params,
      model_state=model_state,
      opt_state=make_server_optimizer(cfg).init(params),
      agg_state=aggregator.init(d),
      client_state=client_state,
      attack_state=update_attack.init(d) if update_attack is not None else (),
      server_control=(jax.tree.map(jnp.zeros_like, params)
                      if cfg.client.scaffold else ()),
      prev_aggregate=jnp.zeros((d,), jnp.float32),
      round=jnp.int32(0),
      key=key)
  # The round step donates its state, so every leaf needs a buffer of its own
  # (an init that reuses one zeros array for two fields would be donated twice).
  return jax.tree.map(lambda a: jnp.array(a, copy=True), state)
