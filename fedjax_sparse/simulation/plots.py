"""PNG plots made from result records (written atomically)."""

from __future__ import annotations

import io as _io
from typing import Optional

from fedjax_sparse.simulation import io


def plot_accuracy_curves(runs: dict[str, list[dict]], path: str,
                         title: str = "Test accuracy",
                         attack_start: Optional[int] = None) -> None:
  """Plots test accuracy against round for each named run.

  Args:
    runs: run name -> the run's per-round records (``rounds.jsonl``).
    path: PNG file to write.
    title: plot title.
    attack_start: round at which an attack starts, marked with a line.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  _draw_curves(ax, runs, "accuracy", attack_start)
  ax.set_ylabel("test accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  buf = _io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  io.atomic_write_bytes(path, buf.getvalue())


# Runs drawn in one panel differ in colour, line style and marker, so that
# a run whose curve equals another's stays visible under it.
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")


def _style(i: int) -> dict:
  return {"linestyle": _STYLES[i % len(_STYLES)],
          "marker": _MARKERS[i % len(_MARKERS)], "markersize": 3,
          "linewidth": 1.6 if i == 0 else 1.2}


def _curve_labels(curves: dict[str, tuple]) -> dict[str, str]:
  """Legend labels; a curve equal to an earlier one is labelled so
  (``"fedavg (= safesparse)"``): the two lines lie on each other."""
  labels, seen = {}, {}
  for name, pts in curves.items():
    same = seen.get(pts)
    labels[name] = f"{name} (= {same})" if same is not None and pts else name
    seen.setdefault(pts, name)
  return labels


def _draw_curves(ax, runs: dict[str, list[dict]], key: str,
                 attack_start: Optional[int]) -> None:
  """Draws ``key`` against round for each run on ``ax``, the attack's start
  as a vertical line, and labels the x axis.

  Records without ``key`` (or with ``None``) are skipped.
  """
  curves = {name: tuple((r["round"], r[key]) for r in records
                        if r.get(key) is not None)
            for name, records in runs.items()}
  labels = _curve_labels(curves)
  for i, (name, pts) in enumerate(curves.items()):
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, label=labels[name], **_style(i))
  if attack_start is not None:
    ax.axvline(attack_start, color="red", linestyle="--", linewidth=1,
               label=f"attack starts (round {attack_start})")
  ax.set_xlabel("round")


_LABELS = {"accuracy": "test accuracy", "asr": "attack success rate",
           "top5_accuracy": "top-5 test accuracy", "loss": "train loss",
           "test_loss": "test loss"}


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt
  buf = _io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  plt.close(fig)
  io.atomic_write_bytes(path, buf.getvalue())


def plot_metric_curves(runs: dict[str, list[dict]], path: str,
                       keys: tuple[str, ...] = ("accuracy", "asr"),
                       title: str = "",
                       attack_start: Optional[int] = None) -> None:
  """One panel per metric (e.g. accuracy and ASR) against round, every run
  drawn in each panel.

  Panels of metrics no record has are left out (e.g. ``asr`` without a
  backdoor attack); with no panel left nothing is written.

  Args:
    runs: run name -> its per-round records (``rounds.jsonl``, or averages
      over seeds in the same form).
    path: PNG file to write.
    keys: record keys to plot, one panel each.
    title: figure title.
    attack_start: round at which the attack starts, marked in every panel.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = tuple(k for k in keys
               if any(r.get(k) is not None for rs in runs.values() for r in rs))
  if not keys:
    return
  fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.2),
                           dpi=110, squeeze=False)
  for ax, key in zip(axes[0], keys):
    _draw_curves(ax, runs, key, attack_start)
    ax.set_ylabel(_LABELS.get(key, key))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


def plot_heatmaps(panels: dict[str, "np.ndarray"], row_labels: list[str],
                  col_labels: list[str], path: str, title: str = "",
                  value_label: str = "final test accuracy",
                  vmin: Optional[float] = 0.0, vmax: Optional[float] = 1.0,
                  fmt: str = "{:.3f}") -> None:
  """Annotated heatmaps (e.g. attack x defence accuracy), one per panel.

  Args:
    panels: panel title -> ``[len(row_labels), len(col_labels)]`` values;
      nan cells (no result) are drawn blank and annotated "-".
    row_labels: row names (attacks).
    col_labels: column names (defences).
    path: PNG file to write.
    title: figure title.
    value_label: colour bar label.
    vmin, vmax: colour range (None: from the data).
    fmt: annotation format.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  n = max(len(panels), 1)
  w = max(4.0, 0.9 * len(col_labels) + 2.5)
  h = max(2.5, 0.5 * len(row_labels) + 1.8)
  fig, axes = plt.subplots(1, n, figsize=(w * n, h), dpi=110, squeeze=False)
  im = None
  for ax, (name, values) in zip(axes[0], panels.items()):
    values = np.asarray(values, np.float64)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin,
                   vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=35, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("defence")
    ax.set_ylabel("attack")
    if name:
      ax.set_title(name, fontsize=9)
    lo = np.nanmin(values) if np.isfinite(values).any() else 0.0
    hi = np.nanmax(values) if np.isfinite(values).any() else 1.0
    mid = ((vmin if vmin is not None else lo) + (vmax if vmax is not None else hi)) / 2
    for i in range(values.shape[0]):
      for j in range(values.shape[1]):
        v = values[i, j]
        text = "-" if not np.isfinite(v) else fmt.format(v)
        color = "black" if np.isfinite(v) and v > mid else "white"
        if not np.isfinite(v):
          color = "black"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
  if im is not None:
    fig.colorbar(im, ax=axes[0].tolist(), label=value_label, shrink=0.9)
  if title:
    fig.suptitle(title, y=1.02)
  _save(fig, path)
