r"""Hybrid sparse attack at the paper's schedule, as a Python config.

The same grid as ``experiments/configs/hybrid_paper_fmnist.flags`` (whose
comments give the setting: hybrid_sparse_attack.txt 4.1 and the F-MNIST
appendix, Fig. 4): the claim "HSA diverges every defence but SignSGD" on the
paper's 2-layer F-MNIST CNN. 25 clients, all participate, 5 Byzantine (20%)
from the first round, local momentum (beta 0.9) uploads after one local step
of batch 32, lr 0.1 divided by 10 at 75% of 7500 rounds; HSA's mask is
Pi_F^+ (FORCE with the critical parameters kept, delta 5e-3, the last dense
layer capped at 0.25, fresh attacker batches at every FORCE step). One seed.

Run (12 cells of about 37 minutes on the 2-core CPU; a killed sweep resumes
from each cell's last checkpoint)::

  .venv/bin/python -m experiments.sweep \
      --config=experiments/configs/sweeps/hybrid_paper_fmnist.py
  # DHSA and ALIE rows (the dhsa entry below is used then):
  .venv/bin/python -m experiments.sweep \
      --config=experiments/configs/sweeps/hybrid_paper_fmnist.py \
      --config.attacks=dhsa,alie
"""

import ml_collections


def _force_plus() -> ml_collections.ConfigDict:
  # sort_keys=False: the arguments keep the flagfile's order, so the cells'
  # attack_args text (and the finished cells a sweep recognises) is the
  # flagfile's. fresh_batches is the flagfile's text "true", which the
  # attack builder reads as a boolean; True would make the text "True" and
  # so other cells.
  return ml_collections.ConfigDict(dict(
      mask_method="force_plus",
      delta=0.005,
      caps="last_dense:0.25",
      fresh_batches="true",
  ), sort_keys=False)


def get_config() -> ml_collections.ConfigDict:
  """The hybrid paper's F-MNIST CNN sweep (see the module docstring)."""
  config = ml_collections.ConfigDict()
  # One line a topic: data, clients, local training, learning rates, model
  # and attack, evaluation.
  config.base = ml_collections.ConfigDict(dict(
      dataset="fashion_mnist", partition="dirichlet", alpha=1.0,
      num_clients=25, clients_per_round=25, rounds=7500,
      local_steps=1, batch_size=32, update_mode="momentum", momentum=0.9,
      lr=0.1, server_lr=0.1, lr_decay_at=0.75, lr_decay_factor=0.1,
      model="cnn2", attack_start=1,
      eval_every=250, checkpoint_every=50,
  ))
  config.attacks = ("hsa", "none")
  config.aggregators = ("multi_krum", "median", "trimmed_mean",
                        "centered_clipping", "signsgd", "bulyan")
  config.malicious_fractions = (0.2,)
  config.topk_ratios = ()
  config.seeds = (0,)
  config.attack_args = dict(hsa=_force_plus(), dhsa=_force_plus())
  config.aggregator_args = {}
  config.aggregator_fields = {}
  config.presets = {}
  config.output_dir = "experiments/results/hybrid_paper_cnn"
  return config
