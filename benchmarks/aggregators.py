r"""Speed of every registered aggregation rule against its numpy reference.

In one run, on the same inputs (standard normal updates ``f32[K, d]``, dense
uploads, weights drawn from U(1, 100), ``f = K // 5`` Byzantine clients
assumed, no layout, so layer-wise rules see one layer):

1. Every registered rule except ``class_aware_masking`` (it needs a model
   and a validation set) at K in {25, 50, 100} and d in {270k, 700k}: the
   jitted ``apply`` (nothing donated; the median of several calls after a
   warm-up call, which also compiles) against the numpy reference of
   ``fedjax_sparse/testing/aggregator_refs/`` (in ``float32``, the rules' precision;
   :mod:`benchmarks.aggregators_baselines`).
   FLTrust gets a random ``ctx.server_update`` and FedNova
   random ``local_steps`` (5 to 20). SparseFed and
   FetchSGD update 1% of the coordinates (FetchSGD: 5 x 10k-column sketch).
   Slow references (over 2 s for the warm-up call) are timed once more.
2. The rules that count an escape ratio inside (median, trimmed mean,
   Bulyan: per-coordinate order statistics) again with ``ctx.malicious``
   set, as the round step passes it: the cost of the diagnostic. (The
   selection rules' ratio is computed outside, from K acceptances.)
3. The whole SafeSparse filter at K = 20, d = 270k on sparse uploads
   (pack top-k at r = 0.5, P in {1, 16}), target <= 20 ms.

Targets: coordinate-wise rules (median, trimmed mean, Bulyan) >= 3x faster
than numpy at K = 25; Krum, Multi-Krum and Bulyan no slower than numpy.

The numpy references are the test oracles, written with whole-array numpy
(the trimmed mean and ``bulyan_fast`` use ``np.partition`` like
``scipy.stats.trim_mean``, ``bulyan`` an argsort of ``|x - median|``, RFA
float32 Weiszfeld steps, distances go through a BLAS Gram matrix), so they
are a fair baseline, not a strawman; numpy's BLAS may use both cores. Times
are wall-clock; other jobs share the 2 cores (the load average is recorded).

  python -m benchmarks.aggregators [--quick] [--out=benchmarks/results/aggregators.json]
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/hugepages.py
  from fedjax_sparse.hugepages import restart_with_huge_pages
  restart_with_huge_pages()

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.aggregators.base import AggContext
from fedjax_sparse.simulation import io
from fedjax_sparse.sparsify import pack_topk_batch
from fedjax_sparse.sparsify.sketch import CountSketch
from fedjax_sparse.testing import aggregator_refs as refs

from benchmarks.aggregators_baselines import (BYZFL, F32, byzfl_rule, hparams,
                                              numpy_rule)

SKIP = ("class_aware_masking",)
# The rules that count an escape ratio inside (from their order statistics);
# the selection rules' ratio is the metrics layer's, from their acceptance.
ESCAPE_RULES = ("median", "trimmed_mean", "bulyan", "bulyan_fast")
COORDINATE_RULES = ("median", "trimmed_mean", "bulyan", "bulyan_fast")
DISTANCE_RULES = ("krum", "multi_krum", "bulyan", "bulyan_fast")
SLOW_NUMPY_S = 2.0


# Pause before each timing: XLA's and OpenBLAS's worker threads spin for a
# while after a call, and a first numpy call right after jax calls was up to
# 50x slower (K = 100: 4.8 s instead of 95 ms for the same Gram matrix).
SETTLE_S = 0.3


def _time(fn, reps):
  """(median s, first call s, reps) of ``fn()`` after one warm-up call."""
  time.sleep(SETTLE_S)
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), first, reps


def _time_numpy(fn, reps):
  """Like :func:`_time`, but after a warm-up call over ``SLOW_NUMPY_S`` only
  one more call is timed."""
  time.sleep(SETTLE_S)
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  n = 1 if first > SLOW_NUMPY_S else reps
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), first, n


# ---------------------------------------------------------------- jax side


def make_case(K, d, seed=0):
  rs = np.random.default_rng(seed)
  u = rs.standard_normal((K, d), dtype=np.float32)
  w = rs.integers(1, 100, K).astype(np.float32)
  g = rs.standard_normal(d, dtype=np.float32)
  server_update = (u[K // 5:].mean(0) + 0.1 * rs.standard_normal(d, dtype=np.float32))
  aux = {"global": g, "server_update": server_update, "rng": rs,
         "local_steps": rs.integers(5, 21, K).astype(np.int32),
         "perm": np.asarray(jax.random.permutation(jax.random.PRNGKey(1), d)),
         "sketch_seeds": None}
  return u, w, aux


def context(name, K, f, aux, malicious=False):
  """The round context the round step would give rule ``name``: the sampled
  clients 0..K-1, lr 1, FLTrust's server update, FedNova's local steps,
  and (``malicious``) the first ``f`` clients flagged, for the rules that
  count their escape ratio themselves."""
  fields = {"clients": jnp.arange(K, dtype=jnp.int32), "lr": jnp.float32(1.0)}
  if name == "fltrust":
    fields["server_update"] = jnp.asarray(aux["server_update"])
  if name == "fednova":
    fields["local_steps"] = jnp.asarray(aux["local_steps"])
  if malicious:
    fields["malicious"] = jnp.arange(K) < f
  return AggContext(jnp.int32(0), global_params=jnp.asarray(aux["global"]),
                    pack_size=1, num_byzantine=f, num_clients=K, **fields)


def jax_apply(name, K, d, f, aux, malicious=False):
  agg = agg_lib.get(name)(**hparams(name, d))
  state = agg.init(d)
  ctx = context(name, K, f, aux, malicious)
  apply = jax.jit(agg.apply)
  key = jax.random.PRNGKey(1)
  return lambda u, m, w: apply(state, u, m, w, key, ctx)[0].update


def bench_rule(name, K, d, u_np, w_np, aux, reps):
  f = K // 5
  u, w = jnp.asarray(u_np), jnp.asarray(w_np)
  fn = jax_apply(name, K, d, f, aux)
  jax_s, jax_first, jax_reps = _time(lambda: fn(u, None, w), reps)
  rec = {"section": "rules", "rule": name, "K": K, "d": d, "f": f,
         "hparams": {k: v for k, v in hparams(name, d).items()},
         "jax_median_s": jax_s, "jax_first_call_s": jax_first, "jax_reps": jax_reps}
  del fn
  if name in ESCAPE_RULES:
    fn = jax_apply(name, K, d, f, aux, malicious=True)
    esc_s, _, _ = _time(lambda: fn(u, None, w), reps)
    rec["jax_with_escape_median_s"] = esc_s
    del fn
  if name == "fetchsgd":
    aux["sketch_seeds"] = np.asarray(CountSketch.create(
        d, 5, hparams(name, d)["cols"], jax.random.PRNGKey(0)).seeds)
  np_s, np_first, np_reps = _time_numpy(lambda: numpy_rule(name, u_np, w_np, f, aux),
                                        reps)
  rec.update({"numpy_median_s": np_s, "numpy_first_call_s": np_first,
              "numpy_reps": np_reps, "speedup_vs_numpy": np_s / jax_s})
  peer = byzfl_rule(name, f, K)
  if peer is not None:
    u_peer = u_np.copy()  # ByzFL's Clipping writes into its input
    bz_s, _, bz_reps = _time_numpy(lambda: peer(u_peer), reps)
    rec.update({"byzfl_median_s": bz_s, "byzfl_reps": bz_reps,
                "speedup_vs_byzfl": bz_s / jax_s})
    del u_peer
  esc = rec.get("jax_with_escape_median_s")
  print(f"  {name:>17} K={K:>3} d={d:>7,}: jax {jax_s * 1e3:9.1f} ms"
        + (f" (+escape {esc * 1e3:8.1f})" if esc else " " * 24)
        + f"  numpy {np_s * 1e3:9.1f} ms{'*' if np_reps == 1 else ' '}"
        f"  x{np_s / jax_s:6.2f}"
        + (f"  ByzFL {rec['byzfl_median_s'] * 1e3:9.1f} ms x"
           f"{rec['speedup_vs_byzfl']:6.2f}" if "byzfl_median_s" in rec else "")
        + f"  (compile+first {jax_first:5.1f} s)", flush=True)
  return rec


def bench_safesparse_sparse(reps, K=20, d=270_000, ratio=0.5):
  rows = []
  u = jnp.asarray(np.random.default_rng(3).standard_normal((K, d), dtype=np.float32))
  w = jnp.ones((K,), jnp.float32)
  for P in (1, 16):
    dense, masks = jax.jit(lambda x: pack_topk_batch(x, ratio, P))(u)
    agg = agg_lib.get("safesparse")()
    ctx = AggContext(jnp.int32(0), malicious=jnp.arange(K) < 4,
                     pack_size=P, num_byzantine=4, num_clients=K)
    apply = jax.jit(agg.apply)
    key = jax.random.PRNGKey(0)
    jax_s, first, _ = _time(lambda: apply((), dense, masks, w, key, ctx)[0].update, reps)
    dn, mn = np.asarray(dense), np.asarray(masks)
    np_s, _, np_reps = _time_numpy(
        lambda: refs.np_combine(dn, mn, np.ones(K, F32), refs.np_safesparse(
            dn, mn, guard=True, pack_size=P, dtype=F32), P, F32), reps)
    rows.append({"section": "safesparse_sparse", "K": K, "d": d, "P": P,
                 "ratio": ratio, "jax_median_s": jax_s, "jax_first_call_s": first,
                 "numpy_median_s": np_s, "numpy_reps": np_reps,
                 "target_s": 0.020, "meets_target": jax_s <= 0.020})
    print(f"  safesparse sparse K={K} d={d:,} P={P:>2} r={ratio}: jax "
          f"{jax_s * 1e3:7.1f} ms (target <= 20 ms)  numpy {np_s * 1e3:8.1f} ms",
          flush=True)
  return rows


def _table(records):
  lines = ["| rule | K | d | jax ms | GB/s read | jax+escape ms | numpy ms "
           "| ByzFL ms | vs numpy | vs ByzFL |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    esc = r.get("jax_with_escape_median_s")
    bz = r.get("byzfl_median_s")
    lines.append(
        f"| {r['rule']} | {r['K']} | {r['d']:,} | {r['jax_median_s'] * 1e3:.1f} | "
        f"{r['K'] * r['d'] * 4 / r['jax_median_s'] / 1e9:.1f} | "
        f"{'' if esc is None else f'{esc * 1e3:.1f}'} | "
        f"{r['numpy_median_s'] * 1e3:.1f}{'*' if r['numpy_reps'] == 1 else ''} | "
        + ("" if bz is None else
           f"{bz * 1e3:.1f}{'*' if r['byzfl_reps'] == 1 else ''}")
        + f" | {r['speedup_vs_numpy']:.2f}x | "
        + ("" if bz is None else f"{r['speedup_vs_byzfl']:.2f}x") + " |")
  lines.append("")
  lines.append("GB/s read: the updates' bytes (4 K d) over the rule's time, a "
               "lower bound on its memory traffic (one pass); compare with the "
               "measured bandwidth above the table.")
  lines.append("`*` timed on one call after a warm-up call over 2 s. ByzFL "
               + (f"{BYZFL.version}'s numpy path; an empty cell: no such rule"
                  " in ByzFL, or one that loops over more subsets in Python "
                  "than can be timed (MDA beyond 65536, SMEA beyond 100)."
                  if BYZFL is not None else
                  "not installed (`make peers`): its columns are empty."))
  return "\n".join(lines)


def _summary(records, sparse_rows):
  by = {(r["rule"], r["K"], r["d"]): r for r in records}
  coord = [r for r in records if r["rule"] in COORDINATE_RULES and r["K"] == 25]
  dist = [r for r in records if r["rule"] in DISTANCE_RULES]
  return {
      "coordinatewise_3x_at_K25": {
          f"{r['rule']}@d={r['d']}": round(r["speedup_vs_numpy"], 2) for r in coord},
      "coordinatewise_3x_at_K25_met": all(r["speedup_vs_numpy"] >= 3 for r in coord),
      "distance_rules_not_slower": {
          f"{r['rule']}@K={r['K']},d={r['d']}": round(r["speedup_vs_numpy"], 2)
          for r in dist},
      "distance_rules_not_slower_met": all(r["speedup_vs_numpy"] >= 1 for r in dist),
      "safesparse_sparse_K20_ms": {f"P={r['P']}": round(r["jax_median_s"] * 1e3, 2)
                                   for r in sparse_rows},
      "safesparse_sparse_K20_met": all(r["meets_target"] for r in sparse_rows),
      "rules": sorted({k[0] for k in by}),
      "below_1x_vs_numpy": sorted(
          f"{r['rule']}@K={r['K']},d={r['d']}" for r in records
          if r["speedup_vs_numpy"] < 1),
      "below_1x_vs_byzfl": sorted(
          f"{r['rule']}@K={r['K']},d={r['d']}" for r in records
          if r.get("speedup_vs_byzfl", 1) < 1),
      "byzfl": None if BYZFL is None else BYZFL.version,
  }


def measure_bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> dict:
  """The machine's read bandwidth as the rules see it: a jitted sum over an
  ``f32`` buffer of ``nbytes`` (one pass, 256 MiB: beyond the caches), and
  numpy's sum of the same buffer, in GB/s (best of ``reps``)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  xn = np.ones((nbytes // 4,), np.float32)
  out = {}
  for name, fn in (("jax", lambda: f(x)), ("numpy", lambda: xn.sum())):
    jax.block_until_ready(fn())
    best = min(_timed_once(fn) for _ in range(reps))
    out[f"{name}_sum_gb_s"] = nbytes / best / 1e9
  return out


def _timed_once(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="K=25, d=270k only")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--rules", default="", help="comma-separated subset")
  parser.add_argument("--out", default="benchmarks/results/aggregators.json")
  args = parser.parse_args()
  names = [n for n in agg_lib.names() if n not in SKIP]
  if args.rules:
    names = [n for n in names if n in args.rules.split(",")]
  ks = [25] if args.quick else [25, 50, 100]
  ds = [270_000] if args.quick else [270_000, 700_000]
  t_start = time.time()
  load_start = os.getloadavg()
  if BYZFL is None:
    print("ByzFL not installed (make peers): no ByzFL columns", flush=True)
  records = []
  for d in ds:
    for K in ks:
      u, w, aux = make_case(K, d)
      print(f"K={K} d={d:,} (f={K // 5}):", flush=True)
      for name in names:
        records.append(bench_rule(name, K, d, u, w, aux, args.reps))
      del u, w, aux
  print("SafeSparse on sparse uploads:", flush=True)
  sparse_rows = bench_safesparse_sparse(max(args.reps, 10))
  bandwidth = measure_bandwidth()
  table = (f"Measured read bandwidth (one pass over 256 MiB): jax "
           f"{bandwidth['jax_sum_gb_s']:.1f} GB/s, numpy "
           f"{bandwidth['numpy_sum_gb_s']:.1f} GB/s; load average "
           f"{load_start[0]:.1f} at the start.\n\n" + _table(records))
  print()
  print(table)
  summary = _summary(records, sparse_rows)
  out = {
      "benchmark": "aggregators",
      "backend": jax.default_backend(),
      "devices": [str(x) for x in jax.devices()],
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "jax_version": jax.__version__,
      "numpy_version": np.__version__,
      "load_average_at_start": load_start,
      "load_average_at_end": os.getloadavg(),
      "byzfl_version": None if BYZFL is None else BYZFL.version,
      "bandwidth": bandwidth,
      "wall_s": time.time() - t_start,
      "notes": ("Dense uploads, f = K // 5, weights U(1, 100), no layout. jax: median "
                "of several jitted calls after a warm-up call (nothing donated); "
                "numpy: float32 references of fedjax_sparse/testing/aggregator_refs/, one timed "
                "call after the warm-up when that took over 2 s (marked * in the "
                "table). jax+escape: "
                "with ctx.malicious as the round step passes it (the selection "
                "rules' escape ratio is computed outside the rule, from "
                "its acceptance). Other "
                "jobs share the 2 cores (see the load average)."),
      "summary": summary,
      "table_markdown": table,
      "records": records + sparse_rows,
  }
  io.atomic_write_json(args.out, out)
  print(f"\nwrote {args.out}\nsummary: {summary}")


if __name__ == "__main__":
  main()
