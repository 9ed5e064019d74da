"""Name -> attack factory registries (names as the papers write them).

Two :class:`~fedjax_sparse.registry.Registry` tables, update attacks and
data attacks, that share one namespace (a name is registered in at most one
of them) and one alias table.
"""

from __future__ import annotations

from typing import Callable

from fedjax_sparse.attacks.base import DataAttack, UpdateAttack
from fedjax_sparse.registry import Registry

# Names as the papers write them -> registry names (case-insensitive).
ALIASES = {"lfa": "label_flip", "bit_flip": "sign_flip",
           "bitflip": "sign_flip"}

UPDATE_ATTACKS: Registry[Callable[..., UpdateAttack]] = Registry(
    "update attack", ALIASES)
DATA_ATTACKS: Registry[Callable[..., DataAttack]] = Registry(
    "data attack", ALIASES)

canonical = UPDATE_ATTACKS.canonical


def _check_free(name: str) -> None:
  if name in UPDATE_ATTACKS.names() or name in DATA_ATTACKS.names():
    raise ValueError(f"attack {name!r} is already registered")


def register_update(name: str, factory: Callable[..., UpdateAttack] | None = None):
  """Registers an update attack factory under ``name`` (usable as a decorator)."""
  _check_free(name)
  return UPDATE_ATTACKS.register(name, factory)


def register_data(name: str, factory: Callable[..., DataAttack] | None = None):
  """Registers a data attack factory under ``name`` (usable as a decorator)."""
  _check_free(name)
  return DATA_ATTACKS.register(name, factory)


def get_update_attack(name: str) -> Callable[..., UpdateAttack]:
  """Returns the update attack factory registered under ``name``."""
  if name not in UPDATE_ATTACKS and name in DATA_ATTACKS:
    raise UPDATE_ATTACKS.unknown(
        name, " (it is a data attack: use get_data_attack)")
  return UPDATE_ATTACKS.get(name)


def get_data_attack(name: str) -> Callable[..., DataAttack]:
  """Returns the data attack factory registered under ``name``."""
  if name not in DATA_ATTACKS and name in UPDATE_ATTACKS:
    raise DATA_ATTACKS.unknown(
        name, " (it is an update attack: use get_update_attack)")
  return DATA_ATTACKS.get(name)


update_attack_names = UPDATE_ATTACKS.names
data_attack_names = DATA_ATTACKS.names


def names() -> list[str]:
  """Every registered attack name, update and data attacks together."""
  return sorted(set(UPDATE_ATTACKS.names()) | set(DATA_ATTACKS.names()))


def is_update_attack(name: str) -> bool:
  return name in UPDATE_ATTACKS


def is_data_attack(name: str) -> bool:
  return name in DATA_ATTACKS
