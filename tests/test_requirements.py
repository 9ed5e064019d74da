"""Rules and attacks declare what they need (fedjax_sparse/requirements.py);
the run layer names none of them."""

import ast
import functools
import os

import numpy as np
import pytest

from fedjax_sparse import aggregators
from fedjax_sparse import attacks
from fedjax_sparse import metrics
from fedjax_sparse import requirements
from fedjax_sparse.requirements import AUX_SET, MODEL, SERVER_DATA, declare
from tests.helpers import ROOT


def test_declarations_of_the_built_in_rules_and_attacks():
  needs = {n: requirements.aggregator_needs(n) for n in aggregators.names()}
  assert {n for n, v in needs.items() if SERVER_DATA in v} == {"fltrust"}
  assert {n for n, v in needs.items() if MODEL in v} == {"class_aware_masking"}
  assert {n for n, v in needs.items()
          if requirements.POPULATION in v} == {"foolsgold"}
  assert {n for n, v in needs.items()
          if requirements.SERVER in v} == {"crfl"}
  assert requirements.aggregator_needs("cm") == frozenset()
  aux = {n for n in attacks.names() if AUX_SET in requirements.attack_needs(n)}
  assert aux == {"targeted_pgd"}
  sparse = {n for n in attacks.names()
            if requirements.SPARSIFIER in requirements.attack_needs(n)}
  assert sparse == {"mask_mimicry", "sign_camouflage"}
  assert requirements.attack_needs("none") == frozenset()
  assert metrics.backdoor_attacks() == ["dba", "edge_case_backdoor",
                                        "neurotoxin", "pixel_backdoor",
                                        "semantic_backdoor"]
  assert not metrics.is_backdoor("ipm") and not metrics.is_backdoor("none")


def test_a_new_rule_declares_its_needs_in_one_place():
  @declare(SERVER_DATA)
  def rule():
    pass
  assert requirements.needs_of(rule) == {SERVER_DATA}
  declare(MODEL)(rule)
  assert requirements.needs_of(rule) == {SERVER_DATA, MODEL}
  assert requirements.needs_of(lambda: None) == frozenset()
  with pytest.raises(ValueError, match="unknown need"):
    declare("gpu")
  with pytest.raises(ValueError, match="unknown need"):
    declare(asr_set=lambda *a: a)


def test_a_backdoor_hook_is_the_asr_set():
  x = np.zeros((6, 4, 4, 1), np.float32)
  y = np.array([0, 1, 2, 7, 7, 1])
  xs, ys = metrics.backdoor_eval_set("semantic_backdoor", {}, x, y)
  assert len(xs) == 2 and (ys == 1).all()
  with pytest.raises(ValueError, match="not a backdoor attack"):
    metrics.backdoor_eval_set("ipm", {}, x, y)


def test_the_run_layer_names_no_rule_or_attack():
  """No string literal of the run layer is a rule or attack name (docs and
  examples inside docstrings aside): what a rule or attack needs is declared
  in its own module."""
  # fedavg is the default rule (ExperimentConfig) and the rule of the
  # client-side presets (FedProx, SCAFFOLD): a default, not a dependence.
  names = (set(aggregators.names()) | set(attacks.names())) - {"none",
                                                               "fedavg"}
  hits = []
  for sub in ("simulation", "sweeps", "metrics"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, "fedjax_sparse", sub)):
      for f in sorted(files):
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        with open(path) as fh:
          tree = ast.parse(fh.read())
        for node in ast.walk(tree):
          if (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value in names):
            hits.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: "
                        f"{node.value!r}")
  assert not hits, "\n".join(hits)


def test_the_run_gives_mask_choosing_attacks_its_topk_ratio():
  import dataclasses
  from fedjax_sparse.simulation.experiment import Experiment, ExperimentConfig
  cfg = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=6, rounds=1, model="mlp",
                         attack="mask_mimicry", malicious_fraction=0.34,
                         attack_start=1, sparsify="topk", topk_ratio=0.2,
                         client_devices=1)
  seen = []
  real = attacks.get_update_attack("mask_mimicry")
  import fedjax_sparse.attacks.builder as builder
  orig = builder.get_update_attack

  def spy(name):
    f = orig(name)

    @functools.wraps(f)  # the builder checks arguments against f's signature
    def wrapped(**kw):
      seen.append(kw.get("topk_ratio"))
      return f(**kw)
    return wrapped
  builder.get_update_attack = spy
  try:
    Experiment(cfg)
    Experiment(dataclasses.replace(cfg, sparsify="none"))
    Experiment(dataclasses.replace(cfg, attack_args="topk_ratio=0.5"))
  finally:
    builder.get_update_attack = orig
  assert seen == [0.2, 1.0, 0.5]
  assert real is orig("mask_mimicry")
