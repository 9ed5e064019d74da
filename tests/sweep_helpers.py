"""What the sweep tests share: a small base configuration and flag parsing."""

import copy
import os

from absl import flags

from experiments import sweep  # noqa: F401  (defines the flags read here)
from fedjax_sparse.simulation.experiment import ExperimentConfig

# The repository's root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                        clients_per_round=4, rounds=3, local_epochs=1,
                        batch_size=16, lr=0.1, model="mlp", eval_every=1,
                        eval_batch_size=100, attack_start=2)


def parse_flags(*argv):
  """The sweep's flags parsed from ``argv`` into a copy of FLAGS."""
  fv = copy.deepcopy(flags.FLAGS)
  fv(["sweep", *argv])
  return fv
