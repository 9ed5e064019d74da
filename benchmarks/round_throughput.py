r"""Throughput of the round step against a sequential per-client loop.

For the MLP and the hybrid paper's 2-layer CNN on FashionMNIST-shaped data,
at K in {10, 20, 50, 100} participating clients, this measures samples/s of
one federated round (local training of all K clients + FedAvg + server
update) for every client engine of the round step:

* ``vmap``: all K clients at once;
* ``map/B``: ``lax.map`` over chunks of B clients, each chunk vmapped;
* ``sequential``: ``lax.map`` one client at a time inside the jit;
* each of them with the client axis split over all host devices (``@N``,
  ``shard_map``; the CPU is split into one device per core);

against the baseline of sequential simulators: a Python loop over clients
that calls a jitted single-client trainer, then averages. It also records
compile times and the training FLOP/s (from XLA's cost analysis of the
single-client trainer) as a fraction of this machine's float32 matmul peak,
measured in the same run.

  python -m benchmarks.round_throughput [--quick] [--out=benchmarks/results/round_throughput.json]
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/hugepages.py
  from fedjax_sparse.hugepages import restart_with_huge_pages
  restart_with_huge_pages()

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse import aggregators
from fedjax_sparse import models
from fedjax_sparse.client.local import ClientConfig, make_client_train
from fedjax_sparse.layout import layout_of
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.round import (RoundConfig, RoundData,
                                            init_server_state, make_round_step)

LOCAL_STEPS = 10
BATCH = 32
N_PER_CLIENT = 320


def _time(fn, reps):
  """Median wall time of ``fn()`` over ``reps`` runs (after one warm-up)."""
  fn()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _processor() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """Measured float32 matmul FLOP/s of this backend (best of ``reps``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def train_flops_per_sample(model, variables) -> float:
  """Training FLOPs per example: 3x the forward pass (forward + backward).

  The forward FLOPs come from XLA's cost analysis of one batch (a loop body
  would be counted once, so the trainer itself is not analysed).
  """
  x = jnp.zeros((BATCH, 28, 28, 1))
  cost = jax.jit(lambda v, x: model.apply(v, x)).lower(
      variables, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return 3.0 * float(cost["flops"]) / BATCH


def make_data(num_clients: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  n = num_clients * N_PER_CLIENT
  x = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  idx = np.arange(n, dtype=np.int32).reshape(num_clients, N_PER_CLIENT)
  counts = np.full(num_clients, N_PER_CLIENT, np.int32)
  return RoundData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx),
                   jnp.asarray(counts))


def bench_engine(model, variables, data, k, engine, chunk, reps, devices=1):
  ccfg = ClientConfig(optimizer="sgd", lr=0.05, local_steps=LOCAL_STEPS,
                      batch_size=BATCH)
  cfg = RoundConfig(num_clients=k, clients_per_round=k, client=ccfg,
                    engine=engine, map_batch_size=chunk,
                    client_devices=devices)
  agg = aggregators.get("fedavg")()
  layout = layout_of(variables["params"])
  step = make_round_step(cfg, model.apply, agg, layout, N_PER_CLIENT)
  holder = {"s": init_server_state(cfg, variables, agg, jax.random.key(0))}
  t0 = time.perf_counter()
  compiled = step.lower(holder["s"], data).compile()
  compile_s = time.perf_counter() - t0

  def run():
    holder["s"], m = compiled(holder["s"], data)
    jax.block_until_ready(m["loss"])

  return _time(run, reps), compile_s


def bench_step_loop(model, variables, data, k, reps):
  """How sequential simulators run (FedJAX, PyTorch libraries).

  A Python loop over clients; for each client a Python loop over its
  minibatches (drawn on the host, like a data loader) calling a jitted
  single-client training step (loss, gradient, optax update); then the
  server averages.
  """
  import optax
  from fedjax_sparse.client.local import make_optimizer, softmax_xent
  ccfg = ClientConfig(optimizer="sgd", lr=0.05, local_steps=LOCAL_STEPS,
                      batch_size=BATCH)
  opt = make_optimizer(ccfg)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      return jnp.mean(softmax_xent(model.apply({"params": p}, x, train=True), y))
    g = jax.grad(loss_fn)(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  x_host, y_host = np.asarray(data.x), np.asarray(data.y)
  idx_host = np.asarray(data.idx)
  params0 = variables["params"]
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  jax.block_until_ready(train_step(params0, opt.init(params0),
                                   x_host[:BATCH], y_host[:BATCH]))
  compile_s = time.perf_counter() - t0

  @jax.jit
  def server(params, client_params):
    del params  # FedAvg with server lr 1: the new model is the mean model
    return jax.tree.map(lambda *cs: sum(cs) / len(cs), *client_params)

  holder = {"p": params0}

  def run():
    finals = []
    for i in range(k):
      p, st = holder["p"], opt.init(holder["p"])
      for _ in range(LOCAL_STEPS):
        rows = idx_host[i, rng.integers(0, N_PER_CLIENT, BATCH)]
        p, st = train_step(p, st, x_host[rows], y_host[rows])
      finals.append(p)
    holder["p"] = server(holder["p"], finals)
    jax.block_until_ready(holder["p"])

  return _time(run, reps), compile_s


def bench_python_loop(model, variables, data, k, reps):
  """A stricter baseline: a Python loop of whole-client jitted trainers.

  Each call runs one client's entire local training (all its steps) in one
  jit, so per-step dispatch and host batching cost nothing.
  """
  ccfg = ClientConfig(optimizer="sgd", lr=0.05, local_steps=LOCAL_STEPS,
                      batch_size=BATCH)
  train = jax.jit(make_client_train(model.apply, ccfg, N_PER_CLIENT))
  params = variables["params"]
  keys = jax.random.split(jax.random.key(0), k)
  t0 = time.perf_counter()
  lowered = train.lower(params, {}, (), data.x, data.y, data.idx[0],
                        data.counts[0], keys[0])
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = LOCAL_STEPS * BATCH * train_flops_per_sample(model, variables)
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def server(flat, ups):
    return flat - jnp.mean(jnp.stack(ups), axis=0)

  def run():
    nonlocal flat
    ups = []
    p = unravel(flat)
    for i in range(k):
      ups.append(compiled(p, {}, (), data.x, data.y, data.idx[i],
                          data.counts[i], keys[i]).update)
    flat = server(flat, ups)
    flat.block_until_ready()

  return _time(run, reps), compile_s, flops


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="K in {10, 20} only, fewer repetitions")
  parser.add_argument("--models", default="mlp,cnn2")
  parser.add_argument("--ks", default="10,20,50,100")
  parser.add_argument("--chunks", default="5,10")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/round_throughput.json")
  args = parser.parse_args()
  from fedjax_sparse.simulation.devices import use_cpu_devices
  use_cpu_devices()
  ks = [10, 20] if args.quick else [int(v) for v in args.ks.split(",")]
  chunks = [int(v) for v in args.chunks.split(",")]
  reps = 1 if args.quick else args.reps

  peak = matmul_peak()
  print(f"backend {jax.default_backend()}, {os.cpu_count()} cpus, "
        f"{jax.local_device_count()} devices, "
        f"measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  rows = []
  for name in args.models.split(","):
    model = models.get_model(name, 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    for k in ks:
      data = make_data(k)
      samples = k * LOCAL_STEPS * BATCH
      base_s, base_compile = bench_step_loop(model, variables, data, k, reps)
      strict_s, _, flops = bench_python_loop(model, variables, data, k, reps)
      row = {"model": name, "K": k, "python_loop_s": base_s,
             "python_loop_compile_s": base_compile,
             "client_jit_loop_s": strict_s,
             "flops_per_client_round": flops, "engines": {}}
      print(f"  {name:5s} K={k:3d} step loop  {base_s * 1e3:9.1f} ms   "
            f"client-jit loop {strict_s * 1e3:9.1f} ms", flush=True)
      ndev = jax.local_device_count()
      engines = [("vmap", 0, 1), ("sequential", 0, 1)]
      engines += [("map", c, 1) for c in chunks if c < k]
      if ndev > 1:
        engines += [("vmap", 0, ndev)]
        engines += [("map", c, ndev) for c in chunks if c < k // ndev]
      for engine, chunk, devices in engines:
        label = engine if engine != "map" else f"map/{chunk}"
        if devices > 1:
          label += f"@{devices}"
        sec, comp = bench_engine(model, variables, data, k, engine, chunk or 1,
                                 reps, devices)
        row["engines"][label] = {
            "seconds": sec, "compile_s": comp,
            "samples_per_s": samples / sec, "speedup": base_s / sec,
            "speedup_vs_client_jit_loop": strict_s / sec,
            "peak_fraction": flops * k / sec / peak if flops else None}
        print(f"  {name:5s} K={k:3d} {label:10s} {sec * 1e3:9.1f} ms "
              f"x{base_s / sec:5.2f} vs loop  compile {comp:5.1f} s",
              flush=True)
      best = max(row["engines"], key=lambda e: row["engines"][e]["speedup"])
      row["best_engine"] = best
      rows.append(row)

  print()
  print("| model | K | step loop samples/s | client-jit loop samples/s | "
        "best engine | samples/s | vs step loop | vs client-jit loop | "
        "% of matmul peak | compile s |")
  print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
  for r in rows:
    b = r["engines"][r["best_engine"]]
    samples = r["K"] * LOCAL_STEPS * BATCH
    pf = b["peak_fraction"]
    pf_s = f"{100 * pf:.0f}%" if pf is not None else "n/a"
    print(f"| {r['model']} | {r['K']} | {samples / r['python_loop_s']:,.0f} | "
          f"{samples / r['client_jit_loop_s']:,.0f} | "
          f"{r['best_engine']} | {b['samples_per_s']:,.0f} | "
          f"{b['speedup']:.2f}x | {b['speedup_vs_client_jit_loop']:.2f}x | "
          f"{pf_s} | {b['compile_s']:.1f} |")
  out = {
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "devices": jax.local_device_count(),
                  "processor": _processor(),
                  "backend": jax.default_backend(),
                  "jax": jax.__version__,
                  "matmul_peak_gflops": peak / 1e9},
      "settings": {"local_steps": LOCAL_STEPS, "batch_size": BATCH,
                   "samples_per_client": N_PER_CLIENT},
      "rows": rows,
  }
  io.atomic_write_json(args.out, out)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
