"""The seeds section of the scale benchmark (:mod:`benchmarks.scale`, item 3).

4 seeds in one compiled step (:mod:`fedjax_sparse.simulation.multi_seed`:
``vmap``, ``lax.map`` and ``shard``) against 4 separately compiled runs,
per round and end to end as a sweep runs them. The measurements run in
child processes of ``python -m benchmarks.scale`` (:func:`child_seeds`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from benchmarks._scale import (K, experiment_config, federated_data, machine,
                               run_child)


def child_seeds(num_clients, k, num_seeds, rounds, modes=("vmap", "map"),
                separate_devices=(1,), sweep_rounds=0):
  """S seeds batched in one step against S separate runs, one round each.

  Every variant is compiled first; then each round times all of them in
  turn (interleaved, so that load from other users of the machine falls on
  each alike). ``separate_devices`` lists the client-axis splits tried for
  the separate runs; the fastest is the baseline of the speedups.
  """
  import jax
  from fedjax_sparse.simulation.experiment import Experiment
  from fedjax_sparse.simulation.multi_seed import SeedBatch
  fd, _ = federated_data(num_clients)
  seeds = list(range(num_seeds))
  variants = {}
  for d in separate_devices:
    cfg = experiment_config(num_clients, k=k, rounds=rounds, client_devices=d)
    t0 = time.perf_counter()
    steps, states, datas = [], [], []
    for s in seeds:
      exp = Experiment(dataclasses.replace(cfg, seed=s), fd=fd)
      st = exp.init_state()
      steps.append(exp.round_step.lower(st, exp.data).compile())
      states.append(st)
      datas.append(exp.data)
    variants[f"separate@{d}"] = {"steps": steps, "states": states,
                                 "datas": datas,
                                 "compile_s": time.perf_counter() - t0}
  cfg = experiment_config(num_clients, k=k, rounds=rounds, client_devices=1)
  for mode in modes:
    t0 = time.perf_counter()
    b = SeedBatch(cfg, seeds, fd, mode=mode)
    st = b.init_state()
    variants[mode] = {"steps": [b.round_step.lower(st, b.data).compile()],
                      "states": [st], "datas": [b.data],
                      "compile_s": time.perf_counter() - t0,
                      "devices": 1 if b.mesh is None else b.mesh.size}

  def one_round(v):
    t0 = time.perf_counter()
    for i, step in enumerate(v["steps"]):
      v["states"][i], m = step(v["states"][i], v["datas"][i])
    jax.block_until_ready(v["states"])
    return time.perf_counter() - t0

  times = {name: [] for name in variants}
  for name, v in variants.items():  # warm-up
    one_round(v)
  for _ in range(rounds):
    for name, v in variants.items():
      times[name].append(one_round(v))
  out = {"C": num_clients, "K": k, "seeds": num_seeds,
         "devices": len(jax.devices())}
  for name, v in variants.items():
    out[name] = {"round_s": statistics.median(times[name]),
                 "round_min_s": min(times[name]), "compile_s": v["compile_s"]}
    if "devices" in v:
      out[name]["devices"] = v["devices"]
  names = list(variants)
  del variants  # free the compiled steps and states before the sweep runs
  sep = min((n for n in names if n.startswith("separate")),
            key=lambda n: out[n]["round_s"])
  out["separate"] = sep
  out["separate_round_s"] = out[sep]["round_s"]
  out["separate_round_min_s"] = out[sep]["round_min_s"]
  out["separate_compile_s"] = out[sep]["compile_s"]
  for mode in modes:
    out[mode]["speedup"] = out["separate_round_s"] / out[mode]["round_s"]
    out[mode]["speedup_min"] = (out["separate_round_min_s"]
                                / out[mode]["round_min_s"])
  if sweep_rounds:
    out["sweep"] = _sweep_seconds(fd, num_clients, k, seeds, sweep_rounds,
                                  int(sep.split("@")[1]), modes)
  return out


def _sweep_seconds(fd, num_clients, k, seeds, rounds, sep_devices, modes):
  """End to end, as a sweep runs them: the S seeds as S separate
  ``run_experiment`` calls against one ``run_seeds`` call per mode, each
  building its experiments, compiling, and running ``rounds`` rounds with an
  evaluation every 10 (seconds of wall time)."""
  from fedjax_sparse.simulation.experiment import run_experiment
  from fedjax_sparse.simulation.multi_seed import run_seeds
  cfg = dataclasses.replace(experiment_config(num_clients, k=k, rounds=rounds),
                            eval_every=10)
  out = {"rounds": rounds}
  t0 = time.perf_counter()
  for s in seeds:
    run_experiment(dataclasses.replace(cfg, seed=s,
                                       client_devices=sep_devices),
                   progress=False, fd=fd)
  out["separate_s"] = time.perf_counter() - t0
  for mode in modes:
    t0 = time.perf_counter()
    run_seeds(cfg, seeds, fd=fd, mode=mode)
    out[f"{mode}_s"] = time.perf_counter() - t0
    out[f"{mode}_speedup"] = out["separate_s"] / out[f"{mode}_s"]
  return out


SEED_MODES = ("vmap", "map", "shard")
SWEEP_ROUNDS = 30  # the FLARE sweep's rounds


def seeds_section(rounds, timeout):
  """4 seeds on 2 host devices: separate runs (client axis on 1 or split
  over 2 devices, the faster is the baseline) against the batched modes."""
  seeds = []
  for k in (K, 10):
    r = run_child("seeds", 2, timeout, num_clients=1_000, k=k, num_seeds=4,
                  rounds=rounds, modes=SEED_MODES, separate_devices=(1, 2),
                  sweep_rounds=SWEEP_ROUNDS)
    seeds.append(r)
    print(f"  seeds=4 K={k} separate ({r['separate']}) "
          f"{r['separate_round_s'] * 1e3:7.1f} ms " + " ".join(
              f"{m} {r[m]['round_s'] * 1e3:7.1f} ms ({r[m]['speedup']:.2f}x)"
              for m in SEED_MODES), flush=True)
    sw = r["sweep"]
    print(f"  seeds=4 K={k} {sw['rounds']} rounds end to end: separate "
          f"{sw['separate_s']:.1f} s " + " ".join(
              f"{m} {sw[m + '_s']:.1f} s ({sw[m + '_speedup']:.2f}x)"
              for m in SEED_MODES), flush=True)
  return seeds


def seed_targets(seeds):
  """Whether each batched mode beat the separate runs, per K."""
  out = {f"K={r['K']} {mode} per round": r[mode]["speedup"] > 1
         for r in seeds for mode in SEED_MODES if mode in r}
  out.update({f"K={r['K']} {mode} sweep of {r['sweep']['rounds']} rounds":
              r["sweep"][f"{mode}_speedup"] > 1
              for r in seeds if "sweep" in r for mode in SEED_MODES})
  return out


def print_seeds(seeds):
  """The section's two Markdown tables: per round and end to end."""
  print("| seeds | K | 4 separate runs ms/round (client devices) | "
        + " | ".join(f"{m} ms/round" for m in SEED_MODES) + " |")
  print("|---:|---:|---:|" + "---:|" * len(SEED_MODES))
  for r in seeds:
    cells = " | ".join(
        f"{r[m]['round_s'] * 1e3:.1f} ({r[m]['speedup']:.2f}x)"
        for m in SEED_MODES)
    print(f"| {r['seeds']} | {r['K']} | {r['separate_round_s'] * 1e3:.1f} "
          f"({r['separate'].split('@')[1]}) | {cells} |")
  print()
  print("| seeds | K | rounds | 4 separate runs s | "
        + " | ".join(f"{m} s" for m in SEED_MODES) + " |")
  print("|---:|---:|---:|---:|" + "---:|" * len(SEED_MODES))
  for r in seeds:
    sw = r["sweep"]
    cells = " | ".join(f"{sw[m + '_s']:.1f} ({sw[m + '_speedup']:.2f}x)"
                       for m in SEED_MODES)
    print(f"| {r['seeds']} | {r['K']} | {sw['rounds']} | "
          f"{sw['separate_s']:.1f} | {cells} |")
  print()


def seeds_only(args, rounds, timeout, load_start):
  """``--only=seeds``: runs the section and updates it in ``args.out``."""
  seeds = seeds_section(rounds, timeout)
  print_seeds(seeds)
  from fedjax_sparse.simulation import io
  out = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      out = json.load(f)
  out["seeds"] = seeds
  out.setdefault("targets", {})["seeds_batched_faster"] = seed_targets(
      seeds)
  out["seeds_machine"] = machine()
  out["seeds_load_average"] = {"start": load_start, "end": os.getloadavg()}
  print(json.dumps(out["targets"]["seeds_batched_faster"], indent=2))
  io.atomic_write_json(args.out, out)
  print(f"\nwrote {args.out}")
