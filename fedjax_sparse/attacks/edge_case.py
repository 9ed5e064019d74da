"""The edge-case backdoor (Wang et al., "Attack of the Tails: Yes, You Really
Can Backdoor Federated Learning", NeurIPS 2020, sections 3-4).

The attackers train on their own clean data mixed with *edge-case* inputs,
examples from the tail of the input distribution (the paper's Southwest
airplanes for CIFAR-10, ARDIS 7s for MNIST), labelled with a target class;
the attack success rate (ASR) is the share of held-out edge-case inputs the
global model classifies as the target.

The edge-case set (ours, derived offline from the data set itself; we have
no ARDIS or Southwest images). From the **test split** (so that no client
ever trains on it) take the examples of class ``source``, score each by
``feature`` and keep the ``round(edge_fraction * n_source)`` lowest scores
(ties to the lower test index):

* ``feature="likelihood"`` (default): the log-likelihood under a diagonal
  Gaussian of the input values fitted to those same source-class test
  examples, ``-1/2 sum_j [(x_j - mu_j)^2 / v_j + log(2 pi v_j)]`` with
  ``v_j`` the per-input variance plus a floor of 1% of its mean (inputs that
  never vary, such as the blank border of FashionMNIST, stay finite): the
  least likely, most atypical examples of the class;
* ``feature="ink"``: the sum of the input values, the ink mass of an image
  (the faintest, smallest items; the order is that of the raw pixels for
  one-channel images under this library's per-channel standardisation).

A random ``asr_fraction`` of the edge cases (``edge_seed``) is held out for
the ASR (:func:`edge_case_split`); the rest is the attackers' edge-case
pool, shared by every attacker. Every edge case, both parts, is left out of
the run's clean test accuracy, loss and top-5 (the ``held_out_test_rows``
hook), as ``targeted_pgd``'s auxiliary test points are. Defaults: source
class 7, target 1 (the paper's ARDIS "7 labelled as 1"; on FashionMNIST:
sneakers labelled as trousers), ``edge_fraction=0.2`` and
``asr_fraction=0.5``: 200 of FashionMNIST's 1000 test sneakers, 100 for the
attackers (the paper's attacker pool holds 100 edge-case images) and 100
for the ASR (the paper: 196 Southwest, 1000 ARDIS test images).

Mixing: in every local batch of a poisoning client exactly
``round(poison_fraction * B)`` rows (chosen from the step's key) are
replaced by edge cases from the pool (drawn without replacement within a
batch while the pool allows) labelled ``target``. The default 0.2 is the
paper's 100 edge-case + 400 clean points per attacker pool. Honest clients
and rounds before ``--attack_start`` train on their batches untouched.

Variants (section 4, "Attack strategies"):

* black-box (``pgd_eps=None``, default): plain local training on the mixed
  batches;
* PGD (``pgd_eps=eps``): after every local step the poisoning client's
  model is projected onto the L2 ball of radius ``eps`` around the global
  model it downloaded (:func:`project_to_ball`; after every local step,
  whatever projection schedule the authors' code uses). The projection
  bounds the uploaded update with ``--update_mode=delta``; in momentum mode
  the upload is the momentum buffer, which it does not bound.

Measured (FashionMNIST, 20 iid clients, 10 a round, 30% attackers from
round 1, the MLP, 30 rounds of one local epoch, FedAvg; clean accuracy
0.87 with and without the attack): the backdoor barely generalises to the
held-out edge cases. Defaults: ASR 0.00 at rounds 10, 20 and 30;
``edge_fraction=0.05``: 0.08, 0.04, 0.04 (the attackers' own edge cases
0.68-0.96); with ``poison_fraction=0.5`` as well: 0.16, 0.16, 0.04;
``feature="ink"``: 0.08, 0.02, 0.00. Unlike ARDIS or Southwest images, the
tail of a class of the data set is also in the honest clients' training
data (their own tail of the source class, correctly labelled), and the
least likely examples share no one style to learn: expect lower ASRs than
the paper's.

Model replacement ("PGD with replacement", the upload scaled by
``gamma``) is the ``model_replacement`` update attack applied to the same
clients' updates: :func:`fedjax_sparse.simulation.round.make_round_step`
takes a data attack and an update attack together, so it composes in
Python; ``--attack`` names one attack, so not from the flags. To keep the
scaled upload within a norm bound ``delta`` set ``pgd_eps = delta / gamma``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.attacks.base import DataAttack
from fedjax_sparse.attacks.data import _check_fraction, _check_label, choose_rows
from fedjax_sparse.attacks.registry import register_data
from fedjax_sparse.requirements import TEST_SPLIT, declare

Array = jax.Array
PyTree = Any

EDGE_FEATURES = ("likelihood", "ink")
# The likelihood's variance floor, as a share of the mean variance.
VAR_FLOOR = 0.01


class EdgeCaseSplit(NamedTuple):
  """The edge-case set as rows of the test split (sorted ``int64`` arrays).

  Attributes:
    train_index: the attackers' edge-case pool.
    asr_index: the held-out edge cases of the ASR.
  """

  train_index: np.ndarray
  asr_index: np.ndarray

  @property
  def all_index(self) -> np.ndarray:
    """Every edge case (both parts), sorted."""
    return np.sort(np.concatenate([self.train_index, self.asr_index]))


def tail_scores(x, feature: str = "likelihood") -> np.ndarray:
  """``f64[n]``, lower = further in the tail (see the module docstring).

  Args:
    x: ``[n, ...]`` examples of one class.
    feature: ``"likelihood"`` or ``"ink"``.
  """
  if feature not in EDGE_FEATURES:
    raise ValueError(f"unknown edge-case feature {feature!r}; choose one of "
                     f"{', '.join(EDGE_FEATURES)}")
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  if feature == "ink":
    return x.sum(axis=1)
  mu = x.mean(axis=0)
  var = x.var(axis=0)
  var = var + VAR_FLOOR * var.mean() + 1e-12
  return -0.5 * (((x - mu) ** 2 / var).sum(axis=1)
                 + np.log(2.0 * np.pi * var).sum())


def edge_case_split(x, y, source: int, edge_fraction: float = 0.2,
                    asr_fraction: float = 0.5, feature: str = "likelihood",
                    seed: int = 0) -> EdgeCaseSplit:
  """The edge-case rows of a split (the test split in a run).

  The ``round(edge_fraction * n)`` examples of class ``source`` (``n`` of
  them) with the lowest :func:`tail_scores` (ties to the lower row), of
  which ``round(asr_fraction * n_edge)``, drawn with ``seed``, are held out
  for the ASR.

  Raises:
    ValueError: a fraction outside ``[0, 1]``, an unknown feature, or fewer
      than one edge case for either part (the message says what to raise).
  """
  _check_fraction("edge_fraction", edge_fraction)
  _check_fraction("asr_fraction", asr_fraction)
  y = np.asarray(y)
  rows = np.flatnonzero(y == source)
  n_edge = int(round(edge_fraction * len(rows)))
  n_asr = int(round(asr_fraction * n_edge))
  if n_asr < 1 or n_edge - n_asr < 1:
    raise ValueError(
        f"edge_case_backdoor: {n_edge} edge cases from {len(rows)} test "
        f"examples of class {source} leave {n_edge - n_asr} for the attackers "
        f"and {n_asr} for the ASR; raise edge_fraction (now {edge_fraction}), "
        f"set asr_fraction (now {asr_fraction}) inside (0, 1), or choose a "
        "source class with more test examples")
  scores = tail_scores(np.asarray(x)[rows], feature)
  tail = rows[np.argsort(scores, kind="stable")[:n_edge]]
  perm = np.random.default_rng(seed).permutation(n_edge)
  return EdgeCaseSplit(np.sort(tail[perm[n_asr:]]), np.sort(tail[perm[:n_asr]]))


def _options(kw: Mapping[str, Any]) -> dict:
  """``kw`` over the factory's defaults."""
  sig = inspect.signature(edge_case_backdoor)
  return {**{n: p.default for n, p in sig.parameters.items()
             if p.default is not inspect.Parameter.empty}, **kw}


def _split_of(kw: Mapping[str, Any], x, y) -> EdgeCaseSplit:
  o = _options(kw)
  return edge_case_split(x, y, o["source"], o["edge_fraction"],
                         o["asr_fraction"], o["feature"], o["edge_seed"])


def _edge_asr_set(kw: dict, x: np.ndarray, y: np.ndarray):
  """The ASR test set: the held-out edge cases labelled the target."""
  idx = _split_of(kw, x, y).asr_index
  return np.asarray(x)[idx], np.full((len(idx),), _options(kw)["target"],
                                     np.int32)


def _edge_test_rows(kw: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Every edge case's test row: out of the clean test metrics."""
  return _split_of(kw, x, y).all_index


def project_to_ball(params: PyTree, center: PyTree, eps) -> PyTree:
  """``params`` projected onto the L2 ball of radius ``eps`` around
  ``center`` (over all leaves together); inside the ball, ``params``
  exactly."""
  diff = jax.tree.map(jnp.subtract, params, center)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in jax.tree.leaves(diff)))
  scale = eps / jnp.maximum(norm, 1e-30)
  return jax.tree.map(
      lambda p, c, d: jnp.where(norm > eps, c + (scale * d).astype(p.dtype), p),
      params, center, diff)


@register_data("edge_case_backdoor")
@declare(TEST_SPLIT, asr_eval_set=_edge_asr_set,
         held_out_test_rows=_edge_test_rows)
def edge_case_backdoor(num_classes: int, source: int = 7, target: int = 1,
                       poison_fraction: float = 0.2,
                       edge_fraction: float = 0.2, asr_fraction: float = 0.5,
                       feature: str = "likelihood", edge_seed: int = 0,
                       pgd_eps: Optional[float] = None,
                       test_x=None, test_y=None) -> DataAttack:
  """The edge-case backdoor (Wang et al. 2020; see the module docstring).

  Args:
    num_classes: C.
    source: the class whose tail gives the edge cases.
    target: the label the attackers give them (``!= source``).
    poison_fraction: share of each local batch replaced by edge cases
      (0.2: the paper's 100 edge-case + 400 clean points).
    edge_fraction: share of the source class's test examples that are edge
      cases (0.2).
    asr_fraction: share of the edge cases held out for the ASR (0.5).
    feature: the tail's feature, ``"likelihood"`` or ``"ink"``.
    edge_seed: seed of the held-out draw.
    pgd_eps: None for the black-box attack; else the radius of the L2 ball
      around the global model that the local model is projected onto after
      every step (PGD).
    test_x, test_y: the test split (the run provides it: declared need
      ``TEST_SPLIT``).

  Returns:
    A :class:`DataAttack` with ``project`` set when ``pgd_eps`` is.

  Raises:
    ValueError: bad classes, fractions, feature or ``pgd_eps``, a missing
      test split, too few edge cases, or inputs of another shape.
  """
  _check_label("source", source, num_classes)
  _check_label("target", target, num_classes)
  if source == target:
    raise ValueError(f"edge_case_backdoor: target ({target}) must differ from "
                     "source: the ASR would be the source's clean accuracy")
  _check_fraction("poison_fraction", poison_fraction)
  if pgd_eps is not None and not float(pgd_eps) > 0:
    raise ValueError(f"edge_case_backdoor: pgd_eps must be > 0 or None (the "
                     f"black-box attack), got {pgd_eps}")
  if test_x is None or test_y is None:
    raise ValueError("edge_case_backdoor draws its edge cases from the test "
                     "split: pass test_x and test_y (a run passes them)")
  split = edge_case_split(test_x, test_y, source, edge_fraction, asr_fraction,
                          feature, edge_seed)
  edge_x = jnp.asarray(np.asarray(test_x)[split.train_index])
  n_edge = edge_x.shape[0]

  def apply(x, y, key, ctx):
    del ctx
    if tuple(x.shape[1:]) != tuple(edge_x.shape[1:]):
      raise ValueError(f"edge_case_backdoor: batch examples of shape "
                       f"{tuple(x.shape[1:])}, edge cases of "
                       f"{tuple(edge_x.shape[1:])}")
    k_rows, k_pick = jax.random.split(key)
    b = y.shape[0]
    rows = choose_rows(k_rows, b, poison_fraction)
    pick = jax.random.permutation(k_pick, n_edge)[jnp.arange(b) % n_edge]
    xe = jnp.take(edge_x, pick, axis=0).astype(x.dtype)
    m = rows.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(m, xe, x), jnp.where(rows, target, y).astype(y.dtype)

  project = None
  if pgd_eps is not None:
    eps = float(pgd_eps)

    def project(params, global_params, ctx):
      del ctx
      return project_to_ball(params, global_params, eps)

  return DataAttack(apply, num_classes, None, project)
