"""The jitted round step: sample -> train all clients at once -> aggregate -> update.

One call of the function built by :func:`make_round_step` runs a whole
federated round inside a single ``jax.jit``:

1. sample ``K`` of ``C`` clients without replacement;
2. gather their index rows and per-client state rows;
3. train all ``K`` clients together with the chosen engine (``vmap``,
   ``lax.map`` in chunks, or a sequential ``lax.map`` as the reference);
4. hand the flat updates ``f32[K, d]`` to the aggregator contract
   (:mod:`fedjax_sparse.aggregators.base`);
5. apply the aggregate with the server optimizer (plain ``theta - lr * u`` by
   default) and write back per-client state;
6. return the round's metrics.

No Python loop over clients runs; all state is an explicit pytree
(:class:`ServerState`) carried from round to round, and its buffers are
donated to the next call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_sparse.aggregators.base import AggContext, Aggregator
from fedjax_sparse.client.local import ClientConfig, make_client_train
from fedjax_sparse.layout import Layout, layout_of

PyTree = Any

ENGINES = ("vmap", "map", "sequential")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Static configuration of the round step.

  Attributes:
    num_clients: population size C.
    clients_per_round: K clients sampled without replacement each round.
    client: local training hyperparameters.
    engine: "vmap" (all K at once), "map" (``lax.map`` over chunks of
      ``map_batch_size`` clients, each chunk vmapped) or "sequential"
      (one client after another inside the jit; the reference).
    map_batch_size: chunk size of the "map" engine.
    server_lr: server learning rate.
    server_optimizer: "sgd" (theta - lr * u), "momentum" or "adam".
    server_momentum: momentum of the "momentum" server optimizer.
    weighted: aggregation weights by client dataset size (True) or uniform.
    num_byzantine: f, the number of attackers robust rules are told to expect.
  """

  num_clients: int
  clients_per_round: int
  client: ClientConfig = ClientConfig()
  engine: str = "vmap"
  map_batch_size: int = 10
  server_lr: float = 1.0
  server_optimizer: str = "sgd"
  server_momentum: float = 0.9
  weighted: bool = True
  num_byzantine: int = 0

  def validate(self) -> None:
    self.client.validate()
    if self.num_clients < 1:
      raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
    if not 1 <= self.clients_per_round <= self.num_clients:
      raise ValueError(
          f"clients_per_round must be between 1 and num_clients="
          f"{self.num_clients}, got {self.clients_per_round}")
    if self.engine not in ENGINES:
      raise ValueError(f"unknown engine {self.engine!r}; choose one of "
                       f"{', '.join(ENGINES)}")
    if self.map_batch_size < 1:
      raise ValueError(f"map_batch_size must be >= 1, got {self.map_batch_size}")
    if self.server_optimizer not in SERVER_OPTIMIZERS:
      raise ValueError(f"unknown server optimizer {self.server_optimizer!r}; "
                       f"choose one of {', '.join(SERVER_OPTIMIZERS)}")
    if not self.server_lr > 0:
      raise ValueError(f"server_lr must be > 0, got {self.server_lr}")


def make_server_optimizer(cfg: RoundConfig) -> optax.GradientTransformation:
  if cfg.server_optimizer == "adam":
    return optax.adam(cfg.server_lr)
  if cfg.server_optimizer == "momentum":
    return optax.sgd(cfg.server_lr, momentum=cfg.server_momentum)
  return optax.sgd(cfg.server_lr)


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
    round: int32 number of finished rounds.
    key: PRNG key of the next round.
  """

  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  agg_state: PyTree
  client_state: PyTree
  round: jax.Array
  key: jax.Array


class RoundData(NamedTuple):
  """The training data every round reads (stored once, gathered by index).

  Attributes:
    x: ``[N, ...]`` training inputs.
    y: ``int32[N]`` labels.
    idx: ``int32[C, n_max]`` client index table.
    counts: ``int32[C]`` client sizes.
  """

  x: jax.Array
  y: jax.Array
  idx: jax.Array
  counts: jax.Array


def split_variables(variables: PyTree) -> tuple[PyTree, PyTree]:
  """Splits Linen variables into params and the other collections."""
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def init_server_state(cfg: RoundConfig, variables: PyTree,
                      aggregator: Aggregator, key: jax.Array) -> ServerState:
  """Builds the round-0 :class:`ServerState` from initial model variables.

  The state owns copies of ``variables``: the round step donates its state,
  and the caller's arrays must stay valid.
  """
  variables = jax.tree.map(lambda a: jnp.array(a, copy=True), variables)
  params, model_state = split_variables(variables)
  d = ravel_pytree(params)[0].size
  if cfg.client.update_mode == "momentum":
    client_state = jax.tree.map(
        lambda p: jnp.zeros((cfg.num_clients,) + p.shape, p.dtype), params)
  else:
    client_state = ()
  return ServerState(
      params=params,
      model_state=model_state,
      opt_state=make_server_optimizer(cfg).init(params),
      agg_state=aggregator.init(d),
      client_state=client_state,
      round=jnp.int32(0),
      key=key)


def run_clients(train_one: Callable, engine: str, map_batch_size: int,
                shared: tuple, per_client: tuple):
  """Runs ``train_one(*shared, *per_client_i)`` for every client i.

  ``per_client`` arrays have a leading client axis; the result does too.
  """

  def one(xs):
    return train_one(*shared, *xs)

  if engine == "vmap":
    return jax.vmap(one)(per_client)
  if engine == "map":
    return jax.lax.map(one, per_client, batch_size=map_batch_size)
  return jax.lax.map(one, per_client)


def make_round_step(cfg: RoundConfig, apply_fn: Callable, aggregator: Aggregator,
                    layout: Layout, n_max: int, has_model_state: bool = False,
                    jit: bool = True) -> Callable:
  """Builds ``round_step(state, data) -> (state, metrics)``.

  Args:
    cfg: static round configuration (validated here).
    apply_fn: the Linen module's ``apply``.
    aggregator: an :class:`~fedjax_sparse.aggregators.Aggregator`.
    layout: layout of the flat parameter vector.
    n_max: width of the client index table.
    has_model_state: whether the model carries BatchNorm statistics.
    jit: return the jitted function (with ``state`` donated).

  Returns:
    The round step. ``metrics`` holds ``loss`` (mean client training loss),
    ``clients`` (the sampled client ids), ``acceptance`` (f32[K]),
    ``update_norm`` and the aggregator's diagnostics.
  """
  cfg.validate()
  train_one = make_client_train(apply_fn, cfg.client, n_max, has_model_state)
  server_opt = make_server_optimizer(cfg)
  momentum_mode = cfg.client.update_mode == "momentum"
  num_k = cfg.clients_per_round

  def round_step(state: ServerState, data: RoundData):
    key, k_sample, k_train, k_agg = jax.random.split(state.key, 4)
    if num_k == cfg.num_clients:
      clients = jnp.arange(num_k, dtype=jnp.int32)
    else:
      clients = jax.random.choice(k_sample, cfg.num_clients, (num_k,),
                                  replace=False).astype(jnp.int32)
    idx = data.idx[clients]
    counts = data.counts[clients]
    client_keys = jax.random.split(k_train, num_k)
    if momentum_mode:
      cstate = jax.tree.map(lambda a: a[clients], state.client_state)
    else:
      cstate = jnp.zeros((num_k,), jnp.int32)  # placeholder with a client axis

    def train_i(params, model_state, x_all, y_all, cs, idx_row, count, k):
      return train_one(params, model_state, cs if momentum_mode else (), x_all,
                       y_all, idx_row, count, k)

    out = run_clients(train_i, cfg.engine, cfg.map_batch_size,
                      (state.params, state.model_state, data.x, data.y),
                      (cstate, idx, counts, client_keys))
    updates = out.update  # f32[K, d]
    weights = (counts.astype(jnp.float32) if cfg.weighted
               else jnp.ones((num_k,), jnp.float32))

    flat_global, unravel = ravel_pytree(state.params)
    ctx = AggContext(round=state.round, global_params=flat_global,
                     layout=layout, pack_size=1,
                     num_byzantine=cfg.num_byzantine, num_clients=num_k)
    agg_out, agg_state = aggregator.apply(state.agg_state, updates, None,
                                          weights, k_agg, ctx)
    grad = unravel(agg_out.update)
    upd, opt_state = server_opt.update(grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)

    if has_model_state:
      wn = weights / jnp.sum(weights)
      model_state = jax.tree.map(lambda a: jnp.tensordot(wn, a, axes=1),
                                 out.model_state)
    else:
      model_state = state.model_state
    if momentum_mode:
      client_state = jax.tree.map(lambda full, new: full.at[clients].set(new),
                                  state.client_state, out.client_state)
    else:
      client_state = state.client_state

    new_state = ServerState(params=params, model_state=model_state,
                            opt_state=opt_state, agg_state=agg_state,
                            client_state=client_state, round=state.round + 1,
                            key=key)
    metrics = {
        "loss": jnp.sum(out.loss * weights) / jnp.sum(weights),
        "clients": clients,
        "acceptance": agg_out.acceptance,
        "update_norm": jnp.linalg.norm(agg_out.update),
        **{f"agg/{k}": v for k, v in agg_out.diagnostics.items()},
    }
    return new_state, metrics

  if jit:
    return jax.jit(round_step, donate_argnums=0)
  return round_step


def make_evaluate(apply_fn: Callable, batch_size: int = 1000,
                  jit: bool = True) -> Callable:
  """Builds ``evaluate(params, model_state, x, y) -> dict`` (loss, top-1, top-5).

  Evaluates in fixed-size batches with ``lax.map``; a ragged tail is padded
  and masked, so one compilation serves any test-set size.
  """

  def evaluate(params, model_state, x, y):
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    yp = jnp.pad(y, (0, pad))
    mask = jnp.arange(nb * batch_size) < n
    variables = {"params": params, **model_state}

    def one(batch):
      xb, yb, mb = batch
      logits = apply_fn(variables, xb, train=False)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      top1 = jnp.argmax(logits, -1) == yb
      kk = min(5, logits.shape[-1])
      top5 = jnp.any(jax.lax.top_k(logits, kk)[1] == yb[:, None], axis=-1)
      mf = mb.astype(jnp.float32)
      return jnp.stack([jnp.sum(loss * mf), jnp.sum(top1 * mf),
                        jnp.sum(top5 * mf)])

    sums = jax.lax.map(one, (xp.reshape(nb, batch_size, *x.shape[1:]),
                             yp.reshape(nb, batch_size),
                             mask.reshape(nb, batch_size)))
    tot = jnp.sum(sums, axis=0) / n
    return {"loss": tot[0], "accuracy": tot[1], "top5_accuracy": tot[2]}

  return jax.jit(evaluate) if jit else evaluate
