"""The configuration tree (fedjax_sparse/config): every field declared once.

ExperimentConfig (the flags), RoundConfig (the round step) and ClientConfig
(local training) are built from one set of declarations, so they cannot
drift apart: one default, one help text, one set of checks per field.
"""

import dataclasses

from absl import flags
import pytest

from experiments import run as run_lib  # defines the flags
from fedjax_sparse import config as config_tree
from fedjax_sparse.client.local import ClientConfig
from fedjax_sparse.simulation import files
from fedjax_sparse.simulation.config import ExperimentConfig, config_dict
from fedjax_sparse.simulation.round_config import RoundConfig

# The round step's own fields, derived from flags by
# ExperimentConfig.round_config: the flag they come from.
DERIVED = {"client": "the client flags", "num_byzantine": "num_byzantine",
           "lr_decay_round": "lr_decay_at"}

# config.json of ExperimentConfig(), as written before the tree existed.
DEFAULT_CONFIG_JSON = """\
{
  "aggregator": "fedavg",
  "aggregator_args": "",
  "allow_empty_clients": false,
  "alpha": 1.0,
  "attack": "none",
  "attack_args": "",
  "attack_start": 10,
  "batch_size": 32,
  "checkpoint_every": 1,
  "client_devices": 0,
  "clients_per_round": 20,
  "conv_impl": "auto",
  "data_dir": null,
  "data_seed": -1,
  "dataset": "fashion_mnist",
  "engine": "map",
  "eval_batch_size": 1000,
  "eval_every": 1,
  "local_epochs": 1,
  "local_steps": 0,
  "lr": 0.05,
  "lr_decay_at": 0.0,
  "lr_decay_factor": 0.1,
  "malicious_fraction": 0.0,
  "malicious_mode": "first",
  "map_batch_size": 10,
  "max_train": 0,
  "min_samples": 10,
  "model": "mlp",
  "model_width": "",
  "momentum": 0.9,
  "nonfinite": "reject",
  "norm": "group",
  "num_byzantine": -1,
  "num_clients": 20,
  "optimizer": "sgd",
  "pack_size": 1,
  "partition": "dirichlet",
  "prox_mu": 0.0,
  "rounds": 20,
  "scaffold": false,
  "seed": 0,
  "server_lr": 1.0,
  "server_momentum": 0.9,
  "server_optimizer": "sgd",
  "shards_per_client": 2,
  "sparsify": "none",
  "topk_ratio": 0.5,
  "twin": false,
  "update_mode": "delta",
  "val_size": 0,
  "weight_decay": 0.0,
  "weighted": true
}
"""


def _fields(cls):
  return {f.name: f for f in dataclasses.fields(cls)}


def test_every_field_is_declared_in_one_section():
  names = [f.name for s in config_tree.SECTIONS for f in dataclasses.fields(s)]
  assert len(names) == len(set(names))
  # ExperimentConfig is the sections' fields, in their order.
  assert list(_fields(ExperimentConfig)) == names


def test_views_share_the_declarations():
  declared = {f.name: f for s in config_tree.SECTIONS
              for f in dataclasses.fields(s)}
  for cls in (ExperimentConfig, RoundConfig, ClientConfig):
    for name, f in _fields(cls).items():
      if cls is RoundConfig and name in DERIVED:
        continue
      assert f.default == declared[name].default, (cls.__name__, name)
      assert f.metadata == declared[name].metadata, (cls.__name__, name)


def test_one_set_of_defaults():
  exp = ExperimentConfig()
  for cfg in (RoundConfig(), ClientConfig()):
    for name, value in config_tree.values(cfg).items():
      if name not in DERIVED:
        assert value == getattr(exp, name), (type(cfg).__name__, name)
  assert ClientConfig().lr == 0.05
  assert (RoundConfig().engine, RoundConfig().client_devices) == ("map", 0)
  assert RoundConfig().client == exp.client_config()


def test_every_field_has_help():
  for cls in (ExperimentConfig, RoundConfig, ClientConfig):
    for f in dataclasses.fields(cls):
      text = config_tree.help_text(f)
      assert isinstance(text, str) and len(text) > 10, (cls.__name__, f.name)


def test_every_field_is_a_flag_with_its_default_and_help():
  for f in dataclasses.fields(ExperimentConfig):
    flag = flags.FLAGS[f.name]
    assert flag.help == config_tree.help_text(f), f.name
    assert flag.default == f.default, f.name
  assert run_lib.AGGREGATOR_NAMES in flags.FLAGS["aggregator"].help
  assert "cm=median" in flags.FLAGS["aggregator"].help
  assert "lfa=label_flip" in flags.FLAGS["attack"].help


def test_every_field_of_the_round_step_comes_from_a_flag():
  flag_names = set(_fields(ExperimentConfig))
  assert set(_fields(ClientConfig)) <= flag_names
  assert set(_fields(RoundConfig)) - flag_names <= set(DERIVED)
  # Every one of them set away from its default reaches the round step.
  given = dict(
      num_clients=7, clients_per_round=5, rounds=10, engine="vmap",
      map_batch_size=3, client_devices=1, server_lr=0.5,
      server_optimizer="momentum", server_momentum=0.5, weighted=False,
      lr_decay_at=0.5, lr_decay_factor=0.5, nonfinite="propagate",
      sparsify="topk", topk_ratio=0.25, pack_size=2, attack_start=3,
      num_byzantine=2, local_epochs=2, local_steps=3, batch_size=4,
      optimizer="adam", lr=0.01, momentum=0.5, weight_decay=0.1,
      update_mode="momentum", prox_mu=0.1, scaffold=False)
  exp = ExperimentConfig(**given)
  exp.validate(check_data=False)
  rc = exp.round_config()
  rc.validate()
  defaults = RoundConfig()
  for name in _fields(RoundConfig):
    if name not in ("client", "lr_decay_round"):
      assert getattr(rc, name) == given[name], name
      assert getattr(rc, name) != getattr(defaults, name), name
  assert rc.lr_decay_round == 5
  for name in _fields(ClientConfig):
    assert getattr(rc.client, name) == given[name], name
    if name != "scaffold":
      assert getattr(rc.client, name) != getattr(ClientConfig(), name), name
  assert ExperimentConfig(scaffold=True).round_config().client.scaffold


def test_default_config_json_is_unchanged(tmp_path):
  path = tmp_path / "config.json"
  files.atomic_write_json(str(path), config_dict(ExperimentConfig()))
  assert path.read_text() == DEFAULT_CONFIG_JSON


@pytest.mark.parametrize("kw,msg", [
    (dict(engine="pmap"), "unknown engine 'pmap'; choose one of vmap, map"),
    (dict(server_optimizer="lars"), "unknown server optimizer 'lars'"),
    (dict(server_optimizer="momentum", server_momentum=1.0),
     r"server_momentum must be in \[0, 1\), got 1.0"),
    (dict(clients_per_round=9, num_clients=5),
     "clients_per_round must be between 1 and num_clients=5, got 9"),
    (dict(map_batch_size=0), "map_batch_size must be >= 1, got 0"),
    (dict(lr_decay_factor=0.0), "lr_decay_factor must be > 0, got 0.0"),
])
def test_a_check_gives_one_message_in_every_view(kw, msg):
  with pytest.raises(ValueError, match=msg):
    dataclasses.replace(ExperimentConfig(dataset="synthetic"), **kw).validate(
        check_data=False)
  with pytest.raises(ValueError, match=msg):
    dataclasses.replace(RoundConfig(), **kw).validate()


def test_client_checks_run_in_the_flat_and_nested_views():
  msg = "scaffold and update_mode=momentum both keep per-client state"
  with pytest.raises(ValueError, match=msg):
    ExperimentConfig(scaffold=True, update_mode="momentum").validate(
        check_data=False)
  with pytest.raises(ValueError, match=msg):
    RoundConfig(client=ClientConfig(scaffold=True,
                                    update_mode="momentum")).validate()


def test_a_field_declared_twice_is_refused():
  with pytest.raises(TypeError, match="'lr' declared twice"):
    @config_tree.flat_view(ClientConfig)
    class Twice:
      lr: float = config_tree.option(0.1, "Another lr.")
