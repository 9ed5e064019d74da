"""Python sweep configs: a grid as an ``ml_collections.ConfigDict``.

The Flax examples' convention: a file ``experiments/configs/sweeps/<name>.py``
defines ``get_config()`` returning a ``ConfigDict``, given to the binary as
``--config=<file>`` (``ml_collections.config_flags``) and overridden on the
command line field by field (``--config.base.rounds=10``,
``--config.seeds=0,1,2``). Its keys, each optional:

* ``base``: :class:`ExperimentConfig` fields every cell starts from
  (``rounds``, ``partition``, ...; not ``output_dir``);
* ``attacks``, ``aggregators``, ``malicious_fractions``, ``topk_ratios``,
  ``seeds``: the axes of the grid, tuples (``ml_collections`` overrides
  tuples, not lists); empty keeps the base value, as an empty grid flag
  does;
* ``attack_args``, ``aggregator_args``: name -> ``{argument: value}``, the
  per-name hyperparameters (``--attack_args_by_name``);
* ``aggregator_fields``: aggregator or preset name -> ``{field: value}``
  (``--aggregator_fields_by_name``);
* ``presets``: preset name -> ``{field: value}`` (``--presets``);
* ``output_dir``: where the cells go.

Values are Python values, so no value needs the ``;:,=`` text of the flags
(``caps="last_dense:0.25"`` is a plain string). The cells keep the text form
of their arguments (``ExperimentConfig.attack_args`` is ``"k=v,k=v"``): a
dict's arguments are written in its key order, values as they read back
(:func:`args_text`), so a config equal to a flagfile makes the same cells,
names and configurations. ``ConfigDict`` sorts its keys unless made with
``sort_keys=False``: an argument dict that must keep a flagfile's order
(the cells' text, and so which finished cells a sweep recognises) says so.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Iterable, Mapping, Optional

from fedjax_sparse.simulation.experiment import ExperimentConfig, parse_kwargs
from fedjax_sparse.sweeps import tables
from fedjax_sparse.sweeps.grid import Cell, make_cells

# A config's keys that set the grid -> the flag of experiments.sweep that
# sets the same thing.
GRID_FLAGS = {
    "attacks": "attacks", "aggregators": "aggregators",
    "malicious_fractions": "malicious_fractions",
    "topk_ratios": "topk_ratios", "seeds": "seeds",
    "attack_args": "attack_args_by_name",
    "aggregator_args": "aggregator_args_by_name",
    "aggregator_fields": "aggregator_fields_by_name", "presets": "presets",
}
KEYS = ("base", *GRID_FLAGS, "output_dir")


def _plain(value: Any) -> Any:
  """A ConfigDict (or any mapping) as nested dicts, in its key order."""
  if isinstance(value, str) or not hasattr(value, "items"):
    return value
  return {k: _plain(v) for k, v in value.items()}


def _get(config: Any, key: str) -> Any:
  return _plain(config.get(key)) if key in config else None


def _check_keys(config: Any) -> None:
  unknown = [k for k in config.keys() if k not in KEYS]
  if unknown:
    raise ValueError(f"sweep config: unknown key(s) {', '.join(unknown)}; "
                     f"the keys are: {', '.join(KEYS)}")


def _value_text(value: Any) -> str:
  """One argument's value as text that :func:`parse_kwargs` reads back."""
  if isinstance(value, str):
    try:
      same = ast.literal_eval(value.strip()) == value
    except (ValueError, SyntaxError):
      same = value.strip() == value
    return value if same else repr(value)
  return repr(value)


def args_text(args: Any, where: str) -> str:
  """``{argument: value}`` as the ``"k=v,k=v"`` text of ``*_args`` fields.

  Args:
    args: a mapping (in the order the text should have), or text kept as it
      is.
    where: what the arguments are, for messages.

  Raises:
    ValueError: a name that is no identifier, or a value that would not read
      back as itself (a string holding ``,name=``).
  """
  if isinstance(args, str):
    parse_kwargs(args, where)
    return args
  if not isinstance(args, Mapping):
    raise ValueError(f"{where} takes {{argument: value}}, got {args!r}")
  for name in args:
    if not re.fullmatch(r"[A-Za-z_]\w*", str(name)):
      raise ValueError(f"{where}: bad argument name {name!r}")
  text = ",".join(f"{k}={_value_text(v)}" for k, v in args.items())
  if parse_kwargs(text, where) != dict(args):
    raise ValueError(f"{where}: {dict(args)} does not read back from the "
                     f"text {text!r}; a string value may not hold ',name='")
  return text


def _axis(config: Any, key: str, kind: type) -> list:
  values = _get(config, key)
  if values is None:
    return []
  if isinstance(values, (str, int, float)):
    values = [values]
  if kind is str:
    # --config.attacks=none,ipm arrives as ("none,ipm",): names hold no
    # commas, so a comma separates two.
    values = [n.strip() for v in values
              for n in (v.split(",") if isinstance(v, str) else [v])]
  out = []
  for v in values:
    ok = (isinstance(v, str) if kind is str else
          isinstance(v, (int, float)) and not isinstance(v, bool)
          and (kind is float or float(v) == int(v)))
    if not ok:
      what = {str: "names", int: "integers", float: "numbers"}[kind]
      raise ValueError(f"config.{key} takes a tuple of {what}, got {v!r}")
    out.append(v)
  return out


def _table(config: Any, key: str) -> dict:
  table = _get(config, key) or {}
  if not isinstance(table, Mapping):
    raise ValueError(f"config.{key} takes {{name: {{...}}}}, got {table!r}")
  return dict(table)


def base_fields(config: Any) -> dict[str, Any]:
  """``config.base`` checked and typed as :class:`ExperimentConfig` fields.

  Raises:
    ValueError: an unknown field (the message lists the valid ones),
      ``output_dir`` (the config's own key), a value of the wrong type.
  """
  base = _table(config, "base")
  valid = [f.name for f in dataclasses.fields(ExperimentConfig)
           if f.name != "output_dir"]
  out = {}
  for key, value in base.items():
    where = f"config.base.{key}"
    if key == "output_dir":
      raise ValueError(f"{where}: set config.output_dir instead")
    if key not in valid:
      raise ValueError(f"{where}: unknown field {key!r}; valid fields: "
                       f"{', '.join(valid)}")
    default = tables.field_default(key)
    if key in tables._ARGS_FIELDS:
      out[key] = args_text(value, where)
    elif key == "data_dir":
      if value is not None and not isinstance(value, str):
        raise ValueError(f"{where} takes a path, got {value!r}")
      out[key] = value or None
    elif isinstance(default, str) and not isinstance(value, str):
      raise ValueError(f"{where} takes a string, got {value!r}")
    else:
      out[key] = tables._coerce(value, default, where)
  return out


def grid(config: Any) -> dict[str, Any]:
  """The grid of ``config`` as :func:`make_cells`' keyword arguments."""
  _check_keys(config)
  presets = {}
  for name, fields in _table(config, "presets").items():
    if isinstance(fields, Mapping) and isinstance(
        fields.get("aggregator_args"), Mapping):
      fields = {**fields, "aggregator_args": args_text(
          fields["aggregator_args"], f"config.presets.{name}.aggregator_args")}
    presets[name] = fields
  return {
      "attacks": _axis(config, "attacks", str),
      "aggregators": _axis(config, "aggregators", str),
      "malicious_fractions": _axis(config, "malicious_fractions", float),
      "topk_ratios": _axis(config, "topk_ratios", float),
      "seeds": _axis(config, "seeds", int),
      "attack_args_by_name": {
          k: args_text(v, f"config.attack_args.{k}")
          for k, v in _table(config, "attack_args").items()},
      "aggregator_args_by_name": {
          k: args_text(v, f"config.aggregator_args.{k}")
          for k, v in _table(config, "aggregator_args").items()},
      "presets": presets,
      "aggregator_fields_by_name": _table(config, "aggregator_fields"),
  }


def output_dir(config: Any) -> str:
  """``config.output_dir`` ("" when it has none)."""
  value = _get(config, "output_dir") or ""
  if not isinstance(value, str):
    raise ValueError(f"config.output_dir takes a path, got {value!r}")
  return value


def cells_from_config(config: Any,
                      base: Optional[ExperimentConfig] = None) -> list[Cell]:
  """The cells of a sweep config.

  Args:
    config: the ``ConfigDict`` (or a mapping of the same keys).
    base: what ``config.base`` applies to (the binary passes its flags:
      defaults, and fields given on the command line that the config does
      not set); default ``ExperimentConfig()``.

  Raises:
    ValueError: a bad key or value (see :func:`base_fields`,
      :func:`args_text`, :func:`make_cells`).
  """
  _check_keys(config)
  base = ExperimentConfig() if base is None else base
  fields = base_fields(config)
  root = output_dir(config)
  if root:
    fields["output_dir"] = root
  return make_cells(dataclasses.replace(base, **fields), **grid(config))


def given_fields(config: Any) -> set[str]:
  """The :class:`ExperimentConfig` fields ``config`` sets (for
  :func:`fedjax_sparse.sweeps.checks.ineffective_flags`); a grid of top-k
  ratios counts as ``topk_ratio``."""
  given = set(_table(config, "base"))
  if _axis(config, "topk_ratios", float):
    given.add("topk_ratio")
  return given


def check_flags(config: Any, grid_flags: Iterable[str],
                field_flags: Iterable[str]) -> None:
  """Refuses a setting given both by ``config`` and by a flag.

  With ``--config`` the grid is the config's: a grid flag
  (``--attacks``, ``--attack_args_by_name``, ...) is an error, whatever its
  value. A field flag (``--rounds``) applies under the config, unless
  ``config.base`` sets the same field (or, for ``--output_dir``,
  ``config.output_dir`` is set): then it is an error too, and the message
  says how to override the config instead (``--config.base.rounds=...``).

  Args:
    config: the sweep config.
    grid_flags: the grid flags given (names without ``--``).
    field_flags: the :class:`ExperimentConfig` field flags given.

  Raises:
    ValueError: naming the flag, the config key and the override to use.
  """
  by_flag = {flag: key for key, flag in GRID_FLAGS.items()}
  both = sorted(set(grid_flags))
  if both:
    flag, key = both[0], by_flag[both[0]]
    raise ValueError(f"--{flag} and --config both set the grid: set {key} in "
                     f"the config file or override it with --config.{key}=...")
  base = _table(config, "base")
  for name in sorted(set(field_flags)):
    if name in base:
      raise ValueError(f"--{name} and --config (base.{name}) both set "
                       f"{name}: override the config with "
                       f"--config.base.{name}=...")
    if name == "output_dir" and output_dir(config):
      raise ValueError("--output_dir and --config (output_dir) both set the "
                       "output directory: override the config with "
                       "--config.output_dir=...")
