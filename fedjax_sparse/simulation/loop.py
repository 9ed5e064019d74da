"""The run loop: one for a single run and for S seeds advanced together.

In the spirit of FedJAX's ``run_federated_experiment``: a loop that owns the
cadence (rounds, periodic and final evaluation, records, checkpoints,
progress, summaries) over a *runner* that owns the computation. Two runners
exist, with the same interface:

* :class:`fedjax_sparse.simulation.experiment.SingleRunner`: one
  :class:`~fedjax_sparse.simulation.experiment.Experiment` (S = 1), its
  jitted round step (or the twin step), its output directory;
* :class:`fedjax_sparse.simulation.multi_seed.BatchRunner`: a
  :class:`~fedjax_sparse.simulation.multi_seed.SeedBatch` (S seeds in one
  compiled step), one output directory per seed.

A runner provides ``cfgs`` (one configuration per seed), ``output_dirs``
(one per seed, or None), ``checkpoint`` (the path, or None), ``data``,
``init_state()``, ``resume(state) -> (state, records)`` (refusing what
cannot be resumed exactly; it writes the configurations), ``compile(state)``,
``metrics(host_metrics) -> [per-seed dict]``, ``evaluate(state) -> [per-seed
dict]`` (test metrics and every evaluation-round metric the configuration
has: ASR, targeted accuracy and OIF, the twin's accuracy) and
``summary_extras(i, records, last_eval) -> dict``. Every per-round metric
(:func:`round_metrics`) comes from the round's metrics the same way for S = 1
and S > 1, so a seed batch records what separate runs record.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from fedjax_sparse.simulation import io

def final_eval_keys(exp, twin: bool) -> list[str]:
  """The evaluation metrics of the :class:`Experiment` ``exp`` (with an
  unattacked twin when ``twin``) that the summary reports as
  ``final_<name>`` from the last evaluation record."""
  return ((["asr"] if exp.has_asr else [])
          + (["targeted_accuracy", "oif"] if exp.has_targeted else [])
          + (["twin_accuracy"] if twin else [])
          + (["twin_targeted_accuracy"] if twin and exp.has_targeted else []))


def round_metrics(cfg, get: Callable[[str], Any], keys) -> dict:
  """The per-round record extras besides :func:`round_record`'s: the rule's
  escape ratios (hybrid paper 2.4) under an attack, the distance to the
  unattacked twin and its loss with ``twin``. ``get(name)``: a round metric
  of this seed; ``keys``: the names of the round's metrics."""
  rec = {}
  if cfg.attack != "none":
    rec.update({k[len("agg/"):]: float(get(k)) for k in keys
                if k.startswith("agg/escape_ratio")})
  if cfg.twin:
    rec["l1_to_twin"] = float(get("l1_to_twin"))
    rec["twin_loss"] = float(get("twin/loss"))
  return rec


def _postfix(loss: float, seconds: float, last: Optional[dict],
             twin: bool, rec: dict) -> dict:
  post = {"loss": f"{loss:.3f}", "s/round": f"{seconds:.2f}"}
  if last is not None:
    post["acc"] = f"{last['accuracy']:.4f}"
    for k, name in (("asr", "asr"), ("targeted_accuracy", "targeted")):
      if last.get(k) is not None:
        post[name] = f"{last[k]:.4f}"
  if twin:
    post["l1_twin"] = f"{rec['l1_to_twin']:.3g}"
  return post


def software() -> dict:
  """What decides the arithmetic besides the configuration: the JAX and
  jaxlib versions and the XLA flags (a long run of many local steps
  amplifies a one-ulp difference in the order of a sum)."""
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_loop(runner, progress: bool = False, on_round=None,
             desc: str = "rounds", started: Optional[float] = None) -> list[dict]:
  """Runs (or resumes) every seed of ``runner`` to ``rounds``.

  Args:
    runner: a runner (see the module docstring).
    progress: show a progress bar.
    on_round: called as ``on_round(i, record)`` after each round, once per
      seed (``i``: the seed's index).
    desc: the progress bar's label.
    started: ``time.perf_counter()`` when the caller began building the run
      (default: now); the summaries' ``startup_seconds`` count from it to
      the start of the first round run here (building, resuming, compiling).

  Returns:
    One summary per seed (also written to each output directory's
    ``summary.json``).
  """
  from fedjax_sparse.simulation.experiment import round_record, run_summary
  started = time.perf_counter() if started is None else started
  cfgs = runner.cfgs
  cfg = cfgs[0]
  num = len(cfgs)
  dirs = runner.output_dirs or [None] * num
  state = runner.init_state()
  state, records = runner.resume(state)
  start = len(records[0])
  for d, recs in zip(dirs, records):
    if d:
      # The records of the checkpointed rounds only; each round appends its own.
      io.write_jsonl(os.path.join(d, "rounds.jsonl"), recs)
  t0 = time.perf_counter()
  step = runner.compile(state)
  compile_s = time.perf_counter() - t0
  last_eval: list[Any] = [next((r for r in reversed(recs) if "accuracy" in r),
                               None) for recs in records]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.rounds, initial=start, desc=desc, unit="round",
               dynamic_ncols=True)
  t_run = time.perf_counter()
  startup_s = t_run - started
  for r in range(start, cfg.rounds):
    t0 = time.perf_counter()
    state, metrics = step(state, runner.data)
    host = runner.metrics(jax.device_get(metrics))
    seconds = time.perf_counter() - t0
    evals = None
    if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
      evals = runner.evaluate(state)
    for i in range(num):
      m = host[i]
      rec = round_record(cfgs[i], r + 1, seconds, m.__getitem__)
      rec.update(round_metrics(cfgs[i], m.__getitem__, m.keys()))
      if evals is not None:
        rec.update(evals[i])
        last_eval[i] = rec
      records[i].append(rec)
    if runner.output_dirs:
      for d, recs in zip(dirs, records):
        io.append_jsonl(os.path.join(d, "rounds.jsonl"), recs[-1:])
      # A resumed run recomputes the rounds after its checkpoint, exactly.
      if (r + 1) % cfg.checkpoint_every == 0 or r + 1 == cfg.rounds:
        io.save_checkpoint(runner.checkpoint, state)
    if bar is not None:
      loss = float(np.mean([h["loss"] for h in host]))
      bar.set_postfix(_postfix(loss, seconds, last_eval[0], cfg.twin,
                               records[0][-1]))
      bar.update(1)
    if on_round is not None:
      for i in range(num):
        on_round(i, records[i][-1])
  if bar is not None:
    bar.close()
  wall = time.perf_counter() - t_run
  summaries = []
  for i, c in enumerate(cfgs):
    recs, ev = records[i], last_eval[i]
    summary = run_summary(c, recs, ev, compile_s, wall, runner.num_params)
    summary["startup_seconds"] = startup_s
    # The loss and accuracy means are summed per device: a rerun matches
    # bit for bit on the same number of devices.
    summary["devices"] = jax.device_count()
    summary["software"] = software()
    for k in runner.final_eval_keys:
      summary[f"final_{k}"] = ev.get(k) if ev else None
    if cfg.twin:
      summary["final_l1_to_twin"] = (recs[-1].get("l1_to_twin") if recs
                                     else None)
    summary.update(runner.summary_extras(i, recs, ev))
    summaries.append(summary)
    if dirs[i]:
      io.atomic_write_json(os.path.join(dirs[i], "summary.json"), summary)
  return summaries
