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

from fedjax_sparse import data as data_lib
from fedjax_sparse import requirements
from fedjax_sparse.config import fields
# parse_kwargs, parse_width and the choices: importable from here as before.
from fedjax_sparse.config.parsing import parse_kwargs, parse_width
from fedjax_sparse.config.sections import (MALICIOUS_MODES, PARTITIONS,
                                           SECTIONS, ClientConfig)
from fedjax_sparse.simulation.round_config import RoundConfig

__all__ = ["MALICIOUS_MODES", "PARTITIONS", "ExperimentConfig", "config_dict",
           "config_differences", "parse_kwargs", "parse_width"]


@fields.flat_view(*SECTIONS)
class ExperimentConfig:
  """A whole experiment: the flat view of the configuration tree.

  One field per command-line flag of ``experiments.run``, the fields of
  the sections of :mod:`fedjax_sparse.config.sections` in their order (which
  is ``config.json``'s); each field's default, help and checks are in its
  declaration there, and the sections' docs say what the fields mean.
  """

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
    return fields.view(ClientConfig, self)

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
    return fields.view(RoundConfig, self, client=self.client_config(),
                       num_byzantine=self.byzantine,
                       lr_decay_round=self.lr_decay_round)

  def validate(self, check_data: bool = True) -> None:
    """Raises ValueError (or DatasetNotFoundError) saying what to change.

    Every field's own checks (in flag order), then the relations between
    sections, then (``check_data``) that the dataset can be found.
    """
    fields.validate(self)
    if not -1 <= self.num_byzantine < self.clients_per_round:
      raise ValueError(f"num_byzantine must be -1 (automatic) or in "
                       f"[0, clients_per_round), got {self.num_byzantine}")
    attack_kwargs = parse_kwargs(self.attack_args, "attack_args")
    if attack_kwargs.get("space") == "model" and self.update_mode != "delta":
      raise ValueError(
          f"--attack_args=space=model crafts the uploaded model, which needs "
          f"clients that upload models (--update_mode=delta); with "
          f"--update_mode={self.update_mode} use space=update")
    if self.attack != "none" and self.num_malicious == 0:
      raise ValueError(f"--attack={self.attack} needs malicious clients: set "
                       "--malicious_fraction (e.g. 0.4)")
    if self.attack != "none" and self.attack_start > self.rounds:
      raise ValueError(
          f"--attack_start={self.attack_start} is after the last round "
          f"(--rounds={self.rounds}): --attack={self.attack} would never be "
          f"active; lower --attack_start (1: from the first round)")
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
