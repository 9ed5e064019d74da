r"""Runs a grid of attacks x defences x malicious fractions x top-k ratios x seeds.

Example::

  python -m experiments.sweep --flagfile=experiments/configs/flare_sweep.flags
  python -m experiments.sweep --flagfile=experiments/configs/flare_sweep.flags \
      --attacks=none,ipm --aggregators=fedavg,median --seeds=0,1 \
      --output_dir=runs/small
  python -m experiments.sweep --flagfile=... --report_only
  python -m experiments.sweep --config=experiments/configs/sweeps/flare.py \
      --config.seeds=0,1 --config.base.rounds=10

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

Python sweep configs: ``--config=<file>.py`` (``ml_collections``; the
file's ``get_config()`` returns a ``ConfigDict``,
:mod:`fedjax_sparse.sweeps.config`, examples in
``experiments/configs/sweeps/``) gives the grid as Python values: ``base``
(fields of :class:`ExperimentConfig`), ``attacks``, ``aggregators``,
``malicious_fractions``, ``topk_ratios``, ``seeds`` (tuples),
``attack_args`` / ``aggregator_args`` (name -> ``{argument: value}``),
``aggregator_fields`` and ``presets`` (name -> ``{field: value}``) and
``output_dir``. Override it with ``--config.<key>=...``
(``--config.base.rounds=10``, ``--config.seeds=0,1,2``). With ``--config``
the grid is the config's: a grid flag (``--attacks``, ``--presets``,
``--attack_args_by_name``, ...) is an error, and so is a field flag
(``--rounds``, ``--output_dir``) for a field the config sets; field flags
for the other fields apply under the config (``--data_dir``). A config
and the flagfile it mirrors make the same cells.

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

import contextlib
import dataclasses
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

# Importing the single-run binary defines one flag per ExperimentConfig field.
from experiments import run as run_lib  # noqa: F401
from fedjax_sparse.simulation import run_safety
from fedjax_sparse.simulation.experiment import ExperimentConfig
from fedjax_sparse.simulation.flag_checks import given_flags
from fedjax_sparse.sweeps import checks
from fedjax_sparse.sweeps import config as config_lib
# The package's names, as this module exported them before it was split
# (experiments.demo and the tests use them through it).
from fedjax_sparse.sweeps.checks import _check_hyperparameters
from fedjax_sparse.sweeps.checks import check_cells
from fedjax_sparse.sweeps.grid import Cell, cell_name, make_cells
from fedjax_sparse.sweeps.report import CSV_COLUMNS, write_report
from fedjax_sparse.sweeps.report import _mean_curve, _panel_title
from fedjax_sparse.sweeps.runner import _config_dict, _read_json
from fedjax_sparse.sweeps.runner import finished, same_config
from fedjax_sparse.sweeps.runner import run_cells, share_data_seed
from fedjax_sparse.sweeps.tables import (
    AGGREGATOR_ALIASES, ATTACK_ALIASES, DEFENCE_PRESETS, defence_fields,
    parse_args_by_name, parse_fields_by_name, parse_presets, preset_fields,
    resolve_presets)
from fedjax_sparse.sweeps.tables import floats as _floats
from fedjax_sparse.sweeps.tables import ints as _ints

__all__ = [
    # This binary's own.
    "FLAGS", "GRID_FLAGS", "cells_from_flags", "config_from_flag_values",
    "ineffective_flags", "main",
    # Re-exported from fedjax_sparse.sweeps.
    "AGGREGATOR_ALIASES", "ATTACK_ALIASES", "CSV_COLUMNS", "Cell",
    "DEFENCE_PRESETS", "_check_hyperparameters", "_config_dict", "_floats",
    "_ints", "_mean_curve", "_panel_title", "_read_json", "cell_name",
    "check_cells", "defence_fields", "finished", "make_cells",
    "parse_args_by_name", "parse_fields_by_name", "parse_presets",
    "preset_fields", "resolve_presets", "run_cells", "same_config",
    "share_data_seed", "write_report",
]

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
# ml_collections' config flag: the file's ConfigDict, --config.<key> overrides.
config_flags.DEFINE_config_file(
    "config", None, "A Python sweep config (experiments/configs/sweeps/"
    "<name>.py, whose get_config() returns an ml_collections.ConfigDict: "
    "base, attacks, aggregators, malicious_fractions, topk_ratios, seeds, "
    "attack_args, aggregator_args, aggregator_fields, presets, output_dir). "
    "Override a key with --config.<key>=... (--config.base.rounds=10). Not "
    "together with the grid flags.")
FLAGS = flags.FLAGS

# The flags that set the grid (the keys of a --config, which replaces them).
GRID_FLAGS = tuple(config_lib.GRID_FLAGS.values())
# The flags of ExperimentConfig's fields (defined by experiments.run).
_FIELD_FLAGS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


def _config(fv: flags.FlagValues):
  """The ``--config`` ConfigDict, or None."""
  return fv.config if "config" in fv else None


def config_from_flag_values(fv: flags.FlagValues) -> ExperimentConfig:
  """The base configuration from parsed flags (as ``experiments.run`` does)."""
  kwargs = {f.name: getattr(fv, f.name)
            for f in dataclasses.fields(ExperimentConfig)}
  if kwargs["data_dir"] == "":
    kwargs["data_dir"] = None
  return ExperimentConfig(**kwargs)


def cells_from_flags(fv: flags.FlagValues = FLAGS) -> list[Cell]:
  """The grid described by parsed flags, or by ``--config`` over them
  (raises ValueError on bad values, or on a setting given both ways)."""
  base = config_from_flag_values(fv)
  config = _config(fv)
  if config is not None:
    config_lib.check_flags(config, given_flags(fv, GRID_FLAGS),
                           given_flags(fv, _FIELD_FLAGS))
    return config_lib.cells_from_config(config, base)
  return make_cells(
      base, fv.attacks, fv.aggregators,
      _floats(fv.malicious_fractions, "malicious_fractions"),
      _floats(fv.topk_ratios, "topk_ratios"), _ints(fv.seeds, "seeds"),
      parse_args_by_name(fv.attack_args_by_name, "attack"),
      parse_args_by_name(fv.aggregator_args_by_name, "aggregator"),
      parse_presets(fv.presets),
      parse_fields_by_name(fv.aggregator_fields_by_name))


def ineffective_flags(cells: Sequence[Cell],
                      fv: flags.FlagValues = FLAGS) -> tuple[list[str],
                                                             list[str]]:
  """``(errors, warnings)`` about the flags given (command line or flagfile)
  and the fields a ``--config`` sets that no cell of the grid uses
  (:func:`fedjax_sparse.sweeps.checks.ineffective_flags`);
  ``--topk_ratios`` counts as ``--topk_ratio``."""
  given = given_flags(fv, _FIELD_FLAGS)
  if "topk_ratios" in fv and fv["topk_ratios"].present and fv.topk_ratios:
    given.add("topk_ratio")
  config = _config(fv)
  if config is not None:
    given |= config_lib.given_fields(config)
  return checks.ineffective_flags(cells, given)


def _output_dir(fv: flags.FlagValues) -> str:
  config = _config(fv)
  return (config and config_lib.output_dir(config)) or fv.output_dir


def main():
  """The binary (run through :func:`fedjax_sparse.cli.run`: flags parsed,
  one CPU device per core, a user error raised here printed as ``error:``
  with exit status 2). Exit status 1: some cell failed."""
  output_dir = _output_dir(FLAGS)
  if not output_dir:
    raise ValueError("--output_dir is required: each cell writes into "
                     "<output_dir>/<cell name>/"
                     + (" (or the config's output_dir)"
                        if _config(FLAGS) is not None else ""))
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
  print(f"{len(cells)} cells into {output_dir}")
  status = {}
  # One sweep at a time in an output directory (two would run the same
  # cells with different settings); --report_only only reads the cells,
  # and may report on a sweep that is running.
  with (contextlib.nullcontext() if FLAGS.report_only
        else run_safety.output_lock(output_dir)):
    if not FLAGS.report_only:
      status = run_cells(cells, progress=FLAGS.cell_progress,
                         batch_seeds=FLAGS.batch_seeds,
                         seed_mode=FLAGS.seed_mode,
                         overall_progress=FLAGS.progress,
                         tensorboard=FLAGS.tensorboard)
    report = write_report(cells, output_dir)
  print()
  print(report["markdown"])
  print("wrote " + ", ".join(report["files"]))
  return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
  _cli.run(main)
