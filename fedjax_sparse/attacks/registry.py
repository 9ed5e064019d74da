"""Name -> attack factory registries (names as the papers write them)."""

from __future__ import annotations

from typing import Callable

from fedjax_sparse.attacks.base import DataAttack, UpdateAttack

_UPDATE: dict[str, Callable[..., UpdateAttack]] = {}
_DATA: dict[str, Callable[..., DataAttack]] = {}
# Names as the papers write them -> registry names (case-insensitive).
ALIASES = {"lfa": "label_flip", "bit_flip": "sign_flip",
           "bitflip": "sign_flip"}


def canonical(name: str) -> str:
  """The registry name of ``name`` (an alias such as ``lfa`` or a name),
  stripped; names that are neither come back unchanged."""
  name = name.strip()
  return ALIASES.get(name.lower(), name)


def _register(table: dict, kind: str, name: str, factory):

  def _do(f):
    if name in _UPDATE or name in _DATA:
      raise ValueError(f"attack {name!r} is already registered")
    table[name] = f
    return f

  return _do(factory) if factory is not None else _do


def register_update(name: str, factory: Callable[..., UpdateAttack] | None = None):
  """Registers an update attack factory under ``name`` (usable as a decorator)."""
  return _register(_UPDATE, "update", name, factory)


def register_data(name: str, factory: Callable[..., DataAttack] | None = None):
  """Registers a data attack factory under ``name`` (usable as a decorator)."""
  return _register(_DATA, "data", name, factory)


def get_update_attack(name: str) -> Callable[..., UpdateAttack]:
  """Returns the update attack factory registered under ``name``."""
  try:
    return _UPDATE[canonical(name)]
  except KeyError:
    hint = " (it is a data attack: use get_data_attack)" if name in _DATA else ""
    raise ValueError(
        f"unknown update attack {name!r}{hint}; known update attacks: "
        f"{', '.join(sorted(_UPDATE))}") from None


def get_data_attack(name: str) -> Callable[..., DataAttack]:
  """Returns the data attack factory registered under ``name``."""
  try:
    return _DATA[canonical(name)]
  except KeyError:
    hint = " (it is an update attack: use get_update_attack)" if name in _UPDATE else ""
    raise ValueError(
        f"unknown data attack {name!r}{hint}; known data attacks: "
        f"{', '.join(sorted(_DATA))}") from None


def update_attack_names() -> list[str]:
  return sorted(_UPDATE)


def data_attack_names() -> list[str]:
  return sorted(_DATA)


def names() -> list[str]:
  """Every registered attack name, update and data attacks together."""
  return sorted(set(_UPDATE) | set(_DATA))


def is_update_attack(name: str) -> bool:
  return canonical(name) in _UPDATE


def is_data_attack(name: str) -> bool:
  return canonical(name) in _DATA
