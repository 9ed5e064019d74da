"""The per-name tables of a sweep and their text form.

A sweep's grid is one set of axes (attacks, defences, malicious fractions,
top-k ratios, seeds) plus tables keyed by name:

* defence presets (:data:`DEFENCE_PRESETS`, ``--presets``): an aggregation
  rule together with other :class:`ExperimentConfig` fields;
* per-name hyperparameters (``--attack_args_by_name``,
  ``--aggregator_args_by_name``): ``name -> "k=v,k=v"``;
* per-defence configuration fields (``--aggregator_fields_by_name``).

On the command line each table is text, ``'name:k=v,k=v;name:k=v'``
(:func:`parse_args_by_name`, :func:`parse_presets`,
:func:`parse_fields_by_name`); a Python sweep config
(:mod:`fedjax_sparse.sweeps.config`) gives them as dicts. Either way the
fields are checked and typed here (:func:`preset_fields`,
:func:`defence_fields`) before any cell is made.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Optional, Sequence

from fedjax_sparse.aggregators.registry import ALIASES as AGGREGATOR_ALIASES
from fedjax_sparse.attacks.registry import ALIASES as ATTACK_ALIASES
from fedjax_sparse.simulation.experiment import ExperimentConfig, parse_kwargs

__all__ = ["AGGREGATOR_ALIASES", "ATTACK_ALIASES", "DEFENCE_PRESETS",
           "defence_fields", "parse_args_by_name", "parse_fields_by_name",
           "parse_presets", "preset_fields", "resolve_presets"]

# Defence presets: the baselines that are an aggregation rule plus a client
# or server setting. FedProx (Li et al., MLSys 2020, eq. 2) adds
# mu/2 ||w - w_t||^2 to the local loss; mu = 0.01 is the value the
# class-aware masking paper sets for its FedProx baseline following prior
# work (class_aware_masking.txt 5.1.5). SCAFFOLD (Karimireddy et al., ICML
# 2020) corrects local steps with control variates.
DEFENCE_PRESETS = {
    "fedprox": {"aggregator": "fedavg", "prox_mu": 0.01},
    "scaffold": {"aggregator": "fedavg", "scaffold": True},
}
# Axes of the grid other than the defence: a preset may not set them.
_GRID_FIELDS = ("attack", "attack_args", "malicious_fraction", "topk_ratio",
                "seed", "output_dir")
# Fields whose values are 'name=value,...' lists (may hold commas).
_ARGS_FIELDS = ("aggregator_args", "attack_args")
# Fields an --aggregator_fields_by_name entry may not set (besides the grid's
# axes): the rule and its arguments have flags of their own.
_NOT_DEFENCE_FIELDS = ("aggregator", "aggregator_args")


def _entries(text: str, flag: str, form: str) -> Iterator[tuple[str, str]]:
  """``'name:rest;name:rest'`` -> ``(name, rest)`` pairs, both stripped.

  Args:
    text: the ``--flag`` value.
    flag: the flag's name, for the message.
    form: what follows ``name:`` in an entry, for the message.

  Raises:
    ValueError: an entry without ``':'``.
  """
  for item in filter(None, (t.strip() for t in text.split(";"))):
    if ":" not in item:
      raise ValueError(f"bad --{flag} entry {item!r}: write "
                       f"'name:{form}' entries separated by ';'")
    name, rest = (t.strip() for t in item.split(":", 1))
    yield name, rest


def parse_args_by_name(text: str, what: str) -> dict[str, str]:
  """``'ipm:eps=0.4;label_flip:mapping=circular'`` -> ``{name: args}``."""
  out = {}
  for name, args in _entries(text, f"{what}_args_by_name", "k=v,k=v"):
    parse_kwargs(args, f"{what}_args of {name}")
    out[name] = args
  return out


def parse_fields_by_name(text: str) -> dict[str, str]:
  """``'sparsefed:server_optimizer=sgd;fedavg:server_momentum=0.9'`` ->
  ``{name: fields}`` (the fields stay text; :func:`make_cells` checks them
  with :func:`defence_fields`)."""
  return dict(_entries(text, "aggregator_fields_by_name",
                       "field=value,field=value"))


def defence_fields(name: str, fields: Any) -> dict[str, Any]:
  """One ``--aggregator_fields_by_name`` entry's fields, checked and typed.

  Args:
    name: the aggregator or preset the entry is for (for messages).
    fields: ``{field: value}`` or the text ``'field=value,field=value'``
      (fields of :class:`ExperimentConfig`).

  Raises:
    ValueError: an unknown field (the message lists the valid ones), an axis
      of the grid, ``aggregator``/``aggregator_args``, a field set twice or
      a value of the wrong type.
  """
  valid = [f for f in _config_fields()
           if f not in _GRID_FIELDS and f not in _NOT_DEFENCE_FIELDS]
  return _typed_fields(
      _field_pairs(fields), f"--aggregator_fields_by_name entry {name!r}",
      valid, refused=_NOT_DEFENCE_FIELDS,
      refusal=("set the rule's arguments with --aggregator_args_by_name, "
               "another rule with --presets"))


def _field_pairs(fields: Any) -> list[tuple[str, Any]]:
  """``{field: value}`` or ``'field=value,...'`` text as (field, value)."""
  return (_split_preset_fields(fields) if isinstance(fields, str)
          else list(dict(fields).items()))


def _typed_fields(pairs: list[tuple[str, Any]], where: str,
                  valid: Sequence[str], hint: str = "",
                  refused: Sequence[str] = (),
                  refusal: str = "") -> dict[str, Any]:
  """Configuration fields checked and typed (:func:`defence_fields`,
  :func:`preset_fields`).

  Args:
    pairs: (field, value) pairs, values as text or Python values.
    where: what sets them, for messages (``"preset 'p'"``).
    valid: the fields it may set, listed when it sets another.
    hint: text after that list.
    refused: fields of :class:`ExperimentConfig` it may not set besides the
      grid's axes.
    refusal: what to do instead of setting one of ``refused``.

  Returns:
    ``{field: value}`` with the values of the fields' types.

  Raises:
    ValueError: an unknown field, an axis of the grid, a refused field, a
      field set twice or a value of the wrong type.
  """
  known = _config_fields()
  listed = f"valid fields: {', '.join(valid)}{hint}"
  out = {}
  for key, value in pairs:
    if key not in known:
      raise ValueError(f"{where}: unknown field {key!r}; {listed}")
    if key in _GRID_FIELDS:
      raise ValueError(f"{where} sets {key!r}, an axis of the grid (set it "
                       f"with the grid flags); {listed}")
    if key in refused:
      raise ValueError(f"{where} sets {key!r}: {refusal}")
    if key in out:
      raise ValueError(f"{where} sets {key!r} twice")
    out[key] = _coerce(value, field_default(key),
                       f"field {key!r} of {where}")
  return out


def _config_fields() -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(ExperimentConfig)}


def field_default(name: str) -> Any:
  """The default of the :class:`ExperimentConfig` field ``name``."""
  f = _config_fields()[name]
  return (f.default if f.default is not dataclasses.MISSING
          else f.default_factory())


def _split_preset_fields(text: str) -> list[tuple[str, str]]:
  """``'aggregator=sparsefed,aggregator_args=k=0.01,clip_norm=5'`` -> pairs.

  A comma starts a new pair when a ``name=`` follows (the rule of
  :func:`parse_kwargs`), unless the open value is a quoted string, or it
  belongs to an ``*_args`` field and ``name`` is no ExperimentConfig field:
  then the comma and the pair are part of that value.
  """
  fields = _config_fields()
  pairs: list[list[str]] = []
  for item in filter(None, (t.strip() for t in
                            re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text))):
    if pairs:
      key, value = pairs[-1]
      quote = value[:1]
      unclosed = (quote in ("'", '"')
                  and (len(value) < 2 or not value.endswith(quote)))
      name = item.split("=", 1)[0].strip()
      if unclosed or (key in _ARGS_FIELDS and name not in fields):
        pairs[-1][1] = f"{value},{item}"
        continue
    if "=" not in item:
      raise ValueError(f"bad preset field {item!r}: write field=value pairs "
                       "separated by commas")
    key, value = (t.strip() for t in item.split("=", 1))
    pairs.append([key, value])
  return [(k, v) for k, v in pairs]


def _unquote(value: str) -> str:
  if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
    return value[1:-1]
  return value


def _coerce(value: Any, default: Any, where: str) -> Any:
  """``value`` (a flag string or a Python value) as the field's type."""
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    text = _unquote(str(value)).strip().lower()
    if text in ("true", "1", "yes"):
      return True
    if text in ("false", "0", "no"):
      return False
    raise ValueError(f"{where} takes true or false, got {value!r}")
  if isinstance(default, (int, float)):
    kind = type(default)
    try:
      if isinstance(value, str):
        value = _unquote(value).strip()
        out = kind(float(value)) if kind is int else float(value)
        if kind is int and out != float(value):
          raise ValueError
        return out
      if isinstance(value, bool):
        raise ValueError
      return kind(value)
    except (TypeError, ValueError):
      raise ValueError(f"{where} takes "
                       f"{'an integer' if kind is int else 'a number'}, got "
                       f"{value!r}") from None
  if value is None:
    return None
  return _unquote(value) if isinstance(value, str) else value


def preset_fields(name: str, fields: Any) -> dict[str, Any]:
  """A preset's configuration fields, checked and typed.

  Args:
    name: the preset's name (lower case, letters, digits, ``_``, ``-``,
      ``.``; no ``__``; not an aggregator's name or alias).
    fields: ``{field: value}`` or the text ``'field=value,field=value'``;
      ``aggregator`` (an alias is resolved) defaults to ``fedavg``.

  Returns:
    ``{field: value}`` with the values of the fields' types and
    ``aggregator`` set.

  Raises:
    ValueError: a bad name, an unknown field (the message lists the valid
      ones), a field of the grid, a value of the wrong type or an unknown
      aggregator.
  """
  from fedjax_sparse import aggregators as aggregators_lib
  if (not re.fullmatch(r"[a-z0-9][a-z0-9_.\-]*", name) or "__" in name):
    raise ValueError(f"bad preset name {name!r}: use lower-case letters, "
                     "digits, '_', '-' and '.' (no '__')")
  if name in aggregators_lib.names() or name in AGGREGATOR_ALIASES:
    raise ValueError(f"preset {name!r} has an aggregator's name: choose "
                     "another name")
  pairs = _field_pairs(fields)
  valid = [f for f in _config_fields() if f not in _GRID_FIELDS]
  has_args = any(k in _ARGS_FIELDS for k, _ in pairs)
  hint = ("; quote an aggregator_args value that holds it: "
          "aggregator_args='k=1,seed=0'" if has_args else "")
  out = _typed_fields(pairs, f"preset {name!r}", valid, hint)
  rule = canonical(str(out.get("aggregator", "fedavg")), AGGREGATOR_ALIASES)
  if rule not in aggregators_lib.names():
    raise ValueError(f"preset {name!r} names an unknown aggregator {rule!r}; "
                     f"known aggregators: {', '.join(aggregators_lib.names())}")
  out = {"aggregator": rule, **{k: v for k, v in out.items()
                                 if k != "aggregator"}}
  if "aggregator_args" in out:
    parse_kwargs(out["aggregator_args"], f"aggregator_args of preset {name}")
  return out


def parse_presets(text: str) -> dict[str, str]:
  """``'fedprox:prox_mu=0.1;sf:aggregator=sparsefed'`` -> ``{name: fields}``.

  The fields stay text; :func:`make_cells` checks them
  (:func:`preset_fields`).
  """
  return {name.lower(): fields for name, fields in
          _entries(text, "presets", "field=value,field=value")}


def resolve_presets(presets: Optional[dict] = None) -> dict[str, dict]:
  """The built-in presets with ``presets`` (name -> fields) over them, all
  checked by :func:`preset_fields`."""
  table = {**DEFENCE_PRESETS,
           **{k.strip().lower(): v for k, v in (presets or {}).items()}}
  return {name: preset_fields(name, fields) for name, fields in table.items()}


def _numbers(values: Sequence[str], flag: str, kind: type,
             noun: str) -> list:
  out = []
  for v in values:
    try:
      out.append(kind(v))
    except ValueError:
      raise ValueError(f"--{flag} takes {noun} separated by commas, got "
                       f"{v!r}") from None
  return out


def floats(values: Sequence[str], flag: str) -> list[float]:
  """``--flag``'s comma-separated values as numbers (ValueError naming the
  flag otherwise)."""
  return _numbers(values, flag, float, "numbers")


def ints(values: Sequence[str], flag: str) -> list[int]:
  """``--flag``'s comma-separated values as integers."""
  return _numbers(values, flag, int, "integers")


def canonical(name: str, aliases: dict) -> str:
  """``name`` as the registry spells it (an alias resolved)."""
  name = name.strip()
  return aliases.get(name.lower(), name)
