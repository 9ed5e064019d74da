"""One federated experiment from a config: data, model, round loop, results.

:class:`ExperimentConfig` is what the ``experiments.run`` binary builds from
its flags; a user can build the same dataclass in Python and call
:func:`run_experiment`. :meth:`ExperimentConfig.validate` checks everything it
can (names, ranges, that the dataset exists) before anything is compiled.

Outputs in ``output_dir`` (all written atomically):

* ``config.json``: the configuration;
* ``rounds.jsonl``: one JSON record per round (round, loss, seconds, and test
  loss/accuracy on evaluation rounds; ``asr``, the attack success rate, on
  evaluation rounds of a backdoor data attack; ``targeted_accuracy`` and
  ``oif``, the outsized impact factor, on evaluation rounds of
  ``targeted_pgd``; with ``twin=True``, ``l1_to_twin`` and ``twin_loss``
  every round and ``twin_accuracy`` (and ``twin_targeted_accuracy``) on
  evaluation rounds);
* ``summary.json``: final metrics and timings (``final_asr`` for backdoor
  attacks, ``final_targeted_accuracy`` and ``final_oif`` for
  ``targeted_pgd``, ``final_l1_to_twin`` and ``final_twin_accuracy`` with
  the twin);
* ``checkpoint/``: the server state after the last finished round, an Orbax
  checkpoint directory written atomically. A killed run started again with
  the same configuration and output directory resumes from it without
  losing finished rounds (runs of earlier versions from their
  ``checkpoint.npz``). With ``twin=True`` it holds both the attacked
  run's and the twin's state;
* ``checkpoint.sha256``: the checkpoint's checksum, verified on resume (a
  corrupt checkpoint is refused, never trained on);
* ``.lock``: locked (``flock``) by the run using the directory, and holding
  its pid: a second run there is refused
  (:mod:`fedjax_sparse.simulation.run_safety`).

Targeted model poisoning (``targeted_pgd``): the attackers' auxiliary set is
drawn once (:func:`fedjax_sparse.attacks.builder.targeted_auxiliary_data`)
and serves both the attack and the targeted accuracy. By default
(``aux_source=test``) it is ``aux_size`` test points, as in sparsefed.txt
3.2, and those points are left out of the test accuracy, loss and top-5 of
the run (and of its twin), which the paper measures on "the validation set
not including the auxiliary set" (B.5, Table 11); ``summary.json`` then
says how many test points were evaluated (``test_size``). Runs without
``targeted_pgd`` (the ``none`` cells of a sweep) evaluate on the whole test
split. ``aux_source=train`` draws the set from the attackers' training data
and evaluates on the whole test split.

The unattacked twin (``twin=True``, ALGORITHMS.md section 7) is trained in
the same jitted step as the attacked run, from the same initial state and
PRNG key, with the same rule and settings but no attack and nobody
malicious (:func:`fedjax_sparse.simulation.round.make_twin_round_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse import aggregators as aggregators_lib
from fedjax_sparse import data as data_lib
from fedjax_sparse import metrics as metrics_lib
from fedjax_sparse import models as models_lib
from fedjax_sparse import requirements
from fedjax_sparse.client.local import ClientConfig
from fedjax_sparse.layout import layout_of
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation import run_safety
from fedjax_sparse.simulation.round import (RoundConfig, RoundData,
                                            TwinState, init_server_state,
                                            init_twin_state, make_evaluate,
                                            make_round_step,
                                            make_twin_round_step)

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


def _build(factory, kwargs: dict, what: str, name: str, **fixed):
  try:
    return factory(**fixed, **kwargs)
  except TypeError as e:
    raise ValueError(f"cannot build {what} {name!r} with arguments {kwargs}: "
                     f"{e}; set them with --{what.split()[0]}_args") from None


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


def build_data(cfg: ExperimentConfig):
  return data_lib.build(cfg.dataset, cfg.num_clients, cfg.partition,
                        alpha=cfg.alpha, shards_per_client=cfg.shards_per_client,
                        min_samples=cfg.min_samples, val_size=cfg.val_size,
                        data_dir=cfg.data_dir, seed=cfg.effective_data_seed,
                        max_train=cfg.max_train or None,
                        allow_empty=cfg.allow_empty_clients)


class Experiment:
  """Data, model, compiled round step and evaluation of one configuration."""

  def __init__(self, cfg: ExperimentConfig, fd=None):
    cfg.validate(check_data=fd is None)
    self.cfg = cfg
    self.fd = fd if fd is not None else build_data(cfg)
    if self.fd.clients.idx.shape[0] != cfg.num_clients:
      raise ValueError("the federated data has a different number of clients "
                       "than the configuration")
    self.model = models_lib.get_model(cfg.model, self.fd.num_classes,
                                      conv_impl=cfg.conv_impl, norm=cfg.norm,
                                      width=parse_width(cfg.model_width))
    key = jax.random.key(cfg.seed)
    k_init, self.k_state = jax.random.split(key)
    self.variables = self.model.init(k_init, jnp.asarray(self.fd.x_train[:1]),
                                     train=False)
    self.has_model_state = len(self.variables) > 1
    self.layout = layout_of(self.variables["params"])
    agg_kwargs = parse_kwargs(cfg.aggregator_args)
    rule_needs = requirements.aggregator_needs(cfg.aggregator)
    server_data = requirements.SERVER_DATA in rule_needs
    if requirements.MODEL in rule_needs:
      agg_kwargs = {**self._model_aware_args(), **agg_kwargs}
    self.aggregator = _build(aggregators_lib.get(cfg.aggregator), agg_kwargs,
                             "aggregator", cfg.aggregator)
    from fedjax_sparse import attacks as attacks_lib
    self.update_attack = self.data_attack = None
    attack_kwargs = parse_kwargs(cfg.attack_args)
    malicious = attacks_lib.choose_malicious(cfg.num_clients, cfg.num_malicious,
                                             cfg.malicious_mode, cfg.seed)
    # targeted_pgd's auxiliary set, drawn once for the attack and for the
    # targeted accuracy (test points by default; see the module docstring).
    self.targeted_aux = None
    if cfg.attack != "none":
      if attacks_lib.is_update_attack(cfg.attack):
        from fedjax_sparse.attacks.builder import (build_update_attack,
                                                   targeted_auxiliary_data)
        rows = self.fd.clients.idx[malicious]
        counts = self.fd.clients.counts[malicious]
        pool = np.concatenate([r[:c] for r, c in zip(rows, counts)])
        if requirements.AUX_SET in requirements.attack_needs(cfg.attack):
          self.targeted_aux = targeted_auxiliary_data(
              attack_kwargs, num_classes=self.fd.num_classes,
              attacker_x=self.fd.x_train[pool],
              attacker_y=self.fd.y_train[pool], test_x=self.fd.x_test,
              test_y=self.fd.y_test)
        self.update_attack = build_update_attack(
            cfg.attack, attack_kwargs, layout=self.layout,
            params=self.variables["params"], apply_fn=self.model.apply,
            attacker_x=self.fd.x_train[pool], attacker_y=self.fd.y_train[pool],
            key=jax.random.fold_in(key, 1), num_classes=self.fd.num_classes,
            model_state={k: v for k, v in self.variables.items()
                         if k != "params"},
            output_dir=cfg.output_dir or None,
            test_x=self.fd.x_test, test_y=self.fd.y_test,
            targeted_aux=self.targeted_aux)
      else:
        self.data_attack = _build(attacks_lib.get_data_attack(cfg.attack),
                                  attack_kwargs, "attack", cfg.attack,
                                  num_classes=self.fd.num_classes)
    self.round_config = cfg.round_config()
    self.round_config.validate(self.layout.d)
    # Rules and attacks check their settings against d in init (k > d, ...):
    # trace them abstractly now, before anything is compiled.
    jax.eval_shape(lambda: self.aggregator.init(self.layout.d))
    if self.update_attack is not None:
      jax.eval_shape(lambda: self.update_attack.init(self.layout.d))
    make_step = make_twin_round_step if cfg.twin else make_round_step
    self.round_step = make_step(
        self.round_config, self.model.apply, self.aggregator, self.layout,
        n_max=self.fd.clients.idx.shape[1],
        has_model_state=self.has_model_state,
        update_attack=self.update_attack, data_attack=self.data_attack,
        server_size=len(self.fd.y_val) if server_data else 0)
    self.evaluate = make_evaluate(self.model.apply, cfg.eval_batch_size)
    self.data = RoundData(jnp.asarray(self.fd.x_train),
                          jnp.asarray(self.fd.y_train),
                          jnp.asarray(self.fd.clients.idx),
                          jnp.asarray(self.fd.clients.counts),
                          jnp.asarray(malicious),
                          jnp.asarray(attacks_lib.malicious_rank(malicious)),
                          *((jnp.asarray(self.fd.x_val), jnp.asarray(self.fd.y_val))
                            if server_data else ()))
    x_test, y_test = self.fd.x_test, self.fd.y_test
    if self.targeted_aux is not None and self.targeted_aux.test_index is not None:
      # The auxiliary test points are the attack's, not the test set's
      # (sparsefed.txt B.5: test accuracy "not including the auxiliary set").
      keep = np.ones(len(y_test), bool)
      keep[self.targeted_aux.test_index] = False
      x_test, y_test = x_test[keep], y_test[keep]
    self.x_test = jnp.asarray(x_test)
    self.y_test = jnp.asarray(y_test)
    # Backdoor data attacks: the triggered non-target test set whose accuracy
    # (labels = the target) is the attack success rate (ALGORITHMS.md s. 7).
    self.x_asr = self.y_asr = None
    if metrics_lib.is_backdoor(cfg.attack):
      x_asr, y_asr = metrics_lib.backdoor_eval_set(
          cfg.attack, attack_kwargs, self.fd.x_test, self.fd.y_test)
      if len(y_asr):
        self.x_asr, self.y_asr = jnp.asarray(x_asr), jnp.asarray(y_asr)
    # Targeted model poisoning: the attack's own auxiliary set with its
    # flipped labels, for the targeted attack accuracy and the outsized
    # impact factor (ALGORITHMS.md s. 7).
    self.x_aux = self.y_aux = None
    if self.targeted_aux is not None:
      self.x_aux = jnp.asarray(self.targeted_aux.x)
      self.y_aux = jnp.asarray(self.targeted_aux.y)
    # n of the OIF: the training points held by all clients together.
    self.num_datapoints = int(np.sum(self.fd.clients.counts))

  def _model_aware_args(self) -> dict:
    """What class-aware masking needs: the model and per-class validation data."""
    from jax.flatten_util import ravel_pytree
    # Every class gets as many examples as the rarest class has.
    counts = np.bincount(np.asarray(self.fd.y_val),
                         minlength=self.fd.num_classes)
    if counts.min() == 0:
      raise ValueError(f"--aggregator={self.cfg.aggregator} needs validation "
                       "examples of every "
                       f"class; raise --val_size (now {self.cfg.val_size})")
    per_class = int(counts.min())
    val_x, val_y = data_lib.per_class_validation(self.fd, per_class)
    return {"apply_fn": self.model.apply,
            "unravel": ravel_pytree(self.variables["params"])[1],
            "val_x": jnp.asarray(val_x), "val_y": jnp.asarray(val_y),
            "num_clients": self.cfg.num_clients,
            "model_state": {k: v for k, v in self.variables.items()
                            if k != "params"}}

  def init_state(self):
    """The round-0 state: a ServerState, or a TwinState with ``twin``."""
    init = init_twin_state if self.cfg.twin else init_server_state
    return init(self.round_config, self.variables, self.aggregator,
                self.k_state, self.update_attack)

  def main_state(self, state):
    """The attacked run's ServerState of ``state``."""
    return state.main if self.cfg.twin else state

  def twin_state(self, state):
    """The unattacked twin's ServerState of ``state`` (``twin`` only)."""
    if not self.cfg.twin:
      raise ValueError("this experiment has no twin: set twin=True (--twin)")
    return state.twin

  def eval_state(self, state) -> dict:
    """Test loss and top-1/top-5 accuracy of a ServerState's model.

    Given a TwinState, evaluates the attacked run's model.
    """
    if isinstance(state, TwinState):
      state = state.main
    out = self.evaluate(state.params, state.model_state, self.x_test,
                        self.y_test)
    return {k: float(v) for k, v in out.items()}

  @property
  def has_asr(self) -> bool:
    return self.x_asr is not None

  def asr_state(self, state) -> float:
    """Attack success rate: the jitted evaluation's accuracy on the
    triggered non-target test set labelled with the target."""
    out = self.evaluate(state.params, state.model_state, self.x_asr,
                        self.y_asr)
    return float(out["accuracy"])

  @property
  def has_targeted(self) -> bool:
    return self.x_aux is not None

  @property
  def aux_size(self) -> int:
    """s, the size of the targeted attack's auxiliary set (0 if none)."""
    return 0 if self.y_aux is None else int(self.y_aux.shape[0])

  def targeted_accuracy_state(self, state) -> float:
    """Targeted attack accuracy (ALGORITHMS.md s. 7): the fraction of the
    auxiliary set that a ServerState's model classifies as the flipped
    labels."""
    out = self.evaluate(state.params, state.model_state, self.x_aux,
                        self.y_aux)
    return float(out["accuracy"])

  def oif(self, targeted_accuracy: float) -> float:
    """Outsized impact factor of sparsefed.txt B.1.6.

    ``|X_m| / (I n)`` with ``|X_m| = targeted_accuracy * s`` the auxiliary
    points poisoned, ``I = num_malicious / num_clients`` and ``n`` the
    training points held by all clients.
    """
    return float(metrics_lib.outsized_impact_factor(
        targeted_accuracy * self.aux_size, self.cfg.num_malicious,
        self.cfg.num_clients, self.num_datapoints))


def _config_dict(cfg: ExperimentConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d.pop("output_dir")
  return d


def _config_differences(old: dict, new: dict) -> list[str]:
  """Fields in which a saved configuration differs from a new one.

  Tolerant of fields added to :class:`ExperimentConfig` after the saved run
  was written (like ``experiments.sweep.same_config``): a field absent from
  ``old`` counts as equal when the new value is the field's default, so
  old runs still resume; keys of ``old`` that are no longer fields are
  ignored.
  """
  defaults = json.loads(json.dumps(_config_dict(ExperimentConfig())))
  new = json.loads(json.dumps(new))  # compare as saved (tuples -> lists)
  diff = []
  for k, value in new.items():
    if k not in old:
      if k not in defaults or value != defaults[k]:
        diff.append(f"{k} (not in the saved run, now {value!r})")
    elif old[k] != value:
      diff.append(f"{k} (saved {old[k]!r}, now {value!r})")
  return diff


def _mean(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


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


@functools.lru_cache(maxsize=64)
def _attack_space_of(cfg: ExperimentConfig) -> Optional[str]:
  """The run's threat model (:func:`fedjax_sparse.attacks.attack_space`),
  resolved once per configuration rather than in every round record."""
  from fedjax_sparse.attacks import attack_space
  return attack_space(cfg.attack, parse_kwargs(cfg.attack_args, "attack_args"))


def round_record(cfg: ExperimentConfig, round_: int, seconds: float,
                 get) -> dict:
  """The per-round record every run writes (``get(name)``: a round metric)."""
  rec = {"round": round_, "loss": float(get("loss")), "seconds": seconds,
         "update_norm": float(get("update_norm")),
         "uplink_bits": float(get("uplink_bits")),
         "downlink_bits": float(get("downlink_bits"))}
  # Only when some upload held inf/nan, so that other records keep their form.
  nonfinite = int(get("nonfinite_clients"))
  if nonfinite:
    rec["nonfinite_clients"] = nonfinite
  if cfg.attack != "none":
    n_mal = int(get("num_malicious"))
    n_ben = cfg.clients_per_round - n_mal
    active = bool(get("attack_active"))
    # Detection rates only where there is an attack to detect.
    rec.update({
        "attack_active": active,
        "num_malicious": n_mal,
        "tpr": (int(get("flagged_malicious")) / n_mal
                if active and n_mal else None),
        "fpr": (int(get("flagged_benign")) / n_ben
                if active and n_ben else None)})
    space = _attack_space_of(cfg)
    if space is not None:
      rec["attack_space"] = space
  return rec


def run_summary(cfg: ExperimentConfig, records: list[dict],
                last_eval: Optional[dict], compile_s: float,
                wall_seconds: float, num_params: int) -> dict:
  """The summary fields every run writes (extras are added by the caller)."""
  steady = [x["seconds"] for x in records]
  return {
      "config": _config_dict(cfg),
      "rounds": cfg.rounds,
      "final_accuracy": last_eval["accuracy"] if last_eval else None,
      "final_top5_accuracy": last_eval["top5_accuracy"] if last_eval else None,
      "final_test_loss": last_eval["test_loss"] if last_eval else None,
      "best_accuracy": max((x["accuracy"] for x in records if "accuracy" in x),
                           default=None),
      "compile_seconds": compile_s,
      "median_round_seconds": float(np.median(steady)) if steady else None,
      "wall_seconds": wall_seconds,
      "num_params": num_params,
      "uplink_bits_total": sum(x["uplink_bits"] for x in records),
      "downlink_bits_total": sum(x["downlink_bits"] for x in records),
      "mean_tpr": _mean([x.get("tpr") for x in records if x.get("attack_active")]),
      "mean_fpr": _mean([x.get("fpr") for x in records if x.get("attack_active")]),
      # Rounds in which the attack acted (None: no attack configured), so
      # that a defence cannot seem to hold against an attack that never ran.
      "attack_rounds": (None if cfg.attack == "none" else
                        sum(1 for x in records if x.get("attack_active"))),
      "backend": jax.default_backend(),
  }


def run_experiment(cfg: ExperimentConfig, progress: bool = True,
                   fd=None, on_round=None) -> dict:
  """Runs (or resumes) an experiment and returns its summary dict.

  With an ``output_dir`` the run holds its lock
  (:func:`fedjax_sparse.simulation.run_safety.output_lock`) throughout, and
  resumes only what it can resume exactly: a ValueError says why not where
  another run holds the directory, it holds another configuration, a
  corrupt checkpoint (:func:`fedjax_sparse.simulation.io.load_checkpoint`),
  more rounds than ``cfg.rounds``, or round records that do not cover its
  checkpoint, or it cannot be written. Nothing is written before these
  checks.

  ``on_round(record)`` (optional) is called after each round with the
  round's record, as written to ``rounds.jsonl`` (e.g. to drive a sweep's
  overall progress display).
  """
  exp = Experiment(cfg, fd)
  if not cfg.output_dir:
    return _run_experiment(exp, cfg, progress, on_round)
  with run_safety.output_lock(cfg.output_dir):
    return _run_experiment(exp, cfg, progress, on_round)


class SingleRunner:
  """One :class:`Experiment` as a runner of
  :func:`fedjax_sparse.simulation.loop.run_loop` (S = 1)."""

  def __init__(self, exp: Experiment):
    self.exp = exp
    cfg = exp.cfg
    self.cfgs = [cfg]
    self.output_dirs = [cfg.output_dir] if cfg.output_dir else None
    self.checkpoint = (os.path.join(cfg.output_dir, "checkpoint")
                       if cfg.output_dir else None)
    self.data = exp.data
    self.num_params = exp.layout.d
    self.final_eval_keys = (
        (["asr"] if exp.has_asr else [])
        + (["targeted_accuracy", "oif"] if exp.has_targeted else [])
        + (["twin_accuracy"] if cfg.twin else [])
        + (["twin_targeted_accuracy"] if cfg.twin and exp.has_targeted
           else []))

  def init_state(self):
    return self.exp.init_state()

  def resume(self, state):
    """The checkpointed state and its round records (or ``state`` and no
    records); refuses what cannot be resumed exactly (ValueError). Writes
    ``config.json``."""
    cfg = self.exp.cfg
    records: list[dict] = []
    if not cfg.output_dir:
      return state, [records]
    out_dir = cfg.output_dir
    ckpt = self.checkpoint
    cfg_path = os.path.join(out_dir, "config.json")
    rounds_path = os.path.join(out_dir, "rounds.jsonl")
    # Runs of earlier versions left a .npz checkpoint.
    resume_from = ckpt if io.checkpoint_exists(ckpt) else ckpt + ".npz"
    if io.checkpoint_exists(resume_from) and os.path.exists(cfg_path):
      old = io.read_json(cfg_path)
      if not isinstance(old, dict):
        raise ValueError(f"{cfg_path} is not a configuration (a JSON "
                         "object): it was damaged or written by something "
                         "else")
      # Neither changes the results: a run may be extended, or resumed
      # with another checkpoint interval. Under a learning-rate schedule
      # the rounds place the decay, so they must match.
      free = (("checkpoint_every",) if cfg.lr_decay_at
              else ("rounds", "checkpoint_every"))
      for k in free:
        old.pop(k, None)
      new = {k: v for k, v in _config_dict(cfg).items() if k not in free}
      diff = _config_differences(old, new)
      if diff:
        raise ValueError(f"{out_dir} holds a run of another configuration "
                         f"(it differs in {', '.join(diff)}); choose a new "
                         "--output_dir or delete it")
      state = io.load_checkpoint(resume_from, state)
      done = int(state.round)
      run_safety.check_rounds(done, cfg.rounds, out_dir)
      records = run_safety.resumed_records(rounds_path, done, resume_from)
    io.atomic_write_json(cfg_path, _config_dict(cfg))
    return state, [records]

  def compile(self, state):
    return self.exp.round_step.lower(state, self.exp.data).compile()

  def metrics(self, host: dict) -> list[dict]:
    return [host]

  def evaluate(self, state) -> list[dict]:
    exp = self.exp
    main = exp.main_state(state)
    ev = exp.eval_state(main)
    rec = {"test_loss": ev["loss"], "accuracy": ev["accuracy"],
           "top5_accuracy": ev["top5_accuracy"]}
    if exp.has_asr:
      rec["asr"] = exp.asr_state(main)
    if exp.has_targeted:
      rec["targeted_accuracy"] = exp.targeted_accuracy_state(main)
      rec["oif"] = exp.oif(rec["targeted_accuracy"])
    if exp.cfg.twin:
      twin = exp.twin_state(state)
      rec["twin_accuracy"] = exp.eval_state(twin)["accuracy"]
      if exp.has_targeted:
        rec["twin_targeted_accuracy"] = exp.targeted_accuracy_state(twin)
    return [rec]

  def summary_extras(self, i: int, records, last_eval) -> dict:
    if self.exp.has_targeted:
      return {"test_size": int(self.exp.y_test.shape[0])}
    return {}


def _run_experiment(exp: Experiment, cfg: ExperimentConfig, progress: bool,
                    on_round=None) -> dict:
  from fedjax_sparse.simulation.loop import run_loop
  return run_loop(SingleRunner(exp), progress=progress,
                  on_round=(None if on_round is None
                            else lambda i, rec: on_round(rec)))[0]
