r"""Reruns committed result cells from their config.json and compares.

Example::

  .venv/bin/python -m experiments.reproduce \
      --cells=experiments/results/flare_iid/none__fedavg__mf0__topk0.5__seed0

Each cell directory holds the ``config.json`` that made it; the cell runs
again with that configuration (fields added to the configuration since then
take their defaults) into a temporary directory, and every round record is
compared with the committed ``rounds.jsonl``, value for value: bit for bit
(``--rtol=0``, the default) or within a relative tolerance. Timings
(``seconds``) are not compared, nor detection rates of rounds in which the
attack was not active (earlier versions recorded them; they are null now).
``--max_rounds`` compares a shorter rerun (at least up to the attack's
first round; the learning-rate decay stays where it was). The round metrics
are summed per device, so a cell reruns bit for bit on as many devices as
made it (``devices`` in its ``summary.json``; set
``FEDJAX_SPARSE_CPU_DEVICES`` to match). Prints one line per cell and a
closing ``N passed, M failed`` line; exits 1
when a cell differs.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/cli.py
  from fedjax_sparse import cli as _cli
  _cli.prepare()

import dataclasses
import math
import os
import tempfile
from typing import Any, Optional

from absl import flags

flags.DEFINE_list("cells", [], "Cell directories to rerun (each with its "
                  "config.json and rounds.jsonl).")
flags.DEFINE_float("rtol", 0.0, "Relative tolerance of the comparison (0: "
                   "bit for bit).")
flags.DEFINE_integer("max_rounds", 0, "Compare only the first rounds (0: "
                     "all; a shorter rerun of a long cell).")
flags.DEFINE_string("add_aggregator_args", "", "Aggregator arguments "
                    "for cells made before the argument existed, as the "
                    "sweep takes them ('rfa:variant=fixed_steps'): they "
                    "replace the saved (empty) aggregator_args of that "
                    "rule's cells.")
flags.DEFINE_string("add_attack_args", "", "Attack arguments for cells "
                    "made before the argument existed "
                    "('targeted_pgd:aux_source=train'): added to the saved "
                    "attack_args of that attack's cells where they lack the "
                    "key.")
flags.DEFINE_list("rename_aggregators", [], "old:new rule names for cells "
                  "made before a rule was renamed ('bulyan:bulyan_fast': the "
                  "one-shot Bulyan of the cells made before Bulyan became El "
                  "Mhamdi et al.'s iterated Krum).")
FLAGS = flags.FLAGS

IGNORED = ("seconds",)


def _same(a: Any, b: Any, rtol: float) -> bool:
  if isinstance(a, float) and isinstance(b, float):
    if math.isnan(a) or math.isnan(b):
      return math.isnan(a) and math.isnan(b)
    return a == b if rtol == 0 else math.isclose(a, b, rel_tol=rtol)
  return a == b


def compare_records(old: list[dict], new: list[dict],
                    rtol: float = 0.0) -> Optional[str]:
  """None when ``new`` reproduces ``old``, else the first difference."""
  if len(old) != len(new):
    return f"{len(new)} rounds rerun, {len(old)} committed"
  for o, n in zip(old, new):
    active = o.get("attack_active", True)
    for k, v in o.items():
      if k in IGNORED or (k in ("tpr", "fpr") and not active):
        continue
      if k not in n:
        return f"round {o['round']}: {k} missing in the rerun"
      if not _same(v, n[k], rtol):
        return f"round {o['round']}: {k} committed {v!r}, rerun {n[k]!r}"
  return None


def config_of(cell_dir: str):
  """The ExperimentConfig saved in ``cell_dir``/config.json."""
  from fedjax_sparse.simulation import io
  from fedjax_sparse.simulation.experiment import ExperimentConfig
  saved = io.read_json(os.path.join(cell_dir, "config.json"))
  fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
  kwargs = {k: v for k, v in saved.items() if k in fields}
  return ExperimentConfig(**kwargs)


def _with_missing(saved: str, extra: Optional[str]) -> str:
  """``saved`` ("k=v,...") with the keys of ``extra`` it lacks appended."""
  if not extra:
    return saved
  have = {kv.split("=", 1)[0].strip() for kv in saved.split(",") if kv.strip()}
  add = [kv for kv in extra.split(",")
         if kv.strip() and kv.split("=", 1)[0].strip() not in have]
  return ",".join([x for x in [saved] if x] + add)


def shortened(cfg, max_rounds: int):
  """``cfg`` cut to its first rounds, with the same records in them: at
  least up to the attack's first round (an attack that would never start is
  refused), and the learning-rate decay at the same round (``lr_decay_at``
  is a fraction of ``rounds``; a decay beyond the shortened run moves to its
  end, where it changes nothing in the rounds compared)."""
  rounds = max_rounds
  if cfg.attack != "none":
    rounds = max(rounds, cfg.attack_start)
  rounds = min(rounds, cfg.rounds)
  changes = {"rounds": rounds}
  decay = cfg.lr_decay_round
  if decay is not None and rounds < cfg.rounds:
    if decay < rounds:
      raise ValueError(
          f"--max_rounds={max_rounds} reaches the learning-rate decay at "
          f"round {decay}, whose place depends on the whole run's rounds; "
          f"compare at most {decay} rounds or the whole run")
    changes["lr_decay_at"] = 1.0
  return dataclasses.replace(cfg, **changes)


def reproduce(cell_dir: str, rtol: float = 0.0, max_rounds: int = 0,
              aggregator_args_by_name: Optional[dict] = None,
              attack_args_by_name: Optional[dict] = None,
              renamed: Optional[dict] = None) -> Optional[str]:
  """Reruns one cell; None when it reproduces, else the difference.

  ``aggregator_args_by_name`` / ``attack_args_by_name``: rule or attack
  name -> ``"k=v,..."`` arguments added where the saved configuration lacks
  the key (cells made before the argument existed, e.g. RFA's
  ``variant=fixed_steps``, targeted PGD's ``aux_source=train``).
  """
  from fedjax_sparse.simulation import io
  from fedjax_sparse.simulation.experiment import run_experiment
  cfg = config_of(cell_dir)
  cfg = dataclasses.replace(
      cfg, aggregator=(renamed or {}).get(cfg.aggregator, cfg.aggregator))
  cfg = dataclasses.replace(
      cfg,
      aggregator_args=_with_missing(
          cfg.aggregator_args,
          (aggregator_args_by_name or {}).get(cfg.aggregator)),
      attack_args=_with_missing(
          cfg.attack_args, (attack_args_by_name or {}).get(cfg.attack)))
  old = io.read_jsonl(os.path.join(cell_dir, "rounds.jsonl"))
  if max_rounds and max_rounds < cfg.rounds:
    cfg = shortened(cfg, max_rounds)
    old = old[:cfg.rounds]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "cell")
    run_experiment(dataclasses.replace(cfg, output_dir=out), progress=False)
    new = io.read_jsonl(os.path.join(out, "rounds.jsonl"))
  return compare_records(old, new, rtol)


def main():
  if not FLAGS.cells:
    raise ValueError("--cells is required: the cell directories to rerun")
  from fedjax_sparse.sweeps.tables import parse_args_by_name
  by_name = parse_args_by_name(FLAGS.add_aggregator_args, "aggregator")
  attack_by_name = parse_args_by_name(FLAGS.add_attack_args, "attack")
  renamed = {}
  for pair in FLAGS.rename_aggregators:
    if pair.count(":") != 1:
      raise ValueError(f"--rename_aggregators takes old:new pairs, got "
                       f"{pair!r}")
    old_name, new_name = pair.split(":")
    renamed[old_name] = new_name
  passed = failed = 0
  for cell in FLAGS.cells:
    try:
      diff = reproduce(cell, FLAGS.rtol, FLAGS.max_rounds, by_name,
                       attack_by_name, renamed)
    except (ValueError, FileNotFoundError) as e:
      diff = f"cannot rerun: {e}"
    if diff is None:
      passed += 1
      print(f"reproduced: {cell}", flush=True)
    else:
      failed += 1
      print(f"DIFFERS: {cell}: {diff}", flush=True)
  print(f"{passed} passed, {failed} failed")
  return 1 if failed else 0


if __name__ == "__main__":
  _cli.run(main)
