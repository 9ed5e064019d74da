"""Markdown tables for the README from the benchmark JSON files.

  python -m benchmarks.report [--results=benchmarks/results]

Prints one section per results file that exists, so the README's numbers are
always copied from the data, with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os


def round_throughput(r: dict) -> str:
  m = r["machine"]
  s = r["settings"]
  out = [f"Round step throughput (`benchmarks/round_throughput.py`): {m['processor']}, "
         f"{m['cpus']} cores, {m['devices']} host devices, JAX {m['jax']}, "
         f"measured f32 matmul peak {m['matmul_peak_gflops']:.0f} GFLOP/s; "
         f"{s['local_steps']} local steps of batch {s['batch_size']} per client. "
         "Baselines: the step loop (a Python loop over clients and their "
         "minibatches calling a jitted training step, as sequential simulators "
         "run) and the client-jit loop (a Python loop over clients, each "
         "client's whole local training in one jit call).", "",
         "| model | K | step loop samples/s | client-jit loop samples/s | best engine "
         "| samples/s | vs step loop | vs client-jit loop | % of matmul peak "
         "| compile s |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
  for row in r["rows"]:
    b = row["engines"][row["best_engine"]]
    n = row["K"] * s["local_steps"] * s["batch_size"]
    pf = b.get("peak_fraction")
    out.append(
        f"| {row['model']} | {row['K']} | {n / row['python_loop_s']:,.0f} | "
        f"{n / row['client_jit_loop_s']:,.0f} | {row['best_engine']} | "
        f"{b['samples_per_s']:,.0f} | {b['speedup']:.2f}x | "
        f"{b['speedup_vs_client_jit_loop']:.2f}x | "
        f"{'n/a' if pf is None else f'{100 * pf:.0f}%'} | {b['compile_s']:.1f} |")
  return "\n".join(out)


def sparsify(r: dict) -> str:
  out = [f"Sparsification (`benchmarks/sparsify.py`, {r['cpu_count']} cores, "
         f"load average at the end {r['load_average_at_end'][0]:.1f}): pack "
         "top-k (r = 0.5) against numpy `argpartition`, and FLARE Alg. 2 "
         "(`combine` with masks) against the dense weighted mean of the same "
         "inputs.", "",
         "| d | K | P | top-k ms | numpy ms | speedup | Alg. 2 ms | dense mean ms "
         "| Alg. 2 / mean |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  topk = [x for x in r["records"] if x["section"] == "pack_topk"]
  alg2 = [x for x in r["records"] if x["section"] == "alg2"]
  for t, a in zip(topk, alg2):
    out.append(
        f"| {t['d']:,} | {t['K']} | {t['P']} | {t['jax_median_s'] * 1e3:.1f} | "
        f"{t['numpy_median_s'] * 1e3:.1f} | {t['speedup_vs_numpy']:.2f}x | "
        f"{a['combine_median_s'] * 1e3:.1f} | {a['dense_mean_median_s'] * 1e3:.1f} | "
        f"{a['combine_over_dense']:.2f}x |")
  return "\n".join(out)


def attacks(r: dict) -> str:
  ks = [str(k) for k in r["ks"]]
  out = [f"Attack generation (`benchmarks/attacks.py`): d = {r['d']:,}, "
         f"{r['malicious_fraction']:.0%} malicious, jitted, median ms, "
         f"{r['cpu_count']} CPU cores (load average {r['loadavg_at_start'][0]:.1f} "
         "at the start); the hybrid paper's Table X on an A40 GPU for "
         "comparison.", "",
         "| attack | " + " | ".join(f"K={k}" for k in ks) + " | A40 K=100 |",
         "|---|" + "---:|" * (len(ks) + 1)]
  for name, per_k in r["ms"].items():
    a40 = r.get("paper_a40_ms", {}).get(name, {})
    a40_100 = a40.get("100") if isinstance(a40, dict) else None
    out.append(f"| {name} | " + " | ".join(
        f"{per_k[k]:.1f}" if k in per_k else "" for k in ks) +
        f" | {a40_100 if a40_100 is not None else ''} |")
  if "force" in r:
    out.append("")
    out.append(f"FORCE (T = 100) on cnn2: {json.dumps(r['force'])}")
  return "\n".join(out)


def aggregators(r: dict) -> str:
  return (f"Aggregators (`benchmarks/aggregators.py`, {r['cpu_count']} cores, load "
          f"average {r['load_average_at_end'][0]:.1f}): {r['notes']}\n\n"
          + r["table_markdown"].strip())


SECTIONS = {"round_throughput.json": round_throughput,
            "sparsify.json": sparsify, "attacks.json": attacks,
            "aggregators.json": aggregators}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default="benchmarks/results")
  args = parser.parse_args()
  for name, fn in SECTIONS.items():
    path = os.path.join(args.results, name)
    if os.path.exists(path):
      with open(path) as f:
        print(fn(json.load(f)))
        print()


if __name__ == "__main__":
  main()
