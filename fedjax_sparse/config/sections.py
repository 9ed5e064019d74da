"""The sections of the configuration tree: every field declared once.

Each field's default, help text (the command-line flag's help) and checks
are in its declaration (:func:`fedjax_sparse.config.fields.option`). The
sections, in flag order: :class:`DataConfig`, :class:`FederationConfig`,
:class:`ClientConfig`, :class:`ServerConfig`, :class:`SparsifyConfig`,
:class:`AttackConfig`, :class:`ModelConfig`, :class:`RunConfig`.
A check reads its own field and at most other fields of its section;
relations between sections (attack and rounds, rule and validation set)
are checked by ``ExperimentConfig.validate``
(:mod:`fedjax_sparse.simulation.config`).

Nothing heavy is imported here: the registries that list the known names
(aggregators, attacks, models) are imported when a check or the help needs
them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from fedjax_sparse.config.fields import at_least, one_of, option, require
from fedjax_sparse.config.fields import validate as _validate
from fedjax_sparse.config.parsing import parse_kwargs, parse_width

PARTITIONS = ("iid", "dirichlet", "shards", "one_class")
OPTIMIZERS = ("sgd", "momentum", "adam")
UPDATE_MODES = ("delta", "momentum")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
NONFINITE_POLICIES = ("reject", "propagate")
SPARSIFIERS = ("none", "topk")
MALICIOUS_MODES = ("first", "random")
CONV_IMPLS = ("auto", "im2col", "lax")
ENGINES = ("vmap", "map", "sequential")


def _names(names, aliases=None) -> str:
  text = ", ".join(names)
  if aliases:
    text += (" (aliases: " + ", ".join(f"{a}={n}" for a, n in aliases.items())
             + ")")
  return text


def aggregator_names() -> str:
  """The aggregation rules and their aliases, as the help lists them."""
  from fedjax_sparse import aggregators
  return _names(aggregators.names(), aggregators.registry.ALIASES)


def attack_names() -> str:
  """``none``, the attacks and their aliases, as the help lists them."""
  from fedjax_sparse import attacks
  return _names(["none"] + attacks.names(), attacks.registry.ALIASES)


def model_names() -> str:
  from fedjax_sparse import models
  return ", ".join(models.names())


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The dataset, the server's validation split and the partition."""

  dataset: str = option(
      "fashion_mnist", "fashion_mnist, mnist, digits, synthetic or "
      "tfds:<name> (e.g. tfds:cifar10).")
  data_dir: Optional[str] = option(
      None, "Directory of the dataset files (default: the dataset's own).")
  max_train: int = option(
      0, "Subsample the training set to this many examples (0: all).")
  val_size: int = option(
      0, "Examples held out of training as the server's validation set.",
      require(lambda c: c.max_train >= 0 and c.val_size >= 0,
              "max_train and val_size must be >= 0"))
  partition: str = option("dirichlet", "iid, dirichlet, shards or one_class.",
                          one_of(PARTITIONS, "partition"))
  alpha: float = option(
      1.0, "Dirichlet concentration (smaller = more label skew).",
      require(lambda c: c.partition != "dirichlet" or c.alpha > 0,
              "--alpha must be > 0 for the dirichlet partition, got {alpha}"))
  shards_per_client: int = option(
      2, "Classes per client of the shards partition.")
  min_samples: int = option(
      10, "Minimum samples per client of the dirichlet partition.")
  allow_empty_clients: bool = option(
      False, "Allow clients without data (more clients than examples: "
      "cross-device populations).")


@dataclasses.dataclass(frozen=True)
class FederationConfig:
  """The population, the clients sampled per round and the rounds."""

  num_clients: int = option(20, "Population size C.", at_least(1))
  clients_per_round: int = option(
      20, "Clients K sampled per round (without replacement).",
      require(lambda c: 1 <= c.clients_per_round <= c.num_clients,
              "clients_per_round must be between 1 and num_clients="
              "{num_clients}, got {clients_per_round}"))
  rounds: int = option(20, "Number of federated rounds.", at_least(1, "--"))


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Hyperparameters of local training (:mod:`fedjax_sparse.client.local`).

  ``update_mode``: "delta" uploads ``global - local``, "momentum" the
  client's momentum buffer (hybrid_sparse_attack.txt section 2.1).
  """

  local_epochs: int = option(
      1, "Local epochs per round (when local_steps is 0).",
      require(lambda c: c.local_steps != 0 or c.local_epochs >= 1,
              "set local_epochs >= 1 or local_steps >= 1 (got local_epochs="
              "{local_epochs}, local_steps=0)"))
  local_steps: int = option(
      0, "Exact local steps per round (overrides local_epochs).", at_least(0))
  batch_size: int = option(32, "Local minibatch size.", at_least(1))
  optimizer: str = option("sgd", "Client optimizer: sgd, momentum or adam.",
                          one_of(OPTIMIZERS, "client optimizer"))
  lr: float = option(0.05, "Client learning rate.",
                     require(lambda c: c.lr > 0, "the client learning rate "
                             "must be > 0, got {lr}"))
  momentum: float = option(
      0.9, "Client momentum (also beta of --update_mode=momentum).",
      require(lambda c: 0.0 <= c.momentum < 1.0,
              "momentum must be in [0, 1), got {momentum}"))
  weight_decay: float = option(0.0, "Client L2 weight decay.")
  update_mode: str = option(
      "delta", "delta (global - local) or momentum (send the local momentum "
      "buffer, hybrid-attack paper).", one_of(UPDATE_MODES, "update_mode"))
  prox_mu: float = option(
      0.0, "FedProx proximal coefficient (0 = off).",
      require(lambda c: c.weight_decay >= 0 and c.prox_mu >= 0,
              "weight_decay and prox_mu must be >= 0"))
  scaffold: bool = option(
      False, "SCAFFOLD control-variate correction of local training.",
      require(lambda c: not (c.scaffold and c.update_mode == "momentum"),
              "scaffold and update_mode=momentum both keep per-client "
              "state; use one of them"))

  def validate(self) -> None:
    """Raises ValueError saying what to change."""
    _validate(self)

  def steps_per_round(self, n_max: int) -> int:
    """Number of (possibly no-op) local steps every client runs."""
    if self.local_steps > 0:
      return self.local_steps
    return self.local_epochs * math.ceil(n_max / self.batch_size)


def _check_aggregator(cfg, name):
  from fedjax_sparse import aggregators
  if getattr(cfg, name) not in aggregators.names():
    raise ValueError(f"unknown aggregator {getattr(cfg, name)!r}; known "
                     f"aggregators: {', '.join(aggregators.names())}")


def _check_args(cfg, name):
  parse_kwargs(getattr(cfg, name), name)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """The server: its optimizer, learning-rate schedule and aggregation rule.

  ``lr_decay_at``: a step decay of both learning rates. From round index
  ``floor(lr_decay_at * rounds)`` on (0-based) the server learning rate and
  the clients' local learning rate are multiplied by ``lr_decay_factor``
  (hybrid_sparse_attack.txt: lr divided by 10 at 75% of training,
  ``lr_decay_at=0.75``, ``lr_decay_factor=0.1``); 0 (the default) turns the
  schedule off. With a schedule, ``rounds`` decides the results, so a run
  cannot be extended to more rounds by resuming it.

  ``server_momentum``: ``optax.sgd(server_lr, momentum)``, ``R <- m R + u``,
  ``theta <- theta - server_lr R`` (the server momentum of sparsefed.txt
  Alg. 4).

  ``nonfinite``: ``reject`` (the default) screens uploads that hold inf/nan
  before aggregation: the row replaced by zeros (its pack mask emptied)
  with weight 0 and acceptance 0 (so such a malicious client counts as
  flagged), left out of the BatchNorm statistics; on finite uploads this
  changes nothing, bit for bit (the rules are told so through
  ``AggContext.finite_uploads`` and skip their own checks). ``propagate``
  hands the raw rows to the rule, which deals with them itself (the
  weighted means leave such rows out,
  :func:`fedjax_sparse.aggregators.base.combine_finite`). Rounds with such
  uploads record ``nonfinite_clients`` either way.
  """

  server_lr: float = option(1.0, "Server learning rate.",
                            require(lambda c: c.server_lr > 0,
                                    "server_lr must be > 0, got {server_lr}"))
  server_optimizer: str = option(
      "sgd", "Server optimizer: sgd, momentum or adam.",
      one_of(SERVER_OPTIMIZERS, "server optimizer"))
  server_momentum: float = option(
      0.9, "Momentum of --server_optimizer=momentum (R <- m R + u, theta <- "
      "theta - server_lr R; SparseFed's baselines use 0.9). Unused by sgd "
      "and adam.",
      require(lambda c: (c.server_optimizer != "momentum"
                         or 0.0 <= c.server_momentum < 1.0),
              "server_momentum must be in [0, 1), got {server_momentum}"))
  lr_decay_at: float = option(
      0.0, "Step decay of the server and client learning rates: from round "
      "floor(lr_decay_at * rounds) (0-based) on, both are multiplied by "
      "--lr_decay_factor (hybrid paper: 0.75). 0: no decay.",
      require(lambda c: 0.0 <= c.lr_decay_at <= 1.0,
              "--lr_decay_at must be in [0, 1] (a fraction of --rounds; 0 = "
              "no decay), got {lr_decay_at}"))
  # Checked with or without a schedule: a value out of range is a mistake
  # even where it has no effect.
  lr_decay_factor: float = option(
      0.1, "Multiplier of the learning rates after --lr_decay_at (0.1: "
      "divide by 10).",
      require(lambda c: c.lr_decay_factor > 0,
              "--lr_decay_factor must be > 0, got {lr_decay_factor}"))
  nonfinite: str = option(
      "reject", "Uploads holding inf/nan: reject (screened before "
      "aggregation: zero row, weight 0, acceptance 0, counted in "
      "nonfinite_clients) or propagate (the rule sees them).",
      one_of(NONFINITE_POLICIES, "nonfinite policy"))
  aggregator: str = option("fedavg", "Aggregation rule", _check_aggregator,
                           names=aggregator_names)
  aggregator_args: str = option(
      "", "Aggregator hyperparameters as name=value pairs, e.g. "
      "'k=0.01,clip_norm=5' for sparsefed.", _check_args)
  weighted: bool = option(
      True, "Weight clients by dataset size (else uniformly).")
  # Checked against clients_per_round by ExperimentConfig.validate.
  num_byzantine: int = option(
      -1, "Number of attackers f that robust rules assume (-1: the expected "
      "number among the sampled clients).")


@dataclasses.dataclass(frozen=True)
class SparsifyConfig:
  """What clients upload: dense updates or pack top-k (FLARE, Alg. 2)."""

  sparsify: str = option(
      "none", "none (dense uploads) or topk (pack top-k uploads).",
      one_of(SPARSIFIERS, "sparsify"))
  # The ranges are checked whatever the sparsifier (as lr_decay_factor).
  topk_ratio: float = option(
      0.5, "Fraction of packs each client keeps (FLARE default 0.5).",
      require(lambda c: 0.0 < c.topk_ratio <= 1.0,
              "topk_ratio must be in (0, 1], got {topk_ratio}"))
  pack_size: int = option(
      1, "Parameters per pack (1 = scalar top-k).",
      require(lambda c: isinstance(c.pack_size, int) and c.pack_size >= 1,
              "pack_size must be an integer >= 1, got {pack_size}"))


def _check_attack(cfg, name):
  from fedjax_sparse import attacks
  attack = getattr(cfg, name)
  if attack != "none" and attack not in attacks.names():
    raise ValueError(f"unknown attack {attack!r}; known attacks: none, "
                     f"{', '.join(attacks.names())}")


def _check_attack_args(cfg, name):
  kwargs = parse_kwargs(getattr(cfg, name), name)
  from fedjax_sparse import requirements
  if requirements.AUX_SET in requirements.attack_needs(cfg.attack):
    from fedjax_sparse.attacks.builder import (TARGETED_OPTIONS,
                                               check_aux_source)
    check_aux_source(kwargs.get("aux_source", TARGETED_OPTIONS["aux_source"]))


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The attack, the malicious clients and when the attack starts."""

  attack: str = option("none", "Attack (update or data attack)",
                       _check_attack, names=attack_names)
  attack_args: str = option(
      "", "Attack hyperparameters as name=value pairs, e.g. 'eps=0.4'.",
      _check_attack_args)
  malicious_fraction: float = option(
      0.0, "Fraction of the clients that are malicious.",
      require(lambda c: 0.0 <= c.malicious_fraction < 1.0,
              "malicious_fraction must be in [0, 1), got "
              "{malicious_fraction}"))
  malicious_mode: str = option(
      "first", "Which clients are malicious: first or random.",
      one_of(MALICIOUS_MODES, "malicious_mode"))
  attack_start: int = option(
      10, "First round (1-based) in which the attack is active.", at_least(1))


def _check_model(cfg, name):
  from fedjax_sparse import models
  if getattr(cfg, name) not in models.names():
    raise ValueError(f"unknown model {getattr(cfg, name)!r}; known models: "
                     f"{', '.join(models.names())}")


def _check_width(cfg, name):
  if getattr(cfg, name):
    from fedjax_sparse import models
    # Builds the module only (no parameters): a width the model cannot
    # take fails here, before any data is loaded.
    models.get_model(cfg.model, 10, width=parse_width(getattr(cfg, name)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model and how its layers are computed."""

  model: str = option("mlp", "Model", _check_model, names=model_names)
  conv_impl: str = option(
      "auto", "Convolution implementation: auto, im2col or lax.",
      require(lambda c: c.conv_impl in CONV_IMPLS,
              "unknown conv_impl {conv_impl!r}; choose auto, im2col or lax"))
  norm: str = option("group",
                     "Normalisation of resnet20: group, batch or none.")
  model_width: str = option(
      "", "Layer widths instead of the model's default: mlp hidden widths "
      "('100' or '200,200'), cnn2 '32,64,512'-style tuples, resnet20 the "
      "first stage's channels ('8').", _check_width)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How the experiment runs: client engine, devices, seeds, evaluation.

  ``engine``: "vmap" (all K clients at once), "map" (``lax.map`` over
  chunks of ``map_batch_size`` clients, each chunk vmapped) or
  "sequential" (one client after another inside the jit; the reference).
  ``client_devices``: devices the client axis is split over (``shard_map``
  over a "clients" mesh axis, each device running its share with
  ``engine``); 1 = no split, 0 = every local device. K is padded to a
  multiple of it with empty clients, dropped before aggregation.

  ``seed`` draws everything random; ``data_seed`` (when >= 0) draws the data
  instead (training subsample, validation split and partition), so that
  several seeds can train on one partition: seed-batched sweeps share one.

  ``twin``: also train an unattacked twin in the same jitted step (same
  seed, no attackers) and report the L1 distance to it every round and its
  accuracy on evaluation rounds (ALGORITHMS.md section 7).
  """

  engine: str = option(
      "map", "Client engine: vmap, map (lax.map in chunks) or sequential.",
      one_of(ENGINES, "engine"))
  map_batch_size: int = option(
      10, "Clients per chunk of the map engine.", at_least(1))
  client_devices: int = option(
      0, "Devices the client axis is split over (0: all local devices; on "
      "CPU the binary makes one device per core).", at_least(0))
  seed: int = option(
      0, "Random seed (same seed, same results, bit for bit).")
  data_seed: int = option(
      -1, "Seed of the data (training subsample, validation split, "
      "partition); -1: --seed. Fix it to train several seeds on one "
      "partition.",
      require(lambda c: c.data_seed >= -1,
              "--data_seed must be -1 (use --seed) or >= 0, got {data_seed}"))
  eval_every: int = option(
      1, "Evaluate on the test set every this many rounds.", at_least(1, "--"))
  checkpoint_every: int = option(
      1, "Save the resumable checkpoint every this many rounds and after "
      "the last (a killed run repeats at most checkpoint_every - 1 rounds).",
      at_least(1, "--"))
  eval_batch_size: int = option(1000, "Evaluation batch size.",
                                at_least(1, "--"))
  twin: bool = option(
      False, "Also train an unattacked twin in the same jitted step (same "
      "seed, no attackers) and report the L1 distance to it (l1_to_twin) "
      "and its accuracy.")
  output_dir: str = option("", "Where results go (empty: nowhere).")


# In flag order: ExperimentConfig's fields, config.json's keys.
SECTIONS = (DataConfig, FederationConfig, ClientConfig, ServerConfig,
            SparsifyConfig, AttackConfig, ModelConfig, RunConfig)
