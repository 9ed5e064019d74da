"""Running a sweep's cells: resume, skip, seed batches, one progress bar.

Each cell runs with :func:`run_experiment` into its own directory, so

* a killed cell started again resumes from its last finished round (its
  ``checkpoint/``, see ``checkpoint_every``);
* a cell whose ``summary.json`` holds the same configuration is skipped
  (:func:`finished`; fields added to :class:`ExperimentConfig` after the run
  count as equal when the cell keeps their default, :func:`same_config`).

With ``batch_seeds`` the cells that differ only in their seed train
together in one compiled step (:mod:`fedjax_sparse.simulation.multi_seed`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation import run_safety
from fedjax_sparse.simulation.experiment import ExperimentConfig
from fedjax_sparse.sweeps.grid import Cell

# Fields of ExperimentConfig that decide the federated data (cells that agree
# on them share one FederatedData).
_DATA_FIELDS = ("dataset", "data_dir", "max_train", "val_size", "partition",
                "alpha", "shards_per_client", "min_samples", "num_clients",
                "effective_data_seed")
# Fields that change how a run is done, not its results.
_NOT_RESULTS = ("checkpoint_every",)


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
