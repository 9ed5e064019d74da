"""Sweeps: a grid of experiments, run, resumed and reported.

``experiments/sweep.py`` is the binary (its flags, ``--config``); this
package is what it runs, importable on its own:

* :mod:`~fedjax_sparse.sweeps.grid`: :class:`Cell`, :func:`cell_name`,
  :func:`make_cells` (attacks x defences x malicious fractions x top-k
  ratios x seeds);
* :mod:`~fedjax_sparse.sweeps.tables`: defence presets and the per-name
  tables (hyperparameters, fields), their ``name:k=v;...`` text;
* :mod:`~fedjax_sparse.sweeps.config`: Python sweep configs
  (``ml_collections``) -> cells;
* :mod:`~fedjax_sparse.sweeps.checks`: every cell checked before any runs;
* :mod:`~fedjax_sparse.sweeps.runner`: :func:`run_cells` (resume, skip,
  seed batches, one progress bar), :func:`finished`;
* :mod:`~fedjax_sparse.sweeps.report`: :func:`write_report`
  (``results.csv``, ``results.md``, heatmaps, curves).

Example::

  from fedjax_sparse import sweeps
  from fedjax_sparse.simulation.experiment import ExperimentConfig

  cells = sweeps.make_cells(ExperimentConfig(dataset="synthetic",
                                             output_dir="runs/x"),
                            attacks=["none", "ipm"],
                            aggregators=["fedavg", "median"],
                            malicious_fractions=[0.2])
  sweeps.check_cells(cells)
  sweeps.run_cells(cells)
  sweeps.write_report(cells, "runs/x")
"""

from fedjax_sparse.sweeps.checks import check_cells
from fedjax_sparse.sweeps.checks import ineffective_flags
from fedjax_sparse.sweeps.config import cells_from_config
from fedjax_sparse.sweeps.grid import Cell
from fedjax_sparse.sweeps.grid import cell_name
from fedjax_sparse.sweeps.grid import make_cells
from fedjax_sparse.sweeps.report import CSV_COLUMNS
from fedjax_sparse.sweeps.report import write_report
from fedjax_sparse.sweeps.runner import finished
from fedjax_sparse.sweeps.runner import run_cells
from fedjax_sparse.sweeps.runner import same_config
from fedjax_sparse.sweeps.runner import share_data_seed
from fedjax_sparse.sweeps.tables import DEFENCE_PRESETS
from fedjax_sparse.sweeps.tables import resolve_presets

__all__ = ["CSV_COLUMNS", "Cell", "DEFENCE_PRESETS", "cell_name",
           "cells_from_config", "check_cells", "finished", "ineffective_flags",
           "make_cells", "resolve_presets", "run_cells", "same_config",
           "share_data_seed", "write_report"]
