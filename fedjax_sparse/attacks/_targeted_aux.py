"""The auxiliary set of ``targeted_pgd`` (sparsefed.txt 3.2, B.1.2), drawn once.

The attack and the targeted-accuracy evaluation use one set:
:class:`~fedjax_sparse.simulation.experiment.Experiment` draws it with
:func:`targeted_auxiliary_data` and hands it to
:func:`fedjax_sparse.attacks.builder.build_update_attack`.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

from fedjax_sparse.attacks._masks import check_attacker_data

# Options of ``targeted_pgd`` made here, with their defaults: s = 50 is the
# cross-silo auxiliary set size of sparsefed.txt Table 1; the seed is ours;
# the auxiliary points are test points (sparsefed.txt 3.2, B.5, B.8: "All
# auxiliary datapoints are drawn from the CIFAR validation set"), or with
# aux_source="train" the attackers' own training examples (what this
# library did before the option existed).
TARGETED_OPTIONS: dict[str, Any] = {"aux_size": 50, "aux_seed": 0,
                                    "aux_source": "test"}
AUX_SOURCES = ("test", "train")
# Factory arguments of ``targeted_pgd`` the builder supplies itself.
TARGETED_MADE = ("loss_fn", "unravel", "aux_x", "aux_y")


def targeted_auxiliary_set(pool_x, pool_y, num_classes: int, size: int = 50,
                           seed: int = 0, return_index: bool = False):
  """An auxiliary set of ``targeted_pgd`` drawn from the pool ``pool_x, pool_y``.

  ``size`` points of the pool, each label flipped to a wrong class
  (:func:`~fedjax_sparse.attacks.make_auxiliary_set`); ``size`` is capped
  at the pool size. Which pool: :func:`targeted_auxiliary_data`.

  Returns:
    ``(x [s, ...], y_flipped int32[s])``, and with ``return_index`` the
    drawn rows' positions in the pool, ``int[s]``.
  """
  from fedjax_sparse.attacks.targeted import make_auxiliary_set
  x, y = check_attacker_data(pool_x, pool_y, "targeted_pgd")
  return make_auxiliary_set(x, y, min(int(size), len(y)), int(num_classes),
                            int(seed), return_index=return_index)


class TargetedAux(NamedTuple):
  """The auxiliary set of ``targeted_pgd`` and where it came from.

  Attributes:
    x: ``[s, ...]`` auxiliary inputs.
    y: ``int32[s]`` their flipped labels (the attack's targets).
    test_index: ``int[s]`` the points' rows in the test split
      (``aux_source="test"``), or None (``"train"``: rows of the attackers'
      pooled training data).
  """

  x: np.ndarray
  y: np.ndarray
  test_index: Optional[np.ndarray]


def check_aux_source(source: Any) -> str:
  """``source`` if it is one of :data:`AUX_SOURCES`, else a ValueError."""
  if source not in AUX_SOURCES:
    raise ValueError(f"targeted_pgd: unknown aux_source {source!r}; choose "
                     f"one of {', '.join(AUX_SOURCES)} (test: the paper's "
                     "auxiliary set of test points)")
  return source


def targeted_auxiliary_data(options: Optional[Mapping[str, Any]] = None, *,
                            num_classes: int, attacker_x=None, attacker_y=None,
                            test_x=None, test_y=None) -> TargetedAux:
  """The auxiliary set of ``targeted_pgd`` for its flag options.

  sparsefed.txt 3.2 (and B.5, B.8): "we sample s points from the test
  distribution. We then flip the label to one of the labels that is not the
  ground truth"; the points are drawn from the test (validation) set, never
  from training data (ALGORITHMS.md section 8, reproduction rules). With
  ``aux_source="test"`` (the default) they are ``aux_size`` rows of
  ``test_x, test_y`` drawn with ``aux_seed``; the experiment then leaves
  them out of its test-accuracy evaluation, as the paper measures stealth
  on "the validation set not including the auxiliary set" (B.5, Table 11).
  ``aux_source="train"`` draws them from the attackers' pooled training
  examples ``attacker_x, attacker_y`` instead (ours; how the committed
  ``experiments/results/sparsefed_targeted*`` runs were made).

  The attack and the targeted-accuracy evaluation must use one set:
  :class:`~fedjax_sparse.simulation.experiment.Experiment` builds it here
  once and hands it to :func:`build_update_attack` (``targeted_aux``).

  Args:
    options: the attack's flag arguments; only ``aux_size``, ``aux_seed``
      and ``aux_source`` (:data:`TARGETED_OPTIONS`) are read.
    num_classes: number of classes (the label flips).
    attacker_x, attacker_y: the attackers' pooled training examples
      (``aux_source="train"``).
    test_x, test_y: the test split (``aux_source="test"``).

  Raises:
    ValueError: an unknown ``aux_source`` or a missing pool.
  """
  opts = {k: (options or {}).get(k, v) for k, v in TARGETED_OPTIONS.items()}
  source = check_aux_source(opts["aux_source"])
  if source == "test":
    if test_x is None or test_y is None:
      raise ValueError("targeted_pgd with aux_source=test needs the test "
                       "split (test_x, test_y); or set aux_source=train")
    x, y, idx = targeted_auxiliary_set(test_x, test_y, num_classes,
                                       opts["aux_size"], opts["aux_seed"],
                                       return_index=True)
    return TargetedAux(x, y, np.asarray(idx))
  x, y = targeted_auxiliary_set(attacker_x, attacker_y, num_classes,
                                opts["aux_size"], opts["aux_seed"])
  return TargetedAux(x, y, None)
