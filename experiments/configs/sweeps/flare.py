r"""SafeSparse/FLARE attack x defence sweep, as a Python config.

The same grid as ``experiments/configs/flare_sweep.flags`` (whose comments
give the papers' setting and how it is scaled: flare.txt V-A,
safesparse.txt 4): 20 clients, all participate every round, 1 local epoch,
batch 64, Adam lr 0.005, Dirichlet alpha = 1, pack top-k uploads with ratio
0.5, 40% attackers (8 of 20) from round 10 to the end, 30 rounds of
FashionMNIST on the MLP. GNA and scaling run in model space (the papers
upload models); boosted_update and copy_boost are the two adaptive rows.

Run (56 cells; a killed sweep started again resumes where it stopped)::

  .venv/bin/python -m experiments.sweep \
      --config=experiments/configs/sweeps/flare.py
  .venv/bin/python -m experiments.sweep \
      --config=experiments/configs/sweeps/flare.py \
      --config.attacks=none,ipm --config.seeds=0,1 \
      --config.base.rounds=10 --config.output_dir=runs/small
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The FLARE sweep (see the module docstring)."""
  config = ml_collections.ConfigDict()
  # One line a topic: data, clients, local training, model and uploads,
  # attack and evaluation.
  config.base = ml_collections.ConfigDict(dict(
      dataset="fashion_mnist", max_train=0, partition="dirichlet", alpha=1.0,
      num_clients=20, clients_per_round=20, rounds=30,
      local_epochs=1, batch_size=64, optimizer="adam", lr=0.005,
      model="mlp", sparsify="topk", topk_ratio=0.5, pack_size=1,
      attack_start=10, malicious_mode="first", eval_every=2,
  ))
  config.attacks = ("none", "label_flip", "gna", "ipm", "scaling",
                    "boosted_update", "copy_boost")
  config.aggregators = ("fedavg", "multi_krum", "median", "trimmed_mean",
                        "fedsign", "robust_dpfl", "rfa", "safesparse")
  config.malicious_fractions = (0.4,)
  config.topk_ratios = (0.5,)
  config.seeds = (0,)
  config.attack_args = dict(
      label_flip=dict(mapping="reverse"),
      gna=dict(space="model"),
      scaling=dict(space="model"),
  )
  config.aggregator_args = {}
  config.aggregator_fields = {}
  config.presets = {}
  config.output_dir = "runs/flare_sweep"
  return config
