"""The FLB-style PyTorch round of benchmarks/peer_round.py: rules and one round.

The torch side of the benchmark must compute what it claims, or the speed
ratios compare different work: its rules are checked against numpy
references and our aggregators on random inputs, and its round against
plain SGD and a numpy oracle of FLB's worker-momentum round.
"""

import copy
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# (benchmarks/ is importable: pytest puts the repository's root on sys.path.)
from benchmarks import peer_round as pr  # noqa: E402

import fedjax_sparse.aggregators as agg_lib  # noqa: E402
from fedjax_sparse.aggregators.base import AggContext  # noqa: E402
from fedjax_sparse.testing.aggregator_refs import np_cc, np_krum_scores  # noqa: E402
from tests.helpers import ROOT  # noqa: E402


@functools.lru_cache(maxsize=None)
def _rule(name, **hparams):
  agg = agg_lib.get(name)(**hparams)
  return agg.init, jax.jit(agg.apply)


def _ours(name, u, f=0, state=None, **hparams):
  """Our registered rule ``name`` (default hyperparameters unless given)."""
  init, apply = _rule(name, **hparams)
  u = jnp.asarray(u)
  k, d = u.shape
  ctx = AggContext(round=jnp.int32(0), num_byzantine=f, num_clients=k)
  state = init(d) if state is None else state
  out, state = apply(state, u, None, jnp.ones((k,)), jax.random.PRNGKey(0),
                     ctx)
  return np.asarray(out.update), state


def _u(k, d=24, seed=0):
  return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


@pytest.mark.parametrize("k", [9, 10])
def test_median_is_the_coordinate_median(k):
  u = _u(k, seed=k)
  np.testing.assert_allclose(pr.torch_median(torch.from_numpy(u)).numpy(),
                             np.median(u, axis=0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pr.torch_median(torch.from_numpy(u)).numpy(),
                             _ours("median", u)[0], rtol=1e-6, atol=1e-7)


def test_median_even_k_averages_the_two_middle_values():
  u = np.array([[0.0], [1.0], [5.0], [9.0]], np.float32)
  assert pr.torch_median(torch.from_numpy(u)).item() == 3.0


def test_multi_krum_matches_ours_and_numpy_scores():
  k, f = 10, 2
  u = _u(k, seed=3)
  u[:f] += 4.0  # two outliers Multi-Krum must drop
  ut = torch.from_numpy(u)
  np.testing.assert_allclose(pr.torch_krum_scores(ut, f).numpy(),
                             np_krum_scores(u, f), rtol=1e-4)
  np.testing.assert_allclose(pr.torch_multi_krum(ut, f).numpy(),
                             _ours("multi_krum", u, f=f)[0],
                             rtol=1e-5, atol=1e-6)
  order = np.argsort(np_krum_scores(u, f), kind="stable")[:k - f]
  assert set(order) == set(range(f, k))
  np.testing.assert_allclose(pr.torch_multi_krum(ut, f).numpy(),
                             u[order].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hparams", [{}, {"tau": 0.5, "num_iters": 3}])
def test_centered_clipping_matches_ours_over_two_rounds(hparams):
  """``{}``: our defaults against the torch side's reading of them."""
  tau, iters = pr.cc_defaults()
  tau, iters = hparams.get("tau", tau), hparams.get("num_iters", iters)
  v_t = torch.zeros(24)
  state = None
  v_np = np.zeros(24, np.float32)
  for rnd in range(2):  # the second round starts from the first's aggregate
    u = _u(7, seed=10 + rnd) * 3  # rows of norm ~15: all clipped at tau <= 1
    v_t = pr.torch_centered_clipping(torch.from_numpy(u), v_t, tau, iters)
    ours, state = _ours("centered_clipping", u, state=state, **hparams)
    v_np = np_cc(u, v_np, tau, iters)
    np.testing.assert_allclose(v_t.numpy(), ours, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v_t.numpy(), v_np, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn2"])
def test_torch_models_have_our_parameter_counts(name):
  from fedjax_sparse import models
  from fedjax_sparse.models.registry import count_params
  model = models.get_model(name, 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 28, 28, 1)))
  ours = count_params(shapes["params"])
  theirs = sum(p.numel() for p in pr.torch_model(name).parameters())
  assert theirs == ours == {"mlp": 199_210, "cnn2": 431_080}[name]
  out = pr.torch_model(name)(torch.zeros(2, 1, 28, 28))
  assert tuple(out.shape) == (2, 10)


def _tiny(k=3, n=8, seed=0):
  torch.manual_seed(seed)
  model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(),
                              torch.nn.Linear(5, 3))
  rng = np.random.default_rng(seed)
  x = torch.from_numpy(rng.standard_normal((k * n, 6)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 3, k * n).astype(np.int64))
  idx = torch.arange(k * n).reshape(k, n)
  return model, x, y, idx


def test_one_mean_round_is_plain_sgd_on_the_clients_batches():
  """1 local step from zero momentum: w - lr (1 - beta) mean_i grad_i(w)."""
  k, lr, beta = 3, 0.5, 0.9
  model, x, y, idx = _tiny(k)
  reference = copy.deepcopy(model)
  rnd = pr.FlbRound(model, x, y, idx, "mean", local_steps=1, batch_size=4,
                    lr=lr, beta=beta)
  w0 = rnd.global_flat.clone()
  positions = rnd.draw_positions()
  rnd(positions)
  rows = idx.gather(1, positions.reshape(k, -1))  # [K, 4]: equal batches
  opt = torch.optim.SGD(reference.parameters(), lr=lr * (1 - beta))
  loss = torch.nn.functional.cross_entropy(reference(x[rows.reshape(-1)]),
                                           y[rows.reshape(-1)])
  loss.backward()
  opt.step()
  expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
  assert not torch.allclose(rnd.global_flat, w0)
  torch.testing.assert_close(rnd.global_flat, expected, rtol=1e-5, atol=1e-6)


def _np_grad(w, x, y):
  """Flat gradient of the mean cross-entropy of the 6-5-3 ReLU MLP."""
  w1, b1 = w[:30].reshape(5, 6), w[30:35]
  w2, b2 = w[35:50].reshape(3, 5), w[50:53]
  h = x @ w1.T + b1
  a = np.maximum(h, 0)
  z = a @ w2.T + b2
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dz = (p - np.eye(3)[y]) / len(y)
  dh = (dz @ w2) * (h > 0)
  return np.concatenate([(dh.T @ x).ravel(), dh.sum(0), (dz.T @ a).ravel(),
                         dz.sum(0)])


def test_two_rounds_match_a_numpy_oracle_of_flb_worker_momentum():
  k, steps, lr, beta = 3, 2, 0.3, 0.9
  model, x, y, idx = _tiny(k, seed=1)
  for rule in ("mean", "median"):
    rnd = pr.FlbRound(copy.deepcopy(model), x, y, idx, rule, local_steps=steps,
                      batch_size=4, lr=lr, beta=beta, seed=5)
    w = rnd.global_flat.numpy().astype(np.float64)
    mom = np.zeros((k, w.size))
    xn, yn = x.numpy().astype(np.float64), y.numpy()
    for _ in range(2):
      positions = rnd.draw_positions()
      rnd(positions)
      rows = idx.gather(1, positions.reshape(k, -1)).reshape(positions.shape)
      for i in range(k):
        wi = w.copy()
        for s in range(steps):
          r = rows[i, s].numpy()
          mom[i] = beta * mom[i] + (1 - beta) * _np_grad(wi, xn[r], yn[r])
          wi -= lr * mom[i]
      agg = mom.mean(0) if rule == "mean" else np.median(mom, axis=0)
      w = w - lr * agg
    np.testing.assert_allclose(rnd.momentum.numpy(), mom, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rnd.global_flat.numpy(), w, rtol=1e-4,
                               atol=1e-6)


def test_summary_judges_the_targets():
  recs = [{"model": "mlp", "K": 25, "rule": "mean", "ratio": 1.6,
           "meets_target": True},
          {"model": "mlp", "K": 25, "rule": "median", "ratio": 1.49,
           "meets_target": False},
          {"model": "mlp", "K": 100, "rule": "mean", "ratio": 3.2,
           "meets_target": True}]
  s = pr.summary(recs)
  assert not s["k25_1p5x_met"] and s["k100_10steps_3x_met"]
  assert s["k25_1p5x"] == {"mlp/mean": 1.6, "mlp/median": 1.49}


def test_without_torch_nothing_is_written(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(pr, "torch", None)
  out = tmp_path / "peer.json"
  pr.main(["--out", str(out)])
  assert not out.exists()
  assert "not installed" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_benchmark_writes_json(tmp_path):
  import subprocess
  out = tmp_path / "peer.json"
  subprocess.run([sys.executable, "-m", "benchmarks.peer_round", "--quick",
                  "--models", "mlp", "--rules", "mean", "--out", str(out)],
                 cwd=ROOT, check=True, timeout=1200,
                 env={**os.environ, "FEDJAX_SPARSE_HUGEPAGES": "0"})
  from fedjax_sparse.simulation import io
  r = io.read_json(str(out))
  assert [(x["K"], x["rule"]) for x in r["records"]] == [(25, "mean"),
                                                          (100, "mean")]
  assert all(x["params_torch"] == x["params_ours"] for x in r["records"])
