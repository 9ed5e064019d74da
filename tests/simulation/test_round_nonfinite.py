"""The round step's policy for uploads holding inf/nan (RoundConfig.nonfinite)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import aggregators
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.attacks.base import UpdateAttack
from fedjax_sparse.client.local import ClientConfig
from fedjax_sparse.layout import layout_of
from fedjax_sparse.simulation.round import (RoundConfig, init_server_state,
                                            make_round_step)
from tests.helpers import TinyBN, TinyMLP, round_data

MAL = np.array([True, False, False, True, False, False])
BASE = RoundConfig(num_clients=6, clients_per_round=6, attack_start=1,
                   engine="vmap", client_devices=1,
                   client=ClientConfig(lr=0.1, batch_size=8, local_epochs=1))


def _poison(value, rows="all"):
  """An update attack that writes ``value`` into the malicious rows."""

  def apply(state, updates, is_mal, key, ctx):
    del key, ctx
    if rows == "all":
      bad = jnp.full_like(updates, value)
    else:  # one coordinate
      bad = updates.at[:, 0].set(value)
    return jnp.where(is_mal[:, None], bad, updates), state

  return UpdateAttack(lambda d: (), apply)


def _plain_mean():
  """A rule that averages whatever it is sent (to see what reaches it)."""

  def apply(state, updates, masks, weights, key, ctx):
    del masks, key, ctx
    w = weights / jnp.sum(weights)
    return AggOut(w @ updates, jnp.ones_like(weights), {}), state

  return Aggregator(lambda d: (), apply)


def _make(cfg, agg=None, attack=None, model=TinyMLP(), malicious=MAL):
  data = round_data()._replace(malicious=jnp.asarray(malicious))
  variables = model.init(jax.random.key(0), data.x[:1])
  agg = agg or aggregators.get("fedavg")()
  step = make_round_step(cfg, model.apply, agg, layout_of(variables["params"]),
                         data.idx.shape[1], has_model_state=len(variables) > 1,
                         update_attack=attack)
  state = init_server_state(cfg, variables, agg, jax.random.key(1),
                            update_attack=attack)
  return data, step, state


def _leaves(tree):
  return [np.asarray(jax.random.key_data(x)
                     if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("case", [
    dict(),
    dict(sparsify="topk", topk_ratio=0.5, pack_size=2, agg="safesparse"),
    dict(model="bn"),
])
def test_reject_changes_nothing_on_finite_uploads(case):
  case = dict(case)
  agg_name = case.pop("agg", "fedavg")
  model = TinyBN() if case.pop("model", None) == "bn" else TinyMLP()
  # The reference: no screening, and the rule's plain arithmetic (without
  # the check for inf/nan rows it would make on its own), i.e. the round
  # step as it was before the policy (checked against that code, bit for
  # bit, when the policy was added).
  agg = aggregators.get(agg_name)()
  trusting = agg._replace(apply=lambda st, u, m, w, k, ctx: agg.apply(
      st, u, m, w, k, ctx.replace(finite_uploads=True)))
  results = []
  for policy, rule in (("reject", agg), ("propagate", trusting)):
    cfg = dataclasses.replace(BASE, nonfinite=policy, **case)
    data, step, state = _make(cfg, rule, model=model)
    for _ in range(2):
      state, m = step(state, data)
    results.append((_leaves(state), {k: np.asarray(v) for k, v in m.items()}))
  (s1, m1), (s2, m2) = results
  for a, b in zip(s1, s2):
    np.testing.assert_array_equal(a, b)
  assert m1.keys() == m2.keys()
  for k in m1:
    np.testing.assert_array_equal(m1[k], m2[k], err_msg=k)
  assert int(m1["nonfinite_clients"]) == 0


@pytest.mark.parametrize("value,rows", [(np.nan, "all"), (np.inf, "all"),
                                        (np.nan, "one")])
def test_reject_screens_nonfinite_uploads(value, rows):
  cfg = dataclasses.replace(BASE, nonfinite="reject")
  data, step, state = _make(cfg, _plain_mean(), _poison(value, rows))
  state, m = step(state, data)
  assert all(np.all(np.isfinite(x)) for x in _leaves(state.params))
  assert int(m["nonfinite_clients"]) == 2
  np.testing.assert_array_equal(np.asarray(m["acceptance"]) > 0, ~MAL)
  # A screened malicious client counts as flagged.
  assert int(m["flagged_malicious"]) == 2 and int(m["flagged_benign"]) == 0
  # The rule saw zero rows of weight 0: the mean of the honest clients.
  data_h, step_h, state_h = _make(cfg, _plain_mean(), malicious=MAL)
  counts = np.asarray(data.counts, np.float32)
  state_c, _ = step_h(state_h, data_h._replace(
      counts=jnp.asarray(np.where(MAL, 0, counts).astype(np.int32))))
  # Weight-0 clients are the same as clients without data for the mean.
  for a, b in zip(_leaves(state.params), _leaves(state_c.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_propagate_lets_the_rule_see_the_raw_rows():
  cfg = dataclasses.replace(BASE, nonfinite="propagate")
  data, step, state = _make(cfg, _plain_mean(), _poison(np.nan))
  state, m = step(state, data)
  assert int(m["nonfinite_clients"]) == 2
  assert all(np.all(np.isnan(x)) for x in _leaves(state.params))
  np.testing.assert_array_equal(np.asarray(m["acceptance"]), 1.0)


@pytest.mark.parametrize("policy", ["reject", "propagate"])
def test_diverged_clients_with_batchnorm(policy):
  # The malicious clients' examples are nan: their training diverges, so
  # both their updates and their BatchNorm statistics are nan.
  cfg = dataclasses.replace(BASE, nonfinite=policy)
  data, step, state = _make(cfg, model=TinyBN())
  counts = np.asarray(data.counts)
  idx = np.concatenate([np.asarray(data.idx)[c, :counts[c]]
                        for c in np.flatnonzero(MAL)])
  x = np.asarray(data.x).copy()
  x[idx] = np.nan
  state, m = step(state, data._replace(x=jnp.asarray(x)))
  assert int(m["nonfinite_clients"]) == 2
  finite = all(np.all(np.isfinite(a)) for a in _leaves(state.params))
  stats = all(np.all(np.isfinite(a)) for a in _leaves(state.model_state))
  if policy == "reject":
    assert finite and stats
  else:  # fedavg leaves the nan updates out, the statistics average them
    assert finite and not stats


def test_unknown_policy_fails_before_compiling():
  with pytest.raises(ValueError, match="nonfinite policy 'drop'.*reject, propagate"):
    dataclasses.replace(BASE, nonfinite="drop").validate()


def test_experiment_config_flag_and_round_record():
  from fedjax_sparse.simulation.experiment import ExperimentConfig, round_record
  cfg = ExperimentConfig(dataset="synthetic", nonfinite="propagate")
  assert cfg.round_config().nonfinite == "propagate"
  assert ExperimentConfig().round_config().nonfinite == "reject"
  with pytest.raises(ValueError, match="nonfinite policy"):
    ExperimentConfig(dataset="synthetic", nonfinite="zero").validate(
        check_data=False)
  metrics = {"loss": 1.0, "update_norm": 0.5, "uplink_bits": 8.0,
             "downlink_bits": 8.0, "nonfinite_clients": 0}
  rec = round_record(cfg, 1, 0.1, metrics.__getitem__)
  assert "nonfinite_clients" not in rec  # finite rounds keep their records
  metrics["nonfinite_clients"] = 3
  assert round_record(cfg, 1, 0.1, metrics.__getitem__)["nonfinite_clients"] == 3
