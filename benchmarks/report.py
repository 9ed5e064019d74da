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
  tun = r.get("glibc_tunables")
  out = [f"Sparsification (`benchmarks/sparsify.py`, {r['cpu_count']} cores, "
         f"load average at the end {r['load_average_at_end'][0]:.1f}"
         + (f", `GLIBC_TUNABLES={tun}`" if tun else "")
         + (f", `XLA_FLAGS={r['xla_flags']}`" if r.get("xla_flags") else "")
         + "): pack "
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
  la0 = r.get("load_average_at_start")
  load = (f"load average {la0[0]:.1f} at the start, "
          f"{r['load_average_at_end'][0]:.1f} at the end" if la0 else
          f"load average {r['load_average_at_end'][0]:.1f}")
  out = (f"Aggregators (`benchmarks/aggregators.py`, {r['cpu_count']} cores, "
         f"{load}): {r['notes']}\n\n" + r["table_markdown"].strip())
  sm = r.get("summary", {})
  if "below_1x_vs_numpy" in sm:
    out += (f"\n\nBelow 1.0x against numpy: {len(sm['below_1x_vs_numpy'])} of "
            f"{len(r['records']) - sum(1 for x in r['records'] if x.get('section') != 'rules')} cells"
            f" ({', '.join(sorted({c.split('@')[0] for c in sm['below_1x_vs_numpy']}))}); "
            f"against ByzFL: {len(sm['below_1x_vs_byzfl'])}.")
  return out


def scale(r: dict) -> str:
  s, m = r["setup"], r["machine"]
  out = [f"Scale (`benchmarks/scale.py`, {m['processor']}, {m['cpus']} cores, "
         f"JAX {m['jax']}, load average {r['load_average']['start'][0]:.1f}"
         f"-{r['load_average']['end'][0]:.1f}): {s['model']}, K = {s['K']}, "
         f"{s['local_steps']} local steps of batch {s['batch']}, engine "
         f"{s['engine']}, {s['partition']} partition of {s['N']:,} examples, "
         f"median of {s['rounds']} rounds, {s['reps']} fresh processes per "
         "cell. Samplers: `choice` (a shuffle of the C clients) and `topk` "
         "(the O(C) sampler the round step uses).", "",
         "| C | sampler | n_max | per-client tables MB | round ms | "
         "peak RSS MB |", "|---:|---|---:|---:|---:|---:|"]
  for p in r["population"]:
    out.append(f"| {p['C']:,} | {p['sampler']} | {p['n_max']} | "
               f"{p['per_client_tables_mb']:.2f} | {p['round_s'] * 1e3:.1f} | "
               f"{p['peak_rss_mb']:.0f} |")
  t = r["targets"]["topk"]
  out += ["", f"C = 100,000 / C = 1,000 time per round (topk): "
          f"{t['round_ratio_100k_over_1k']:.2f}x (target 1.2x); compiled-step "
          f"memory +{t['xla_step_memory_growth_mb']:.1f} MB for "
          f"+{t['per_client_tables_growth_mb']:.1f} MB of per-client tables "
          f"(process peak RSS +{t['peak_rss_growth_mb']:.0f} MB, "
          f"run-to-run spread {t['peak_rss_spread_mb']:.0f} MB)."]
  seeds = r.get("seeds") or []
  if seeds:
    sm = r.get("seeds_machine", m)
    la = r.get("seeds_load_average", r["load_average"])
    modes = [k for k in ("vmap", "map", "shard") if k in seeds[0]]
    out += ["", f"Seed batches ({sm['processor']}, {sm['cpus']} cores split "
            f"into {seeds[0].get('devices', 1)} host devices, load average "
            f"{la['start'][0]:.1f}-{la['end'][0]:.1f}; C = 1,000): 4 seeds in "
            "one compiled step against 4 separately compiled runs, per round "
            "(all variants timed in turn) and end to end as a sweep runs "
            "them (build, compile, rounds, an evaluation every 10).", "",
            "| K | 4 separate runs ms/round | " + " | ".join(
                f"{x} ms/round" for x in modes) + " | rounds | 4 separate "
            "runs s | " + " | ".join(f"{x} s" for x in modes) + " |",
            "|---:|---:|" + "---:|" * len(modes) + "---:|---:|"
            + "---:|" * len(modes)]
    for x in seeds:
      sw = x.get("sweep", {})
      out.append(
          f"| {x['K']} | {x['separate_round_s'] * 1e3:.1f} | " + " | ".join(
              f"{x[k]['round_s'] * 1e3:.1f} ({x[k]['speedup']:.2f}x)"
              for k in modes) + f" | {sw.get('rounds', '')} | "
          f"{sw.get('separate_s', float('nan')):.1f} | " + " | ".join(
              f"{sw[k + '_s']:.1f} ({sw[k + '_speedup']:.2f}x)"
              for k in modes if k + "_s" in sw) + " |")
  return "\n".join(out)


def peer_round(r: dict) -> str:
  m, v, s = r["machine"], r["versions"], r["summary"]
  la0, la1 = r["load_average_at_start"][0], r["load_average_at_end"][0]
  torch_cfg = "; ".join(
      f"{c['model']}: " + ", ".join(f"{k} {sec * 1e3:.0f} ms"
                                    for k, sec in c["seconds"].items())
      + f" -> {c['best']}" for c in r.get("torch_settings", []))
  out = [f"Against an FL-Byzantine-Library-style PyTorch round "
         f"(`benchmarks/peer_round.py`, {m['processor']}, {m['cpus']} cores, "
         f"{m['devices']} host devices, JAX {v['jax']}, PyTorch {v['torch']}, "
         f"load average {la0:.1f} at the start, {la1:.1f} at the end): "
         f"{r['notes']}"]
  if torch_cfg:
    out.append(f"Torch configuration chosen by measurement ({torch_cfg}).")
  out += ["", r["table_markdown"].strip(), "",
          f"Targets: >= 1.5x in every K = 25 row "
          f"{'met' if s['k25_1p5x_met'] else 'not met'}; >= 3x at K = 100, 10 "
          f"local steps {'met' if s['k100_10steps_3x_met'] else 'not met'}."]
  return "\n".join(out)


def sweep_startup(r: dict) -> str:
  st = r["settings"]
  return "\n".join([
      f"Sweep cell startup (`benchmarks/sweep_startup.py`, {r['cpu_count']} "
      f"cores, load average {r['load_average_at_start'][0]:.1f} at the "
      f"start): {st['cells']} cells of {st['model']} on {st['dataset']} "
      f"that differ only in the seed, run by the sweep binary with an empty "
      f"persistent compilation cache (cold) and again with it filled (warm); "
      f"seconds from each cell's start to its first round.", "",
      r["table_markdown"].strip(), "",
      f"Target: cells 2-8 within {r['target_s']:g} s: cold "
      f"{'met' if r['summary']['cold_later_cells_within_2s'] else 'not met'}"
      f", warm "
      f"{'met' if r['summary']['warm_later_cells_within_2s'] else 'not met'}."])


def compile_time(r: dict) -> str:
  sm = r["summary"]
  la = r.get("load_average_at_start", [float("nan")])[0]
  totals = ", ".join(f"{k} {v:.2f}" for k, v in sorted(
      sm["total_s_at_K100"].items(), key=lambda kv: -kv[1]))
  return (f"Compile plus first call of every rule (`benchmarks/compile_time.py`, "
          f"{r['cpu_count']} cores, load average {la:.1f} at the start, JAX "
          f"{r['jax_version']}; d = 270,000, a fresh jit each, no persistent "
          f"cache; `+escape`: with the malicious flags, as the round step "
          f"compiles it): target {sm['target']}: "
          f"{'met by every rule' if sm['all_met'] else 'not met by ' + ', '.join(sm['failing'])}. "
          f"Seconds at K = 100, slowest first: {totals}.")


SECTIONS = {"round_throughput.json": round_throughput,
            "sparsify.json": sparsify, "attacks.json": attacks,
            "aggregators.json": aggregators, "scale.json": scale,
            "peer_round.json": peer_round, "sweep_startup.json": sweep_startup,
            "compile_time.json": compile_time}


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
