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

from fedjax_sparse import aggregators as _aggregators
from fedjax_sparse import attacks as _attacks
from fedjax_sparse import models as _models
from fedjax_sparse.simulation.experiment import ExperimentConfig

_DEFAULTS = ExperimentConfig()


def _names(names, aliases=None) -> str:
  text = ", ".join(names)
  if aliases:
    text += " (aliases: " + ", ".join(f"{a}={n}" for a, n in aliases.items()) + ")"
  return text


AGGREGATOR_NAMES = _names(_aggregators.names(), _aggregators.registry.ALIASES)
ATTACK_NAMES = _names(["none"] + _attacks.names(), _attacks.registry.ALIASES)
_HELP = {
    "dataset": "fashion_mnist, mnist, digits, synthetic or tfds:<name> "
               "(e.g. tfds:cifar10).",
    "data_dir": "Directory of the dataset files (default: the dataset's own).",
    "max_train": "Subsample the training set to this many examples (0: all).",
    "val_size": "Examples held out of training as the server's validation set.",
    "partition": "iid, dirichlet, shards or one_class.",
    "alpha": "Dirichlet concentration (smaller = more label skew).",
    "shards_per_client": "Classes per client of the shards partition.",
    "min_samples": "Minimum samples per client of the dirichlet partition.",
    "allow_empty_clients": "Allow clients without data (more clients than "
                           "examples: cross-device populations).",
    "num_clients": "Population size C.",
    "clients_per_round": "Clients K sampled per round (without replacement).",
    "rounds": "Number of federated rounds.",
    "local_epochs": "Local epochs per round (when local_steps is 0).",
    "local_steps": "Exact local steps per round (overrides local_epochs).",
    "batch_size": "Local minibatch size.",
    "optimizer": "Client optimizer: sgd, momentum or adam.",
    "lr": "Client learning rate.",
    "momentum": "Client momentum (also beta of --update_mode=momentum).",
    "weight_decay": "Client L2 weight decay.",
    "update_mode": "delta (global - local) or momentum (send the local "
                   "momentum buffer, hybrid-attack paper).",
    "prox_mu": "FedProx proximal coefficient (0 = off).",
    "scaffold": "SCAFFOLD control-variate correction of local training.",
    "server_lr": "Server learning rate.",
    "server_optimizer": "Server optimizer: sgd, momentum or adam.",
    "server_momentum": "Momentum of --server_optimizer=momentum (R <- m R + "
                       "u, theta <- theta - server_lr R; SparseFed's "
                       "baselines use 0.9). Unused by sgd and adam.",
    "lr_decay_at": "Step decay of the server and client learning rates: "
                   "from round floor(lr_decay_at * rounds) (0-based) on, "
                   "both are multiplied by --lr_decay_factor (hybrid "
                   "paper: 0.75). 0: no decay.",
    "nonfinite": "Uploads holding inf/nan: reject (screened before "
                 "aggregation: zero row, weight 0, acceptance 0, counted in "
                 "nonfinite_clients) or propagate (the rule sees them).",
    "lr_decay_factor": "Multiplier of the learning rates after "
                       "--lr_decay_at (0.1: divide by 10).",
    "aggregator": "Aggregation rule: " + AGGREGATOR_NAMES + ".",
    "weighted": "Weight clients by dataset size (else uniformly).",
    "aggregator_args": "Aggregator hyperparameters as name=value pairs, e.g. "
                       "'k=0.01,clip_norm=5' for sparsefed.",
    "num_byzantine": "Number of attackers f that robust rules assume (-1: "
                     "the expected number among the sampled clients).",
    "sparsify": "none (dense uploads) or topk (pack top-k uploads).",
    "topk_ratio": "Fraction of packs each client keeps (FLARE default 0.5).",
    "pack_size": "Parameters per pack (1 = scalar top-k).",
    "attack": "Attack (update or data attack): " + ATTACK_NAMES + ".",
    "attack_args": "Attack hyperparameters as name=value pairs, e.g. 'eps=0.4'.",
    "malicious_fraction": "Fraction of the clients that are malicious.",
    "malicious_mode": "Which clients are malicious: first or random.",
    "attack_start": "First round (1-based) in which the attack is active.",
    "model": "Model: " + ", ".join(_models.names()) + ".",
    "conv_impl": "Convolution implementation: auto, im2col or lax.",
    "norm": "Normalisation of resnet20: group, batch or none.",
    "model_width": "Layer widths instead of the model's default: mlp hidden "
                   "widths ('100' or '200,200'), cnn2 '32,64,512'-style "
                   "tuples, resnet20 the first stage's channels ('8').",
    "engine": "Client engine: vmap, map (lax.map in chunks) or sequential.",
    "map_batch_size": "Clients per chunk of the map engine.",
    "client_devices": "Devices the client axis is split over (0: all local "
                      "devices; on CPU the binary makes one device per core).",
    "seed": "Random seed (same seed, same results, bit for bit).",
    "data_seed": "Seed of the data (training subsample, validation split, "
                 "partition); -1: --seed. Fix it to train several seeds on "
                 "one partition.",
    "eval_every": "Evaluate on the test set every this many rounds.",
    "checkpoint_every": "Save the resumable checkpoint every this many "
                        "rounds and after the last (a killed run repeats at "
                        "most checkpoint_every - 1 rounds).",
    "eval_batch_size": "Evaluation batch size.",
    "twin": "Also train an unattacked twin in the same jitted step (same "
            "seed, no attackers) and report the L1 distance to it "
            "(l1_to_twin) and its accuracy.",
    "output_dir": "Where results go (empty: nowhere).",
}


def _define_flags():
  for f in dataclasses.fields(ExperimentConfig):
    default = getattr(_DEFAULTS, f.name)
    help_text = _HELP.get(f.name, f.name)
    if f.type in ("bool", bool):
      flags.DEFINE_boolean(f.name, default, help_text)
    elif f.type in ("int", int):
      flags.DEFINE_integer(f.name, default, help_text)
    elif f.type in ("float", float):
      flags.DEFINE_float(f.name, default, help_text)
    else:
      flags.DEFINE_string(f.name, default, help_text)


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
