r"""Compile time and first-call time of every registered aggregation rule.

Target (issue #15, item 5): lowering + compilation + the first call of every
rule at K = 100 clients under 5 s. Each rule is given its context as in
:mod:`benchmarks.aggregators` (standard normal dense updates ``f32[K, d]``,
d = 270k, weights U(1, 100), ``f = K // 5``, no layout; FLTrust's
``ctx.server_update``, FedNova's ``local_steps``, SparseFed and
FetchSGD updating 1% of the coordinates, FoolsGold's 100 history rows);
``class_aware_masking`` is skipped (it needs a model and a validation set).

For every rule and K, in a fresh ``jax.jit`` of the whole ``apply`` (all
outputs kept: the update, the acceptance, the diagnostics and the state) after
``jax.clear_caches()`` and with no persistent compilation cache, three times
are taken separately: ``lower`` (tracing to StableHLO), ``compile`` (XLA) and
the first call of the compiled executable (``block_until_ready``). A second
call is timed too, so that a slow first call can be told from a slow rule.
Times are wall-clock; other jobs share the 2 cores (the load average is
recorded before and after every rule). They vary with what those jobs do:
on 2026-12-03 the same code compiled 2-3x slower in one run than in another
at about the same load average, so compare rules within one run, or
interleave runs of two versions. The rules that report an escape ratio
(``benchmarks.aggregators.ESCAPE_RULES``) are measured a second time with
``ctx.malicious`` set, as the round step always passes it
("+escape" rows).

  python -m benchmarks.compile_time [--quick] [--rules=krum,bulyan]
      [--out=benchmarks/results/compile_time.json]
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: see fedjax_sparse/hugepages.py
  from fedjax_sparse.hugepages import restart_with_huge_pages
  restart_with_huge_pages()

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp

import fedjax_sparse.aggregators as agg_lib
from fedjax_sparse.simulation import io
from benchmarks.aggregators import ESCAPE_RULES, SKIP, context, hparams, make_case

TARGET_S = 5.0
TARGET = "compile + first call < 5 s at K = 100"
QUICK_RULES = ("fedavg", "median", "trimmed_mean", "krum", "bulyan", "gas",
               "flguardian")


def measure(name, K, d, u, w, aux, malicious=False):
  """One record: lower, compile, first and second call (s) of rule ``name``.

  ``malicious``: ``ctx.malicious`` set (the first ``f`` clients), as
  the round step passes it; the rules of ``ESCAPE_RULES`` then also compute
  their escape ratios.
  """
  f = K // 5
  jax.clear_caches()
  agg = agg_lib.get(name)(**hparams(name, d))
  state = agg.init(d)
  ctx = context(name, K, f, aux, malicious)
  key = jax.random.PRNGKey(1)
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  lowered = jax.jit(agg.apply).lower(state, u, None, w, key, ctx)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  jax.block_until_ready(compiled(state, u, None, w, key, ctx))
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(state, u, None, w, key, ctx))
  t4 = time.perf_counter()
  total = t3 - t0
  rec = {"rule": name, "escape": malicious, "K": K, "d": d, "f": f,
         "hparams": hparams(name, d),
         "lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": t3 - t2,
         "second_call_s": t4 - t3, "total_s": total,
         "meets_target": total < TARGET_S if K == 100 else None,
         "load_average_1min": [load_before, os.getloadavg()[0]]}
  del compiled, lowered
  label = name + ("+escape" if malicious else "")
  print(f"  {label:>24} K={K:>3}: lower {rec['lower_s']:6.2f} s  compile "
        f"{rec['compile_s']:6.2f} s  first call {rec['first_call_s']:6.2f} s  "
        f"= {total:6.2f} s  (second call {rec['second_call_s'] * 1e3:8.1f} ms; "
        f"load {load_before:.1f})", flush=True)
  return rec


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _label(r):
  return r["rule"] + (" +escape" if r["escape"] else "")


def _table(records):
  lines = ["| rule | K | lower s | compile s | first call s | total s | "
           "second call ms | < 5 s |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in records:
    met = ("" if r["meets_target"] is None
           else "yes" if r["meets_target"] else "**no**")
    lines.append(
        f"| {_label(r)} | {r['K']} | {r['lower_s']:.2f} | "
        f"{r['compile_s']:.2f} | "
        f"{r['first_call_s']:.2f} | {r['total_s']:.2f} | "
        f"{r['second_call_s'] * 1e3:.1f} | {met} |")
  return "\n".join(lines)


def _summary(records):
  at100 = [r for r in records if r["K"] == 100]
  return {
      "target": TARGET,
      "total_s_at_K100": {_label(r): round(r["total_s"], 2) for r in at100},
      "met": {_label(r): r["meets_target"] for r in at100},
      "all_met": all(r["meets_target"] for r in at100) if at100 else None,
      "failing": [_label(r) for r in at100 if not r["meets_target"]],
      "slowest_at_K100": (_label(max(at100, key=lambda r: r["total_s"]))
                          if at100 else None),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"K=25 only, rules {','.join(QUICK_RULES)}")
  parser.add_argument("--rules", default="", help="comma-separated subset")
  parser.add_argument("--ks", default="", help="comma-separated K values "
                      "(default 25,100; --quick: 25)")
  parser.add_argument("--d", type=int, default=270_000,
                      help="parameters per update (default 270k)")
  parser.add_argument("--no_escape", action="store_true",
                      help="skip the second pass of the escape-ratio rules "
                      "with ctx.malicious set")
  parser.add_argument("--out", default="benchmarks/results/compile_time.json",
                      help="where the JSON record goes")
  args = parser.parse_args()
  # Every measurement compiles from scratch.
  jax.config.update("jax_enable_compilation_cache", False)
  names = [n for n in agg_lib.names() if n not in SKIP]
  if args.quick:
    names = [n for n in names if n in QUICK_RULES]
  if args.rules:
    wanted = args.rules.split(",")
    unknown = set(wanted) - set(names)
    if unknown:
      parser.error(f"unknown or skipped rules {sorted(unknown)}; "
                   f"known: {names}")
    names = [n for n in names if n in wanted]
  ks = ([int(k) for k in args.ks.split(",")] if args.ks
        else [25] if args.quick else [25, 100])
  d = args.d
  t_start = time.time()
  load_start = os.getloadavg()
  records = []
  for K in ks:
    u_np, w_np, aux = make_case(K, d)
    u, w = jnp.asarray(u_np), jnp.asarray(w_np)
    print(f"K={K} d={d:,} (f={K // 5}):", flush=True)
    for name in names:
      records.append(measure(name, K, d, u, w, aux))
      if name in ESCAPE_RULES and not args.no_escape:
        records.append(measure(name, K, d, u, w, aux, malicious=True))
    del u, w, u_np, w_np, aux
  table = _table(records)
  print()
  print(table)
  summary = _summary(records)
  out = {
      "benchmark": "compile_time",
      "backend": jax.default_backend(),
      "devices": [str(x) for x in jax.devices()],
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "processor": _cpu_model(),
      "platform": platform.platform(),
      "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_at_start": load_start,
      "load_average_at_end": os.getloadavg(),
      "wall_s": time.time() - t_start,
      "notes": ("Fresh jax.jit of the rule's whole apply per rule and K, "
                "after jax.clear_caches(), no persistent compilation cache. "
                "total = lower + compile + first call. Dense uploads, "
                f"d = {d}, f = K // 5, no layout. Other jobs share the 2 "
                "cores (see the load averages)."),
      "summary": summary,
      "table_markdown": table,
      "records": records,
  }
  io.atomic_write_json(args.out, out)
  print(f"\nwrote {args.out}\nsummary: {summary}")


if __name__ == "__main__":
  main()
