r"""im2col against lax.conv for clients stacked by vmap (DESIGN.md, models).

For the hybrid paper's 2-layer CNN ('cnn2') and LeNet-5 ('lenet') on
28x28x1 inputs, with K in {10, 20} clients whose parameters are stacked on a
leading axis, this measures one SGD step of every client at once
(``jit(vmap(value_and_grad(cross-entropy)))`` plus the parameter update,
batch 32 per client) with ``conv_impl='im2col'`` and ``conv_impl='lax'``:
compile time and milliseconds per step, and the step's FLOP/s (XLA cost
analysis) as a fraction of this machine's float32 matmul peak.

Each case runs in a subprocess with a time limit (``--compile_limit`` for the
compile, ``--run_limit`` for the timed steps): on XLA:CPU the vmapped
lax.conv can take minutes to compile, and such a case is recorded as timed
out instead of waited for. A small pooling section compares the reshape max
pool of :mod:`fedjax_sparse.models.layers` with ``flax.linen.max_pool``
(``lax.reduce_window``) under vmap and grad.

``--local_steps=S`` scans S local SGD steps per client inside the vmap, as
local training does (FLOP/s then scale XLA's once-counted loop body by S).

  python -m benchmarks.conv_impl [--models=cnn2,lenet] [--ks=10,20] \
      [--local_steps=1] [--out=benchmarks/results/conv_impl.json]
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/hugepages.py
  from fedjax_sparse.hugepages import restart_with_huge_pages
  restart_with_huge_pages()

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time

BATCH = 32
SHAPE = (28, 28, 1)
LR = 0.05


def _child(spec: dict) -> None:
  """Compiles and times one case; prints one JSON line per stage."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedjax_sparse import models

  k, name, impl = spec["K"], spec["model"], spec["impl"]
  model = models.get_model(name, 10, conv_impl=impl)
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *SHAPE))))
  params = jax.tree_util.tree_map(
      lambda a: (0.05 * rng.standard_normal((k, *a.shape))).astype(
          np.float32), abstract["params"])
  steps = spec.get("local_steps", 1)
  x = rng.standard_normal((k, steps, BATCH, *SHAPE)).astype(np.float32)
  y = rng.integers(0, 10, (k, steps, BATCH)).astype(np.int32)

  def loss(p, xb, yb):
    logits = model.apply({"params": p}, xb, train=True)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  def sgd_step(p, batch):
    value, grads = jax.value_and_grad(loss)(p, *batch)
    return jax.tree_util.tree_map(lambda w, g: w - LR * g, p, grads), value

  def local_training(p, xs, ys):
    if steps == 1:
      return sgd_step(p, (xs[0], ys[0]))
    return jax.lax.scan(sgd_step, p, (xs, ys))  # As a client's local steps.

  step = jax.jit(jax.vmap(local_training))
  t0 = time.perf_counter()
  compiled = step.lower(params, x, y).compile()
  compile_s = time.perf_counter() - t0
  try:
    # XLA counts a loop body once: scale by the scanned local steps.
    flops = float(compiled.cost_analysis()["flops"]) * steps
  except Exception:  # pylint: disable=broad-except
    flops = float("nan")
  print(json.dumps({"stage": "compiled", "compile_s": compile_s,
                    "flops": flops}), flush=True)

  jax.block_until_ready(compiled(params, x, y))  # Warm-up.
  times = []
  budget_end = time.perf_counter() + spec["run_budget_s"]
  while len(times) < spec["reps"] and (
      not times or time.perf_counter() < budget_end):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, x, y))
    times.append(time.perf_counter() - t0)
  print(json.dumps({"stage": "ran", "step_ms": 1e3 * float(np.median(times)),
                    "reps": len(times)}), flush=True)


def _run_case(spec: dict, compile_limit: float, run_limit: float) -> dict:
  """Runs one case in a subprocess, killing it when it exceeds a limit."""
  rec = dict(spec)
  cmd = [sys.executable, "-m", "benchmarks.conv_impl", "--child",
         json.dumps({**spec, "run_budget_s": run_limit / 2})]
  err = tempfile.TemporaryFile(mode="w+")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                          text=True, cwd=_repo_root())

  def stderr_tail():
    err.seek(0)
    return err.read()[-2000:]

  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout],
                   daemon=True).start()

  def wait_for(stage, limit):
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
      try:
        msg = json.loads(lines.get(timeout=0.5))
      except queue.Empty:
        if proc.poll() is not None and lines.empty():
          return None
        continue
      if msg.get("stage") == stage:
        return msg
    return "timeout"

  t0 = time.perf_counter()
  msg = wait_for("compiled", compile_limit)
  if msg == "timeout":
    proc.kill()
    proc.wait()
    rec.update(status="compile_timeout", compile_s=None,
               compile_limit_s=compile_limit,
               note=f"compile exceeded {compile_limit:.0f} s (killed)")
    return rec
  if msg is None:
    rec.update(status="error", error=stderr_tail())
    return rec
  rec.update(compile_s=msg["compile_s"], flops_per_step=msg["flops"])
  msg = wait_for("ran", run_limit)
  if msg == "timeout":
    proc.kill()
    proc.wait()
    rec.update(status="run_timeout", step_ms=None,
               note=f"first steps exceeded {run_limit:.0f} s (killed)")
    return rec
  if msg is None:
    rec.update(status="error", error=stderr_tail())
    return rec
  proc.wait()
  rec.update(status="ok", step_ms=msg["step_ms"], reps=msg["reps"],
             wall_s=time.perf_counter() - t0)
  return rec


def _pool_section(k: int) -> list[dict]:
  """vmap(grad) of max pooling: reshape form against lax.reduce_window."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedjax_sparse.models import layers

  x = np.random.default_rng(0).standard_normal(
      (k, BATCH, 24, 24, 20)).astype(np.float32)
  out = []
  for name, pool in [
      ("reshape", lambda v: layers.max_pool(v, 2)),
      ("nn.max_pool", lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)))]:
    f = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(pool(v) ** 2))))
    t0 = time.perf_counter()
    c = f.lower(x).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(c(x))
    ts = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(c(x))
      ts.append(time.perf_counter() - t0)
    out.append({"pool": name, "K": k, "shape": list(x.shape[1:]),
                "compile_s": compile_s,
                "step_ms": 1e3 * float(np.median(ts))})
  return out


def _matmul_peak(n: int = 1024, reps: int = 5) -> float:
  import jax
  import numpy as np
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  f = jax.jit(lambda u, v: u @ v)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="cnn2,lenet")
  parser.add_argument("--ks", default="10,20")
  parser.add_argument("--impls", default="im2col,lax")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--local_steps", type=int, default=1,
                      help="SGD steps per client, in a lax.scan when > 1")
  parser.add_argument("--compile_limit", type=float, default=60.0)
  parser.add_argument("--run_limit", type=float, default=60.0)
  parser.add_argument("--out", default="benchmarks/results/conv_impl.json")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    _child(json.loads(args.child))
    return

  import jax
  from fedjax_sparse.simulation import io

  peak = _matmul_peak()
  print(f"backend {jax.default_backend()}, {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.1f}, matmul peak {peak / 1e9:.0f} "
        f"GFLOP/s; batch {BATCH}, input {SHAPE}", flush=True)
  results = []
  for name in args.models.split(","):
    for k in (int(v) for v in args.ks.split(",")):
      for impl in args.impls.split(","):
        spec = {"model": name, "K": k, "impl": impl, "batch": BATCH,
                "local_steps": args.local_steps, "reps": args.reps}
        rec = _run_case(spec, args.compile_limit, args.run_limit)
        if rec.get("status") == "ok" and rec.get("flops_per_step"):
          rec["gflops_per_s"] = rec["flops_per_step"] / rec["step_ms"] / 1e6
          rec["fraction_of_peak"] = rec["gflops_per_s"] * 1e9 / peak
        results.append(rec)
        print(f"  {name:6s} K={k:3d} {impl:7s} {rec['status']:15s} "
              f"compile {_fmt(rec.get('compile_s'), 's')} "
              f"step {_fmt(rec.get('step_ms'), 'ms')}", flush=True)
  pools = _pool_section(10)

  print()
  print("| model | K | impl | compile (s) | ms / step | GFLOP/s | % peak |")
  print("|---|---:|---|---:|---:|---:|---:|")
  for r in results:
    if r["status"] == "ok":
      print(f"| {r['model']} | {r['K']} | {r['impl']} | {r['compile_s']:.2f} "
            f"| {r['step_ms']:.1f} | {r.get('gflops_per_s', float('nan')):.1f}"
            f" | {100 * r.get('fraction_of_peak', float('nan')):.1f} |")
    else:
      print(f"| {r['model']} | {r['K']} | {r['impl']} | "
            f"{_fmt(r.get('compile_s'), '')} | {r['status']} | | |")
  print()
  print("| max pool (vmap, grad) | K | compile (s) | ms / step |")
  print("|---|---:|---:|---:|")
  for p in pools:
    print(f"| {p['pool']} | {p['K']} | {p['compile_s']:.2f} | "
          f"{p['step_ms']:.1f} |")

  out = {
      "benchmark": "conv_impl",
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "backend": jax.default_backend(),
                  "load_avg_1m_at_start": os.getloadavg()[0],
                  "matmul_peak_gflops": peak / 1e9},
      "config": {"batch": BATCH, "input": list(SHAPE), "lr": LR,
                 "local_steps": args.local_steps,
                 "compile_limit_s": args.compile_limit,
                 "run_limit_s": args.run_limit},
      "results": results,
      "pooling": pools,
  }
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  io.atomic_write_json(args.out, out)
  print(f"\nwrote {args.out}")


def _fmt(v, unit):
  if v is None:
    return "   n/a"
  return f"{v:7.2f}{unit}" if unit == "s" else f"{v:8.1f}{unit}"


if __name__ == "__main__":
  main()
