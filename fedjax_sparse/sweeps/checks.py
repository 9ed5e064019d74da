"""Checks of a sweep's cells before any of them runs.

Every cell is validated (names, ranges, hyperparameters, the dataset) before
the first one is compiled, so that a bad setting in the tenth cell does not
surface an hour into the sweep; the message names the cell and what to
change.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Sequence

from fedjax_sparse.simulation.experiment import ExperimentConfig, parse_kwargs
from fedjax_sparse.sweeps.grid import Cell


def _check_hyperparameters(cfg: ExperimentConfig) -> None:
  """Builds the aggregator and binds the attack's arguments (no compiling)."""
  from fedjax_sparse import aggregators as aggregators_lib
  from fedjax_sparse import attacks as attacks_lib
  from fedjax_sparse import requirements
  kwargs = parse_kwargs(cfg.aggregator_args)
  try:
    factory = aggregators_lib.get(cfg.aggregator)
    if requirements.needs_of(factory) & {requirements.MODEL,
                                         requirements.POPULATION}:
      inspect.signature(factory).bind_partial(**kwargs)  # the model comes later
    elif requirements.SERVER in requirements.needs_of(factory):
      factory(**{**requirements.server_arguments(cfg), **kwargs})
    else:
      factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"cannot build aggregator {cfg.aggregator!r} with "
                     f"arguments {kwargs}: {e}; set them with "
                     "--aggregator_args_by_name or --aggregator_args") from None
  if cfg.attack == "none":
    return
  kwargs = parse_kwargs(cfg.attack_args)
  if attacks_lib.is_update_attack(cfg.attack):
    # The attack builder supplies masks and auxiliary sets from the data.
    from fedjax_sparse.attacks.builder import accepted_arguments
    unknown = sorted(set(kwargs) - set(accepted_arguments(cfg.attack)))
    if unknown:
      raise ValueError(f"cannot build attack {cfg.attack!r}: it takes no "
                       f"argument(s) {', '.join(unknown)}; it accepts: "
                       f"{', '.join(accepted_arguments(cfg.attack))}")
    return
  else:
    factory = attacks_lib.get_data_attack(cfg.attack)
    fixed = {"num_classes": 2}  # only bound, never built: the data decides C
  try:
    inspect.signature(factory).bind(**fixed, **kwargs)
  except TypeError as e:
    raise ValueError(f"cannot build attack {cfg.attack!r} with arguments "
                     f"{kwargs}: {e}; set them with --attack_args_by_name or "
                     "--attack_args") from None


def ineffective_flags(cells: Sequence[Cell],
                      given: Iterable[str]) -> tuple[list[str], list[str]]:
  """``(errors, warnings)`` about the settings given that no cell of the
  grid uses (:mod:`fedjax_sparse.simulation.flag_checks`).

  Args:
    cells: the grid.
    given: the names of the :class:`ExperimentConfig` fields the user set
      (flags on the command line or in a flagfile, a config's ``base``);
      a grid of top-k ratios counts as ``topk_ratio``.

  Returns:
    The messages every cell shares, each naming the flag and what would make
    it count, sorted.
  """
  from fedjax_sparse.simulation import flag_checks
  given = set(given)
  errors = warnings = None
  for cell in cells:
    e, w = flag_checks.ineffective(cell.config, given)
    errors = set(e) if errors is None else errors & set(e)
    warnings = set(w) if warnings is None else warnings & set(w)
  # Messages name one cell's value; keep those every cell shares, by flag.
  return sorted(errors or ()), sorted(warnings or ())


def check_cells(cells: Sequence[Cell], check_data: bool = True) -> None:
  """Validates every cell before any runs; raises ValueError naming the cell."""
  if not cells:
    raise ValueError("the grid is empty")
  for i, cell in enumerate(cells):
    try:
      cell.config.validate(check_data=check_data and i == 0)
      _check_hyperparameters(cell.config)
    except ValueError as e:
      raise ValueError(f"cell {cell.name}: {e}") from None
