r"""What a sweep cell pays before its first round, and what reuse saves.

A sweep of 8 cells of one compiled shape (the same configuration but the
seed, seeds not batched) runs twice as the binary runs it
(``python -m experiments.sweep``), each time in a fresh process:

1. ``cold``: an empty persistent compilation cache (a fresh directory);
2. ``warm``: the same sweep into a new output directory, the cache filled
   by run 1 (a rerun, a resumed sweep, another sweep of compiled shapes).

For every cell the summaries record ``startup_seconds`` (from the start of
the cell to its first round: building the experiment, resuming, compiling
or loading the compiled round step) and ``compile_seconds`` (the round
step's share). The data are loaded once per sweep (the runner keeps them
between cells of one dataset setting), and cells after the first find the
round step in the cache that the first one filled, when their programs
are the same. Target (issue #16): the second and later cells start their
first round within 2 s.

Measured (2-core dev machine, cnn2, 5000 images, load about 8): cold, every
cell compiled anew (11-13 s each): the seed changes the partition and so
the width of the client index table (the largest client), a static shape of
the round step; warm, every cell loads its program from the cache (0.5 s).
A table width shared by the cells of a sweep would let cells 2-8 reuse cell
1's program; it changes the shuffles (drawn over the table width), so it
must be recorded in the configuration (not done yet).

  python -m benchmarks.sweep_startup [--model=cnn2] [--dataset=fashion_mnist]
      [--out=benchmarks/results/sweep_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from fedjax_sparse.simulation import io

SEEDS = 8
TARGET_S = 2.0


def run_sweep(args, out_dir: str, cache_dir: str) -> tuple[list[dict], float]:
  cmd = [sys.executable, "-m", "experiments.sweep",
         f"--dataset={args.dataset}", f"--model={args.model}",
         f"--max_train={args.max_train}", "--val_size=200",
         "--num_clients=20", "--clients_per_round=10", "--local_steps=2",
         "--batch_size=32", "--rounds=3", "--eval_every=3",
         "--attacks=none", "--aggregators=fedavg",
         f"--seeds={','.join(str(s) for s in range(SEEDS))}",
         "--batch_seeds=false", "--progress=false",
         f"--compilation_cache_dir={cache_dir}", f"--output_dir={out_dir}"]
  if args.data_dir:
    cmd.append(f"--data_dir={args.data_dir}")
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  cells = []
  for seed in range(SEEDS):
    name = f"none__fedavg__mf0__dense__seed{seed}"
    with open(os.path.join(out_dir, name, "summary.json")) as f:
      s = json.load(f)
    cells.append({"cell": name, "startup_seconds": s["startup_seconds"],
                  "compile_seconds": s["compile_seconds"],
                  "median_round_seconds": s["median_round_seconds"]})
  return cells, wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="cnn2")
  parser.add_argument("--dataset", default="fashion_mnist")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--max_train", type=int, default=5000)
  parser.add_argument("--out", default="benchmarks/results/sweep_startup.json")
  args = parser.parse_args()
  load_start = os.getloadavg()
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    for name in ("cold", "warm"):
      cells, wall = run_sweep(args, os.path.join(tmp, name), cache)
      runs[name] = {"cells": cells, "process_wall_s": wall}
  lines = ["| run | cell 1 startup s | cells 2-8 startup s (median / max) "
           "| cell 1 compile s | cells 2-8 compile s (max) | process wall s |",
           "|---|---:|---:|---:|---:|---:|"]
  summary = {}
  for name, r in runs.items():
    c = r["cells"]
    later = [x["startup_seconds"] for x in c[1:]]
    lines.append(
        f"| {name} | {c[0]['startup_seconds']:.2f} | "
        f"{statistics.median(later):.2f} / {max(later):.2f} | "
        f"{c[0]['compile_seconds']:.2f} | "
        f"{max(x['compile_seconds'] for x in c[1:]):.2f} | "
        f"{r['process_wall_s']:.1f} |")
    summary[f"{name}_later_cells_max_startup_s"] = round(max(later), 3)
    summary[f"{name}_later_cells_within_{TARGET_S:g}s"] = max(later) <= TARGET_S
  table = "\n".join(lines)
  print(table)
  out = {
      "benchmark": "sweep_startup",
      "settings": {"model": args.model, "dataset": args.dataset,
                   "max_train": args.max_train, "cells": SEEDS,
                   "clients_per_round": 10, "local_steps": 2, "rounds": 3},
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "load_average_at_start": load_start,
      "load_average_at_end": os.getloadavg(),
      "target_s": TARGET_S,
      "summary": summary,
      "table_markdown": table,
      "runs": runs,
  }
  io.atomic_write_json(args.out, out)
  print(f"wrote {args.out}\nsummary: {summary}")


if __name__ == "__main__":
  main()
