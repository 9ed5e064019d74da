r"""Scale: population size, devices, and seed-batched sweeps.

Three measurements of the round step on FashionMNIST-shaped synthetic data
(60,000 examples of 28x28x1, 10 classes), the 2x200 MLP (199,210 parameters),
K = 100 clients per round, 2 local steps of batch 32, the ``map`` engine in
chunks of 10 clients, FedAvg:

1. Population: C in {1,000, 10,000, 100,000} clients (one_class partition;
   at 100,000 > N, 60,000 clients hold one example and 40,000 none). Each C
   runs in its own process, which reports its peak resident memory
   (``getrusage`` maxrss) next to the size of the per-client tables
   (index table, counts, malicious flags and ranks). Time per round is
   measured with the round step as it is (``jax.random.choice`` without
   replacement samples the K clients) and with the top-k sampler proposed
   for ``round.py`` (:func:`topk_sample_clients`).
2. Devices: the client axis split over 1 and 2 host CPU devices (C=10,000),
   at 2 and at 10 local steps.
3. Seeds: 4 seeds in one compiled step (:mod:`fedjax_sparse.simulation.
   multi_seed`: ``vmap`` over the seeds, ``lax.map`` over them, and
   ``shard``, the seeds split over the 2 host devices) against 4 separately
   compiled runs advancing one round each, with the client axis on one
   device or split over both (the faster is the baseline); C=1,000, at
   K=100 and K=10, all variants timed in turn every round; and end to
   end, as a sweep runs them: 4 ``run_experiment`` calls against one
   ``run_seeds`` call per mode (building, compiling, 30 rounds, an
   evaluation every 10).
   ``--only=seeds`` runs this section alone and updates it in ``--out``.

Times are per round, the median (and minimum) of ``--rounds`` rounds after
compilation. The machine is shared: minima are the least disturbed.

  python -m benchmarks.scale [--quick] [--out=benchmarks/results/scale.json]
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/hugepages.py
  from fedjax_sparse.hugepages import restart_with_huge_pages
  restart_with_huge_pages()

import argparse
import json
import os
import statistics
import time

from benchmarks._scale import (BATCH, K, LOCAL_STEPS, N_TRAIN,
                               experiment_config, federated_data, machine,
                               rss_mb, run_child)
from benchmarks.scale_seeds import (child_seeds, print_seeds, seed_targets,
                                    seeds_only, seeds_section)


def topk_sample_clients(key, num_clients: int, k: int):
  """K distinct clients, uniformly: the top k of C random keys.

  The keys are 30 random bits laid out as positive normal float32 values
  (their order is the bits' order), because XLA:CPU's top-k is fast for
  floats only; ties (probability about C / 2^30 at the k-th place) go to the
  lower id. O(C) where ``jax.random.choice(..., replace=False)`` shuffles
  all C ids.
  """
  import jax
  import jax.numpy as jnp
  bits = jax.random.bits(key, (num_clients,), jnp.uint32)
  keys = jax.lax.bitcast_convert_type((bits >> 2) + jnp.uint32(0x00800000),
                                      jnp.float32)
  return jax.lax.top_k(keys, k)[1].astype(jnp.int32)


def _use_topk_sampler():
  """Routes the round step's client sampling through the top-k sampler."""
  import jax
  orig = jax.random.choice

  def choice(key, a, shape=(), replace=True, p=None, axis=0):
    if not replace and p is None and isinstance(a, int) and len(shape) == 1:
      return topk_sample_clients(key, a, shape[0])
    return orig(key, a, shape, replace, p, axis)

  jax.random.choice = choice


def _time_rounds(step, state, data, rounds):
  import jax
  ts = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m["loss"])
    ts.append(time.perf_counter() - t0)
  return state, ts


def child_population(num_clients, rounds, client_devices, sampler,
                     local_steps=LOCAL_STEPS):
  """One population size in this process: time, memory, table sizes."""
  if sampler == "topk":
    _use_topk_sampler()
  import jax
  from fedjax_sparse.simulation.experiment import Experiment
  rss = {"start": rss_mb()}
  fd, part_s = federated_data(num_clients)
  rss["data"] = rss_mb()
  cfg = experiment_config(num_clients, client_devices=client_devices,
                          rounds=rounds, local_steps=local_steps)
  exp = Experiment(cfg, fd=fd)
  state = exp.init_state()
  t0 = time.perf_counter()
  step = exp.round_step.lower(state, exp.data).compile()
  compile_s = time.perf_counter() - t0
  rss["compiled"] = rss_mb()
  mem = step.memory_analysis()
  xla_mb = {k: getattr(mem, f"{k}_size_in_bytes") / 2**20
            for k in ("argument", "output", "temp", "alias")}
  state, _ = _time_rounds(step, state, exp.data, 1)  # warm-up
  state, ts = _time_rounds(step, state, exp.data, rounds)
  rss["peak"] = rss_mb()
  ci = fd.clients
  tables = (ci.idx.nbytes + ci.counts.nbytes + exp.data.malicious.nbytes
            + exp.data.rank.nbytes)
  per_client_state = sum(
      a.nbytes for a in jax.tree.leaves(state)
      if getattr(a, "ndim", 0) and a.shape[0] == num_clients)
  return {"C": num_clients, "K": K, "sampler": sampler,
          "client_devices": client_devices, "local_steps": local_steps,
          "devices": jax.device_count(), "n_max": ci.n_max,
          "empty_clients": int((ci.counts == 0).sum()),
          "partition_s": part_s, "index_table_mb": ci.idx.nbytes / 2**20,
          "per_client_tables_mb": tables / 2**20,
          "per_client_state_mb": per_client_state / 2**20,
          "compile_s": compile_s, "round_s": statistics.median(ts),
          "round_min_s": min(ts), "rss_mb": rss, "xla_mb": xla_mb}


def _partition_sizes(num_clients):
  """n_max and table size of one_class and dirichlet over 60k labels."""
  import numpy as np
  import importlib
  partition_lib = importlib.import_module("fedjax_sparse.data.partition")
  labels = np.random.default_rng(0).integers(0, 10, N_TRAIN)
  rows = []
  empty = num_clients > N_TRAIN
  for method, kw in (("one_class", {}),
                     ("dirichlet", dict(alpha=0.5, min_samples=0)),
                     ("dirichlet", dict(alpha=0.1, min_samples=0)),
                     ("dirichlet", dict(alpha=0.01, min_samples=0))):
    t0 = time.perf_counter()
    ci = partition_lib.partition(labels, num_clients, method,
                                 allow_empty=True, **kw)
    rows.append({"C": num_clients, "method": method, "alpha": kw.get("alpha"),
                 "allow_empty_needed": empty,
                 "seconds": time.perf_counter() - t0, "n_max": ci.n_max,
                 "index_table_mb": ci.idx.nbytes / 2**20,
                 "empty_clients": int((ci.counts == 0).sum())})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="3 rounds per measurement, 1 repetition")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--reps", type=int, default=3,
                      help="fresh processes per population cell")
  parser.add_argument("--out", default="benchmarks/results/scale.json")
  parser.add_argument("--only", default="", choices=["", "seeds"],
                      help="run one section and update it in --out")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--child_args", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    fn = {"population": child_population, "seeds": child_seeds}[args.child]
    print(json.dumps(fn(**json.loads(args.child_args))))
    return
  rounds = 3 if args.quick else args.rounds
  reps = 1 if args.quick else args.reps
  load_start = os.getloadavg()
  timeout = 900

  if args.only == "seeds":
    seeds_only(args, rounds, timeout, load_start)
    return
  print("partition tables over 60,000 labels")
  parts = [r for c in (1_000, 10_000, 100_000) for r in _partition_sizes(c)]
  for r in parts:
    print(f"  C={r['C']:>7,} {r['method']:9s} alpha={r['alpha']!s:5s} "
          f"n_max={r['n_max']:5d} table={r['index_table_mb']:7.2f} MB "
          f"empty={r['empty_clients']:6d} {r['seconds']:.2f}s")

  # Repetitions interleaved over C and sampler, each in a fresh process, so
  # that load from other users of the machine falls on every cell alike.
  runs = {}
  for rep in range(reps):
    for sampler in ("choice", "topk"):
      for c in (1_000, 10_000, 100_000):
        r = run_child("population", 1, timeout, num_clients=c,
                      rounds=rounds, client_devices=1, sampler=sampler)
        runs.setdefault((sampler, c), []).append(r)
        print(f"  rep {rep} population C={c:>7,} sampler={sampler:6s} "
              f"round {r['round_s'] * 1e3:7.1f} ms (min "
              f"{r['round_min_s'] * 1e3:7.1f}) peak "
              f"{r['rss_mb']['peak']:7.1f} MB xla temp "
              f"{r['xla_mb']['temp']:.1f} MB", flush=True)
  pop = []
  for (sampler, c), rs in runs.items():
    r = dict(rs[0])
    r.update({
        "reps": len(rs),
        "round_s": statistics.median(x["round_s"] for x in rs),
        "round_min_s": min(x["round_min_s"] for x in rs),
        "round_s_per_rep": [x["round_s"] for x in rs],
        "peak_rss_mb_per_rep": [x["rss_mb"]["peak"] for x in rs],
        "peak_rss_mb": statistics.median(x["rss_mb"]["peak"] for x in rs)})
    pop.append(r)

  devs = []
  for steps in (LOCAL_STEPS, 10):
    for d in (1, 2):
      r = run_child("population", 2, timeout, num_clients=10_000,
                    rounds=rounds, client_devices=d, sampler="choice",
                    local_steps=steps)
      devs.append(r)
      print(f"  devices={d} local_steps={steps} C=10,000 round "
            f"{r['round_s'] * 1e3:7.1f} ms (min "
            f"{r['round_min_s'] * 1e3:7.1f})", flush=True)

  seeds = seeds_section(rounds, timeout)

  def by(sampler, c):
    return next(r for r in pop if r["sampler"] == sampler and r["C"] == c)

  targets = {}
  for sampler in ("choice", "topk"):
    a, b = by(sampler, 1_000), by(sampler, 100_000)
    ratio = b["round_s"] / a["round_s"]
    ratio_min = b["round_min_s"] / a["round_min_s"]
    growth = b["peak_rss_mb"] - a["peak_rss_mb"]
    table_growth = b["per_client_tables_mb"] - a["per_client_tables_mb"]
    xla_growth = sum(b["xla_mb"][k] - a["xla_mb"][k]
                     for k in ("argument", "output", "temp"))
    targets[sampler] = {
        "round_ratio_100k_over_1k": ratio,
        "round_min_ratio_100k_over_1k": ratio_min,
        "time_target_met": ratio <= 1.2,
        "peak_rss_growth_mb": growth,
        "peak_rss_spread_mb": max(
            max(r["peak_rss_mb_per_rep"]) - min(r["peak_rss_mb_per_rep"])
            for r in (a, b)),
        "xla_step_memory_growth_mb": xla_growth,
        "per_client_tables_growth_mb": table_growth}
  targets["seeds_batched_faster"] = seed_targets(seeds)

  print()
  print("| C | sampler | n_max | tables MB | step args+temp MB (XLA) | "
        "peak RSS MB (reps) | compile s | round ms (median) | "
        "round ms (min) |")
  print("|---:|---|---:|---:|---:|---|---:|---:|---:|")
  for r in pop:
    rss = ", ".join(f"{x:.0f}" for x in r["peak_rss_mb_per_rep"])
    print(f"| {r['C']:,} | {r['sampler']} | {r['n_max']} | "
          f"{r['per_client_tables_mb']:.2f} | "
          f"{r['xla_mb']['argument'] + r['xla_mb']['temp']:.1f} | {rss} | "
          f"{r['compile_s']:.1f} | {r['round_s'] * 1e3:.1f} | "
          f"{r['round_min_s'] * 1e3:.1f} |")
  print()
  print("| local steps | client devices | round ms (median) | "
        "round ms (min) |")
  print("|---:|---:|---:|---:|")
  for r in devs:
    print(f"| {r['local_steps']} | {r['client_devices']} | "
          f"{r['round_s'] * 1e3:.1f} | {r['round_min_s'] * 1e3:.1f} |")
  print()
  print_seeds(seeds)
  print(json.dumps(targets, indent=2))

  from fedjax_sparse.simulation import io
  out = {"machine": machine(),
         "setup": {"N": N_TRAIN, "K": K, "local_steps": LOCAL_STEPS,
                   "batch": BATCH, "model": "mlp 2x200", "engine": "map/10",
                   "partition": "one_class", "rounds": rounds,
                   "reps": reps},
         "load_average": {"start": load_start, "end": os.getloadavg()},
         "partition_tables": parts, "population": pop, "devices": devs,
         "seeds": seeds, "targets": targets}
  io.atomic_write_json(args.out, out)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
