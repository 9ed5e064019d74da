"""Name -> aggregator factory registry (names as the papers write them)."""

from __future__ import annotations

from typing import Callable

from fedjax_sparse.aggregators.base import Aggregator

_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register(name: str, factory: Callable[..., Aggregator] | None = None):
  """Registers ``factory`` under ``name`` (usable as a decorator)."""

  def _do(f):
    if name in _REGISTRY:
      raise ValueError(f"aggregator {name!r} is already registered")
    _REGISTRY[name] = f
    return f

  return _do(factory) if factory is not None else _do


def get(name: str) -> Callable[..., Aggregator]:
  """Returns the factory registered under ``name``."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown aggregator {name!r}; known aggregators: "
        f"{', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
  return sorted(_REGISTRY)
