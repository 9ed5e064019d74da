"""Local training of one client, written to be vmapped over a client axis.

A client receives the global parameters, trains on its own rows of the shared
training set (gathered by index inside jit, DESIGN.md "Data at scale") and
returns a flat update vector:

* ``update_mode="delta"``: ``u = global - local`` after local training, a
  descent direction like a gradient (FedAvg, SafeSparse/FLARE, SparseFed).
* ``update_mode="momentum"``: the client's momentum buffer after its local
  steps, with ``m = (1 - beta) g + beta m`` (hybrid_sparse_attack.txt
  section 2.1, eq. 3 and Alg. 1). The buffer persists across rounds in the
  per-client state ``[C, d]`` and the server applies
  ``theta - lr * AGG(m_1..m_K)``.

Local schedule: ``local_steps > 0`` runs exactly that many minibatch steps
(batches drawn uniformly from the client's samples); otherwise
``local_epochs`` epochs of shuffled minibatches. Because every client runs
under one compiled function, the number of steps is fixed by the largest
client (``n_max``); steps past a client's own epoch end are no-ops, and the
last partial batch of an epoch is masked, so each client computes exactly
what it would on its own.

The local optimizer (optax) is fresh every round (its state is not carried
across rounds), except the momentum buffer of ``update_mode="momentum"``.

Training-side algorithms of the class-aware masking paper's comparison
(ALGORITHMS.md section 4):

* FedProx (Li et al., 2020): ``prox_mu > 0`` adds ``mu/2 ||w - w_global||^2``
  to the local loss.
* FedNova (Wang et al., 2020): every client reports its number of effective
  local steps (``ClientOut.steps``); the ``fednova`` aggregator normalises by
  it.
* SCAFFOLD (Karimireddy et al., 2020), ``scaffold=True``: each local gradient
  is corrected by ``c - c_i`` (server and client control variates); after
  training, ``c_i+ = c_i - c + (w_global - w_local) / (S * lr)`` (option II
  of the paper) with ``S`` the steps' total step-size multiplier: ``S = tau``
  for plain SGD; for heavy-ball momentum ``beta``, the displacement that
  ``tau`` steps of one constant gradient make,
  ``S = (tau - beta (1 - beta^tau) / (1 - beta)) / (1 - beta)`` (ours: with
  ``S = tau`` the control variates come out up to ``1 / (1 - beta)`` times
  too large and training diverges); Adam uses ``S = tau``. The client state
  holds ``c_i``; the round step keeps ``c``.

BatchNorm statistics (``model_state``) are updated locally and returned
separately; they are not part of the update vector (see
:mod:`fedjax_sparse.models`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

# The hyperparameters of local training are the client section of the
# configuration tree (declared there once, with their flags' help).
from fedjax_sparse.config.sections import ClientConfig

PyTree = Any


def scaffold_multiplier(n_steps, cfg: ClientConfig):
  """``S``: the local displacement per unit gradient and lr after ``n_steps``.

  SCAFFOLD's option II divides ``w_global - w_local`` by ``S * lr`` to
  estimate the clients' mean gradient. Plain SGD (and Adam, approximately):
  ``S = n_steps``. Heavy-ball momentum ``beta`` (``optax.sgd(lr, beta)``):
  ``sum_{t=1..n} (1 - beta^t) / (1 - beta)``, exact for a constant gradient.
  """
  n = jnp.maximum(jnp.asarray(n_steps, jnp.float32), 1.0)
  if cfg.optimizer != "momentum" or cfg.momentum == 0:
    return n
  b = jnp.float32(cfg.momentum)
  return (n - b * (1.0 - b ** n) / (1.0 - b)) / (1.0 - b)


def make_optimizer(cfg: ClientConfig) -> optax.GradientTransformation:
  """The optax local optimizer for ``cfg`` (without momentum-mode handling)."""
  if cfg.optimizer == "adam":
    opt = optax.adam(cfg.lr)
  elif cfg.optimizer == "momentum":
    opt = optax.sgd(cfg.lr, momentum=cfg.momentum)
  else:
    opt = optax.sgd(cfg.lr)
  if cfg.weight_decay > 0:
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  return opt


class ClientOut(NamedTuple):
  """What one client returns.

  Attributes:
    update: ``f32[d]`` flat update (delta or momentum, see module docstring).
    model_state: the client's final non-parameter collections (BatchNorm
      statistics), ``{}`` for models without any.
    client_state: the client's new persistent state (momentum buffer or
      SCAFFOLD control variate) or ().
    loss: mean training loss over the client's local steps.
    steps: number of local steps that saw data (FedNova's tau_i).
  """

  update: jax.Array
  model_state: PyTree
  client_state: PyTree
  loss: jax.Array
  steps: jax.Array


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy (int labels)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _batch_positions(cfg: ClientConfig, n_max: int, count: jax.Array,
                     key: jax.Array):
  """Positions into the client's index row for every step: int32[S, B] + valid mask."""
  num_steps = cfg.steps_per_round(n_max)
  bsz = cfg.batch_size
  if cfg.local_steps > 0:
    u = jax.random.uniform(key, (num_steps, bsz))
    pos = jnp.minimum((u * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
    valid = jnp.broadcast_to(count > 0, (num_steps, bsz))
    return pos, valid
  spe = math.ceil(n_max / bsz)
  keys = jax.random.split(key, cfg.local_epochs)
  slots = jnp.arange(n_max)

  def epoch_perm(k):
    r = jax.random.uniform(k, (n_max,))
    r = jnp.where(slots < count, r, 2.0)  # padding slots sort last
    return jnp.argsort(r).astype(jnp.int32)

  perms = jax.vmap(epoch_perm)(keys)  # [E, n_max]
  pad = spe * bsz - n_max
  perms = jnp.pad(perms, ((0, 0), (0, pad)))
  in_epoch = jnp.pad(slots, (0, pad), constant_values=n_max)
  pos = perms.reshape(cfg.local_epochs * spe, bsz)
  valid = jnp.tile((in_epoch < count).reshape(spe, bsz), (cfg.local_epochs, 1))
  return pos, valid


def make_client_train(apply_fn: Callable, cfg: ClientConfig, n_max: int,
                      has_model_state: bool = False,
                      data_attack: Optional[Any] = None) -> Callable:
  """Builds the pure function that trains one client.

  Args:
    apply_fn: ``apply_fn(variables, x, train=..., mutable=...)`` of a Linen
      module (``module.apply``).
    cfg: local training hyperparameters.
    n_max: width of the client index table (the largest client).
    has_model_state: whether the model has non-parameter collections
      (BatchNorm ``batch_stats``).
    data_attack: an optional :class:`fedjax_sparse.attacks.DataAttack`
      applied to every minibatch of a poisoning client.

  Returns:
    ``train(params, model_state, client_state, x_all, y_all, idx_row, count,
    key, poison=False, attack_ctx=None, server_control=None) -> ClientOut``.
    ``client_state`` is the client's momentum buffer (a params-shaped pytree)
    in momentum mode, its control variate ``c_i`` with ``scaffold``, else
    ``()``; ``server_control`` is SCAFFOLD's ``c``. ``poison`` (bool scalar) switches the data attack on for
    this client; ``attack_ctx`` is the attack's context (round, the client's
    rank among the attackers). ``lr_scale`` (a traced f32 scalar, or None
    for 1) multiplies the local learning rate for this round (a step
    schedule such as the hybrid paper's x0.1 decay): every local step's
    update is multiplied by it, which is the same as running the optimizer
    with ``lr * lr_scale`` (the optax optimizers' last transformation is the
    scaling by ``-lr``); SCAFFOLD's ``c_i`` divides by the scaled lr. None
    runs exactly the unscaled computation.
  """
  cfg.validate()
  opt = make_optimizer(cfg)
  momentum_mode = cfg.update_mode == "momentum"
  beta = cfg.momentum

  def loss_fn(params, model_state, global_params, x, y, ex_mask):
    variables = {"params": params, **model_state}
    if has_model_state:
      logits, new_vars = apply_fn(variables, x, train=True,
                                  mutable=list(model_state.keys()))
    else:
      logits = apply_fn(variables, x, train=True)
      new_vars = {}
    per_ex = softmax_xent(logits, y)
    denom = jnp.maximum(jnp.sum(ex_mask), 1.0)
    loss = jnp.sum(per_ex * ex_mask) / denom
    total = loss
    if cfg.prox_mu > 0:
      sq = sum(jnp.sum((p - g) ** 2) for p, g in zip(
          jax.tree.leaves(params), jax.tree.leaves(global_params)))
      total = loss + 0.5 * cfg.prox_mu * sq
    return total, (loss, new_vars)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train(params, model_state, client_state, x_all, y_all, idx_row, count,
            key, poison=False, attack_ctx=None, server_control=None,
            lr_scale=None):
    global_params = params
    lr = cfg.lr if lr_scale is None else cfg.lr * lr_scale
    if cfg.scaffold:
      correction = jax.tree.map(lambda c, ci: c - ci, server_control,
                                client_state)
    k_pos, k_attack = jax.random.split(key)
    pos, valid = _batch_positions(cfg, n_max, count, k_pos)
    grad_mask = None
    if data_attack is not None and data_attack.grad_mask is not None:
      # The poisoning client's projection (e.g. Neurotoxin's), as a params
      # pytree; others keep their gradients.
      flat_mask = data_attack.grad_mask(attack_ctx)
      grad_mask = ravel_pytree(params)[1](flat_mask.astype(jnp.float32))
    steps = jnp.arange(pos.shape[0], dtype=jnp.int32)
    if momentum_mode:
      mom0 = client_state
      opt_state0 = ()
    else:
      mom0 = ()
      opt_state0 = opt.init(params)

    def step(carry, inp):
      p, ms, opt_state, mom, loss_sum, n_steps = carry
      pos_s, valid_s, step_i = inp
      ex_mask = valid_s.astype(jnp.float32)
      rows = idx_row[pos_s]
      x = x_all[rows]
      y = y_all[rows]
      if data_attack is not None:
        xa, ya = data_attack.apply(x, y, jax.random.fold_in(k_attack, step_i),
                                   attack_ctx)
        x = jnp.where(poison, xa.astype(x.dtype), x)
        y = jnp.where(poison, ya.astype(y.dtype), y)
      (_, (loss, new_ms)), g = grad_fn(p, ms, global_params, x, y, ex_mask)
      if cfg.scaffold:
        g = jax.tree.map(jnp.add, g, correction)
      if grad_mask is not None:
        g = jax.tree.map(
            lambda gi, mi: jnp.where(poison, gi * mi.astype(gi.dtype), gi),
            g, grad_mask)
      live = jnp.any(valid_s)
      if momentum_mode:
        if cfg.weight_decay > 0:
          g = jax.tree.map(lambda gi, pi: gi + cfg.weight_decay * pi, g, p)
        new_mom = jax.tree.map(lambda m, gi: (1 - beta) * gi + beta * m, mom, g)
        new_p = jax.tree.map(lambda pi, m: pi - lr * m, p, new_mom)
        new_opt_state = opt_state
      else:
        upd, new_opt_state = opt.update(g, opt_state, p)
        if lr_scale is not None:
          upd = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), upd)
        new_p = optax.apply_updates(p, upd)
        new_mom = mom
      if data_attack is not None and data_attack.project is not None:
        proj = data_attack.project(new_p, global_params, attack_ctx)
        new_p = jax.tree.map(lambda a, b: jnp.where(poison, a, b), proj, new_p)
      keep = lambda new, old: jax.tree.map(
          lambda a, b: jnp.where(live, a, b), new, old)
      carry = (keep(new_p, p), keep(new_ms, ms) if has_model_state else ms,
               keep(new_opt_state, opt_state), keep(new_mom, mom),
               loss_sum + jnp.where(live, loss, 0.0),
               n_steps + live.astype(jnp.float32))
      return carry, None

    init = (params, model_state, opt_state0, mom0, jnp.float32(0.0),
            jnp.float32(0.0))
    (p, ms, _, mom, loss_sum, n_steps), _ = jax.lax.scan(step, init,
                                                         (pos, valid, steps))
    if momentum_mode:
      update = ravel_pytree(mom)[0]
      new_client_state = mom
    else:
      update = ravel_pytree(global_params)[0] - ravel_pytree(p)[0]
      new_client_state = client_state
      if cfg.scaffold:
        scale = 1.0 / (scaffold_multiplier(n_steps, cfg) * lr)
        new_client_state = jax.tree.map(
            lambda ci, c, g0, w: jnp.where(n_steps > 0,
                                           ci - c + (g0 - w) * scale, ci),
            client_state, server_control, global_params, p)
    loss = loss_sum / jnp.maximum(n_steps, 1.0)
    return ClientOut(update, ms, new_client_state, loss, n_steps)

  return train
