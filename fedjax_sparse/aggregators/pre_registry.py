"""Name -> pre-aggregator combinator registry.

A pre-aggregator (clipping, bucketing, nearest-neighbour mixing) transforms
the K updates before a base rule aggregates them, so its factory takes the
base :class:`~fedjax_sparse.aggregators.base.Aggregator` as first argument
and returns a new one::

  agg = get_pre("bucketing")(get("krum")(), s=2)

They live in this separate registry because ``get(name)()`` must build a
complete rule from hyperparameters alone; :func:`compose` builds a chain
from names.
"""

from __future__ import annotations

from typing import Callable, Sequence

from fedjax_sparse.aggregators.base import Aggregator
from fedjax_sparse.registry import Registry

PRE_RULES: Registry[Callable[..., Aggregator]] = Registry("pre-aggregator")

register_pre = PRE_RULES.register
get_pre = PRE_RULES.get
pre_names = PRE_RULES.names


def compose(base: Aggregator, pre: Sequence[tuple[str, dict]]) -> Aggregator:
  """Wraps ``base`` in pre-aggregators, the first listed applied first.

  Args:
    base: the aggregation rule.
    pre: ``(name, hyperparameters)`` pairs, e.g. ``[("nnm", {}),
      ("bucketing", {"s": 2})]`` mixes neighbours, then buckets the mixed
      updates, then aggregates with ``base``.

  Returns:
    The composed :class:`Aggregator`.
  """
  agg = base
  for name, hparams in reversed(list(pre)):
    agg = get_pre(name)(agg, **hparams)
  return agg
