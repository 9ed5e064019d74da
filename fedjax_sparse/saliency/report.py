"""Per-layer densities of sparse masks: JSON and a bar plot (hybrid paper Fig. 8)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping, Optional, Union

from fedjax_sparse.saliency.masks import MaskResult

Results = Union[MaskResult, Mapping[str, MaskResult]]


def _as_dict(results: Results) -> dict[str, MaskResult]:
  if isinstance(results, MaskResult):
    return {results.method: results}
  return dict(results)


def densities_record(results: Results, meta: Optional[Mapping] = None) -> dict:
  """A JSON-ready record: per method, per-leaf densities and counts."""
  out = {"meta": dict(meta or {}), "masks": {}}
  for label, r in _as_dict(results).items():
    out["masks"][label] = {
        "method": r.method, "delta": r.delta, "num_kept": r.num_kept,
        "densities": {k: float(v) for k, v in r.densities.items()},
        "counts": {k: int(v) for k, v in r.counts.items()},
    }
  return out


def write_densities_json(path: str, results: Results,
                         meta: Optional[Mapping] = None) -> None:
  """Writes :func:`densities_record` to ``path`` atomically."""
  text = json.dumps(densities_record(results, meta), indent=2, sort_keys=True) + "\n"
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def plot_densities(path: str, results: Results, layers: Optional[list[str]] = None,
                   title: Optional[str] = None, log: bool = False) -> None:
  """Grouped bar chart of the per-layer densities, one group per layer.

  Like the hybrid paper's Fig. 8 (remaining weights per layer for ERK,
  FORCE and FORCE with a layer constraint). ``layers`` defaults to the
  leaves with a density below 1 in some mask or that are kernels; pass the
  kernel names to restrict the plot to the prunable layers.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  res = _as_dict(results)
  first = next(iter(res.values()))
  if layers is None:
    layers = [n for n in first.densities if n.endswith("kernel")] or list(first.densities)
  x = np.arange(len(layers))
  width = 0.8 / max(len(res), 1)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 3.6))
  for i, (label, r) in enumerate(res.items()):
    ax.bar(x + (i - (len(res) - 1) / 2) * width, [r.densities.get(n, 0.0) for n in layers],
           width, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels([n.replace("/kernel", "") for n in layers], rotation=60,
                     ha="right", fontsize=7)
  ax.set_ylabel("density (kept / size)")
  if log:
    ax.set_yscale("log")
  if title:
    ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
