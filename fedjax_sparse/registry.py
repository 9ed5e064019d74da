"""One name -> factory registry, shared by every table of the package.

Aggregation rules, pre-aggregators, update and data attacks, models and
dataset loaders are each a :class:`Registry` that maps the names the papers
write to factories (DESIGN.md, "Contracts": an unknown name gives an error
that lists the known ones)::

  _RULES = Registry("aggregator", aliases={"cm": "median"})

  @_RULES.register("median")
  def median(...) -> Aggregator: ...

  _RULES.get("CM")        # -> median (aliases are case-insensitive)
  _RULES.get("krumm")     # ValueError: unknown aggregator 'krumm'; known
                          # aggregators: median (aliases: cm=median)

The module of each kind keeps its own public functions (``get``,
``names``, ``register``, ...) as thin views of its registry.
"""

from __future__ import annotations

from typing import Generic, Iterator, MutableMapping, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Names -> factories, with optional case-insensitive aliases.

  Attributes:
    kind: what an entry is, singular (``"aggregator"``, ``"update attack"``),
      used in messages: ``unknown <kind> 'x'; known <kind>s: ...``.
    aliases: ``alias -> registered name``; aliases are looked up in lower
      case, so keys must be lower case. The mapping is held, not copied: a
      module that exposes it (``aggregators.registry.ALIASES``) and the
      registry see the same entries.
  """

  def __init__(self, kind: str,
               aliases: Optional[MutableMapping[str, str]] = None):
    self.kind = kind
    self.aliases = aliases if aliases is not None else {}
    self._entries: dict[str, T] = {}

  def canonical(self, name: str) -> str:
    """The registered name of ``name`` (an alias, in any case, or a name),
    stripped of surrounding whitespace; names that are neither come back
    unchanged (stripped)."""
    name = name.strip()
    return self.aliases.get(name.lower(), name)

  def register(self, name: str, factory: Optional[T] = None):
    """Registers ``factory`` under ``name``; usable as a decorator.

    ``register("x", f)`` registers ``f`` and returns it;
    ``@register("x")`` registers the decorated function.

    Raises:
      ValueError: ``name`` is already registered.
    """

    def _do(f: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = f
      return f

    return _do(factory) if factory is not None else _do

  def get(self, name: str) -> T:
    """The factory registered under ``name`` or its alias.

    Raises:
      ValueError: unknown name; the message lists the known names and the
        aliases (:meth:`unknown`).
    """
    try:
      return self._entries[self.canonical(name)]
    except KeyError:
      raise self.unknown(name) from None

  def unknown(self, name: str, note: str = "") -> ValueError:
    """The error for an unknown ``name``, ``note`` placed after the name.

    ``unknown <kind> 'name'<note>; known <kind>s: a, b (aliases: x=a)``;
    only aliases of registered names are listed, and the parenthesis only
    when there are some.
    """
    aliases = [f"{a}={n}" for a, n in self.aliases.items()
               if n in self._entries]
    listed = f" (aliases: {', '.join(aliases)})" if aliases else ""
    return ValueError(f"unknown {self.kind} {name!r}{note}; known "
                      f"{self.kind}s: {', '.join(self.names())}{listed}")

  def names(self) -> list[str]:
    """The registered names, sorted (aliases not included)."""
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    """Whether ``name`` (or its alias) is registered."""
    return isinstance(name, str) and self.canonical(name) in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {self.names()})"

