"""The baselines of :mod:`benchmarks.aggregators`: for every rule, its numpy
reference (:func:`numpy_rule`, on the test oracles of
:mod:`fedjax_sparse.testing.aggregator_refs` in ``float32``) and ByzFL's
numpy path where ByzFL has the rule (:func:`byzfl_rule`)."""

from __future__ import annotations

import math

import numpy as np

from fedjax_sparse.testing import aggregator_refs as refs
from fedjax_sparse.testing import byzfl as byzfl_loader
from fedjax_sparse.testing.crfl_ref import np_crfl_round
from fedjax_sparse.testing.signguard_ref import signguard_ref

BYZFL = byzfl_loader.load()

F32 = np.float32


def _sparse_k(d):
  return max(1, math.ceil(0.01 * d))


def hparams(name, d):
  """The hyperparameters the benchmark gives rule ``name`` at dimension
  ``d`` (the defaults but for the sparse and history rules)."""
  if name == "sparsefed":
    return {"k": 0.01}
  if name == "fetchsgd":
    return {"k": 0.01, "rows": 5, "cols": 10 * _sparse_k(d)}
  if name == "foolsgold":  # history rows: the largest K of the benchmark
    return {"num_clients": 100}
  return {}


# ---------------------------------------------------------------- numpy side


def _np_trimmed_partition(u, b):
  k = len(u)
  part = np.partition(u, [b, k - b - 1], axis=0) if b else u
  return part[b:k - b].mean(0)


def _np_select(u, w, accept):
  return refs.np_combine(u, None, w, accept, 1, F32)


def _np_meamed_windows(u, f):
  """Meamed with whole-array numpy: of the ``f + 1`` windows of ``K - f``
  sorted values, the one whose farthest value is closest to the median
  (``refs.np_meamed`` is the per-coordinate loop)."""
  k = len(u)
  n = k - f
  s = np.sort(u, axis=0)
  med = np.median(s, axis=0)
  cost = np.stack([np.maximum(med - s[i], s[i + n - 1] - med)
                   for i in range(f + 1)])
  start = np.argmin(cost, axis=0)
  csum = np.concatenate([np.zeros((1, u.shape[1]), u.dtype), np.cumsum(s, 0)])
  cols = np.arange(u.shape[1])
  return (csum[start + n, cols] - csum[start, cols]) / n


def numpy_rule(name, u, w, f, aux):
  """The numpy reference of rule ``name`` on dense uploads."""
  k, d = u.shape
  if name == "fedavg":
    return refs.np_combine(u, None, w, np.ones(k, F32), 1, F32)
  if name == "nwfedavg":
    return u.mean(0)
  if name == "fednova":
    tau = aux["local_steps"].astype(F32)
    p = w / w.sum()
    return (p * tau).sum() * ((p / tau) @ u)
  if name == "clipping":  # per-row L2 clip to 5, then the weighted mean
    norms = np.sqrt(np.einsum("kd,kd->k", u, u))
    scale = np.minimum(1, 5.0 / np.maximum(norms, F32(1e-30))).astype(F32)
    return ((w * scale) @ u) / w.sum()
  if name == "median":
    return np.median(u, axis=0)
  if name == "trimmed_mean":
    return _np_trimmed_partition(u, f)
  if name == "bulyan":  # iterated Krum, mean around the median
    return refs.np_bulyan(u, f, F32)[0]
  if name in ("krum", "multi_krum", "bulyan_fast"):
    scores = refs.np_krum_scores(u, f, F32)
    order = np.argsort(scores, kind="stable")
    if name == "bulyan_fast":
      sel = order[:k - 2 * f]
      return _np_trimmed_partition(u[sel], min(f, (len(sel) - 1) // 2))
    accept = np.zeros(k, F32)
    accept[order[:1 if name == "krum" else k - f]] = 1
    return _np_select(u, w, accept)
  if name == "rfa":
    return refs.np_rfa_weiszfeld(u, w, dtype=F32)[0]
  if name == "centered_clipping":
    return refs.np_cc(u, np.zeros(d, F32), 1.0, 1)
  if name == "signsgd":
    return np.sign(np.sign(u).sum(0))
  if name == "fedsign":
    cos = refs.np_sign_cos(np.sign(u))
    density = (cos.sum(1) - np.diag(cos)) / (k - 1)
    return _np_select(u, w, (density <= density.mean()).astype(F32))
  if name == "robust_dpfl":
    keep = refs.np_two_means_high(aux["global"].mean() - u.mean(1))
    return _np_select(u, w, keep.astype(F32))
  if name == "safesparse":
    accept = refs.np_safesparse(u, None, guard=True, dtype=F32)
    return _np_select(u, w, accept.astype(F32))
  if name == "gas":
    return refs.np_gas(u, w, 1000, "krum", f, aux["perm"], F32)[0]
  if name == "dnc":
    cols = aux["rng"].choice(d, min(10000, d), replace=False)
    return refs.np_dnc(u, w, f, [cols], dtype=F32)[0]
  if name == "fltrust":
    return refs.np_fltrust(u, aux["server_update"], F32)[0]
  if name == "lasa":
    return refs.np_lasa(u, [slice(0, d)], dtype=F32)[0]
  if name == "flguardian":
    trust = refs.np_flguardian_trust(u, [slice(0, d)], F32)
    return _np_select(u, w, (trust >= np.median(trust)).astype(F32))
  if name == "sparsefed":
    z = np.zeros(d, F32)
    return refs.np_sparsefed_round(u, z, z, _sparse_k(d))[0]
  if name == "fetchsgd":
    cols = hparams(name, d)["cols"]
    z = np.zeros((5, cols), F32)
    return refs.np_fetchsgd_round(u, z, z, _sparse_k(d), aux["sketch_seeds"], cols)[0]
  if name == "flame":  # sklearn's HDBSCAN; noise drawn by numpy
    noise = aux["rng"].standard_normal(d, dtype=F32)
    return refs.np_flame(u, w, lamb=0.001, noise=noise, dtype=F32)[0]
  if name == "foolsgold":  # first round: the histories are the updates
    return refs.np_foolsgold(u, u, w, dtype=F32)[0]
  if name == "rlr":
    return refs.np_rlr(u, None, w, 4.0, dtype=F32)
  if name == "mda":  # exact up to 65536 subsets, else the best neighbourhood
    return _np_select(u, w, refs.np_mda(u, f, dtype=F32)[0].astype(F32))
  if name == "smea":  # exact up to 5000 subsets, else f greedy removals
    return _np_select(u, w, refs.np_smea(u, f, dtype=F32)[0].astype(F32))
  if name == "monna":
    return _np_select(u, w, refs.np_monna(u, f, dtype=F32).astype(F32))
  if name == "meamed":
    return _np_meamed_windows(u, f)
  if name == "caf":  # unweighted: the filter's weights only
    c, _ = refs.np_caf(u, f, dtype=F32)
    return refs.np_combine(u, None, np.ones(k, F32), c, 1, F32)
  if name == "crfl":  # FedAvg, the model clipped to rho_1 = 2.1; numpy noise
    noise = aux["rng"].standard_normal(d, dtype=F32)
    return np_crfl_round(u, w, aux["global"], 2.1, 0.01, noise=noise,
                         dtype=F32)["update"]
  if name == "signguard":  # sklearn MeanShift; its own random 10% of coordinates
    cols = aux["rng"].choice(d, max(1, int(0.1 * d)), replace=False)
    return signguard_ref(u, None, w, np.sort(cols))["update"]
  raise KeyError(f"no numpy reference for {name!r}")


# ---------------------------------------------------------------- ByzFL side


def byzfl_rule(name, f, k=None):
  """ByzFL's numpy path for rule ``name`` (a function of the ``f32[K, d]``
  numpy updates), or ``None`` when ByzFL is not installed or has no such
  rule, or (MDA, SMEA: ``k`` given) when ByzFL would loop in Python over
  more than 65536 (MDA) or 100 (SMEA, a power step on ``d``-vectors each)
  subsets. Same work, not always the same numbers: ByzFL's mean is unweighted
  (ours ``fedavg`` weighted), its Krum family counts ``K - f - 1``
  neighbours (ours ``K - f - 2``), its ``GeometricMedian`` takes ``T = 3``
  Weiszfeld steps from zeros (ours, Pillutla et al.'s, runs from the
  coordinate median to a tolerance); see
  tests/aggregators/test_byzfl_oracle.py. Ours MDA, MoNNA and SMEA weigh the
  mean of the clients they select; ByzFL's CAF and SMEA estimate eigenvalues
  with one random power step (see tests/aggregators/test_byzfl_rules.py)."""
  if BYZFL is None:
    return None
  b = BYZFL
  rules = {
      "fedavg": lambda: b.Average(),
      "nwfedavg": lambda: b.Average(),
      "median": lambda: b.Median(),
      "trimmed_mean": lambda: b.TrMean(f=f),
      "krum": lambda: b.Krum(f=f),
      "multi_krum": lambda: b.MultiKrum(f=f),
      "rfa": lambda: b.GeometricMedian(nu=0.1, T=3),
      "meamed": lambda: b.Meamed(f=f),
      "monna": lambda: b.MoNNA(f=f),  # pivot row 0, as ours by default
      "caf": lambda: b.CAF(f=f),
  }
  subsets = None if k is None else math.comb(k, k - f)
  if name == "mda" and (subsets is None or subsets <= 65536):
    return b.MDA(f=f)
  if name == "smea" and (subsets is None or subsets <= 100):
    return b.SMEA(f=f)
  if name == "centered_clipping":  # ByzFL keeps its centre: a fresh one a call
    return lambda u: b.CenteredClipping(L=1, tau=1.0)(u)
  if name == "clipping":
    clip, mean = b.Clipping(c=5.0), b.Average()
    return lambda u: mean(clip(u))
  if name not in rules:
    return None
  return rules[name]()
