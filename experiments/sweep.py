r"""Runs a grid of attacks x defences x malicious fractions x top-k ratios x seeds.

Example::

  python -m experiments.sweep --flagfile=experiments/configs/flare_sweep.flags
  python -m experiments.sweep --flagfile=experiments/configs/flare_sweep.flags \
      --attacks=none,ipm --aggregators=fedavg,median --seeds=0,1 \
      --output_dir=runs/small
  python -m experiments.sweep --flagfile=... --report_only

Every flag of ``experiments.run`` (every field of
:class:`fedjax_sparse.simulation.ExperimentConfig`) sets the base
configuration; the grid flags below replace one field per cell (an empty grid
flag keeps the base value: ``--attacks`` empty runs ``--attack``). Each cell
runs with :func:`run_experiment` into ``<output_dir>/<cell name>/``, so

* a killed cell started again resumes from its last finished round (its
  ``checkpoint/``, see ``--checkpoint_every``);
* a cell whose ``summary.json`` holds the same configuration is skipped.

``--batch_seeds`` trains the seeds of a cell together in one compiled step
(:mod:`fedjax_sparse.simulation.multi_seed`; on a CPU split into host
devices, each device runs whole seeds): the seeds then share one data
partition (``--data_seed``, or the first of ``--seeds``), and a killed batch
resumes from its last checkpointed round.

``none`` is an attack (no attackers: the cell's malicious fraction is 0, and
one such cell per defence, ratio and seed is run whatever
``--malicious_fractions`` says). Names may be written as the papers write
them (``lfa``, ``bit_flip``; ``cm``, ``tm``, ``cc``).

Attack and aggregator hyperparameters that differ per name go in
``--attack_args_by_name`` / ``--aggregator_args_by_name``, e.g.
``'ipm:eps=0.4;label_flip:mapping=circular'``; a name without an entry gets
``--attack_args`` / ``--aggregator_args``.

Other configuration fields that differ per defence go in
``--aggregator_fields_by_name``, in the same language with fields of
:class:`ExperimentConfig` (as in a preset) for arguments, e.g. the server
optimizer of SparseFed's comparison, where the baselines get the server
momentum that SparseFed keeps inside the rule (its ``rho``)::

  --server_optimizer=momentum --server_momentum=0.9
  --aggregator_fields_by_name='sparsefed:server_optimizer=sgd;fetchsgd:server_optimizer=sgd'

or, the other way round, ``'fedavg:server_optimizer=momentum,
server_momentum=0.9;clipping:server_optimizer=momentum,server_momentum=0.9'``.
An entry may not set the grid's axes, ``aggregator`` or ``aggregator_args``
(use a preset, ``--aggregator_args_by_name``). The cells keep their names;
the entries used are listed in ``results.md``. A preset's cells take its
rule's entry first, then the preset's own fields, then an entry keyed by
the preset's name.

Defence presets: a name in ``--aggregators`` may also be a preset, an
aggregation rule together with other configuration fields, for the baselines
that change local training rather than aggregation. Built in
(:data:`DEFENCE_PRESETS`): ``fedprox`` (fedavg with ``prox_mu=0.01``) and
``scaffold`` (fedavg with ``scaffold=True``). ``--presets`` defines more or
replaces these, e.g.
``'fedprox:prox_mu=0.1;sf:aggregator=sparsefed,aggregator_args=k=0.05,rho=0'``
(fields of :class:`ExperimentConfig`; ``aggregator`` names the rule, fedavg
when left out; quote a value holding a ``name=`` pair whose name is also a
field: ``aggregator_args='k=0.01,weighted=False'``). A preset's cells, rows and
columns are named by the preset (``ipm__fedprox__mf0.2__dense__seed0``), and
``--aggregator_args_by_name`` keyed by a preset's name applies to it (before
the preset's own ``aggregator_args``, then the rule's entry).

After the cells (or right away with ``--report_only``) the binary writes,
atomically, into ``--output_dir``:

* ``results.csv``: one row per cell (its ``aggregator`` column names the
  defence: the preset for a preset's cells);
* ``results.md``: final accuracy (mean over seeds), attacks as rows and
  defences as columns, one table per (malicious fraction, top-k ratio); in
  the same layout, where some finished cell reports them, the final attack
  success rate (backdoor attacks), targeted accuracy, outsized impact factor
  (OIF) and L1 distance to the unattacked twin; the mean TPR / FPR of the
  defences that flag clients; and the presets used;
* ``heatmap.png``: the same accuracy tables as annotated heatmaps;
* ``curves_<attack>.png``: test accuracy (and ASR, targeted accuracy) per
  round of every defence under that attack (mean over seeds), the attack
  start marked.

A cell counts as finished when its ``summary.json`` holds its configuration;
fields added to :class:`ExperimentConfig` after the run count as equal when
the cell keeps their default.

Every cell is checked (names, ranges, hyperparameters, the dataset) before
any is run; a bad flag fails with a message saying what to change.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/cli.py
  from fedjax_sparse import cli as _cli
  _cli.prepare()

import collections
import contextlib
import csv
import dataclasses
import inspect
import io as _io
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

from absl import flags
import numpy as np

# Importing the single-run binary defines one flag per ExperimentConfig field.
from experiments import run as run_lib  # noqa: F401
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation import run_safety
from fedjax_sparse.simulation.experiment import ExperimentConfig, parse_kwargs

flags.DEFINE_list("attacks", [], "Attacks of the grid (comma-separated; "
                  "'none' = no attack). Empty: --attack. Known: "
                  + run_lib.ATTACK_NAMES + ".")
flags.DEFINE_list("aggregators", [], "Defences of the grid: aggregators or "
                  "defence presets (fedprox, scaffold, --presets). Empty: "
                  "--aggregator. Aggregators: " + run_lib.AGGREGATOR_NAMES
                  + ".")
flags.DEFINE_list("malicious_fractions", [], "Malicious fractions of the grid. "
                  "Empty: --malicious_fraction.")
flags.DEFINE_list("topk_ratios", [], "Top-k ratios of the grid (needs "
                  "--sparsify=topk when more than one). Empty: --topk_ratio.")
flags.DEFINE_list("seeds", [], "Seeds of the grid. Empty: --seed.")
flags.DEFINE_string("attack_args_by_name", "", "Per-attack hyperparameters: "
                    "'name:k=v,k=v;name:k=v' (others get --attack_args).")
flags.DEFINE_string("aggregator_args_by_name", "", "Per-aggregator (or "
                    "per-preset) hyperparameters: 'name:k=v,k=v;name:k=v' "
                    "(others get --aggregator_args).")
flags.DEFINE_string("aggregator_fields_by_name", "", "Per-aggregator (or "
                    "per-preset) configuration fields: "
                    "'name:field=value,field=value;name:...' (fields of "
                    "ExperimentConfig other than the grid's axes, aggregator "
                    "and aggregator_args), e.g. "
                    "'sparsefed:server_optimizer=sgd;fedavg:server_momentum="
                    "0.9'. Others keep the base flags.")
flags.DEFINE_string("presets", "", "Defence presets usable in --aggregators: "
                    "'name:field=value,field=value;name:...' (fields of "
                    "ExperimentConfig; aggregator names the rule, fedavg when "
                    "left out). Replaces a built-in preset of that name "
                    "(fedprox, scaffold).")
flags.DEFINE_boolean("report_only", False, "Do not run: write the report "
                     "from the cells already on disk.")
flags.DEFINE_boolean("cell_progress", False, "Show a progress bar per cell "
                     "(instead of the sweep's).")
flags.DEFINE_boolean("progress", True, "Show one progress bar over the whole "
                     "sweep: rounds done, the current cell, its accuracy and "
                     "the ETA (updated every 30 s when stderr is not a "
                     "terminal).")
flags.DEFINE_boolean("batch_seeds", False, "Train the seeds of each cell "
                     "together in one compiled step (fedjax_sparse."
                     "simulation.multi_seed). The seeds then share one data "
                     "partition: --data_seed, or the first of --seeds when "
                     "it is -1. Cells whose extras need separate runs "
                     "(--twin, targeted_pgd, hsa/dhsa) run separately.")
flags.DEFINE_enum("seed_mode", "auto", ["auto", "map", "vmap", "shard"],
                  "With --batch_seeds: how the seeds share the step (auto: "
                  "shard the seeds over the host devices on CPU, vmap on "
                  "accelerators).")
FLAGS = flags.FLAGS

# Names as the papers write them -> registry names.
from fedjax_sparse.aggregators.registry import ALIASES as AGGREGATOR_ALIASES
from fedjax_sparse.attacks.registry import ALIASES as ATTACK_ALIASES
# Defence presets: the baselines that are an aggregation rule plus a client
# or server setting. FedProx (Li et al., MLSys 2020, eq. 2) adds
# mu/2 ||w - w_t||^2 to the local loss; mu = 0.01 is the value the
# class-aware masking paper sets for its FedProx baseline following prior
# work (class_aware_masking.txt 5.1.5). SCAFFOLD (Karimireddy et al., ICML
# 2020) corrects local steps with control variates.
DEFENCE_PRESETS = {
    "fedprox": {"aggregator": "fedavg", "prox_mu": 0.01},
    "scaffold": {"aggregator": "fedavg", "scaffold": True},
}
# Axes of the grid other than the defence: a preset may not set them.
_GRID_FIELDS = ("attack", "attack_args", "malicious_fraction", "topk_ratio",
                "seed", "output_dir")
# Fields whose values are 'name=value,...' lists (may hold commas).
_ARGS_FIELDS = ("aggregator_args", "attack_args")
# Fields of ExperimentConfig that decide the federated data (cells that agree
# on them share one FederatedData).
_DATA_FIELDS = ("dataset", "data_dir", "max_train", "val_size", "partition",
                "alpha", "shards_per_client", "min_samples", "num_clients",
                "effective_data_seed")
CSV_COLUMNS = ("cell", "status", "attack", "aggregator", "malicious_fraction",
               "sparsify", "topk_ratio", "seed", "rounds", "final_accuracy",
               "best_accuracy", "final_top5_accuracy", "final_asr",
               "final_l1_to_twin", "final_twin_accuracy",
               "final_targeted_accuracy", "final_oif", "mean_tpr", "mean_fpr",
               "uplink_bits_total", "downlink_bits_total", "wall_seconds", "compile_seconds")
# The columns read from summary.json.
_SUMMARY_COLUMNS = CSV_COLUMNS[CSV_COLUMNS.index("final_accuracy"):]


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


def parse_args_by_name(text: str, what: str) -> dict[str, str]:
  """``'ipm:eps=0.4;label_flip:mapping=circular'`` -> ``{name: args}``."""
  out = {}
  for item in filter(None, (t.strip() for t in text.split(";"))):
    if ":" not in item:
      raise ValueError(f"bad --{what}_args_by_name entry {item!r}: write "
                       f"'name:k=v,k=v' entries separated by ';'")
    name, args = (t.strip() for t in item.split(":", 1))
    parse_kwargs(args, f"{what}_args of {name}")
    out[name] = args
  return out


def parse_fields_by_name(text: str) -> dict[str, str]:
  """``'sparsefed:server_optimizer=sgd;fedavg:server_momentum=0.9'`` ->
  ``{name: fields}`` (the fields stay text; :func:`make_cells` checks them
  with :func:`defence_fields`)."""
  out = {}
  for item in filter(None, (t.strip() for t in text.split(";"))):
    if ":" not in item:
      raise ValueError(f"bad --aggregator_fields_by_name entry {item!r}: write "
                       "'name:field=value,field=value' entries separated by "
                       "';'")
    name, fields = (t.strip() for t in item.split(":", 1))
    out[name] = fields
  return out


# Fields an --aggregator_fields_by_name entry may not set (besides the grid's
# axes): the rule and its arguments have flags of their own.
_NOT_DEFENCE_FIELDS = ("aggregator", "aggregator_args")


def defence_fields(name: str, fields: Any) -> dict[str, Any]:
  """One ``--aggregator_fields_by_name`` entry's fields, checked and typed.

  Args:
    name: the aggregator or preset the entry is for (for messages).
    fields: ``{field: value}`` or the text ``'field=value,field=value'``
      (fields of :class:`ExperimentConfig`).

  Raises:
    ValueError: an unknown field (the message lists the valid ones), an axis
      of the grid, ``aggregator``/``aggregator_args``, a field set twice or
      a value of the wrong type.
  """
  pairs = (_split_preset_fields(fields) if isinstance(fields, str)
           else list(dict(fields).items()))
  known = _config_fields()
  valid = [f for f in known
           if f not in _GRID_FIELDS and f not in _NOT_DEFENCE_FIELDS]
  where = f"--aggregator_fields_by_name entry {name!r}"
  out = {}
  for key, value in pairs:
    if key not in known:
      raise ValueError(f"{where}: unknown field {key!r}; valid fields: "
                       f"{', '.join(valid)}")
    if key in _GRID_FIELDS:
      raise ValueError(f"{where} sets {key!r}, an axis of the grid (set it "
                       "with the grid flags)")
    if key in _NOT_DEFENCE_FIELDS:
      raise ValueError(f"{where} sets {key!r}: set the rule's arguments with "
                       "--aggregator_args_by_name, another rule with "
                       "--presets")
    if key in out:
      raise ValueError(f"{where} sets {key!r} twice")
    f = known[key]
    default = (f.default if f.default is not dataclasses.MISSING
               else f.default_factory())
    out[key] = _coerce(value, default, f"field {key!r} of {where}")
  return out


def _config_fields() -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(ExperimentConfig)}


def _split_preset_fields(text: str) -> list[tuple[str, str]]:
  """``'aggregator=sparsefed,aggregator_args=k=0.01,clip_norm=5'`` -> pairs.

  A comma starts a new pair when a ``name=`` follows (the rule of
  :func:`parse_kwargs`), unless the open value is a quoted string, or it
  belongs to an ``*_args`` field and ``name`` is no ExperimentConfig field:
  then the comma and the pair are part of that value.
  """
  fields = _config_fields()
  pairs: list[list[str]] = []
  for item in filter(None, (t.strip() for t in
                            re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text))):
    if pairs:
      key, value = pairs[-1]
      quote = value[:1]
      unclosed = (quote in ("'", '"')
                  and (len(value) < 2 or not value.endswith(quote)))
      name = item.split("=", 1)[0].strip()
      if unclosed or (key in _ARGS_FIELDS and name not in fields):
        pairs[-1][1] = f"{value},{item}"
        continue
    if "=" not in item:
      raise ValueError(f"bad preset field {item!r}: write field=value pairs "
                       "separated by commas")
    key, value = (t.strip() for t in item.split("=", 1))
    pairs.append([key, value])
  return [(k, v) for k, v in pairs]


def _unquote(value: str) -> str:
  if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
    return value[1:-1]
  return value


def _coerce(value: Any, default: Any, where: str) -> Any:
  """``value`` (a flag string or a Python value) as the field's type."""
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    text = _unquote(str(value)).strip().lower()
    if text in ("true", "1", "yes"):
      return True
    if text in ("false", "0", "no"):
      return False
    raise ValueError(f"{where} takes true or false, got {value!r}")
  if isinstance(default, (int, float)):
    kind = type(default)
    try:
      if isinstance(value, str):
        value = _unquote(value).strip()
        out = kind(float(value)) if kind is int else float(value)
        if kind is int and out != float(value):
          raise ValueError
        return out
      if isinstance(value, bool):
        raise ValueError
      return kind(value)
    except (TypeError, ValueError):
      raise ValueError(f"{where} takes "
                       f"{'an integer' if kind is int else 'a number'}, got "
                       f"{value!r}") from None
  if value is None:
    return None
  return _unquote(value) if isinstance(value, str) else value


def preset_fields(name: str, fields: Any) -> dict[str, Any]:
  """A preset's configuration fields, checked and typed.

  Args:
    name: the preset's name (lower case, letters, digits, ``_``, ``-``,
      ``.``; no ``__``; not an aggregator's name or alias).
    fields: ``{field: value}`` or the text ``'field=value,field=value'``;
      ``aggregator`` (an alias is resolved) defaults to ``fedavg``.

  Returns:
    ``{field: value}`` with the values of the fields' types and
    ``aggregator`` set.

  Raises:
    ValueError: a bad name, an unknown field (the message lists the valid
      ones), a field of the grid, a value of the wrong type or an unknown
      aggregator.
  """
  from fedjax_sparse import aggregators as aggregators_lib
  if (not re.fullmatch(r"[a-z0-9][a-z0-9_.\-]*", name) or "__" in name):
    raise ValueError(f"bad preset name {name!r}: use lower-case letters, "
                     "digits, '_', '-' and '.' (no '__')")
  if name in aggregators_lib.names() or name in AGGREGATOR_ALIASES:
    raise ValueError(f"preset {name!r} has an aggregator's name: choose "
                     "another name")
  pairs = (_split_preset_fields(fields) if isinstance(fields, str)
           else list(dict(fields).items()))
  known = _config_fields()
  valid = [f for f in known if f not in _GRID_FIELDS]
  has_args = any(k in _ARGS_FIELDS for k, _ in pairs)
  hint = ("; quote an aggregator_args value that holds it: "
          "aggregator_args='k=1,seed=0'" if has_args else "")
  out = {}
  for key, value in pairs:
    if key not in known:
      raise ValueError(f"preset {name!r}: unknown field {key!r}; valid "
                       f"fields: {', '.join(valid)}{hint}")
    if key in _GRID_FIELDS:
      raise ValueError(f"preset {name!r} sets {key!r}, an axis of the grid "
                       "(set it with the grid flags); valid fields: "
                       f"{', '.join(valid)}{hint}")
    if key in out:
      raise ValueError(f"preset {name!r} sets {key!r} twice")
    f = known[key]
    default = (f.default if f.default is not dataclasses.MISSING
               else f.default_factory())
    out[key] = _coerce(value, default, f"field {key!r} of preset {name!r}")
  rule = _canonical(str(out.get("aggregator", "fedavg")), AGGREGATOR_ALIASES)
  if rule not in aggregators_lib.names():
    raise ValueError(f"preset {name!r} names an unknown aggregator {rule!r}; "
                     f"known aggregators: {', '.join(aggregators_lib.names())}")
  out = {"aggregator": rule, **{k: v for k, v in out.items()
                                 if k != "aggregator"}}
  if "aggregator_args" in out:
    parse_kwargs(out["aggregator_args"], f"aggregator_args of preset {name}")
  return out


def parse_presets(text: str) -> dict[str, str]:
  """``'fedprox:prox_mu=0.1;sf:aggregator=sparsefed'`` -> ``{name: fields}``.

  The fields stay text; :func:`make_cells` checks them
  (:func:`preset_fields`).
  """
  out = {}
  for item in filter(None, (t.strip() for t in text.split(";"))):
    if ":" not in item:
      raise ValueError(f"bad --presets entry {item!r}: write "
                       "'name:field=value,field=value' entries separated by "
                       "';'")
    name, fields = (t.strip() for t in item.split(":", 1))
    out[name.lower()] = fields
  return out


def resolve_presets(presets: Optional[dict] = None) -> dict[str, dict]:
  """The built-in presets with ``presets`` (name -> fields) over them, all
  checked by :func:`preset_fields`."""
  table = {**DEFENCE_PRESETS,
           **{k.strip().lower(): v for k, v in (presets or {}).items()}}
  return {name: preset_fields(name, fields) for name, fields in table.items()}


def _floats(values: Sequence[str], flag: str) -> list[float]:
  out = []
  for v in values:
    try:
      out.append(float(v))
    except ValueError:
      raise ValueError(f"--{flag} takes numbers separated by commas, got "
                       f"{v!r}") from None
  return out


def _ints(values: Sequence[str], flag: str) -> list[int]:
  out = []
  for v in values:
    try:
      out.append(int(v))
    except ValueError:
      raise ValueError(f"--{flag} takes integers separated by commas, got "
                       f"{v!r}") from None
  return out


def _canonical(name: str, aliases: dict) -> str:
  name = name.strip()
  return aliases.get(name.lower(), name)


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
  table = resolve_presets(presets)

  def defence(name: str) -> str:
    name = name.strip()
    return name.lower() if name.lower() in table else _canonical(
        name, AGGREGATOR_ALIASES)

  attacks = [_canonical(a, ATTACK_ALIASES) for a in attacks] or [base.attack]
  aggregators = list(dict.fromkeys(
      defence(a) for a in (list(aggregators) or [base.aggregator])))
  fractions = list(malicious_fractions) or [base.malicious_fraction]
  ratios = list(topk_ratios) or [base.topk_ratio]
  seeds = list(seeds) or [base.seed]
  attack_args_by_name = {_canonical(k, ATTACK_ALIASES): v for k, v in
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
  fields_by_name = {k: defence_fields(k, v) for k, v in fields_by_name.items()}
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


def config_from_flag_values(fv: flags.FlagValues) -> ExperimentConfig:
  """The base configuration from parsed flags (as ``experiments.run`` does)."""
  kwargs = {f.name: getattr(fv, f.name)
            for f in dataclasses.fields(ExperimentConfig)}
  if kwargs["data_dir"] == "":
    kwargs["data_dir"] = None
  return ExperimentConfig(**kwargs)


def cells_from_flags(fv: flags.FlagValues = FLAGS) -> list[Cell]:
  """The grid described by parsed flags (raises ValueError on bad values)."""
  base = config_from_flag_values(fv)
  return make_cells(
      base, fv.attacks, fv.aggregators,
      _floats(fv.malicious_fractions, "malicious_fractions"),
      _floats(fv.topk_ratios, "topk_ratios"), _ints(fv.seeds, "seeds"),
      parse_args_by_name(fv.attack_args_by_name, "attack"),
      parse_args_by_name(fv.aggregator_args_by_name, "aggregator"),
      parse_presets(fv.presets),
      parse_fields_by_name(fv.aggregator_fields_by_name))


def _check_hyperparameters(cfg: ExperimentConfig) -> None:
  """Builds the aggregator and binds the attack's arguments (no compiling)."""
  from fedjax_sparse import aggregators as aggregators_lib
  from fedjax_sparse import attacks as attacks_lib
  from fedjax_sparse.simulation.experiment import MODEL_AWARE_RULES
  kwargs = parse_kwargs(cfg.aggregator_args)
  try:
    factory = aggregators_lib.get(cfg.aggregator)
    if cfg.aggregator in MODEL_AWARE_RULES:
      inspect.signature(factory).bind_partial(**kwargs)  # the model comes later
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
                      fv: flags.FlagValues = FLAGS) -> tuple[list[str],
                                                             list[str]]:
  """``(errors, warnings)`` about the flags given (command line or flagfile)
  that no cell of the grid uses (:mod:`fedjax_sparse.simulation.flag_checks`);
  ``--topk_ratios`` counts as ``--topk_ratio``."""
  from fedjax_sparse.simulation import flag_checks
  given = flag_checks.given_flags(
      fv, [f.name for f in dataclasses.fields(ExperimentConfig)])
  if "topk_ratios" in fv and fv["topk_ratios"].present and fv.topk_ratios:
    given.add("topk_ratio")
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


def _config_dict(cfg: ExperimentConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d.pop("output_dir")
  return json.loads(json.dumps(d))


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _field_defaults() -> dict:
  out = {}
  for f in dataclasses.fields(ExperimentConfig):
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
  return json.loads(json.dumps(out))


# Fields that change how a run is done, not its results.
_NOT_RESULTS = ("checkpoint_every",)


def same_config(saved: Any, cfg: ExperimentConfig) -> bool:
  """Whether a saved ``summary.json`` configuration is ``cfg``'s.

  Tolerant of fields added to :class:`ExperimentConfig` since the run: a
  field missing from ``saved`` counts as equal when ``cfg`` keeps its
  default; keys of ``saved`` that are no longer fields are ignored.
  """
  if not isinstance(saved, dict):
    return False
  defaults = _field_defaults()
  for key, value in _config_dict(cfg).items():
    if key in _NOT_RESULTS:
      continue
    if key in saved:
      if saved[key] != value:
        return False
    elif key not in defaults or defaults[key] != value:
      return False
  return True


def finished(cell: Cell) -> bool:
  """Whether the cell's ``summary.json`` holds a run of its configuration
  (see :func:`same_config`)."""
  summary = _read_json(os.path.join(cell.dir, "summary.json"))
  return bool(summary) and same_config(summary.get("config"), cell.config)


def share_data_seed(cells: Sequence[Cell]) -> list[Cell]:
  """The cells with ``data_seed`` fixed to the grid's first seed where it
  is -1, so that the seeds of a cell train on one partition (the
  configuration ``--batch_seeds`` runs)."""
  if not cells:
    return []
  first = cells[0].seed
  return [c if c.config.data_seed >= 0 else dataclasses.replace(
      c, config=dataclasses.replace(c.config, data_seed=first)) for c in cells]


def _seed_group_key(cell: Cell) -> tuple:
  return (cell.preset, cell.preset_fields, tuple(
      (k, v) for k, v in sorted(_config_dict(dataclasses.replace(
          cell.config, seed=0)).items())))


def _summary_message(summary: dict) -> str:
  msg = f"accuracy {summary['final_accuracy']:.4f}"
  if summary.get("final_asr") is not None:
    msg += f", ASR {summary['final_asr']:.4f}"
  return msg


def _clear_error(cell: Cell) -> None:
  err = os.path.join(cell.dir, "error.txt")
  if os.path.exists(err):
    os.unlink(err)


class _Overall:
  """One progress bar over every round of every cell of a sweep, with the
  current cell, its last accuracy and the ETA of the whole sweep."""

  def __init__(self, cells: Sequence[Cell], enabled: bool):
    self.bar = None
    self.cell, self.last_acc = None, None
    self.done: dict[str, int] = {}
    if not enabled:
      return
    from tqdm.auto import tqdm
    total = sum(c.config.rounds for c in cells)
    initial = sum(c.config.rounds for c in cells if finished(c))
    # Updates every 30 s into a log file, live on a terminal.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    self.bar = tqdm(total=total, initial=initial, desc="sweep", unit="round",
                    dynamic_ncols=True, mininterval=interval,
                    smoothing=0.05)

  def round(self, cell: Cell, rec: dict) -> None:
    if self.bar is None:
      return
    step = rec["round"] - self.done.get(cell.name, 0)
    self.done[cell.name] = rec["round"]
    if cell.name != self.cell:
      self.cell, self.last_acc = cell.name, None
    post = {"cell": cell.name, "round": rec["round"]}
    if "accuracy" in rec:
      self.last_acc = rec["accuracy"]
    if self.last_acc is not None:
      post["acc"] = f"{self.last_acc:.4f}"
    self.bar.set_postfix(post, refresh=False)
    self.bar.update(step)

  def write(self, msg: str) -> None:
    """Prints ``msg`` above the bar."""
    if self.bar is None:
      print(msg)
    else:
      self.bar.write(msg)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def run_cells(cells: Sequence[Cell], progress: bool = False,
              log=None, batch_seeds: bool = False,
              seed_mode: str = "auto",
              overall_progress: bool = False,
              tensorboard: bool = False) -> dict[str, str]:
  """Runs (or resumes, or skips) every cell in order.

  A cell that fails (e.g. a rule's requirement on K and f that only shows
  when the round step is traced) is recorded in ``<cell>/error.txt`` and the
  sweep goes on.

  With ``batch_seeds``, the unfinished cells that differ only in their seed
  run together through :func:`fedjax_sparse.simulation.multi_seed.run_seeds`
  (``seed_mode``), each writing its own cell directory as a separate run
  would; a killed batch resumes from its last checkpointed round. Cells the
  seed batch cannot run (see ``unbatchable_reason``) run one by one. Give it
  cells whose ``data_seed`` is fixed (:func:`share_data_seed`): the seeds of
  a batch share one partition.

  ``progress`` shows a bar per cell; ``overall_progress`` one bar over the
  whole sweep (rounds, current cell, accuracy, ETA), above which ``log``
  (default: print) writes each cell's line. ``tensorboard``: each cell also
  writes its rounds' scalars into ``<cell>/tensorboard/``
  (:mod:`fedjax_sparse.metrics.writers`).

  Returns:
    cell name -> ``"skipped"``, ``"ran"`` or ``"failed: <message>"``.
  """
  overall = _Overall(cells, overall_progress and not progress)
  try:
    return _run_cells(cells, progress, log or overall.write, batch_seeds,
                      seed_mode, overall, tensorboard)
  finally:
    overall.close()


def _run_cells(cells, progress, log, batch_seeds, seed_mode,
               overall: _Overall, tensorboard: bool) -> dict[str, str]:
  from fedjax_sparse.metrics import writers as writers_lib
  open_writers = {}

  def on_round(cell, rec):
    overall.round(cell, rec)
    if tensorboard:
      if cell.name not in open_writers:
        open_writers[cell.name] = writers_lib.create_writer(cell.dir, True)
      writers_lib.round_callback(open_writers[cell.name])(rec)

  try:
    return _run_cells_with(cells, progress, log, batch_seeds, seed_mode,
                           on_round)
  finally:
    for w in open_writers.values():
      w.close()


def _run_cells_with(cells, progress, log, batch_seeds, seed_mode,
                    on_round) -> dict[str, str]:
  from fedjax_sparse.simulation.experiment import build_data, run_experiment
  from fedjax_sparse.simulation import multi_seed
  status = {}
  data_key, fd = None, None
  index = {cell.name: i for i, cell in enumerate(cells)}
  groups: dict[tuple, list[Cell]] = {}
  if batch_seeds:
    for cell in cells:
      groups.setdefault(_seed_group_key(cell), []).append(cell)

  def tag(cell):
    return f"[{index[cell.name] + 1}/{len(cells)}] {cell.name}"

  def data_for(cell):
    nonlocal data_key, fd
    key = tuple(getattr(cell.config, f) for f in _DATA_FIELDS)
    if key != data_key:
      data_key, fd = None, None  # free the old arrays before loading
      fd = build_data(cell.config)
      data_key = key
    return fd

  for cell in cells:
    if cell.name in status:
      continue  # ran in an earlier cell's seed batch
    if finished(cell):
      status[cell.name] = "skipped"
      log(f"{tag(cell)}: finished before, skipped")
      continue
    batch = []
    if batch_seeds and multi_seed.unbatchable_reason(cell.config) is None:
      batch = [c for c in groups[_seed_group_key(cell)]
               if c.name not in status and not finished(c)]
    t0 = time.perf_counter()
    if len(batch) > 1:
      try:
        sums = multi_seed.run_seeds(
            cell.config, [c.seed for c in batch], fd=data_for(cell),
            progress=progress, mode=seed_mode,
            output_dirs=[c.dir for c in batch],
            on_round=lambda i, rec, b=batch: on_round(b[i], rec))
      except (ValueError, FileNotFoundError) as e:
        for c in batch:
          status[c.name] = f"failed: {e}"
          if not isinstance(e, run_safety.OutputDirInUse):
            io.atomic_write_text(os.path.join(c.dir, "error.txt"), f"{e}\n")
          log(f"{tag(c)}: FAILED: {e}")
        continue
      seconds = time.perf_counter() - t0
      for c, summary in zip(batch, sums):
        _clear_error(c)
        status[c.name] = "ran"
        log(f"{tag(c)}: {_summary_message(summary)} ({seconds:.1f} s for "
            f"{len(batch)} seeds together)")
      continue
    try:
      summary = run_experiment(
          cell.config, progress=progress, fd=data_for(cell),
          on_round=lambda rec, c=cell: on_round(c, rec))
    except (ValueError, FileNotFoundError) as e:
      status[cell.name] = f"failed: {e}"
      # Not into the directory of another run that holds it.
      if not isinstance(e, run_safety.OutputDirInUse):
        io.atomic_write_text(os.path.join(cell.dir, "error.txt"), f"{e}\n")
      log(f"{tag(cell)}: FAILED: {e}")
      continue
    _clear_error(cell)
    status[cell.name] = "ran"
    log(f"{tag(cell)}: {_summary_message(summary)} "
        f"({time.perf_counter() - t0:.1f} s)")
  return status


# ----------------------------------------------------------------- report --


def _load(cell: Cell) -> tuple[str, Optional[dict], list[dict]]:
  summary = _read_json(os.path.join(cell.dir, "summary.json"))
  if summary is not None and not same_config(summary.get("config"),
                                             cell.config):
    summary = None  # another configuration (e.g. fewer rounds): not a result
  rounds_path = os.path.join(cell.dir, "rounds.jsonl")
  records = io.read_jsonl(rounds_path) if os.path.exists(rounds_path) else []
  if summary is not None:
    status = "done"
  elif os.path.exists(os.path.join(cell.dir, "error.txt")):
    with open(os.path.join(cell.dir, "error.txt")) as f:
      status = "failed: " + f.read().strip()
  elif records:
    status = f"partial ({records[-1]['round']}/{cell.config.rounds} rounds)"
  else:
    status = "missing"
  return status, summary, records


def _row(cell: Cell, status: str, summary: Optional[dict]) -> dict:
  s = summary or {}
  return {
      "cell": cell.name, "status": status, "attack": cell.attack,
      "aggregator": cell.defence,
      "malicious_fraction": cell.malicious_fraction,
      "sparsify": cell.config.sparsify,
      "topk_ratio": "" if cell.topk_ratio is None else cell.topk_ratio,
      "seed": cell.seed, "rounds": cell.config.rounds,
      **{k: s.get(k) for k in _SUMMARY_COLUMNS}}


def _fmt(x: Any) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return ""
  return repr(x) if isinstance(x, float) else str(x)


def _has_value(x: Any) -> bool:
  return x is not None and not (isinstance(x, float) and math.isnan(x))


def _mean_std(values: list) -> tuple[float, float, int]:
  v = [x for x in values if _has_value(x)]
  if not v:
    return math.nan, math.nan, 0
  return float(np.mean(v)), float(np.std(v)), len(v)


def _panels(rows: list[dict], key: str, attacks: list[str],
            aggregators: list[str]) -> dict[tuple, np.ndarray]:
  """(fraction, ratio) -> [attack, aggregator] mean over seeds of ``key``.

  The "none" attack (fraction 0) is the baseline row of every panel.
  """
  combos = sorted({(r["malicious_fraction"], r["topk_ratio"]) for r in rows
                   if r["attack"] != "none"}, key=lambda t: (t[0], str(t[1])))
  if not combos:
    combos = sorted({(r["malicious_fraction"], r["topk_ratio"]) for r in rows},
                    key=lambda t: (t[0], str(t[1])))
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["attack"], r["aggregator"], r["malicious_fraction"],
            r["topk_ratio"])].append(r.get(key))
  out = {}
  for frac, ratio in combos:
    m = np.full((len(attacks), len(aggregators), 3), np.nan)
    for i, a in enumerate(attacks):
      for j, g in enumerate(aggregators):
        f = 0.0 if a == "none" else frac
        m[i, j] = _mean_std(groups.get((a, g, f, ratio), []))
    out[(frac, ratio)] = m
  return out


def _panel_title(frac, ratio, with_none: bool = False) -> str:
  """The panel's setting; ``with_none``: the panel holds the none row, whose
  cells have no attackers whatever the panel's fraction."""
  r = "dense" if ratio == "" else f"top-k {ratio:g}"
  none = " (none row: no attackers)" if with_none and frac else ""
  return f"malicious fraction {frac:g}{none}, {r}"


def _markdown_table(m: np.ndarray, attacks, aggregators,
                    fmt: str = "{:.4f}") -> list[str]:
  lines = ["| attack \\ defence | " + " | ".join(aggregators) + " |",
           "|---|" + "---:|" * len(aggregators)]
  for i, a in enumerate(attacks):
    cells = []
    for j in range(len(aggregators)):
      mean, std, n = m[i, j]
      if n == 0:
        cells.append("-")
      elif n > 1:
        cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
      else:
        cells.append(fmt.format(mean))
    lines.append(f"| {a} | " + " | ".join(cells) + " |")
  return lines


# Per-round record keys averaged over seeds for the curves.
_CURVE_KEYS = ("accuracy", "asr", "targeted_accuracy", "twin_accuracy",
               "l1_to_twin", "oif")
# Of those, the ones plotted (each where some record has it).
_PLOTTED_KEYS = ("accuracy", "asr", "targeted_accuracy")


def _mean_curve(runs: list[list[dict]]) -> list[dict]:
  by_round = collections.defaultdict(lambda: collections.defaultdict(list))
  for records in runs:
    for r in records:
      for k in _CURVE_KEYS:
        if _has_value(r.get(k)):
          by_round[r["round"]][k].append(r[k])
  return [{"round": rnd, **{k: float(np.mean(v)) for k, v in d.items()}}
          for rnd, d in sorted(by_round.items())]


# Tables of results.md after the accuracy tables: summary key, title, what
# the values are, number format. Each appears when a finished cell has it,
# with the attacks that have it as rows.
_METRIC_TABLES = (
    ("final_asr", "Final attack success rate (backdoor attacks)", "", "{:.4f}"),
    ("final_targeted_accuracy", "Final targeted accuracy",
     "Accuracy on the attack's targeted task at the last evaluation.",
     "{:.4f}"),
    ("final_oif", "Final outsized impact factor (OIF)",
     "|X_m| / (I n) of sparsefed.txt B.1.6: 1 means the attackers poisoned "
     "the share of the data their share of the clients entitles them to.",
     "{:.4f}"),
    ("final_l1_to_twin", "Final L1 distance to the unattacked twin",
     "||w - w_twin||_1 between the final model and the same run without "
     "attackers (sparsefed.txt Table 2).", "{:.4g}"),
)


def _detection_lines(done: list[dict], attacks: list[str],
                     aggregators: list[str]) -> list[str]:
  """Mean TPR / FPR tables of the defences that flagged some client."""
  attacked = [r for r in done if r["attack"] != "none"]
  filtering = [g for g in aggregators if any(
      r["aggregator"] == g and any(_has_value(r.get(k)) and r[k] > 0
                                   for k in ("mean_tpr", "mean_fpr"))
      for r in attacked)]
  rows = [a for a in attacks if a != "none" and any(
      r["attack"] == a and r["aggregator"] in filtering for r in attacked)]
  if not filtering or not rows:
    return []
  sub = [r for r in attacked if r["aggregator"] in filtering]
  tpr = _panels(sub, "mean_tpr", rows, filtering)
  fpr = _panels(sub, "mean_fpr", rows, filtering)
  md = ["# Detection: mean TPR / FPR", "",
        "Mean over the attacked rounds (and over seeds) of the share of "
        "malicious clients flagged (TPR) and of benign clients flagged "
        "(FPR), for the defences that flagged some client.", ""]
  for combo, t in tpr.items():
    f = fpr[combo]
    md += [f"## {_panel_title(*combo)}", "",
           "| attack \\ defence | " + " | ".join(filtering) + " |",
           "|---|" + "---:|" * len(filtering)]
    for i, a in enumerate(rows):
      vals = []
      for j in range(len(filtering)):
        (tm, _, tn), (fm, _, fn) = t[i, j], f[i, j]
        vals.append("-" if tn == 0 and fn == 0 else
                    f"{_fmt_or_dash(tm, tn)} / {_fmt_or_dash(fm, fn)}")
      md.append(f"| {a} | " + " | ".join(vals) + " |")
    md.append("")
  return md


def _fmt_or_dash(mean: float, n: int) -> str:
  return "-" if n == 0 else f"{mean:.4f}"


def _preset_lines(cells: Sequence[Cell]) -> list[str]:
  used = {}
  for c in cells:
    if c.preset and c.preset not in used:
      fields = dict(c.preset_fields)
      fields["aggregator_args"] = c.config.aggregator_args
      used[c.preset] = ", ".join(f"{k}={v!r}" if isinstance(v, str) else
                                 f"{k}={v}" for k, v in fields.items()
                                 if k != "aggregator_args" or v)
  if not used:
    return []
  return (["# Defence presets", ""]
          + [f"- {name}: {text}" for name, text in used.items()] + [""])


def _defence_field_lines(cells: Sequence[Cell]) -> list[str]:
  used = {}
  for c in cells:
    if c.defence_fields and c.defence not in used:
      used[c.defence] = ", ".join(f"{k}={v!r}" if isinstance(v, str) else
                                  f"{k}={v}" for k, v in c.defence_fields)
  if not used:
    return []
  return (["# Per-defence settings (--aggregator_fields_by_name)", ""]
          + [f"- {name}: {text}" for name, text in used.items()] + [""])


def write_report(cells: Sequence[Cell], output_dir: str) -> dict:
  """Writes results.csv, results.md, heatmap.png and curves_<attack>.png.

  Cells without a finished run appear in the CSV with their status (missing,
  partial, failed) and are left out of the tables and plots.

  Returns:
    ``{"rows": [...], "markdown": str, "files": [paths written]}``.
  """
  from fedjax_sparse.simulation import plots
  os.makedirs(output_dir, exist_ok=True)
  attacks = list(dict.fromkeys(c.attack for c in cells))
  aggregators = list(dict.fromkeys(c.defence for c in cells))
  rows, curves = [], collections.defaultdict(list)
  for cell in cells:
    status, summary, records = _load(cell)
    rows.append(_row(cell, status, summary))
    if summary is not None:
      curves[cell.attack].append((cell, records))
  files = []

  buf = _io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for r in rows:
    writer.writerow([_fmt(r[c]) for c in CSV_COLUMNS])
  path = os.path.join(output_dir, "results.csv")
  io.atomic_write_text(path, buf.getvalue())
  files.append(path)

  done = [r for r in rows if r["status"] == "done"]
  acc = _panels(done, "final_accuracy", attacks, aggregators)
  base = cells[0].config
  md = ["# Sweep results: final test accuracy",
        "",
        f"{base.dataset}, model {base.model}, {base.num_clients} clients "
        f"({base.clients_per_round} per round), partition {base.partition}"
        + (f" (alpha {base.alpha:g})" if base.partition == "dirichlet" else "")
        + f", {base.rounds} rounds, attack from round {base.attack_start}. "
        f"{len(done)}/{len(rows)} cells finished; values are the mean "
        "(± std) over seeds."
        + (" The none row (no attackers) is the clean baseline of every "
           "table." if "none" in attacks else ""), ""]
  for (frac, ratio), m in acc.items():
    md += [f"## {_panel_title(frac, ratio, 'none' in attacks)}", ""]
    md += _markdown_table(m, attacks, aggregators) + [""]
  for key, title, text, fmt in _METRIC_TABLES:
    have = [a for a in attacks if any(_has_value(r.get(key))
                                      for r in done if r["attack"] == a)]
    if not have:
      continue
    panels = _panels([r for r in done if r["attack"] in have], key, have,
                     aggregators)
    md += [f"# {title}", ""] + ([text, ""] if text else [])
    for (frac, ratio), m in panels.items():
      md += [f"## {_panel_title(frac, ratio)}", ""]
      md += _markdown_table(m, have, aggregators, fmt) + [""]
  md += _detection_lines(done, attacks, aggregators)
  md += _preset_lines(cells)
  md += _defence_field_lines(cells)
  failed = [r for r in rows if r["status"] != "done"]
  if failed:
    md += ["# Cells without results", ""]
    md += [f"- {r['cell']}: {r['status']}" for r in failed] + [""]
  markdown = "\n".join(md)
  path = os.path.join(output_dir, "results.md")
  io.atomic_write_text(path, markdown)
  files.append(path)

  if done:
    path = os.path.join(output_dir, "heatmap.png")
    plots.plot_heatmaps(
        {_panel_title(*k, "none" in attacks): m[..., 0]
         for k, m in acc.items()}, attacks,
        aggregators, path,
        title=f"Final test accuracy ({base.dataset}, {base.model})")
    files.append(path)

  for attack, runs in curves.items():
    combos = {(c.malicious_fraction, c.topk_ratio) for c, _ in runs}
    grouped = collections.defaultdict(list)
    for cell, records in runs:
      label = cell.defence
      if len(combos) > 1:
        label += (f" (mf {cell.malicious_fraction:g}, "
                  + ("dense" if cell.topk_ratio is None
                     else f"top-k {cell.topk_ratio:g}") + ")")
      grouped[label].append(records)
    path = os.path.join(output_dir, f"curves_{attack}.png")
    plots.plot_metric_curves(
        {k: _mean_curve(v) for k, v in grouped.items()}, path,
        keys=_PLOTTED_KEYS,
        title=f"attack: {attack}" + (" (mean over seeds)"
                                     if len({c.seed for c, _ in runs}) > 1 else ""),
        attack_start=None if attack == "none" else base.attack_start)
    files.append(path)
  return {"rows": rows, "markdown": markdown, "files": files}


def main():
  """The binary (run through :func:`fedjax_sparse.cli.run`: flags parsed,
  one CPU device per core, a user error raised here printed as ``error:``
  with exit status 2). Exit status 1: some cell failed."""
  if not FLAGS.output_dir:
    raise ValueError("--output_dir is required: each cell writes into "
                     "<output_dir>/<cell name>/")
  cells = cells_from_flags(FLAGS)
  if FLAGS.batch_seeds:
    cells = share_data_seed(cells)
  errors, warnings = ineffective_flags(cells, FLAGS)
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  if errors:
    raise ValueError("; ".join(errors))
  check_cells(cells, check_data=not FLAGS.report_only)
  if FLAGS.tensorboard:
    from fedjax_sparse.metrics import writers
    writers.check_tensorboard()
  print(f"{len(cells)} cells into {FLAGS.output_dir}")
  status = {}
  # One sweep at a time in an output directory (two would run the same
  # cells with different settings); --report_only only reads the cells,
  # and may report on a sweep that is running.
  with (contextlib.nullcontext() if FLAGS.report_only
        else run_safety.output_lock(FLAGS.output_dir)):
    if not FLAGS.report_only:
      status = run_cells(cells, progress=FLAGS.cell_progress,
                         batch_seeds=FLAGS.batch_seeds,
                         seed_mode=FLAGS.seed_mode,
                         overall_progress=FLAGS.progress,
                         tensorboard=FLAGS.tensorboard)
    report = write_report(cells, FLAGS.output_dir)
  print()
  print(report["markdown"])
  print("wrote " + ", ".join(report["files"]))
  return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
  _cli.run(main)
