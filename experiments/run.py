r"""Runs one federated experiment.

Example::

  python -m experiments.run --dataset=fashion_mnist --num_clients=20 \
      --partition=dirichlet --alpha=1 --rounds=20 --output_dir=/tmp/run
  python -m experiments.run --flagfile=experiments/configs/demo.flags

Every flag but the multi-host ones (``--distributed``,
``--coordinator_address``, ``--num_processes``, ``--process_id``) is a field
of :class:`fedjax_sparse.simulation.ExperimentConfig`. Bad flags fail before
anything is compiled, with a message saying what to change. So does a run
that cannot start or resume in its ``--output_dir`` (another run holds the
directory's lock, it holds another configuration, a corrupt checkpoint or
result file, more rounds than ``--rounds``, or it cannot be written): each
prints ``error: ...`` and exits with status 2.

Multi-host: start the same command on every host (or every process) with
``--distributed``; on TPU pod slices, SLURM and Open MPI the processes find
each other, elsewhere add ``--coordinator_address=host0:1234
--num_processes=N --process_id=i``. Only process 0 prints the summary.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/cli.py
  from fedjax_sparse import cli as _cli
  _cli.prepare()

import dataclasses
import json
import sys

from absl import flags

from fedjax_sparse.config import help_text
from fedjax_sparse.config import sections as _sections
from fedjax_sparse.simulation.experiment import ExperimentConfig

AGGREGATOR_NAMES = _sections.aggregator_names()
ATTACK_NAMES = _sections.attack_names()


def _define_flags():
  """One flag per ExperimentConfig field, with the field's default and help
  (declared once, in :mod:`fedjax_sparse.config.sections`)."""
  for f in dataclasses.fields(ExperimentConfig):
    if f.type in ("bool", bool):
      flags.DEFINE_boolean(f.name, f.default, help_text(f))
    elif f.type in ("int", int):
      flags.DEFINE_integer(f.name, f.default, help_text(f))
    elif f.type in ("float", float):
      flags.DEFINE_float(f.name, f.default, help_text(f))
    else:
      flags.DEFINE_string(f.name, f.default, help_text(f))


_define_flags()
# Multi-host flags: how the processes connect, not part of the experiment.
flags.DEFINE_boolean(
    "distributed", False,
    "Multi-host run: connect this process to the others with "
    "jax.distributed.initialize before any JAX operation (the cluster is "
    "detected on TPU pod slices, SLURM and Open MPI; elsewhere set "
    "--coordinator_address, --num_processes and --process_id).")
flags.DEFINE_string("coordinator_address", None,
                    "With --distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None,
                     "With --distributed: number of processes.")
flags.DEFINE_integer("process_id", None,
                     "With --distributed: this process's index.")
flags.DEFINE_boolean(
    "tensorboard", False,
    "Also write each round's scalars as TensorBoard event files into "
    "<output_dir>/tensorboard/ (a sweep: <cell>/tensorboard/, so "
    "tensorboard --logdir=<output_dir> shows every cell). Needs "
    "tensorboardX: pip install 'fedjax_sparse[tensorboard]'; rounds.jsonl "
    "stays the record.")
FLAGS = flags.FLAGS


def config_from_flags() -> ExperimentConfig:
  kwargs = {f.name: getattr(FLAGS, f.name)
            for f in dataclasses.fields(ExperimentConfig)}
  if kwargs["data_dir"] == "":
    kwargs["data_dir"] = None
  return ExperimentConfig(**kwargs)


def main():
  """The binary (run through :func:`fedjax_sparse.cli.run`: flags parsed,
  one CPU device per core, a user error raised here printed as ``error:``
  with exit status 2)."""
  coordinator = True
  if FLAGS.distributed:
    from fedjax_sparse.simulation import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id)
    coordinator = distributed.is_coordinator()
  cfg = config_from_flags()
  from fedjax_sparse.simulation import flag_checks
  errors, warnings = flag_checks.ineffective(
      cfg, flag_checks.given_flags(
          FLAGS, [f.name for f in dataclasses.fields(ExperimentConfig)]))
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  if errors:
    raise ValueError("; ".join(errors))
  cfg.validate()
  from fedjax_sparse.simulation.experiment import run_experiment
  # What the run finds before or while running (another run in the output
  # directory, a run that cannot be resumed, a directory that cannot be
  # written) raises ValueError too.
  from fedjax_sparse.metrics import writers
  writer = writers.create_writer(cfg.output_dir,
                                 FLAGS.tensorboard and coordinator)
  try:
    summary = run_experiment(cfg, progress=coordinator,
                             on_round=writers.round_callback(writer))
  finally:
    writer.close()
  if not coordinator:
    return 0
  keys = ["final_accuracy", "final_top5_accuracy", "best_accuracy",
          "compile_seconds", "startup_seconds", "median_round_seconds",
          "wall_seconds",
          "num_params", "attack_rounds"]
  print(json.dumps({k: summary[k] for k in keys}, indent=2))
  return 0


if __name__ == "__main__":
  _cli.run(main)
