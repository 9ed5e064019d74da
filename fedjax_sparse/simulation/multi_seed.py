"""Seed-batched sweeps: S seeds of one configuration in one compiled step.

A sweep repeats each configuration over several seeds. Run one after
another, every seed pays its own dispatch and leaves the machine idle
between small kernels; :class:`SeedBatch` instead ``vmap``s the (unjitted)
round step over a stacked :class:`~fedjax_sparse.simulation.round.ServerState`
with a leading seed axis (or ``lax.map``s it over the seeds), so one call of
one compiled function advances all S runs by a round. The training data are stored once and shared by every
seed (``in_axes=None``); only per-seed arrays (the malicious set, when
``malicious_mode="random"`` draws it from the seed) get a seed axis.

What a seed means here: seed ``s`` of :func:`run_seeds` is the run
``run_experiment(dataclasses.replace(cfg, seed=s), fd=fd)`` on the same
federated data ``fd`` (built once from ``cfg.seed`` when not given). It draws
the model initialisation, client sampling, local batches, aggregator and
attack randomness, and the malicious clients in ``random`` mode. Results
agree with those separate runs to float rounding
(``tests/simulation/test_scale.py``).

Limits: update attacks whose construction depends on the seed (the saliency
masks of ``hsa``/``dhsa`` are computed on each seed's initial model) cannot
share one step and are refused, and so are seeds of ``targeted_pgd`` that
would draw different auxiliary sets. Every metric of a separate run is
recorded (escape ratios, the unattacked twin of ``--twin``, ASR, targeted
accuracy and OIF): both go through one loop,
:func:`fedjax_sparse.simulation.loop.run_loop`.
``client_devices`` other than 1 works in the ``vmap`` and ``map`` modes
(``shard_map`` under them), see ``tests/simulation/test_scale.py``. With output
directories, a batch checkpoints its stacked state and resumes after a kill
like a single run. ``experiments.sweep --batch_seeds`` runs the seeds of each
grid cell this way.

Speed (``benchmarks/scale.py``, 2-core CPU split into 2 host devices, 2x200
MLP, 4 seeds, per round against 4 separate runs at K = 100 / 10): ``shard``
1.34x / 1.09x, ``map`` 1.16x / 0.91x, ``vmap`` 0.31x / 0.74x (a CPU round is
already compute-bound and the 4x working set costs cache); end to end over a
30-round sweep, where the separate runs also compile 4 times, ``shard`` is
1.88x / 2.64x. ``vmap`` is for accelerators, where one seed's round leaves the
device idle; measure there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation import run_safety
from fedjax_sparse.simulation.loop import final_eval_keys
from fedjax_sparse.simulation.config import (ExperimentConfig, config_dict,
                                             config_differences)
from fedjax_sparse.simulation.seed_batch import (MODES, SeedBatch, seed_mesh,
                                                 unbatchable_reason)

# Names of seed_batch, importable from here as before.
__all__ = ["MODES", "BatchRunner", "SeedBatch", "run_seeds", "seed_mesh",
           "unbatchable_reason"]


def run_seeds(cfg: ExperimentConfig, seeds: Sequence[int], *, fd=None,
              progress: bool = False, mode: str = "auto",
              batch: Optional[SeedBatch] = None,
              output_dirs: Optional[Sequence[str]] = None,
              on_round=None) -> list[dict]:
  """Runs ``cfg`` once per seed, all seeds in one compiled round step.

  Args:
    cfg: the configuration; ``cfg.seed`` picks the data partition when
      ``fd`` is None (or ``cfg.data_seed``, when set), each entry of
      ``seeds`` everything else.
    seeds: the S seeds.
    fd: the federated data shared by all seeds (None: ``build_data(cfg)``).
    progress: show a progress bar.
    mode: how the seeds share the step, ``"auto"``, ``"vmap"``, ``"map"`` or
      ``"shard"`` (see :class:`SeedBatch`).
    batch: a prebuilt :class:`SeedBatch` of ``cfg`` and ``seeds`` (reuse its
      compiled step).
    on_round: called as ``on_round(i, record)`` after each round, once per
      seed (``i``: its index in ``seeds``).
    output_dirs: one directory per seed for its ``config.json``,
      ``rounds.jsonl`` and ``summary.json`` (the files of a separate run;
      default ``<cfg.output_dir>/seed_<s>/`` when ``cfg.output_dir`` is set).
      The stacked state is checkpointed every ``cfg.checkpoint_every``
      rounds into ``<first directory>/seed_batch/``; a killed batch run
      again with the same seeds resumes from there and ends as it would
      have. Every directory is locked for the run, and a resume is refused
      (ValueError) as :func:`run_experiment`'s is: a corrupt checkpoint,
      fewer ``cfg.rounds`` than it holds, or a seed's ``rounds.jsonl``
      without the records of its rounds.

  Returns:
    One summary per seed, with the keys of
    :func:`fedjax_sparse.simulation.experiment.run_experiment`'s summary
    (its ``config`` has ``seed`` set to that seed) plus ``round_losses`` and
    ``seeds_per_step`` (S; the timings are those of the batched step, which
    advances every seed).
  """
  started = time.perf_counter()
  b = batch if batch is not None else SeedBatch(cfg, seeds, fd, mode)
  num = b.num_seeds
  if output_dirs is None and cfg.output_dir:
    output_dirs = [os.path.join(cfg.output_dir, f"seed_{s}") for s in b.seeds]
  if output_dirs is not None and len(output_dirs) != num:
    raise ValueError(f"{len(output_dirs)} output_dirs for {num} seeds")
  if not output_dirs:
    return _run_seeds(cfg, b, progress, output_dirs, on_round, started)
  # Every seed's directory is locked as a separate run's would be (all or
  # none; see run_safety.output_lock).
  with run_safety.output_locks(output_dirs):
    return _run_seeds(cfg, b, progress, output_dirs, on_round, started)


class BatchRunner:
  """A :class:`SeedBatch` as a runner of
  :func:`fedjax_sparse.simulation.loop.run_loop`: S seeds, one output
  directory each, the stacked state checkpointed in the first one's
  ``seed_batch/``."""

  def __init__(self, cfg: ExperimentConfig, b: SeedBatch,
               output_dirs: Optional[Sequence[str]]):
    self.batch = b
    self.cfg = cfg
    self.output_dirs = list(output_dirs) if output_dirs else None
    self.cfgs = [dataclasses.replace(
        cfg, seed=s, output_dir=output_dirs[i] if output_dirs else "")
                 for i, s in enumerate(b.seeds)]
    self.checkpoint = None
    if output_dirs:
      self.ckpt_dir = os.path.join(output_dirs[0], "seed_batch")
      self.checkpoint = os.path.join(self.ckpt_dir, "checkpoint")
    self.data = b.data
    base = b.base
    self.num_params = base.layout.d
    self.final_eval_keys = final_eval_keys(base, cfg.twin)

  def init_state(self):
    return self.batch.init_state()

  def resume(self, state):
    """As a single run's resume, for the stacked state: the batch resumes
    only with the same seeds, directories and configuration."""
    cfg, b = self.cfg, self.batch
    records: list[list[dict]] = [[] for _ in range(b.num_seeds)]
    if not self.output_dirs:
      return state, records
    ckpt, ckpt_dir = self.checkpoint, self.ckpt_dir
    meta_path = os.path.join(ckpt_dir, "batch.json")
    meta = {"seeds": b.seeds, "output_dirs": [os.path.abspath(d) for d in
                                              self.output_dirs],
            # rounds place a learning-rate decay: then a batch resumes
            # only with the same rounds.
            "config": {k: v for k, v in config_dict(cfg).items()
                       if k not in ("seed", "checkpoint_every")
                       and (k != "rounds" or cfg.lr_decay_at)}}
    meta = json.loads(json.dumps(meta))
    old = io.read_json(meta_path) if os.path.exists(meta_path) else None
    # Fields added to ExperimentConfig since the batch was written count as
    # equal at their defaults (as for a single run's resume).
    same = (isinstance(old, dict)
            and {k: v for k, v in old.items() if k != "config"}
            == {k: v for k, v in meta.items() if k != "config"}
            and isinstance(old.get("config"), dict)
            and not config_differences(old["config"], meta["config"]))
    if same and io.checkpoint_exists(ckpt):
      state = io.load_checkpoint(ckpt, state)
      done = int(np.asarray(state.round)[0])
      run_safety.check_rounds(done, cfg.rounds, ckpt_dir)
      records = [run_safety.resumed_records(os.path.join(d, "rounds.jsonl"),
                                            done, ckpt)
                 for d in self.output_dirs]
    run_safety.prepare_output_dir(ckpt_dir)
    io.atomic_write_json(meta_path, meta)
    for d, c in zip(self.output_dirs, self.cfgs):
      io.atomic_write_json(os.path.join(d, "config.json"), config_dict(c))
    return state, records

  def compile(self, state):
    return self.batch.round_step.lower(state, self.batch.data).compile()

  def metrics(self, host: dict) -> list[dict]:
    return [{k: v[i] for k, v in host.items()}
            for i in range(self.batch.num_seeds)]

  def evaluate(self, state) -> list[dict]:
    b, base = self.batch, self.batch.base
    main = state.main if self.cfg.twin else state
    recs = [{"test_loss": e["loss"], "accuracy": e["accuracy"],
             "top5_accuracy": e["top5_accuracy"]} for e in b.eval_state(main)]
    if base.has_asr:
      for rec, e in zip(recs, b.eval_state(main, base.x_asr, base.y_asr)):
        rec["asr"] = e["accuracy"]
    if base.has_targeted:
      for rec, e in zip(recs, b.eval_state(main, base.x_aux, base.y_aux)):
        rec["targeted_accuracy"] = e["accuracy"]
        rec["oif"] = base.oif(e["accuracy"])
    if self.cfg.twin:
      for rec, e in zip(recs, b.eval_state(state.twin)):
        rec["twin_accuracy"] = e["accuracy"]
      if base.has_targeted:
        for rec, e in zip(recs, b.eval_state(state.twin, base.x_aux,
                                             base.y_aux)):
          rec["twin_targeted_accuracy"] = e["accuracy"]
    return recs

  def summary_extras(self, i: int, records, last_eval) -> dict:
    b = self.batch
    out = {"round_losses": [x["loss"] for x in records],
           "seeds_per_step": b.num_seeds,
           "seed_batch": {"seeds": b.seeds, "mode": b.mode}}
    if b.base.has_targeted:
      out["test_size"] = int(b.base.y_test.shape[0])
    return out


def _run_seeds(cfg: ExperimentConfig, b: SeedBatch, progress: bool,
               output_dirs: Optional[Sequence[str]], on_round=None,
               started: Optional[float] = None) -> list[dict]:
  from fedjax_sparse.simulation.loop import run_loop
  return run_loop(BatchRunner(cfg, b, output_dirs), progress=progress,
                  on_round=on_round, desc=f"rounds x{b.num_seeds} seeds",
                  started=started)
