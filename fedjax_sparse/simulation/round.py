"""The jitted round step: sample -> train all clients at once -> aggregate -> update.

One call of the function built by :func:`make_round_step` runs a whole
federated round inside a single ``jax.jit``:

1. sample ``K`` of ``C`` clients without replacement;
2. gather their index rows and per-client state rows;
3. train all ``K`` clients together with the chosen engine (``vmap``,
   ``lax.map`` in chunks, or a sequential ``lax.map`` as the reference);
   malicious clients poison their minibatches when a data attack is active;
4. let an update attack replace the malicious clients' rows of the flat
   updates ``f32[K, d]`` (from the attack's start round on);
5. sparsify every upload with pack top-k (FLARE IV-C) when configured, which
   gives the zero-filled dense views and the 1-bit pack masks;
6. hand updates and masks to the aggregator contract
   (:mod:`fedjax_sparse.aggregators.base`);
7. apply the aggregate with the server optimizer (plain ``theta - lr * u`` by
   default; with ``lr_decay_round`` the server and client learning rates
   follow a step decay) and write back per-client state;
8. return the round's metrics: loss, acceptance, detection counts and the
   selection escape ratio against the known malicious clients
   (:mod:`fedjax_sparse.metrics`), and uplink/downlink bits.

No Python loop over clients runs; all state is an explicit pytree
(:class:`ServerState`) carried from round to round, and its buffers are
donated to the next call.

:func:`make_twin_round_step` builds one jitted step that advances an attacked
run and its unattacked twin together (state :class:`TwinState`), for the L1
distance between the two models (ALGORITHMS.md section 7).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_sparse.aggregators.base import Aggregator
from fedjax_sparse.client.local import make_client_train
from fedjax_sparse.context import RoundContext
from fedjax_sparse.layout import Layout
from fedjax_sparse.metrics.detection import detection
from fedjax_sparse.metrics.escape import selection_escape_metrics
from fedjax_sparse.simulation.evaluation import make_evaluate
from fedjax_sparse.simulation.round_config import (ENGINES,
                                                   NONFINITE_POLICIES,
                                                   SERVER_OPTIMIZERS,
                                                   SPARSIFIERS, RoundConfig,
                                                   lr_multiplier,
                                                   make_server_optimizer)
from fedjax_sparse.simulation.round_state import (PyTree, RoundData,
                                                  ServerState,
                                                  init_server_state,
                                                  split_variables)
from fedjax_sparse.simulation.twin import (TwinState, init_twin_state,
                                           make_twin_round_step)

# The names of the round step's modules, importable from here as before.
__all__ = ["ENGINES", "NONFINITE_POLICIES", "SERVER_OPTIMIZERS",
           "SPARSIFIERS", "PyTree", "RoundConfig", "RoundData", "ServerState",
           "TwinState", "init_server_state", "init_twin_state",
           "lr_multiplier", "make_evaluate", "make_round_step",
           "make_server_optimizer", "make_twin_round_step", "run_clients",
           "sample_clients", "screen_nonfinite", "split_variables"]


def sample_clients(key: jax.Array, num_clients: int, k: int) -> jax.Array:
  """``k`` of ``num_clients`` ids, uniformly without replacement: ``int32[k]``.

  The ``k`` largest of ``num_clients`` random 30-bit keys, cast to float32
  (XLA:CPU's top-k is fast for floats only). Costs O(C): about 1 ms at
  C = 100,000, where ``jax.random.choice(..., replace=False)`` shuffles the
  whole population (56 ms; ``benchmarks/scale.py``).
  """
  bits = jax.random.bits(key, (num_clients,), jnp.uint32)
  keys = jax.lax.bitcast_convert_type((bits >> 2) + jnp.uint32(0x00800000),
                                      jnp.float32)
  return jax.lax.top_k(keys, k)[1].astype(jnp.int32)


def run_clients(train_one: Callable, engine: str, map_batch_size: int,
                shared: tuple, per_client: tuple, mesh=None):
  """Runs ``train_one(*shared, *per_client_i)`` for every client i.

  ``per_client`` arrays have a leading client axis; the result does too.
  With a ``mesh`` (axis "clients"), the client axis is split over its devices
  with ``shard_map`` and each device runs its share with ``engine``; the
  leading size must be a multiple of the mesh size.
  """

  def run_local(shared, per_client):
    def one(xs):
      return train_one(*shared, *xs)

    if engine == "vmap":
      return jax.vmap(one)(per_client)
    if engine == "map":
      return jax.lax.map(one, per_client, batch_size=map_batch_size)
    return jax.lax.map(one, per_client)

  if mesh is None or mesh.size == 1:
    return run_local(shared, per_client)
  from jax.sharding import PartitionSpec as P
  sharded = jax.shard_map(
      run_local, mesh=mesh,
      in_specs=(jax.tree.map(lambda _: P(), shared),
                jax.tree.map(lambda _: P("clients"), per_client)),
      out_specs=P("clients"), check_vma=False)
  return sharded(shared, per_client)


def _pad_clients(tree, k_pad: int):
  """Pads every leaf's leading client axis with zeros to ``k_pad``."""
  def pad(a):
    extra = k_pad - a.shape[0]
    if extra == 0:
      return a
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jnp.concatenate([a, jax.random.split(a[0], extra)])
    return jnp.concatenate([a, jnp.zeros((extra,) + a.shape[1:], a.dtype)])
  return jax.tree.map(pad, tree)


def screen_nonfinite(updates: jax.Array, masks: Optional[jax.Array],
                     bad: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
  """Rows ``bad`` (``bool[K]``) of the uploads replaced by zeros, masks emptied.

  ``jnp.where``, never a product (``0 * inf = nan``): an identity on finite
  rows, bit for bit. Not under ``lax.cond``: a conditional would take the
  updates as an operand, and XLA would write them out instead of fusing
  their computation into the rule's, which changed the last bits of a fused
  FedAvg round.
  """
  updates = jnp.where(bad[:, None], jnp.zeros((), updates.dtype), updates)
  return updates, (None if masks is None else masks & ~bad[:, None])


def make_round_step(cfg: RoundConfig, apply_fn: Callable, aggregator: Aggregator,
                    layout: Layout, n_max: int, has_model_state: bool = False,
                    update_attack=None, data_attack=None,
                    server_size: int = 0, jit: bool = True) -> Callable:
  """Builds ``round_step(state, data) -> (state, metrics)``.

  Args:
    cfg: static round configuration (validated here).
    apply_fn: the Linen module's ``apply``.
    aggregator: an :class:`~fedjax_sparse.aggregators.Aggregator`.
    layout: layout of the flat parameter vector.
    n_max: width of the client index table.
    has_model_state: whether the model carries BatchNorm statistics.
    update_attack: an optional :class:`fedjax_sparse.attacks.UpdateAttack`
      (initialise its state with ``init_server_state(..., update_attack)``).
    data_attack: an optional :class:`fedjax_sparse.attacks.DataAttack`.
    server_size: number of server-held examples (``data.x_server``), 0 if
      none.
    jit: return the jitted function (with ``state`` donated).

  Both attacks act from round ``cfg.attack_start`` on, through the clients
  marked in ``data.malicious``.

  The aggregator's :class:`~fedjax_sparse.context.RoundContext` has the
  typed side inputs ``clients`` (int32[K] sampled ids, to index per-client
  state), ``malicious`` (bool[K], for escape-ratio diagnostics only: rules
  must not use it to decide), ``lr`` (the round's server learning rate,
  after the decay of ``cfg.lr_decay_round``), ``local_steps`` (f32[K]) and,
  with server data, ``server_update``. Data attacks get ``client_rank``,
  update attacks ``agg_state`` (the rule's state).

  Returns:
    The round step. ``metrics`` holds ``loss`` (mean client training loss),
    ``clients`` (the sampled client ids), ``acceptance`` (f32[K]),
    ``malicious`` (bool[K]), ``attack_active``, detection counts
    (``num_malicious``, ``flagged_malicious``, ``flagged_benign``: a client is
    flagged when its acceptance is 0, and a client screened by
    ``cfg.nonfinite="reject"`` has acceptance 0), ``nonfinite_clients``
    (uploads holding inf/nan), ``uplink_bits`` and ``downlink_bits``
    of the round, ``update_norm``, the aggregator's diagnostics (``agg/``)
    and, for a rule that names one (``aggregator.selection_escape``), its
    selection escape ratio under that name (``agg/escape_ratio``, ...):
    the share of the malicious clients the rule accepted, from its own
    acceptance (before the ``nonfinite="reject"`` screen sets screened
    clients to 0).
  """
  d = layout.d
  cfg.validate(d)
  train_one = make_client_train(apply_fn, cfg.client, n_max, has_model_state,
                                data_attack=data_attack)
  server_opt = make_server_optimizer(cfg)
  # The server trains on its own data (when it has any) with the clients'
  # settings; its index table is the identity over those examples.
  train_server = make_client_train(
      apply_fn, dataclasses.replace(cfg.client, update_mode="delta"),
      n_max=server_size, has_model_state=has_model_state) if server_size else None
  momentum_mode = cfg.client.update_mode == "momentum"
  stateful = momentum_mode or cfg.client.scaffold
  num_k = cfg.clients_per_round
  mesh = None
  k_pad = num_k
  if cfg.client_devices != 1:
    from fedjax_sparse.simulation.devices import client_mesh
    mesh = client_mesh(cfg.client_devices)
    k_pad = -(-num_k // mesh.size) * mesh.size
  sparse = cfg.sparsify == "topk"
  pack_size = cfg.pack_size if sparse else 1
  dense_bits = 32 * d
  if sparse:
    from fedjax_sparse.sparsify import pack_topk_batch, uplink_bits_from_masks

  def round_step(state: ServerState, data: RoundData):
    key, k_sample, k_train, k_agg, k_attack, k_server = jax.random.split(
        state.key, 6)
    if num_k == cfg.num_clients:
      clients = jnp.arange(num_k, dtype=jnp.int32)
    else:
      clients = sample_clients(k_sample, cfg.num_clients, num_k)
    idx = data.idx[clients]
    counts = data.counts[clients]
    client_keys = jax.random.split(k_train, num_k)
    if data.malicious is not None:
      is_mal = data.malicious[clients]
    else:
      is_mal = jnp.zeros((num_k,), bool)
    rank = (data.rank[clients] if data.rank is not None
            else jnp.full((num_k,), -1, jnp.int32))
    attack_active = state.round + 1 >= cfg.attack_start
    poison = is_mal & attack_active
    if stateful:
      cstate = jax.tree.map(lambda a: a[clients], state.client_state)
    else:
      cstate = jnp.zeros((num_k,), jnp.int32)  # placeholder with a client axis

    def train_i(params, model_state, x_all, y_all, rnd, control, cs, idx_row,
                count, k, psn, rk):
      actx = None
      if data_attack is not None:
        actx = RoundContext(round=rnd, prev_aggregate=state.prev_aggregate,
                            client_rank=rk)
      return train_one(params, model_state, cs if stateful else (), x_all,
                       y_all, idx_row, count, k, psn, actx, control,
                       lr_scale=lr_multiplier(cfg, rnd))

    per_client = (cstate, idx, counts, client_keys, poison, rank)
    if k_pad != num_k:  # empty clients (count 0) train on nothing
      per_client = _pad_clients(per_client, k_pad)
    out = run_clients(train_i, cfg.engine, cfg.map_batch_size,
                      (state.params, state.model_state, data.x, data.y,
                       state.round, state.server_control), per_client, mesh)
    if k_pad != num_k:
      out = jax.tree.map(lambda a: a[:num_k], out)
    updates = out.update  # f32[K, d]
    weights = (counts.astype(jnp.float32) if cfg.weighted
               else jnp.ones((num_k,), jnp.float32))
    flat_global, unravel = ravel_pytree(state.params)

    attack_state = state.attack_state
    if update_attack is not None:
      actx = RoundContext(round=state.round, global_params=flat_global,
                          prev_aggregate=state.prev_aggregate,
                          weights=weights, agg_state=state.agg_state,
                          layout=layout, num_clients=num_k,
                          pack_size=pack_size)
      updates, attack_state = jax.lax.cond(
          attack_active & jnp.any(is_mal),
          lambda u, st: update_attack.apply(st, u, is_mal, k_attack, actx),
          lambda u, st: (u, st), updates, attack_state)

    if sparse:
      updates, masks = pack_topk_batch(updates, cfg.topk_ratio, pack_size)
      uplink = jnp.sum(uplink_bits_from_masks(masks, d, pack_size)
                       .astype(jnp.float32))
    else:
      masks = None
      uplink = jnp.float32(dense_bits * num_k)

    # Uploads with inf/nan (RoundConfig.nonfinite): always counted; with
    # "reject" the rule sees a zero row of weight 0 instead.
    nonfinite = ~jnp.all(jnp.isfinite(updates), axis=1)
    reject = cfg.nonfinite == "reject"
    agg_weights = weights
    if reject:
      updates, masks = screen_nonfinite(updates, masks, nonfinite)
      agg_weights = jnp.where(nonfinite, jnp.zeros((), weights.dtype), weights)

    lr_mult = lr_multiplier(cfg, state.round)
    server_lr = jnp.float32(cfg.server_lr)
    if lr_mult is not None:
      server_lr = server_lr * lr_mult
    server_update = None
    if data.x_server is not None:
      n_srv = data.x_server.shape[0]
      server_update = train_server(
          state.params, state.model_state, (), data.x_server, data.y_server,
          jnp.arange(n_srv, dtype=jnp.int32), jnp.int32(n_srv), k_server,
          lr_scale=lr_mult).update
    ctx = RoundContext(round=state.round, global_params=flat_global,
                       client_model_state=(out.model_state if has_model_state
                                           else None),
                       clients=clients, malicious=is_mal, lr=server_lr,
                       local_steps=out.steps.astype(jnp.float32),
                       server_update=server_update, layout=layout,
                       pack_size=pack_size, num_byzantine=cfg.num_byzantine,
                       num_clients=num_k, finite_uploads=reject)
    agg_out, agg_state = aggregator.apply(state.agg_state, updates, masks,
                                          agg_weights, k_agg, ctx)
    acceptance = agg_out.acceptance
    if reject:  # a screened client was not accepted, whatever the rule says
      acceptance = jnp.where(nonfinite, jnp.zeros((), acceptance.dtype),
                             acceptance)
    grad = unravel(agg_out.update)
    upd, opt_state = server_opt.update(grad, state.opt_state, state.params)
    if lr_mult is not None:
      upd = jax.tree.map(lambda u: u * lr_mult.astype(u.dtype), upd)
    params = optax.apply_updates(state.params, upd)

    if has_model_state and reject:
      # Screened clients' statistics are left out; none left: keep the old.
      total = jnp.sum(agg_weights)
      wn = jnp.where(total > 0, agg_weights / jnp.where(total > 0, total, 1.0),
                     0.0)

      def average(a, old):
        a = jnp.where(nonfinite.reshape((-1,) + (1,) * (a.ndim - 1)),
                      jnp.zeros((), a.dtype), a)
        return jnp.where(total > 0, jnp.tensordot(wn, a, axes=1), old)

      model_state = jax.tree.map(average, out.model_state, state.model_state)
    elif has_model_state:
      wn = weights / jnp.sum(weights)
      model_state = jax.tree.map(lambda a: jnp.tensordot(wn, a, axes=1),
                                 out.model_state)
    else:
      model_state = state.model_state
    if stateful:
      client_state = jax.tree.map(lambda full, new: full.at[clients].set(new),
                                  state.client_state, out.client_state)
    else:
      client_state = state.client_state
    server_control = state.server_control
    if cfg.client.scaffold:
      # c <- c + |S|/N * mean_i (c_i+ - c_i)  (SCAFFOLD Alg. 1, line 17).
      server_control = jax.tree.map(
          lambda c, new, old: c + (num_k / cfg.num_clients) * jnp.mean(
              new - old, axis=0),
          state.server_control, out.client_state, cstate)

    new_state = ServerState(params=params, model_state=model_state,
                            opt_state=opt_state, agg_state=agg_state,
                            client_state=client_state,
                            attack_state=attack_state,
                            server_control=server_control,
                            prev_aggregate=agg_out.update.astype(jnp.float32),
                            round=state.round + 1, key=key)
    det = detection(acceptance, is_mal)
    metrics = {
        "loss": jnp.sum(out.loss * weights) / jnp.sum(weights),
        "clients": clients,
        "acceptance": acceptance,
        "malicious": is_mal,
        "attack_active": attack_active,
        "num_malicious": det.num_malicious,
        "flagged_malicious": det.flagged_malicious,
        "flagged_benign": det.flagged_benign,
        "nonfinite_clients": jnp.sum(nonfinite.astype(jnp.int32)),
        "uplink_bits": uplink,
        "downlink_bits": jnp.float32(dense_bits * num_k),
        "update_norm": jnp.linalg.norm(agg_out.update),
        **{f"agg/{k}": v for k, v in agg_out.diagnostics.items()},
        **{f"agg/{k}": v for k, v in selection_escape_metrics(
            aggregator, agg_out.acceptance, is_mal).items()},
    }
    return new_state, metrics

  if jit:
    return jax.jit(round_step, donate_argnums=0)
  return round_step
