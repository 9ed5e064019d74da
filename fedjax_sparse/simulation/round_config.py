"""Static configuration of the round step, its learning-rate schedule and server optimizer.

:class:`RoundConfig` is what :func:`fedjax_sparse.simulation.round.make_round_step`
is built from (:class:`fedjax_sparse.simulation.experiment.ExperimentConfig`
derives it from the flags); :meth:`RoundConfig.validate` says what to
change before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_sparse.client.local import ClientConfig


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
