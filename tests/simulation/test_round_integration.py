"""Sparsified uploads, attacks and detection inside the jitted round step."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators, attacks
from fedjax_sparse.client.local import ClientConfig
from fedjax_sparse.layout import layout_of
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment
from fedjax_sparse.simulation.round import (RoundConfig, init_server_state,
                                            make_round_step)
from tests.helpers import TinyMLP, round_data


def _make(cfg, agg_name="fedavg", update_attack=None, data_attack=None,
          malicious=None, agg=None):
  data = round_data()
  if malicious is not None:
    data = data._replace(malicious=jnp.asarray(malicious),
                         rank=jnp.asarray(attacks.malicious_rank(malicious)))
  model = TinyMLP()
  variables = model.init(jax.random.key(0), data.x[:1])
  agg = agg or aggregators.get(agg_name)()
  step = make_round_step(cfg, model.apply, agg, layout_of(variables["params"]),
                         data.idx.shape[1], update_attack=update_attack,
                         data_attack=data_attack)
  state = init_server_state(cfg, variables, agg, jax.random.key(1),
                            update_attack)
  return data, variables, step, state


BASE = RoundConfig(num_clients=6, clients_per_round=6, engine="vmap",
                   client_devices=1,
                   client=ClientConfig(lr=0.1, batch_size=8, local_epochs=1))


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def test_topk_ratio_one_equals_dense_fedavg():
  data, _, step_d, st_d = _make(BASE)
  _, _, step_s, st_s = _make(dataclasses.replace(BASE, sparsify="topk",
                                                 topk_ratio=1.0))
  for _ in range(2):
    st_d, _ = step_d(st_d, data)
    st_s, _ = step_s(st_s, data)
  np.testing.assert_allclose(_flat(st_d.params), _flat(st_s.params),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio,pack", [(0.5, 1), (0.3, 4), (0.1, 7)])
def test_sparse_round_counts_bits_and_changes_only_selected_packs(ratio, pack):
  cfg = dataclasses.replace(BASE, sparsify="topk", topk_ratio=ratio,
                            pack_size=pack)
  data, variables, step, state = _make(cfg)
  flat0 = _flat(variables["params"])
  state, m = step(state, data)
  d = flat0.size
  n_packs = math.ceil(d / pack)
  kept = math.ceil(ratio * n_packs)
  values = kept * pack if d % pack == 0 else None
  if values is not None:
    assert float(m["uplink_bits"]) == 6 * (32 * values + n_packs)
  assert float(m["downlink_bits"]) == 6 * 32 * d
  assert float(m["uplink_bits"]) < 6 * 32 * d
  changed = _flat(state.params) != flat0
  # Each client keeps `kept` packs, so at most 6 * kept packs can change.
  changed_packs = np.unique(np.nonzero(changed)[0] // pack)
  assert 0 < len(changed_packs) <= 6 * kept


def test_update_attack_starts_at_its_round_and_only_touches_attackers():
  mal = np.array([True, True, False, False, False, False])
  cfg = dataclasses.replace(BASE, attack_start=2)
  data, _, step_c, st_c = _make(cfg)
  data_a, _, step_a, st_a = _make(cfg, update_attack=attacks.get_update_attack(
      "sign_flip")(), malicious=mal)
  st_c, m_c = step_c(st_c, data)
  st_a, m_a = step_a(st_a, data_a)
  assert not bool(m_a["attack_active"])
  np.testing.assert_array_equal(_flat(st_c.params), _flat(st_a.params))
  st_c, m_c = step_c(st_c, data)
  st_a, m_a = step_a(st_a, data_a)
  assert bool(m_a["attack_active"])
  assert int(m_a["num_malicious"]) == 2
  assert not np.allclose(_flat(st_c.params), _flat(st_a.params))


def test_sign_flip_round_equals_manual_aggregate():
  # Round 1 with the attack active: the aggregate is the weighted mean of the
  # honest updates with the attackers' rows negated.
  mal = np.array([True, False, True, False, False, False])
  cfg = dataclasses.replace(BASE, attack_start=1)
  data, variables, step_c, st_c = _make(cfg, agg_name="nwfedavg")
  data_a, _, step_a, st_a = _make(cfg, agg_name="nwfedavg",
                                  update_attack=attacks.get_update_attack("sign_flip")(),
                                  malicious=mal)
  flat0 = _flat(variables["params"])
  st_c, _ = step_c(st_c, data)
  st_a, _ = step_a(st_a, data_a)
  # Honest mean = flat0 - new_c; attackers' honest updates are unknown, so
  # compare through linearity: new_a - new_c = (2/K) * sum_attackers u_i.
  diff = _flat(st_a.params) - _flat(st_c.params)
  assert np.linalg.norm(diff) > 0
  # A second, all-attacker run gives the negated mean: new = flat0 + mean.
  data_all, _, step_all, st_all = _make(
      cfg, agg_name="nwfedavg",
      update_attack=attacks.get_update_attack("sign_flip")(),
      malicious=np.ones(6, bool))
  st_all, _ = step_all(st_all, data_all)
  np.testing.assert_allclose(_flat(st_all.params) - flat0,
                             flat0 - _flat(st_c.params), rtol=1e-4, atol=1e-6)


def test_model_space_scaling_round_uploads_scaled_local_models():
  # All clients attack with model-space scaling: each uploads lambda x its
  # local model w_i = flat0 - u_i, so (server lr 1, unweighted mean) the new
  # global model is flat0 - mean_i (flat0 - lambda w_i) = lambda * mean_i w_i
  # = lambda * (flat0 - honest mean update) = lambda * new_clean.
  cfg = dataclasses.replace(BASE, attack_start=1)
  data, variables, step_c, st_c = _make(cfg, agg_name="nwfedavg")
  data_a, _, step_a, st_a = _make(
      cfg, agg_name="nwfedavg", malicious=np.ones(6, bool),
      update_attack=attacks.get_update_attack("scaling")(scale=3.0, space="model"))
  st_c, _ = step_c(st_c, data)
  st_a, _ = step_a(st_a, data_a)
  np.testing.assert_allclose(_flat(st_a.params), 3.0 * _flat(st_c.params),
                             rtol=1e-4, atol=1e-5)


def test_data_attack_poisons_only_malicious_clients():
  mal = np.array([True, False, False, False, False, False])
  cfg = dataclasses.replace(BASE, attack_start=1)
  lf = attacks.get_data_attack("label_flip")(num_classes=4)
  data, _, step_c, st_c = _make(cfg)
  data_a, _, step_a, st_a = _make(cfg, data_attack=lf, malicious=mal)
  data_n, _, step_n, st_n = _make(cfg, data_attack=lf,
                                  malicious=np.zeros(6, bool))
  st_c, m_c = step_c(st_c, data)
  st_a, m_a = step_a(st_a, data_a)
  st_n, m_n = step_n(st_n, data_n)
  np.testing.assert_array_equal(_flat(st_c.params), _flat(st_n.params))
  assert not np.allclose(_flat(st_c.params), _flat(st_a.params))
  assert float(m_a["loss"]) > float(m_c["loss"])


def test_detection_counts_with_krum():
  mal = np.array([True, True, False, False, False, False])
  cfg = dataclasses.replace(BASE, attack_start=1, num_byzantine=1)
  # K = 6 allows f <= 1 (Krum: K >= 2f + 3); m = 4 keeps four of the six.
  data, _, step, st = _make(cfg, agg=aggregators.get("multi_krum")(m=4),
                            update_attack=attacks.get_update_attack("scaling")(),
                            malicious=mal)
  st, m = step(st, data)
  acc = np.asarray(m["acceptance"])
  is_mal = np.asarray(m["malicious"])
  assert int(m["flagged_malicious"]) == int(((acc <= 0) & is_mal).sum())
  assert int(m["flagged_benign"]) == int(((acc <= 0) & ~is_mal).sum())
  # Scaled (x10) updates are far from everyone: Multi-Krum drops both.
  assert int(m["flagged_malicious"]) == 2


def test_sparsefed_runs_in_the_round_step_and_conserves_mass():
  agg = aggregators.get("sparsefed")(k=50, rho=0.0)
  data, variables, step, st = _make(BASE, agg=agg)
  flat0 = _flat(variables["params"])
  st, m = step(st, data)
  moved = _flat(st.params) - flat0
  assert np.count_nonzero(moved) <= 50
  # Applied update + error-feedback residual = the round's mean update.
  _, _, step_avg, st_avg = _make(BASE, agg_name="nwfedavg")
  st_avg, _ = step_avg(st_avg, data)
  mean_update = flat0 - _flat(st_avg.params)
  np.testing.assert_allclose(-moved + np.asarray(st.agg_state.error), mean_update,
                             rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_experiment_with_attack_and_sparsity(tmp_path):
  cfg = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=10,
                         clients_per_round=10, rounds=3, batch_size=16, lr=0.1,
                         model="mlp", sparsify="topk", topk_ratio=0.5,
                         attack="scaling", malicious_fraction=0.3,
                         attack_start=2, aggregator="multi_krum",
                         output_dir=str(tmp_path))
  summary = run_experiment(cfg, progress=False)
  assert summary["mean_tpr"] == 1.0
  assert summary["uplink_bits_total"] < summary["downlink_bits_total"]


@pytest.mark.parametrize("kw,msg", [
    (dict(sparsify="randk"), "unknown sparsify"),
    (dict(sparsify="topk", topk_ratio=0.0), "topk_ratio"),
    (dict(sparsify="topk", topk_ratio=1.5), "topk_ratio"),
    (dict(sparsify="topk", pack_size=0), "pack_size"),
    (dict(attack="alie"), "malicious_fraction"),
    (dict(attack="nosuchattack", malicious_fraction=0.2), "unknown attack"),
    (dict(aggregator_args="k"), "name=value"),
    (dict(malicious_fraction=1.0), "malicious_fraction"),
])
def test_bad_sparsity_and_attack_flags(kw, msg):
  cfg = dataclasses.replace(ExperimentConfig(dataset="synthetic"), **kw)
  with pytest.raises(ValueError, match=msg):
    cfg.validate()


def test_sparsefed_k_larger_than_d_fails_before_compiling():
  cfg = ExperimentConfig(dataset="synthetic", num_clients=4,
                         clients_per_round=4, aggregator="sparsefed",
                         aggregator_args="k=10000000")
  from fedjax_sparse.simulation.experiment import Experiment
  with pytest.raises(ValueError, match="k"):
    Experiment(cfg)


@pytest.mark.slow
def test_escape_ratio_and_class_aware_masking_from_flags(tmp_path):
  from fedjax_sparse.simulation import io
  cfg = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=6, rounds=2, batch_size=16, lr=0.1,
                         attack="alie", malicious_fraction=0.34,
                         attack_start=1, aggregator="trimmed_mean",
                         output_dir=str(tmp_path / "tm"))
  run_experiment(cfg, progress=False)
  recs = io.read_jsonl(tmp_path / "tm" / "rounds.jsonl")
  assert all(0.0 <= r["escape_ratio"] <= 1.0 for r in recs)
  cam = dataclasses.replace(cfg, attack="none", malicious_fraction=0.0,
                            aggregator="class_aware_masking", val_size=120,
                            output_dir=str(tmp_path / "cam"))
  summary = run_experiment(cam, progress=False)
  assert summary["final_accuracy"] > 0.3
