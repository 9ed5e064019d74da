"""The report of a sweep, read back from its cells' directories.

:func:`write_report` writes, atomically, into the sweep's output directory:

* ``results.csv``: one row per cell (its ``aggregator`` column names the
  defence: the preset for a preset's cells);
* ``results.md``: final accuracy (mean over seeds), attacks as rows and
  defences as columns, one table per (malicious fraction, top-k ratio); in
  the same layout, where some finished cell reports them, the final attack
  success rate, targeted accuracy, outsized impact factor (OIF) and L1
  distance to the unattacked twin; the mean TPR / FPR of the defences that
  flag clients; the presets and per-defence settings used;
* ``heatmap.png`` and ``curves_<attack>.png``
  (:mod:`fedjax_sparse.simulation.plots`).

A cell counts as a result only when its ``summary.json`` holds its
configuration (:func:`fedjax_sparse.sweeps.runner.same_config`); the
committed sweeps under ``experiments/results/`` are read this way, so the
file formats here do not change.
"""

from __future__ import annotations

import collections
import csv
import io as _io
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from fedjax_sparse.simulation import io
from fedjax_sparse.sweeps.grid import Cell
from fedjax_sparse.sweeps.runner import _read_json, same_config

CSV_COLUMNS = ("cell", "status", "attack", "aggregator", "malicious_fraction",
               "sparsify", "topk_ratio", "seed", "rounds", "final_accuracy",
               "best_accuracy", "final_top5_accuracy", "final_asr",
               "final_l1_to_twin", "final_twin_accuracy",
               "final_targeted_accuracy", "final_oif", "mean_tpr", "mean_fpr",
               "uplink_bits_total", "downlink_bits_total", "wall_seconds", "compile_seconds",
               "startup_seconds")
# The columns read from summary.json.
_SUMMARY_COLUMNS = CSV_COLUMNS[CSV_COLUMNS.index("final_accuracy"):]


def _load(cell: Cell) -> tuple[str, Optional[dict], list[dict]]:
  summary = _read_json(os.path.join(cell.dir, "summary.json"))
  if summary is not None and not same_config(summary.get("config"),
                                             cell.config):
    summary = None  # another configuration (e.g. fewer rounds): not a result
  rounds_path = os.path.join(cell.dir, "rounds.jsonl")
  records = io.read_jsonl(rounds_path) if os.path.exists(rounds_path) else []
  if summary is not None:
    status = "done"
  elif os.path.exists(os.path.join(cell.dir, "error.txt")):
    with open(os.path.join(cell.dir, "error.txt")) as f:
      status = "failed: " + f.read().strip()
  elif records:
    status = f"partial ({records[-1]['round']}/{cell.config.rounds} rounds)"
  else:
    status = "missing"
  return status, summary, records


def _row(cell: Cell, status: str, summary: Optional[dict]) -> dict:
  s = summary or {}
  return {
      "cell": cell.name, "status": status, "attack": cell.attack,
      "aggregator": cell.defence,
      "malicious_fraction": cell.malicious_fraction,
      "sparsify": cell.config.sparsify,
      "topk_ratio": "" if cell.topk_ratio is None else cell.topk_ratio,
      "seed": cell.seed, "rounds": cell.config.rounds,
      **{k: s.get(k) for k in _SUMMARY_COLUMNS}}


def _fmt(x: Any) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return ""
  return repr(x) if isinstance(x, float) else str(x)


def _has_value(x: Any) -> bool:
  return x is not None and not (isinstance(x, float) and math.isnan(x))


def _mean_std(values: list) -> tuple[float, float, int]:
  v = [x for x in values if _has_value(x)]
  if not v:
    return math.nan, math.nan, 0
  return float(np.mean(v)), float(np.std(v)), len(v)


def _panels(rows: list[dict], key: str, attacks: list[str],
            aggregators: list[str]) -> dict[tuple, np.ndarray]:
  """(fraction, ratio) -> [attack, aggregator] mean over seeds of ``key``.

  The "none" attack (fraction 0) is the baseline row of every panel.
  """
  combos = sorted({(r["malicious_fraction"], r["topk_ratio"]) for r in rows
                   if r["attack"] != "none"}, key=lambda t: (t[0], str(t[1])))
  if not combos:
    combos = sorted({(r["malicious_fraction"], r["topk_ratio"]) for r in rows},
                    key=lambda t: (t[0], str(t[1])))
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["attack"], r["aggregator"], r["malicious_fraction"],
            r["topk_ratio"])].append(r.get(key))
  out = {}
  for frac, ratio in combos:
    m = np.full((len(attacks), len(aggregators), 3), np.nan)
    for i, a in enumerate(attacks):
      for j, g in enumerate(aggregators):
        f = 0.0 if a == "none" else frac
        m[i, j] = _mean_std(groups.get((a, g, f, ratio), []))
    out[(frac, ratio)] = m
  return out


def _panel_title(frac, ratio, with_none: bool = False) -> str:
  """The panel's setting; ``with_none``: the panel holds the none row, whose
  cells have no attackers whatever the panel's fraction."""
  r = "dense" if ratio == "" else f"top-k {ratio:g}"
  none = " (none row: no attackers)" if with_none and frac else ""
  return f"malicious fraction {frac:g}{none}, {r}"


def _markdown_table(m: np.ndarray, attacks, aggregators,
                    fmt: str = "{:.4f}") -> list[str]:
  lines = ["| attack \\ defence | " + " | ".join(aggregators) + " |",
           "|---|" + "---:|" * len(aggregators)]
  for i, a in enumerate(attacks):
    cells = []
    for j in range(len(aggregators)):
      mean, std, n = m[i, j]
      if n == 0:
        cells.append("-")
      elif n > 1:
        cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
      else:
        cells.append(fmt.format(mean))
    lines.append(f"| {a} | " + " | ".join(cells) + " |")
  return lines


# Per-round record keys averaged over seeds for the curves.
_CURVE_KEYS = ("accuracy", "asr", "targeted_accuracy", "twin_accuracy",
               "l1_to_twin", "oif")
# Of those, the ones plotted (each where some record has it).
_PLOTTED_KEYS = ("accuracy", "asr", "targeted_accuracy")


def _mean_curve(runs: list[list[dict]]) -> list[dict]:
  by_round = collections.defaultdict(lambda: collections.defaultdict(list))
  for records in runs:
    for r in records:
      for k in _CURVE_KEYS:
        if _has_value(r.get(k)):
          by_round[r["round"]][k].append(r[k])
  return [{"round": rnd, **{k: float(np.mean(v)) for k, v in d.items()}}
          for rnd, d in sorted(by_round.items())]


# Tables of results.md after the accuracy tables: summary key, title, what
# the values are, number format. Each appears when a finished cell has it,
# with the attacks that have it as rows.
_METRIC_TABLES = (
    ("final_asr", "Final attack success rate (backdoor attacks)", "", "{:.4f}"),
    ("final_targeted_accuracy", "Final targeted accuracy",
     "Accuracy on the attack's targeted task at the last evaluation.",
     "{:.4f}"),
    ("final_oif", "Final outsized impact factor (OIF)",
     "|X_m| / (I n) of sparsefed.txt B.1.6: 1 means the attackers poisoned "
     "the share of the data their share of the clients entitles them to.",
     "{:.4f}"),
    ("final_l1_to_twin", "Final L1 distance to the unattacked twin",
     "||w - w_twin||_1 between the final model and the same run without "
     "attackers (sparsefed.txt Table 2).", "{:.4g}"),
)


def _detection_lines(done: list[dict], attacks: list[str],
                     aggregators: list[str]) -> list[str]:
  """Mean TPR / FPR tables of the defences that flagged some client."""
  attacked = [r for r in done if r["attack"] != "none"]
  filtering = [g for g in aggregators if any(
      r["aggregator"] == g and any(_has_value(r.get(k)) and r[k] > 0
                                   for k in ("mean_tpr", "mean_fpr"))
      for r in attacked)]
  rows = [a for a in attacks if a != "none" and any(
      r["attack"] == a and r["aggregator"] in filtering for r in attacked)]
  if not filtering or not rows:
    return []
  sub = [r for r in attacked if r["aggregator"] in filtering]
  tpr = _panels(sub, "mean_tpr", rows, filtering)
  fpr = _panels(sub, "mean_fpr", rows, filtering)
  md = ["# Detection: mean TPR / FPR", "",
        "Mean over the attacked rounds (and over seeds) of the share of "
        "malicious clients flagged (TPR) and of benign clients flagged "
        "(FPR), for the defences that flagged some client.", ""]
  for combo, t in tpr.items():
    f = fpr[combo]
    md += [f"## {_panel_title(*combo)}", "",
           "| attack \\ defence | " + " | ".join(filtering) + " |",
           "|---|" + "---:|" * len(filtering)]
    for i, a in enumerate(rows):
      vals = []
      for j in range(len(filtering)):
        (tm, _, tn), (fm, _, fn) = t[i, j], f[i, j]
        vals.append("-" if tn == 0 and fn == 0 else
                    f"{_fmt_or_dash(tm, tn)} / {_fmt_or_dash(fm, fn)}")
      md.append(f"| {a} | " + " | ".join(vals) + " |")
    md.append("")
  return md


def _fmt_or_dash(mean: float, n: int) -> str:
  return "-" if n == 0 else f"{mean:.4f}"


def _preset_lines(cells: Sequence[Cell]) -> list[str]:
  used = {}
  for c in cells:
    if c.preset and c.preset not in used:
      fields = dict(c.preset_fields)
      fields["aggregator_args"] = c.config.aggregator_args
      used[c.preset] = ", ".join(f"{k}={v!r}" if isinstance(v, str) else
                                 f"{k}={v}" for k, v in fields.items()
                                 if k != "aggregator_args" or v)
  if not used:
    return []
  return (["# Defence presets", ""]
          + [f"- {name}: {text}" for name, text in used.items()] + [""])


def _defence_field_lines(cells: Sequence[Cell]) -> list[str]:
  used = {}
  for c in cells:
    if c.defence_fields and c.defence not in used:
      used[c.defence] = ", ".join(f"{k}={v!r}" if isinstance(v, str) else
                                  f"{k}={v}" for k, v in c.defence_fields)
  if not used:
    return []
  return (["# Per-defence settings (--aggregator_fields_by_name)", ""]
          + [f"- {name}: {text}" for name, text in used.items()] + [""])


def write_report(cells: Sequence[Cell], output_dir: str) -> dict:
  """Writes results.csv, results.md, heatmap.png and curves_<attack>.png.

  Cells without a finished run appear in the CSV with their status (missing,
  partial, failed) and are left out of the tables and plots.

  Returns:
    ``{"rows": [...], "markdown": str, "files": [paths written]}``.
  """
  from fedjax_sparse.simulation import plots
  os.makedirs(output_dir, exist_ok=True)
  attacks = list(dict.fromkeys(c.attack for c in cells))
  aggregators = list(dict.fromkeys(c.defence for c in cells))
  rows, curves = [], collections.defaultdict(list)
  for cell in cells:
    status, summary, records = _load(cell)
    rows.append(_row(cell, status, summary))
    if summary is not None:
      curves[cell.attack].append((cell, records))
  files = []

  buf = _io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for r in rows:
    writer.writerow([_fmt(r[c]) for c in CSV_COLUMNS])
  path = os.path.join(output_dir, "results.csv")
  io.atomic_write_text(path, buf.getvalue())
  files.append(path)

  done = [r for r in rows if r["status"] == "done"]
  acc = _panels(done, "final_accuracy", attacks, aggregators)
  base = cells[0].config
  md = ["# Sweep results: final test accuracy",
        "",
        f"{base.dataset}, model {base.model}, {base.num_clients} clients "
        f"({base.clients_per_round} per round), partition {base.partition}"
        + (f" (alpha {base.alpha:g})" if base.partition == "dirichlet" else "")
        + f", {base.rounds} rounds, attack from round {base.attack_start}. "
        f"{len(done)}/{len(rows)} cells finished; values are the mean "
        "(± std) over seeds."
        + (" The none row (no attackers) is the clean baseline of every "
           "table." if "none" in attacks else ""), ""]
  for (frac, ratio), m in acc.items():
    md += [f"## {_panel_title(frac, ratio, 'none' in attacks)}", ""]
    md += _markdown_table(m, attacks, aggregators) + [""]
  for key, title, text, fmt in _METRIC_TABLES:
    have = [a for a in attacks if any(_has_value(r.get(key))
                                      for r in done if r["attack"] == a)]
    if not have:
      continue
    panels = _panels([r for r in done if r["attack"] in have], key, have,
                     aggregators)
    md += [f"# {title}", ""] + ([text, ""] if text else [])
    for (frac, ratio), m in panels.items():
      md += [f"## {_panel_title(frac, ratio)}", ""]
      md += _markdown_table(m, have, aggregators, fmt) + [""]
  md += _detection_lines(done, attacks, aggregators)
  md += _preset_lines(cells)
  md += _defence_field_lines(cells)
  failed = [r for r in rows if r["status"] != "done"]
  if failed:
    md += ["# Cells without results", ""]
    md += [f"- {r['cell']}: {r['status']}" for r in failed] + [""]
  markdown = "\n".join(md)
  path = os.path.join(output_dir, "results.md")
  io.atomic_write_text(path, markdown)
  files.append(path)

  if done:
    path = os.path.join(output_dir, "heatmap.png")
    plots.plot_heatmaps(
        {_panel_title(*k, "none" in attacks): m[..., 0]
         for k, m in acc.items()}, attacks,
        aggregators, path,
        title=f"Final test accuracy ({base.dataset}, {base.model})")
    files.append(path)

  for attack, runs in curves.items():
    combos = {(c.malicious_fraction, c.topk_ratio) for c, _ in runs}
    grouped = collections.defaultdict(list)
    for cell, records in runs:
      label = cell.defence
      if len(combos) > 1:
        label += (f" (mf {cell.malicious_fraction:g}, "
                  + ("dense" if cell.topk_ratio is None
                     else f"top-k {cell.topk_ratio:g}") + ")")
      grouped[label].append(records)
    path = os.path.join(output_dir, f"curves_{attack}.png")
    plots.plot_metric_curves(
        {k: _mean_curve(v) for k, v in grouped.items()}, path,
        keys=_PLOTTED_KEYS,
        title=f"attack: {attack}" + (" (mean over seeds)"
                                     if len({c.seed for c, _ in runs}) > 1 else ""),
        attack_start=None if attack == "none" else base.attack_start)
    files.append(path)
  return {"rows": rows, "markdown": markdown, "files": files}
