"""The configuration of one experiment, checked before anything is compiled.

:class:`ExperimentConfig` is what the ``experiments.run`` binary builds from
its flags; a user can build the same dataclass in Python and call
:func:`fedjax_sparse.simulation.experiment.run_experiment`.
:meth:`ExperimentConfig.validate` checks everything it can (names, ranges,
that the dataset exists) and says what to change. :func:`config_dict` is
the configuration as ``config.json`` holds it, and
:func:`config_differences` what a resumed run compares.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

from fedjax_sparse import aggregators as aggregators_lib
from fedjax_sparse import data as data_lib
from fedjax_sparse import models as models_lib
from fedjax_sparse import requirements
from fedjax_sparse.client.local import ClientConfig
from fedjax_sparse.simulation.round_config import RoundConfig


PARTITIONS = ("iid", "dirichlet", "shards", "one_class")
MALICIOUS_MODES = ("first", "random")


def parse_kwargs(text: str, what: str = "arguments") -> dict:
  """Parses ``"k=0.01,clip_norm=5,mode=sketch"`` into typed keyword arguments.

  Values are Python literals (ints, floats, booleans, None, tuples) where they
  parse as one, else strings.
  """
  import ast
  out = {}
  import re
  # A comma starts a new pair only when a `name=` follows, so values may hold
  # commas themselves (caps=last_dense:0.25,first_conv:0.2).
  items = re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text)
  for item in filter(None, (t.strip() for t in items)):
    if "=" not in item:
      raise ValueError(f"bad {what} {item!r}: write name=value pairs separated "
                       "by commas, e.g. 'k=0.01,clip_norm=5'")
    name, value = (t.strip() for t in item.split("=", 1))
    try:
      out[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[name] = value
  return out


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole experiment. Field names match the command-line flags.

  ``twin``: also train an unattacked twin in the same jitted step (same
  seed, no attackers) and report the L1 distance to it every round and its
  accuracy on evaluation rounds (ALGORITHMS.md section 7).

  ``seed`` draws everything random; ``data_seed`` (when >= 0) draws the data
  instead (training subsample, validation split and partition), so that
  several seeds can train on one partition: seed-batched sweeps share one.

  ``lr_decay_at``: a step decay of both learning rates. From round index
  ``floor(lr_decay_at * rounds)`` on (0-based) the server learning rate and
  the clients' local learning rate are multiplied by ``lr_decay_factor``
  (hybrid_sparse_attack.txt: lr divided by 10 at 75% of training,
  ``lr_decay_at=0.75``, ``lr_decay_factor=0.1``); 0 (the default) turns the
  schedule off. With a schedule, ``rounds`` decides the results, so a run
  cannot be extended to more rounds by resuming it.

  ``nonfinite``: ``reject`` (the default) screens uploads that hold inf/nan
  before aggregation (a zero row of weight 0, acceptance 0, so such a
  malicious client counts as flagged); ``propagate`` hands them to the rule
  as they are (see :class:`RoundConfig`). Rounds with such uploads record
  ``nonfinite_clients``; finite rounds are the same either way, bit for bit.
  """

  dataset: str = "fashion_mnist"
  data_dir: Optional[str] = None
  max_train: int = 0
  val_size: int = 0
  partition: str = "dirichlet"
  alpha: float = 1.0
  shards_per_client: int = 2
  min_samples: int = 10
  allow_empty_clients: bool = False
  num_clients: int = 20
  clients_per_round: int = 20
  rounds: int = 20
  local_epochs: int = 1
  local_steps: int = 0
  batch_size: int = 32
  optimizer: str = "sgd"
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 0.0
  update_mode: str = "delta"
  prox_mu: float = 0.0
  scaffold: bool = False
  server_lr: float = 1.0
  server_optimizer: str = "sgd"
  server_momentum: float = 0.9
  lr_decay_at: float = 0.0
  lr_decay_factor: float = 0.1
  nonfinite: str = "reject"
  aggregator: str = "fedavg"
  aggregator_args: str = ""
  weighted: bool = True
  num_byzantine: int = -1
  sparsify: str = "none"
  topk_ratio: float = 0.5
  pack_size: int = 1
  attack: str = "none"
  attack_args: str = ""
  malicious_fraction: float = 0.0
  malicious_mode: str = "first"
  attack_start: int = 10
  model: str = "mlp"
  conv_impl: str = "auto"
  norm: str = "group"
  model_width: str = ""
  engine: str = "map"
  map_batch_size: int = 10
  client_devices: int = 0
  seed: int = 0
  data_seed: int = -1
  eval_every: int = 1
  checkpoint_every: int = 1
  eval_batch_size: int = 1000
  twin: bool = False
  output_dir: str = ""

  def __post_init__(self):
    # Aliases as the papers write them (cm, tm, lfa, ...) become registry
    # names, so config.json and every check see one name.
    from fedjax_sparse.aggregators.registry import canonical as agg_name
    from fedjax_sparse.attacks.registry import canonical as attack_name
    if isinstance(self.aggregator, str):
      object.__setattr__(self, "aggregator", agg_name(self.aggregator))
    if isinstance(self.attack, str):
      object.__setattr__(self, "attack", attack_name(self.attack))

  def client_config(self) -> ClientConfig:
    return ClientConfig(optimizer=self.optimizer, lr=self.lr,
                        momentum=self.momentum, weight_decay=self.weight_decay,
                        local_epochs=self.local_epochs,
                        local_steps=self.local_steps,
                        batch_size=self.batch_size,
                        update_mode=self.update_mode, prox_mu=self.prox_mu,
                        scaffold=self.scaffold)

  @property
  def effective_data_seed(self) -> int:
    """The seed of the data partition: ``data_seed``, or ``seed`` if -1."""
    return self.seed if self.data_seed < 0 else self.data_seed

  @property
  def num_malicious(self) -> int:
    """Malicious clients in the population: round(fraction * C)."""
    return int(round(self.malicious_fraction * self.num_clients))

  @property
  def byzantine(self) -> int:
    """f given to robust rules: --num_byzantine, or the expected number of
    attackers among the K sampled clients when it is -1."""
    if self.num_byzantine >= 0:
      return self.num_byzantine
    if self.attack == "none":
      return 0
    return int(round(self.malicious_fraction * self.clients_per_round))

  @property
  def lr_decay_round(self) -> Optional[int]:
    """The first round index (0-based) of the decayed learning rates,
    ``floor(lr_decay_at * rounds)``, or None without a schedule."""
    if self.lr_decay_at == 0:
      return None
    from fractions import Fraction
    # As the decimal the flag was written in: 0.29 * 100 is 29, not 28.
    return math.floor(Fraction(repr(float(self.lr_decay_at))) * self.rounds)

  def round_config(self) -> RoundConfig:
    return RoundConfig(num_clients=self.num_clients,
                       clients_per_round=self.clients_per_round,
                       client=self.client_config(), engine=self.engine,
                       map_batch_size=self.map_batch_size,
                       client_devices=self.client_devices,
                       server_lr=self.server_lr,
                       server_optimizer=self.server_optimizer,
                       server_momentum=self.server_momentum,
                       weighted=self.weighted,
                       num_byzantine=self.byzantine,
                       sparsify=self.sparsify, topk_ratio=self.topk_ratio,
                       pack_size=self.pack_size,
                       attack_start=self.attack_start,
                       lr_decay_round=self.lr_decay_round,
                       lr_decay_factor=self.lr_decay_factor,
                       nonfinite=self.nonfinite)

  def validate(self, check_data: bool = True) -> None:
    """Raises ValueError (or DatasetNotFoundError) saying what to change."""
    if not 0.0 <= self.lr_decay_at <= 1.0:
      raise ValueError(f"--lr_decay_at must be in [0, 1] (a fraction of "
                       f"--rounds; 0 = no decay), got {self.lr_decay_at}")
    if not self.lr_decay_factor > 0:
      raise ValueError(f"--lr_decay_factor must be > 0, got "
                       f"{self.lr_decay_factor}")
    self.round_config().validate()
    if self.partition not in PARTITIONS:
      raise ValueError(f"unknown partition {self.partition!r}; choose one of "
                       f"{', '.join(PARTITIONS)}")
    if self.partition == "dirichlet" and not self.alpha > 0:
      raise ValueError(f"--alpha must be > 0 for the dirichlet partition, got "
                       f"{self.alpha}")
    if self.rounds < 1:
      raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
    if self.data_seed < -1:
      raise ValueError(f"--data_seed must be -1 (use --seed) or >= 0, got "
                       f"{self.data_seed}")
    if self.eval_every < 1:
      raise ValueError(f"--eval_every must be >= 1, got {self.eval_every}")
    if self.checkpoint_every < 1:
      raise ValueError(f"--checkpoint_every must be >= 1, got "
                       f"{self.checkpoint_every}")
    if self.eval_batch_size < 1:
      raise ValueError(f"--eval_batch_size must be >= 1, got "
                       f"{self.eval_batch_size}")
    if self.aggregator not in aggregators_lib.names():
      raise ValueError(f"unknown aggregator {self.aggregator!r}; known "
                       f"aggregators: {', '.join(aggregators_lib.names())}")
    if self.model not in models_lib.names():
      raise ValueError(f"unknown model {self.model!r}; known models: "
                       f"{', '.join(models_lib.names())}")
    if self.model_width:
      # Builds the module only (no parameters): a width the model cannot
      # take fails here, before any data is loaded.
      models_lib.get_model(self.model, 10, width=parse_width(self.model_width))
    if self.conv_impl not in ("auto", "im2col", "lax"):
      raise ValueError(f"unknown conv_impl {self.conv_impl!r}; choose auto, "
                       "im2col or lax")
    if not -1 <= self.num_byzantine < self.clients_per_round:
      raise ValueError(f"num_byzantine must be -1 (automatic) or in "
                       f"[0, clients_per_round), got {self.num_byzantine}")
    parse_kwargs(self.aggregator_args, "aggregator_args")
    attack_kwargs = parse_kwargs(self.attack_args, "attack_args")
    from fedjax_sparse import attacks as attacks_lib
    if self.attack != "none" and self.attack not in attacks_lib.names():
      raise ValueError(f"unknown attack {self.attack!r}; known attacks: none, "
                       f"{', '.join(attacks_lib.names())}")
    if requirements.AUX_SET in requirements.attack_needs(self.attack):
      from fedjax_sparse.attacks.builder import (TARGETED_OPTIONS,
                                                 check_aux_source)
      check_aux_source(attack_kwargs.get("aux_source",
                                         TARGETED_OPTIONS["aux_source"]))
    if attack_kwargs.get("space") == "model" and self.update_mode != "delta":
      raise ValueError(
          f"--attack_args=space=model crafts the uploaded model, which needs "
          f"clients that upload models (--update_mode=delta); with "
          f"--update_mode={self.update_mode} use space=update")
    if not 0.0 <= self.malicious_fraction < 1.0:
      raise ValueError(f"malicious_fraction must be in [0, 1), got "
                       f"{self.malicious_fraction}")
    if self.attack != "none" and self.num_malicious == 0:
      raise ValueError(f"--attack={self.attack} needs malicious clients: set "
                       "--malicious_fraction (e.g. 0.4)")
    if self.attack != "none" and self.attack_start > self.rounds:
      raise ValueError(
          f"--attack_start={self.attack_start} is after the last round "
          f"(--rounds={self.rounds}): --attack={self.attack} would never be "
          f"active; lower --attack_start (1: from the first round)")
    if self.malicious_mode not in MALICIOUS_MODES:
      raise ValueError(f"unknown malicious_mode {self.malicious_mode!r}; "
                       f"choose one of {', '.join(MALICIOUS_MODES)}")
    if self.max_train < 0 or self.val_size < 0:
      raise ValueError("max_train and val_size must be >= 0")
    rule_needs = requirements.aggregator_needs(self.aggregator)
    if requirements.MODEL in rule_needs and self.val_size == 0:
      raise ValueError(f"--aggregator={self.aggregator} needs the server's "
                       "validation set: set --val_size (e.g. 500)")
    if requirements.SERVER_DATA in rule_needs and self.val_size == 0:
      raise ValueError(f"--aggregator={self.aggregator} needs server data: set "
                       "--val_size (e.g. 100, FLTrust's root set)")
    if check_data:
      data_lib.check_available(self.dataset, self.data_dir)


def config_dict(cfg: ExperimentConfig) -> dict:
  """``cfg`` as ``config.json`` holds it: every field but ``output_dir``."""
  d = dataclasses.asdict(cfg)
  d.pop("output_dir")
  return d


def config_differences(old: dict, new: dict) -> list[str]:
  """Fields in which a saved configuration differs from a new one.

  Tolerant of fields added to :class:`ExperimentConfig` after the saved run
  was written (like ``experiments.sweep.same_config``): a field absent from
  ``old`` counts as equal when the new value is the field's default, so
  old runs still resume; keys of ``old`` that are no longer fields are
  ignored.
  """
  defaults = json.loads(json.dumps(config_dict(ExperimentConfig())))
  new = json.loads(json.dumps(new))  # compare as saved (tuples -> lists)
  diff = []
  for k, value in new.items():
    if k not in old:
      if k not in defaults or value != defaults[k]:
        diff.append(f"{k} (not in the saved run, now {value!r})")
    elif old[k] != value:
      diff.append(f"{k} (saved {old[k]!r}, now {value!r})")
  return diff


def parse_width(text: str):
  """``--model_width``: "" (the model's default), "100" or "100,100"."""
  text = text.strip()
  if not text:
    return None
  try:
    widths = tuple(int(w) for w in text.split(","))
  except ValueError:
    raise ValueError(f"--model_width must be integers separated by commas, "
                     f"got {text!r}") from None
  if any(w < 1 for w in widths):
    raise ValueError(f"--model_width entries must be >= 1, got {text!r}")
  return widths[0] if len(widths) == 1 and "," not in text else widths
