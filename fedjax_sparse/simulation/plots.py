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
  for name, records in runs.items():
    pts = [(r["round"], r["accuracy"]) for r in records if "accuracy" in r]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, marker="o", markersize=3, label=name)
  if attack_start is not None:
    ax.axvline(attack_start, color="red", linestyle="--", linewidth=1,
               label=f"attack starts (round {attack_start})")
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  buf = _io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  io.atomic_write_bytes(path, buf.getvalue())
