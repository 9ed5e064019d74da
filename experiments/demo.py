r"""The showcase run behind ``make demo``: attacks x defences on FashionMNIST.

Runs the grid attacks {none, IPM, scaling, boosted update} x defences
{FedAvg, SafeSparse, coordinate median} in the FLARE/SafeSparse setting
(flare.txt V-A, safesparse.txt 4; ``experiments/configs/flare_sweep.flags``),
scaled to the 2-core CPU: FashionMNIST, 20 clients all participating every
round, Dirichlet alpha = 1, the 2x200 MLP, pack top-k uploads (ratio 0.5),
40% of the clients (the first 8) malicious from round 5 of 15. Each cell is
an :mod:`experiments.sweep` cell in ``<output_dir>/<cell name>/`` (a second
run skips finished cells and resumes killed ones); the report is the
sweep's: ``results.csv``, ``results.md``, ``heatmap.png`` and
``curves_<attack>.png``.

Two threat models (ALGORITHMS.md section 5):

* ``scaling`` is the papers' attack, in their model-upload framework
  (``space=model``): each attacker uploads 10 times its local model, so the
  server sees ``(1 - 10) * global + 10 * own update``. Those updates are
  dominated by the global model: all attackers share one top-k mask and one
  sign pattern, SafeSparse's sign clustering finds them and the defence
  holds, while FedAvg collapses.
* ``boosted_update`` uploads 10 times the attacker's honest *update*
  (``scaling`` with ``space=update``): an adaptive attack on SafeSparse. Its
  mask and signs are those of an honest update, and SafeSparse's filter reads
  only masks and signs, so it cannot see it.

Choices (measured on the 2-core development CPU):

* Local training: 1 epoch of SGD, lr 0.1, batch 64 (FLARE's Adam lr 0.005
  reached 0.82-0.84 and oscillated; SGD reaches 0.86 clean). 15 rounds.
* IPM with ``eps=4`` instead of the hybrid paper's 0.4: with 40% attackers
  sending ``-eps * mu`` the FedAvg aggregate is about ``(0.6 - 0.4 eps) mu``,
  so in 20-round trial runs eps = 0.4 only slowed FedAvg (0.854 against
  0.868 clean) and eps = 2 eroded it slowly (0.59 at round 20); eps = 4
  reverses the descent direction and FedAvg falls to chance. Scaling keeps
  the paper's ``scale=10``.
* Median is the third column because it shows the other side: it bounds
  the boosted values but is pulled off by 40% identical IPM updates.

Result (2-core CPU, final test accuracy)::

  | attack \ defence | fedavg | safesparse | median |
  | none             | 0.8572 | 0.8572     | 0.8411 |
  | ipm              | 0.0593 | 0.8609     | 0.6717 |
  | scaling          | 0.1815 | 0.8609     | 0.8470 |
  | boosted_update   | 0.2946 | 0.2946     | 0.8448 |

The 12 cells took 202 s of wall time on the 2-core CPU. FedAvg diverges
under IPM and scaling; the default ``--nonfinite=reject`` screens the
non-finite uploads of such rounds, so its accuracy is that of its last
finite model.

Example::

  python -m experiments.demo [--data_dir=/usr/share/datasets/fashion-mnist] \
      [--output_dir=demo_results] [--aggregators=fedavg,safesparse,trimmed_mean]

Any :class:`ExperimentConfig` field flag of ``experiments.run`` given on the
command line (e.g. ``--rounds=30``) overrides the demo setting; the sweep's
``--attacks`` and ``--aggregators`` replace the grid, and entries of its
``--attack_args_by_name`` replace the demo's attack hyperparameters.
FashionMNIST missing: exit status 2 with a message saying how to
install it.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/cli.py
  from fedjax_sparse import cli as _cli
  _cli.prepare()

import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Optional, Sequence

from absl import flags

# Importing the sweep defines its grid flags and one flag per
# ExperimentConfig field (through experiments.run); the demo reads
# --data_dir, --output_dir, --attacks, --aggregators, --attack_args_by_name
# and lets any other field flag given explicitly override DEMO.
from experiments import sweep
from fedjax_sparse.data import sources
from fedjax_sparse.simulation.experiment import ExperimentConfig

FLAGS = flags.FLAGS

DEFAULT_DATA_DIR = sources.DEFAULT_FASHION_MNIST_DIR
DEFAULT_OUTPUT_DIR = "demo_results"

DEMO = ExperimentConfig(
    dataset="fashion_mnist", data_dir=DEFAULT_DATA_DIR,
    partition="dirichlet", alpha=1.0,
    num_clients=20, clients_per_round=20, rounds=15, local_epochs=1,
    batch_size=64, optimizer="sgd", lr=0.1, model="mlp",
    sparsify="topk", topk_ratio=0.5, pack_size=1,
    malicious_fraction=0.4, malicious_mode="first", attack_start=5,
    engine="map", map_batch_size=10, client_devices=0, seed=0, eval_every=1)
ATTACKS = ("none", "ipm", "scaling", "boosted_update")
DEFENCES = ("fedavg", "safesparse", "median")
# Hyperparameters that differ from the attacks' defaults (see above).
ATTACK_ARGS = {"ipm": "eps=4", "scaling": "space=model"}
# One sentence per attack whose meaning the table alone does not tell.
ATTACK_NOTES = {
    "scaling": "scaling: the papers' threat model, each attacker uploads 10x "
               "its local model; the uploads share one mask and sign pattern, "
               "which SafeSparse's sign clustering detects.",
    "boosted_update": "boosted_update: 10x an honest update (an adaptive "
                      "attack): its mask and signs are honest, and SafeSparse "
                      "reads only masks and signs, so it cannot see it.",
}


def _stale(cell: "sweep.Cell") -> bool:
  """Whether ``cell.dir`` holds a run that cannot be resumed into this cell.

  :func:`run_experiment` resumes a run of the same configuration and more
  rounds; anything else (an older demo setting) is started afresh.
  """
  path = os.path.join(cell.dir, "config.json")
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return True
  new = json.loads(json.dumps(dataclasses.asdict(cell.config)))
  new.pop("output_dir")
  old_rounds, new_rounds = old.pop("rounds", None), new.pop("rounds")
  return old != new or old_rounds is None or old_rounds > new_rounds


def format_table(report: dict, attacks: Sequence[str],
                 defences: Sequence[str]) -> str:
  """Final test accuracy as a Markdown table: attacks x defences."""
  acc = {(r["attack"], r["aggregator"]): r["final_accuracy"]
         for r in report["rows"] if r["status"] == "done"}
  lines = ["| attack \\ defence | " + " | ".join(defences) + " |",
           "|---|" + "".join("---:|" for _ in defences)]
  for a in attacks:
    vals = [acc.get((a, d)) for d in defences]
    lines.append(f"| {a} | " + " | ".join(
        "-" if v is None else f"{v:.4f}" for v in vals) + " |")
  return "\n".join(lines)


def _median(values: Sequence[float]) -> float:
  values = sorted(values)
  return values[len(values) // 2]


def run_demo(base: ExperimentConfig, output_dir: str,
             attacks: Sequence[str] = ATTACKS,
             defences: Sequence[str] = DEFENCES,
             attack_args_by_name: Optional[dict] = None,
             log: Callable[[str], None] = print,
             progress: bool = False) -> dict:
  """Runs (or resumes, or skips) the attack x defence grid and reports it.

  Logs a line per cell, then the final-accuracy table (attacks x defences),
  the wall time, the median seconds per round of each defence and the files
  written.

  Args:
    base: the configuration every cell starts from (its ``output_dir`` is
      ignored).
    output_dir: each cell runs in ``<output_dir>/<cell name>/``; the report
      (results.csv, results.md, heatmap.png, curves_<attack>.png) goes here.
    attacks: attacks of the grid (``"none"``: the clean baseline).
    defences: aggregation rules of the grid.
    attack_args_by_name: attack name -> ``"k=v,k=v"`` hyperparameters
      (None: :data:`ATTACK_ARGS`).
    log: where the lines go.
    progress: show one progress bar over the grid (rounds, current cell,
      accuracy, ETA); the cell lines are written above it.

  Returns:
    ``{"cells", "status", "report", "table", "wall_seconds", "summaries"}``:
    the cells, their run status (``"ran"``, ``"skipped"``, ``"failed: ..."``),
    :func:`experiments.sweep.write_report`'s result, the Markdown table, the
    wall time of this call and each finished cell's ``summary.json``.

  Raises:
    ValueError, FileNotFoundError: a bad configuration or a missing dataset,
      before anything is run.
  """
  t0 = time.perf_counter()
  cells = sweep.make_cells(
      dataclasses.replace(base, output_dir=output_dir), attacks=attacks,
      aggregators=defences,
      attack_args_by_name=(ATTACK_ARGS if attack_args_by_name is None
                           else attack_args_by_name))
  sweep.check_cells(cells)
  for cell in cells:
    if _stale(cell):
      log(f"{cell.dir} holds another demo configuration: starting it afresh")
      shutil.rmtree(cell.dir)
  status = sweep.run_cells(cells, log=None if progress and log is print
                           else log, overall_progress=progress)
  report = sweep.write_report(cells, output_dir)
  wall = time.perf_counter() - t0
  summaries = {}
  for cell in cells:
    try:
      with open(os.path.join(cell.dir, "summary.json")) as f:
        summaries[cell.name] = json.load(f)
    except (OSError, ValueError):
      pass
  # Names as the cells spell them (aliases resolved).
  attacks = tuple(dict.fromkeys(c.attack for c in cells))
  defences = tuple(dict.fromkeys(c.aggregator for c in cells))
  table = format_table(report, attacks, defences)
  round_seconds = {}
  for cell in cells:
    if cell.name in summaries:
      round_seconds.setdefault(cell.aggregator, []).append(
          summaries[cell.name]["median_round_seconds"])
  ran = sum(v == "ran" for v in status.values())
  log("")
  log(f"final test accuracy after {base.rounds} rounds "
      f"({base.malicious_fraction:.0%} attackers from round "
      f"{base.attack_start}; none = no attackers):")
  log("")
  for line in table.splitlines():
    log(line)
  notes = [ATTACK_NOTES[a] for a in attacks if a in ATTACK_NOTES]
  if notes:
    log("")
    for note in notes:
      log(note)
  log("")
  log(f"wall time {wall:.1f} s for {len(cells)} cells ({ran} run now, "
      f"{len(cells) - ran} finished before; data loading and compiling "
      "included)")
  log("median seconds per round: " + ", ".join(
      f"{d} {_median(v):.2f}" for d, v in round_seconds.items()))
  log(f"wrote {', '.join(report['files'])}")
  log(f"and one folder per cell (rounds.jsonl, summary.json) in {output_dir}")
  return {"cells": cells, "status": status, "report": report, "table": table,
          "wall_seconds": wall, "summaries": summaries}


def _explicit_overrides() -> dict:
  """ExperimentConfig fields whose flags were given on the command line."""
  out = {}
  for f in dataclasses.fields(ExperimentConfig):
    if f.name in ("output_dir", "data_dir"):
      continue
    if FLAGS[f.name].present:
      out[f.name] = FLAGS[f.name].value
  return out


def main():
  """The binary (run through :func:`fedjax_sparse.cli.run`: flags parsed,
  one CPU device per core, a user error raised here printed as ``error:``
  with exit status 2). Exit status 1: some cell failed."""
  import jax
  output_dir = FLAGS.output_dir or DEFAULT_OUTPUT_DIR
  attacks = tuple(FLAGS.attacks) or ATTACKS
  defences = tuple(FLAGS.aggregators) or DEFENCES
  base = dataclasses.replace(
      DEMO, data_dir=FLAGS.data_dir or DEFAULT_DATA_DIR,
      **_explicit_overrides())
  attack_args = {**ATTACK_ARGS, **sweep.parse_args_by_name(
      FLAGS.attack_args_by_name, "attack")}
  partition = (f"Dirichlet alpha={base.alpha:g}"
               if base.partition == "dirichlet" else base.partition)
  print(f"{len(attacks)} attacks x {len(defences)} defences on "
        f"{base.dataset}: {base.num_clients} clients, {partition}, "
        f"model {base.model}, {base.rounds} rounds, "
        f"top-k {base.topk_ratio:g} uploads, {base.malicious_fraction:.0%} "
        f"attackers from round {base.attack_start}, "
        f"{jax.local_device_count()} client devices")
  result = run_demo(base, output_dir, attacks, defences, attack_args,
                    progress=True)
  failed = [k for k, v in result["status"].items() if v.startswith("failed")]
  return 1 if failed else 0


if __name__ == "__main__":
  _cli.run(main)
