"""Metric writers: where a run's per-round scalars go besides ``rounds.jsonl``.

A small interface in the style of ``clu.metric_writers``: a writer takes
``write_scalars(step, {name: value})`` and is flushed and closed at the end.
``rounds.jsonl`` stays the record of truth (resumes reconcile it with the
checkpoint); writers are for watching runs live, e.g. a whole sweep in
TensorBoard (``--tensorboard``: one event directory per cell, so
``tensorboard --logdir=<sweep output_dir>`` shows every cell as a run).

The TensorBoard backend writes event files through ``tensorboardX``, without
TensorFlow (``pip install 'fedjax_sparse[tensorboard]'``); asking for it
without the package is a ValueError naming the install command.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Protocol, Sequence

TENSORBOARD_DIR = "tensorboard"


class MetricWriter(Protocol):
  """Receives scalars by step."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    ...

  def flush(self) -> None:
    ...

  def close(self) -> None:
    ...


def record_scalars(record: Mapping[str, object]) -> dict[str, float]:
  """The scalars of a round record to plot: every finite int or float value
  but the round number itself (booleans as 0/1)."""
  out = {}
  for k, v in record.items():
    if k == "round" or isinstance(v, str) or v is None:
      continue
    if isinstance(v, bool):
      out[k] = float(v)
    elif isinstance(v, (int, float)) and math.isfinite(v):
      out[k] = float(v)
  return out


def check_tensorboard() -> None:
  """Raises ValueError (with the install command) without tensorboardX."""
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    raise ValueError(
        "--tensorboard needs tensorboardX: pip install "
        "'fedjax_sparse[tensorboard]' (or pip install tensorboardX)"
    ) from None


class TensorBoardWriter:
  """Writes scalars as TensorBoard event files in ``logdir``."""

  def __init__(self, logdir: str):
    check_tensorboard()
    from tensorboardX import SummaryWriter
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._writer = SummaryWriter(logdir=logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, global_step=step)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter:
  """Writes to every writer of ``writers``."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


def create_writer(output_dir: str, tensorboard: bool) -> MultiWriter:
  """The writers of a run into ``output_dir`` (none without a backend)."""
  writers = []
  if tensorboard:
    if not output_dir:
      raise ValueError("--tensorboard writes into --output_dir: set it")
    writers.append(TensorBoardWriter(os.path.join(output_dir,
                                                  TENSORBOARD_DIR)))
  return MultiWriter(writers)


def round_callback(writer: MetricWriter):
  """An ``on_round`` callback of the run loops that writes each round's
  record (:func:`record_scalars`) at its round number."""

  def on_round(record: Mapping[str, object]) -> None:
    writer.write_scalars(int(record["round"]), record_scalars(record))

  return on_round
