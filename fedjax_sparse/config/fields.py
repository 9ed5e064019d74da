"""How a configuration field is declared once and reused by every view.

A field of the configuration tree is a :func:`dataclasses.field` whose
metadata holds its help text and its checks (:func:`option`). The sections of
:mod:`fedjax_sparse.config.sections` declare every field once; the flat
:class:`~fedjax_sparse.simulation.config.ExperimentConfig` (one field per
command-line flag) and
:class:`~fedjax_sparse.simulation.round_config.RoundConfig` (what the round
step is built from) take copies of those declarations with
:func:`flat_view`, so a default, a help text or a check is written in one
place and every view has the same.

A check is ``check(cfg, name)``: it reads the field ``name`` of ``cfg`` (and,
at most, other fields of the same section) and raises ``ValueError`` saying
what to change. :func:`validate` runs the checks of every field a
configuration has, in field order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

Check = Callable[[Any, str], None]


def option(default: Any, help: str, *checks: Check,
           names: Callable[[], str] | None = None) -> Any:
  """A field with its one default, help text and checks.

  Args:
    default: the default value (immutable: the configurations are frozen).
    help: the field's help text, as ``--help`` shows it.
    *checks: run by :func:`validate`, in order.
    names: a function listing the accepted names (a registry's, read when
      the help is shown, not at import); :func:`help_text` appends them.
  """
  metadata = {"help": help, "checks": checks}
  if names is not None:
    metadata["names"] = names
  return dataclasses.field(default=default, metadata=metadata)


def help_text(field: dataclasses.Field) -> str:
  """The help of a field declared with :func:`option` (names included)."""
  names = field.metadata.get("names")
  text = field.metadata["help"]
  return text if names is None else f"{text}: {names()}."


def require(ok: Callable[[Any], bool], message: str) -> Check:
  """A check: ``ValueError(message)`` unless ``ok(cfg)``.

  ``message`` is a :meth:`str.format` template over the configuration's
  fields: ``"server_lr must be > 0, got {server_lr}"``.
  """
  def check(cfg, name):
    del name
    if not ok(cfg):
      raise ValueError(message.format(**values(cfg)))
  return check


def one_of(choices: Sequence[str], what: str) -> Check:
  """A check: the field's value is one of ``choices``."""
  def check(cfg, name):
    value = getattr(cfg, name)
    if value not in choices:
      raise ValueError(f"unknown {what} {value!r}; choose one of "
                       f"{', '.join(choices)}")
  return check


def at_least(minimum: int, prefix: str = "") -> Check:
  """A check: ``{prefix}{name} must be >= {minimum}, got {value}``."""
  def check(cfg, name):
    value = getattr(cfg, name)
    if value < minimum:
      raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}")
  return check


def validate(cfg: Any) -> None:
  """Runs the checks of every field of ``cfg``, in field order."""
  for f in dataclasses.fields(cfg):
    for check in f.metadata.get("checks", ()):
      check(cfg, f.name)


def values(cfg: Any) -> dict[str, Any]:
  """The fields of a configuration by name (not recursively, unlike
  :func:`dataclasses.asdict`)."""
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def view(cls: type, source: Any, **overrides: Any) -> Any:
  """A ``cls`` holding the values of ``source``'s fields of the same names.

  ``cls`` fields that ``source`` lacks come from ``overrides`` (or keep their
  defaults); ``overrides`` also replace values of ``source``.
  """
  have = values(source)
  kwargs = {f.name: have[f.name] for f in dataclasses.fields(cls)
            if f.init and f.name in have}
  kwargs.update(overrides)
  return cls(**kwargs)


def _copy(f: dataclasses.Field) -> dataclasses.Field:
  return dataclasses.field(default=f.default, default_factory=f.default_factory,
                           init=f.init, repr=f.repr, hash=f.hash,
                           compare=f.compare, metadata=f.metadata,
                           kw_only=f.kw_only)


Part = Union[type, tuple]


def flat_view(*parts: Part) -> Callable[[type], type]:
  """Makes a class a frozen dataclass with copies of sections' fields.

  Each part is a section (all its fields) or ``(section, name, ...)`` (those
  fields). The copied fields come first, in the order given, then the
  fields the class declares itself; its methods stay. A name given twice is
  an error: every field has one declaration.
  """
  def wrap(cls):
    own = dict(cls.__dict__.get("__annotations__", {}))
    annotations = {}
    for part in parts:
      section, *names = part if isinstance(part, tuple) else (part,)
      declared = {f.name: f for f in dataclasses.fields(section)}
      for name in names or declared:
        if name not in declared:
          raise TypeError(f"{section.__name__} has no field {name!r}")
        if name in annotations or name in own or name in cls.__dict__:
          raise TypeError(f"{cls.__name__}: field {name!r} declared twice")
        annotations[name] = declared[name].type
        setattr(cls, name, _copy(declared[name]))
    cls.__annotations__ = {**annotations, **own}
    return dataclasses.dataclass(frozen=True)(cls)
  return wrap
