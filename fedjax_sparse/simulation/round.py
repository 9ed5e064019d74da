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
8. return the round's metrics: loss, acceptance, detection counts against the
   known malicious clients, and uplink/downlink bits.

No Python loop over clients runs; all state is an explicit pytree
(:class:`ServerState`) carried from round to round, and its buffers are
donated to the next call.

:func:`make_twin_round_step` builds one jitted step that advances an attacked
run and its unattacked twin together (state :class:`TwinState`), for the L1
distance between the two models (ALGORITHMS.md section 7).
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
SPARSIFIERS = ("none", "topk")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
NONFINITE_POLICIES = ("reject", "propagate")


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
    client_devices: devices the client axis is split over (``shard_map``
      over a "clients" mesh axis; each device runs its share of clients with
      ``engine``); 1 = no split, 0 = every local device. K is padded to a
      multiple of it with empty clients, which train on nothing and are
      dropped before aggregation.
    server_lr: server learning rate.
    server_optimizer: "sgd" (theta - lr * u), "momentum" or "adam".
    server_momentum: momentum of the "momentum" server optimizer
      (``optax.sgd(server_lr, momentum)``: ``R <- server_momentum R + u``,
      ``theta <- theta - server_lr R``, the server momentum of
      sparsefed.txt Alg. 4; unused by "sgd" and "adam").
    weighted: aggregation weights by client dataset size (True) or uniform.
    num_byzantine: f, the number of attackers robust rules are told to expect.
    sparsify: "none" (dense uploads) or "topk" (pack top-k uploads).
    topk_ratio: fraction r of packs each client keeps (FLARE default 0.5).
    pack_size: parameters per pack P (1 = scalar top-k).
    attack_start: first round (1-based) in which attacks are active
      (ALGORITHMS.md section 5: paper default 10).
    lr_decay_round: step decay of the learning rates: from this round index
      on (0-based, ``ServerState.round``) both the server learning rate and
      the clients' local learning rate are multiplied by
      ``lr_decay_factor`` (the hybrid paper divides the lr by 10 at 75% of
      training: ``lr_decay_round = floor(0.75 * rounds)``,
      ``lr_decay_factor = 0.1``); None (the default) keeps them constant
      and builds exactly the step without a schedule.
    lr_decay_factor: the multiplier of ``lr_decay_round``.
    nonfinite: what the round step does with an upload that holds ``inf`` or
      ``nan`` (a diverged client, an attack). ``"reject"`` (the default):
      screened before aggregation, the row replaced by zeros (and its pack
      mask emptied) with weight 0, acceptance 0 (so a screened malicious
      client counts as flagged), left out of the BatchNorm statistics, and
      counted in the round metric ``nonfinite_clients``; on finite uploads
      this changes nothing, bit for bit (the rules are told so through
      ``AggContext.finite_uploads`` and skip their own checks).
      ``"propagate"``: the rule sees the raw rows, as before the policy
      existed, and deals with them itself (the weighted means leave such
      rows out, :func:`fedjax_sparse.aggregators.base.combine_finite`); the
      count is still reported.
  """

  num_clients: int
  clients_per_round: int
  client: ClientConfig = ClientConfig()
  engine: str = "vmap"
  map_batch_size: int = 10
  client_devices: int = 1
  server_lr: float = 1.0
  server_optimizer: str = "sgd"
  server_momentum: float = 0.9
  weighted: bool = True
  num_byzantine: int = 0
  sparsify: str = "none"
  topk_ratio: float = 0.5
  pack_size: int = 1
  attack_start: int = 10
  lr_decay_round: Optional[int] = None
  lr_decay_factor: float = 0.1
  nonfinite: str = "reject"

  def validate(self, d: Optional[int] = None) -> None:
    """Raises ValueError saying what to change (``d`` enables the k <= d check)."""
    self.client.validate()
    if self.sparsify not in SPARSIFIERS:
      raise ValueError(f"unknown sparsify {self.sparsify!r}; choose one of "
                       f"{', '.join(SPARSIFIERS)}")
    # Checked whatever the sparsifier: a value out of range is a mistake
    # even where it has no effect.
    if not 0.0 < self.topk_ratio <= 1.0:
      raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
    if not isinstance(self.pack_size, int) or self.pack_size < 1:
      raise ValueError(f"pack_size must be an integer >= 1, got "
                       f"{self.pack_size}")
    if self.sparsify == "topk":
      if d is not None:
        from fedjax_sparse.sparsify import check_topk_config
        check_topk_config(d, self.topk_ratio, self.pack_size)
    if self.attack_start < 1:
      raise ValueError(f"attack_start must be >= 1, got {self.attack_start}")
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
    if self.client_devices < 0:
      raise ValueError(f"client_devices must be >= 0, got {self.client_devices}")
    if self.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(f"unknown nonfinite policy {self.nonfinite!r}; choose "
                       f"one of {', '.join(NONFINITE_POLICIES)}")
    if self.server_optimizer not in SERVER_OPTIMIZERS:
      raise ValueError(f"unknown server optimizer {self.server_optimizer!r}; "
                       f"choose one of {', '.join(SERVER_OPTIMIZERS)}")
    if not self.server_lr > 0:
      raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
    if (self.server_optimizer == "momentum"
        and not 0.0 <= self.server_momentum < 1.0):
      raise ValueError(f"server_momentum must be in [0, 1), got "
                       f"{self.server_momentum}")
    if self.lr_decay_round is not None:
      if (isinstance(self.lr_decay_round, bool)
          or not isinstance(self.lr_decay_round, int)
          or self.lr_decay_round < 0):
        raise ValueError(f"lr_decay_round must be None (no decay) or an "
                         f"integer >= 0, got {self.lr_decay_round!r}")
      if not self.lr_decay_factor > 0:
        raise ValueError(f"lr_decay_factor must be > 0, got "
                         f"{self.lr_decay_factor}")


def lr_multiplier(cfg: RoundConfig, rnd) -> Optional[jax.Array]:
  """The learning-rate multiplier of round ``rnd`` (0-based), or None.

  ``f32``: ``cfg.lr_decay_factor`` from round ``cfg.lr_decay_round`` on, 1
  before; None when ``cfg.lr_decay_round`` is None (no schedule, nothing
  is multiplied).
  """
  if cfg.lr_decay_round is None:
    return None
  return jnp.where(jnp.asarray(rnd) >= cfg.lr_decay_round,
                   jnp.float32(cfg.lr_decay_factor), jnp.float32(1.0))


def make_server_optimizer(cfg: RoundConfig) -> optax.GradientTransformation:
  """The server optimizer at the constant ``cfg.server_lr``.

  A step decay (``cfg.lr_decay_round``) is applied by the round step, which
  multiplies this optimizer's update by :func:`lr_multiplier` (for sgd,
  momentum and adam alike the same as scaling the learning rate: optax's
  last transformation is the scaling by ``-lr``; the momentum and Adam
  moments themselves are not scaled, as with an optax schedule).
  """
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
      and hands the result to the aggregator as ``ctx.extra["server_update"]``.
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

  The aggregator's ``ctx.extra`` holds ``clients`` (int32[K] sampled ids, to
  index per-client state), ``malicious`` (bool[K], for escape-ratio
  diagnostics only: rules must not use it to decide), ``lr`` (the round's server
  learning rate, after the decay of ``cfg.lr_decay_round``) and, with server data, ``server_update``.

  Returns:
    The round step. ``metrics`` holds ``loss`` (mean client training loss),
    ``clients`` (the sampled client ids), ``acceptance`` (f32[K]),
    ``malicious`` (bool[K]), ``attack_active``, detection counts
    (``num_malicious``, ``flagged_malicious``, ``flagged_benign``: a client is
    flagged when its acceptance is 0, and a client screened by
    ``cfg.nonfinite="reject"`` has acceptance 0), ``nonfinite_clients``
    (uploads holding inf/nan), ``uplink_bits`` and ``downlink_bits``
    of the round, ``update_norm`` and the aggregator's diagnostics.
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
        from fedjax_sparse.attacks import AttackContext
        actx = AttackContext(round=rnd, extra={"client_rank": rk})
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
      from fedjax_sparse.attacks import AttackContext
      actx = AttackContext(round=state.round, global_params=flat_global,
                           prev_aggregate=state.prev_aggregate,
                           weights=weights, layout=layout,
                           num_clients=num_k, pack_size=pack_size)
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
    extra = {"clients": clients, "malicious": is_mal,
             "lr": server_lr,
             "local_steps": out.steps.astype(jnp.float32)}
    if data.x_server is not None:
      n_srv = data.x_server.shape[0]
      srv = train_server(state.params, state.model_state, (), data.x_server,
                         data.y_server, jnp.arange(n_srv, dtype=jnp.int32),
                         jnp.int32(n_srv), k_server, lr_scale=lr_mult)
      extra["server_update"] = srv.update
    ctx = AggContext(round=state.round, global_params=flat_global,
                     client_model_state=(out.model_state if has_model_state
                                         else None),
                     extra=extra, layout=layout, pack_size=pack_size,
                     num_byzantine=cfg.num_byzantine, num_clients=num_k,
                     finite_uploads=reject)
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
    flagged = acceptance <= 0
    metrics = {
        "loss": jnp.sum(out.loss * weights) / jnp.sum(weights),
        "clients": clients,
        "acceptance": acceptance,
        "malicious": is_mal,
        "attack_active": attack_active,
        "num_malicious": jnp.sum(is_mal.astype(jnp.int32)),
        "flagged_malicious": jnp.sum((flagged & is_mal).astype(jnp.int32)),
        "flagged_benign": jnp.sum((flagged & ~is_mal).astype(jnp.int32)),
        "nonfinite_clients": jnp.sum(nonfinite.astype(jnp.int32)),
        "uplink_bits": uplink,
        "downlink_bits": jnp.float32(dense_bits * num_k),
        "update_norm": jnp.linalg.norm(agg_out.update),
        **{f"agg/{k}": v for k, v in agg_out.diagnostics.items()},
    }
    return new_state, metrics

  if jit:
    return jax.jit(round_step, donate_argnums=0)
  return round_step


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
