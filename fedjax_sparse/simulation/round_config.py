"""Static configuration of the round step, its learning-rate schedule and server optimizer.

:class:`RoundConfig` is what :func:`fedjax_sparse.simulation.round.make_round_step`
is built from (:class:`fedjax_sparse.simulation.experiment.ExperimentConfig`
derives it from the flags); :meth:`RoundConfig.validate` says what to
change before anything is compiled.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_sparse.config import fields
from fedjax_sparse.config.fields import option
# The choices, declared with the fields; importable from here as before.
from fedjax_sparse.config.sections import (ENGINES, NONFINITE_POLICIES,
                                           SERVER_OPTIMIZERS, SPARSIFIERS,
                                           AttackConfig, ClientConfig,
                                           FederationConfig, RunConfig,
                                           ServerConfig, SparsifyConfig)


@fields.flat_view(
    (FederationConfig, "num_clients", "clients_per_round"),
    (RunConfig, "engine", "map_batch_size", "client_devices"),
    (ServerConfig, "server_lr", "server_optimizer", "server_momentum",
     "weighted", "lr_decay_factor", "nonfinite"),
    SparsifyConfig,
    (AttackConfig, "attack_start"))
class RoundConfig:
  """Static configuration of the round step.

  Its fields are the configuration tree's (:mod:`fedjax_sparse.config`):
  the same defaults, help and checks as the flags of the same names
  (``engine``, ``server_lr``, ``topk_ratio``, ... ; their sections' docs
  say more), and ``client``, the :class:`ClientConfig` section. Two fields
  are the round step's own, derived by
  :meth:`fedjax_sparse.simulation.config.ExperimentConfig.round_config`
  from the flags: ``num_byzantine`` (the resolved f) and ``lr_decay_round``
  (from ``--lr_decay_at``).
  """

  client: ClientConfig = option(
      ClientConfig(), "Local training hyperparameters.",
      lambda cfg, name: cfg.client.validate())
  num_byzantine: int = option(
      0, "f, the number of attackers robust rules are told to expect "
      "(--num_byzantine resolved: never -1).")
  lr_decay_round: Optional[int] = option(
      None, "Step decay of the learning rates: from this round index on "
      "(0-based, ServerState.round) both the server learning rate and the "
      "clients' local learning rate are multiplied by lr_decay_factor "
      "(floor(lr_decay_at * rounds)); None keeps them constant and builds "
      "exactly the step without a schedule.",
      fields.require(
          lambda c: c.lr_decay_round is None or (
              not isinstance(c.lr_decay_round, bool)
              and isinstance(c.lr_decay_round, int)
              and c.lr_decay_round >= 0),
          "lr_decay_round must be None (no decay) or an integer >= 0, got "
          "{lr_decay_round!r}"))

  def validate(self, d: Optional[int] = None) -> None:
    """Raises ValueError saying what to change (``d`` enables the k <= d check)."""
    fields.validate(self)
    if self.sparsify == "topk" and d is not None:
      from fedjax_sparse.sparsify import check_topk_config
      check_topk_config(d, self.topk_ratio, self.pack_size)


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
