"""Name -> aggregator factory registry (names as the papers write them)."""

from __future__ import annotations

from typing import Callable

from fedjax_sparse.aggregators.base import Aggregator

_REGISTRY: dict[str, Callable[..., Aggregator]] = {}
# Names as the papers write them -> registry names (case-insensitive).
ALIASES = {"cm": "median", "tm": "trimmed_mean", "cc": "centered_clipping",
           "mkrum": "multi_krum", "m_krum": "multi_krum"}


def canonical(name: str) -> str:
  """The registry name of ``name`` (an alias such as ``cm`` or a name),
  stripped; names that are neither come back unchanged."""
  name = name.strip()
  return ALIASES.get(name.lower(), name)


def register(name: str, factory: Callable[..., Aggregator] | None = None):
  """Registers ``factory`` under ``name`` (usable as a decorator)."""

  def _do(f):
    if name in _REGISTRY:
      raise ValueError(f"aggregator {name!r} is already registered")
    _REGISTRY[name] = f
    return f

  return _do(factory) if factory is not None else _do


def get(name: str) -> Callable[..., Aggregator]:
  """Returns the factory registered under ``name`` (or its alias)."""
  try:
    return _REGISTRY[canonical(name)]
  except KeyError:
    raise ValueError(
        f"unknown aggregator {name!r}; known aggregators: "
        f"{', '.join(sorted(_REGISTRY))} (aliases: "
        f"{', '.join(f'{a}={n}' for a, n in ALIASES.items())})") from None


def names() -> list[str]:
  return sorted(_REGISTRY)
