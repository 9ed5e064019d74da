"""Name -> pre-aggregator combinator registry.

A pre-aggregator (bucketing, nearest-neighbour mixing) transforms the K
updates before a base rule aggregates them, so its factory takes the base
:class:`~fedjax_sparse.aggregators.base.Aggregator` as first argument and
returns a new one::

  agg = get_pre("bucketing")(get("krum")(), s=2)

They live in this separate registry because ``get(name)()`` must build a
complete rule from hyperparameters alone; :func:`compose` builds a chain
from names.
"""

from __future__ import annotations

from typing import Callable, Sequence

from fedjax_sparse.aggregators.base import Aggregator

_PRE_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register_pre(name: str, factory: Callable[..., Aggregator] | None = None):
  """Registers a pre-aggregator ``factory(base, **hparams)`` under ``name``."""

  def _do(f):
    if name in _PRE_REGISTRY:
      raise ValueError(f"pre-aggregator {name!r} is already registered")
    _PRE_REGISTRY[name] = f
    return f

  return _do(factory) if factory is not None else _do


def get_pre(name: str) -> Callable[..., Aggregator]:
  """Returns the pre-aggregator factory registered under ``name``."""
  try:
    return _PRE_REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown pre-aggregator {name!r}; known pre-aggregators: "
        f"{', '.join(sorted(_PRE_REGISTRY))}") from None


def pre_names() -> list[str]:
  return sorted(_PRE_REGISTRY)


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
