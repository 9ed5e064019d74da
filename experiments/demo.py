r"""The showcase run behind ``make demo``.

FedAvg on FashionMNIST with 20 clients (Dirichlet alpha = 1), all clients
trained together in one jitted round step. Prints a result table and writes
the accuracy curve next to the results (``demo_results/``).

  python -m experiments.demo [--rounds=20] [--output_dir=demo_results]
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from fedjax_sparse.simulation.experiment import ExperimentConfig

flags.DEFINE_string("data_dir", None, "FashionMNIST directory.")
flags.DEFINE_string("output_dir", "demo_results", "Where results go.")
flags.DEFINE_integer("rounds", None, "Override the number of rounds.")
FLAGS = flags.FLAGS

DEMO = ExperimentConfig(
    dataset="fashion_mnist", partition="dirichlet", alpha=1.0,
    num_clients=20, clients_per_round=20, rounds=20, local_epochs=1,
    batch_size=32, optimizer="sgd", lr=0.05, model="mlp",
    aggregator="fedavg", engine="map", map_batch_size=10, client_devices=0,
    seed=0, eval_every=1)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from fedjax_sparse.simulation.devices import use_cpu_devices
  use_cpu_devices()  # one host device per core, before any JAX operation
  del argv
  cfg = dataclasses.replace(
      DEMO, data_dir=FLAGS.data_dir,
      rounds=FLAGS.rounds or DEMO.rounds,
      output_dir=os.path.join(FLAGS.output_dir, "fedavg"))
  try:
    cfg.validate()
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from fedjax_sparse.simulation import io
  from fedjax_sparse.simulation.experiment import run_experiment
  from fedjax_sparse.simulation.plots import plot_accuracy_curves

  print(f"FedAvg on FashionMNIST: {cfg.num_clients} clients, Dirichlet "
        f"alpha={cfg.alpha}, {cfg.rounds} rounds, model={cfg.model}, "
        f"engine={cfg.engine}, {jax.local_device_count()} client devices")
  try:
    summary = run_experiment(cfg)
  except ValueError as e:
    if "another configuration" not in str(e):
      raise
    import shutil
    print(f"{cfg.output_dir} holds an older demo configuration: starting afresh")
    shutil.rmtree(cfg.output_dir)
    summary = run_experiment(cfg)
  records = io.read_jsonl(os.path.join(cfg.output_dir, "rounds.jsonl"))
  print()
  print("| round | train loss | test accuracy | seconds |")
  print("|---:|---:|---:|---:|")
  for r in records:
    if r["round"] in (1, 2, 5) or r["round"] % 5 == 0:
      print(f"| {r['round']} | {r['loss']:.4f} | {r.get('accuracy', float('nan')):.4f} "
            f"| {r['seconds']:.2f} |")
  print()
  print(f"final test accuracy {summary['final_accuracy']:.4f} "
        f"(top-5 {summary['final_top5_accuracy']:.4f}), compile "
        f"{summary['compile_seconds']:.1f} s, median round "
        f"{summary['median_round_seconds']:.2f} s, total "
        f"{summary['wall_seconds']:.1f} s")
  png = os.path.join(FLAGS.output_dir, "accuracy.png")
  plot_accuracy_curves({"FedAvg": records}, png,
                       title="FedAvg, FashionMNIST, 20 clients, Dirichlet(1)")
  print(f"wrote {png} and {cfg.output_dir}/summary.json")
  return 0


if __name__ == "__main__":
  app.run(main)
