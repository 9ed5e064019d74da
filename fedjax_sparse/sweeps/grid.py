"""The grid of a sweep: its cells and their names.

A cell is one :class:`ExperimentConfig` of the grid attacks x defences x
malicious fractions x top-k ratios x seeds, named
``<attack>__<defence>__mf<fraction>__topk<ratio>|dense__seed<seed>`` and run
into ``<output_dir>/<name>/``. The names are the cells' directories: a sweep
started again finds its finished cells by them, so they never change.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from fedjax_sparse.simulation.experiment import ExperimentConfig
from fedjax_sparse.sweeps import tables
from fedjax_sparse.sweeps.tables import AGGREGATOR_ALIASES, ATTACK_ALIASES


@dataclasses.dataclass(frozen=True)
class Cell:
  """One configuration of the grid and where its results go.

  Attributes:
    name: the cell's name (its directory under the sweep's output).
    config: the cell's configuration.
    preset: the defence preset the cell runs ("" for a plain rule).
    preset_fields: the preset's ``(field, value)`` pairs.
    defence_fields: the ``(field, value)`` pairs that
      ``--aggregator_fields_by_name`` set for the cell's defence.
  """

  name: str
  config: ExperimentConfig
  preset: str = ""
  preset_fields: tuple = ()
  defence_fields: tuple = ()

  @property
  def attack(self) -> str:
    return self.config.attack

  @property
  def aggregator(self) -> str:
    """The aggregation rule (a preset's rule for a preset cell)."""
    return self.config.aggregator

  @property
  def defence(self) -> str:
    """The defence's name in reports: the preset, else the rule."""
    return self.preset or self.config.aggregator

  @property
  def malicious_fraction(self) -> float:
    return self.config.malicious_fraction

  @property
  def topk_ratio(self) -> Optional[float]:
    return self.config.topk_ratio if self.config.sparsify == "topk" else None

  @property
  def seed(self) -> int:
    return self.config.seed

  @property
  def dir(self) -> str:
    return self.config.output_dir


def _num(x: float) -> str:
  return f"{x:g}"


def cell_name(cfg: ExperimentConfig, defence: Optional[str] = None) -> str:
  """``<attack>__<defence>__mf<fraction>__topk<ratio>|dense__seed<seed>``.

  Args:
    cfg: the cell's configuration.
    defence: the preset's name, in place of ``cfg.aggregator``.
  """
  ratio = f"topk{_num(cfg.topk_ratio)}" if cfg.sparsify == "topk" else "dense"
  return (f"{cfg.attack}__{defence or cfg.aggregator}"
          f"__mf{_num(cfg.malicious_fraction)}__{ratio}__seed{cfg.seed}")


def make_cells(base: ExperimentConfig,
               attacks: Sequence[str] = (),
               aggregators: Sequence[str] = (),
               malicious_fractions: Sequence[float] = (),
               topk_ratios: Sequence[float] = (),
               seeds: Sequence[int] = (),
               attack_args_by_name: Optional[dict] = None,
               aggregator_args_by_name: Optional[dict] = None,
               presets: Optional[dict] = None,
               aggregator_fields_by_name: Optional[dict] = None) -> list[Cell]:
  """The grid's cells (seed-major, deduplicated), each with its own
  ``output_dir`` under ``base.output_dir``.

  An empty sequence keeps the base configuration's value. Attack ``"none"``
  forces the malicious fraction to 0 (and drops the attack arguments).

  Args:
    base: the configuration every cell starts from.
    attacks: attack names (aliases allowed; ``"none"``: no attack).
    aggregators: defences: aggregator names (aliases allowed) or preset
      names (:data:`DEFENCE_PRESETS` and ``presets``).
    malicious_fractions: malicious fractions of the grid.
    topk_ratios: top-k ratios of the grid.
    seeds: seeds of the grid.
    attack_args_by_name: attack name -> ``"k=v,k=v"``.
    aggregator_args_by_name: aggregator or preset name -> ``"k=v,k=v"``; a
      preset's entry comes first, then the preset's ``aggregator_args``,
      then its rule's entry, then ``base.aggregator_args``.
    presets: preset name -> fields (``{field: value}`` or
      ``"field=value,..."``), defining presets or replacing built-in ones.
    aggregator_fields_by_name: aggregator or preset name -> configuration
      fields (``{field: value}`` or ``"field=value,..."``,
      :func:`defence_fields`) of that defence's cells, e.g.
      ``{"sparsefed": "server_optimizer=sgd"}``. A preset's cells take
      its rule's entry, then the preset's fields, then the preset's entry.

  Raises:
    ValueError: an unknown name in the ``*_by_name`` tables, a bad preset
      or field entry, several top-k ratios without top-k sparsification.
  """
  table = tables.resolve_presets(presets)
  canonical = tables.canonical

  def defence(name: str) -> str:
    name = name.strip()
    return name.lower() if name.lower() in table else canonical(
        name, AGGREGATOR_ALIASES)

  attacks = [canonical(a, ATTACK_ALIASES) for a in attacks] or [base.attack]
  aggregators = list(dict.fromkeys(
      defence(a) for a in (list(aggregators) or [base.aggregator])))
  fractions = list(malicious_fractions) or [base.malicious_fraction]
  ratios = list(topk_ratios) or [base.topk_ratio]
  seeds = list(seeds) or [base.seed]
  attack_args_by_name = {canonical(k, ATTACK_ALIASES): v for k, v in
                         (attack_args_by_name or {}).items()}
  aggregator_args_by_name = {defence(k): v for k, v in
                             (aggregator_args_by_name or {}).items()}
  if base.sparsify != "topk" and len(set(ratios)) > 1:
    raise ValueError("--topk_ratios has several values but --sparsify="
                     f"{base.sparsify}: set --sparsify=topk")
  from fedjax_sparse import aggregators as aggregators_lib
  from fedjax_sparse import attacks as attacks_lib
  for name in attack_args_by_name:
    if name not in attacks_lib.names():
      raise ValueError(f"--attack_args_by_name names an unknown attack "
                       f"{name!r}; known attacks: {', '.join(attacks_lib.names())}")
  fields_by_name = {defence(k): v for k, v in
                    (aggregator_fields_by_name or {}).items()}
  for flag, names in (("aggregator_args_by_name", aggregator_args_by_name),
                      ("aggregator_fields_by_name", fields_by_name)):
    for name in names:
      if name not in aggregators_lib.names() and name not in table:
        raise ValueError(f"--{flag} names an unknown "
                         f"aggregator {name!r}; known aggregators: "
                         f"{', '.join(aggregators_lib.names())}; presets: "
                         f"{', '.join(sorted(table))}")
  fields_by_name = {k: tables.defence_fields(k, v)
                    for k, v in fields_by_name.items()}
  root = base.output_dir
  cells: dict[str, Cell] = {}
  for seed in seeds:
    for attack in attacks:
      for agg in aggregators:
        fields = dict(table.get(agg, {"aggregator": agg}))
        rule = fields["aggregator"]
        if agg in table and agg in aggregator_args_by_name:
          agg_args = aggregator_args_by_name[agg]
        elif "aggregator_args" in fields:
          agg_args = fields["aggregator_args"]
        else:
          agg_args = aggregator_args_by_name.get(rule, base.aggregator_args)
        fields["aggregator_args"] = agg_args
        own = {}
        if agg in table:  # a preset: its rule's entry, under its fields
          own.update({k: v for k, v in fields_by_name.get(rule, {}).items()
                      if k not in table[agg]})
        own.update(fields_by_name.get(agg, {}))
        fields.update(own)
        for frac in fractions:
          for ratio in ratios:
            cfg = dataclasses.replace(
                base, **fields, attack=attack, seed=int(seed),
                malicious_fraction=0.0 if attack == "none" else float(frac),
                attack_args=("" if attack == "none" else
                             attack_args_by_name.get(attack, base.attack_args)),
                topk_ratio=float(ratio))
            preset = agg if agg in table else ""
            name = cell_name(cfg, preset or None)
            if name not in cells:
              cfg = dataclasses.replace(
                  cfg, output_dir=os.path.join(root, name) if root else "")
              cells[name] = Cell(name, cfg, preset, tuple(
                  (k, v) for k, v in table[agg].items()) if preset else (),
                  tuple(own.items()))
  return list(cells.values())
