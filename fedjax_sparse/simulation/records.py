"""What every run writes: the record of each round and the run's summary.

Shared by a single run and by seed-batched runs (through
:func:`fedjax_sparse.simulation.loop.run_loop`), so that both write the same
fields.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from fedjax_sparse.simulation.config import (ExperimentConfig, config_dict,
                                             parse_kwargs)


def _mean(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


@functools.lru_cache(maxsize=64)
def _attack_space_of(cfg: ExperimentConfig) -> Optional[str]:
  """The run's threat model (:func:`fedjax_sparse.attacks.attack_space`),
  resolved once per configuration rather than in every round record."""
  from fedjax_sparse.attacks import attack_space
  return attack_space(cfg.attack, parse_kwargs(cfg.attack_args, "attack_args"))


def round_record(cfg: ExperimentConfig, round_: int, seconds: float,
                 get) -> dict:
  """The per-round record every run writes (``get(name)``: a round metric)."""
  rec = {"round": round_, "loss": float(get("loss")), "seconds": seconds,
         "update_norm": float(get("update_norm")),
         "uplink_bits": float(get("uplink_bits")),
         "downlink_bits": float(get("downlink_bits"))}
  # Only when some upload held inf/nan, so that other records keep their form.
  nonfinite = int(get("nonfinite_clients"))
  if nonfinite:
    rec["nonfinite_clients"] = nonfinite
  if cfg.attack != "none":
    n_mal = int(get("num_malicious"))
    n_ben = cfg.clients_per_round - n_mal
    active = bool(get("attack_active"))
    # Detection rates only where there is an attack to detect.
    rec.update({
        "attack_active": active,
        "num_malicious": n_mal,
        "tpr": (int(get("flagged_malicious")) / n_mal
                if active and n_mal else None),
        "fpr": (int(get("flagged_benign")) / n_ben
                if active and n_ben else None)})
    space = _attack_space_of(cfg)
    if space is not None:
      rec["attack_space"] = space
  return rec


def run_summary(cfg: ExperimentConfig, records: list[dict],
                last_eval: Optional[dict], compile_s: float,
                wall_seconds: float, num_params: int) -> dict:
  """The summary fields every run writes (extras are added by the caller)."""
  steady = [x["seconds"] for x in records]
  return {
      "config": config_dict(cfg),
      "rounds": cfg.rounds,
      "final_accuracy": last_eval["accuracy"] if last_eval else None,
      "final_top5_accuracy": last_eval["top5_accuracy"] if last_eval else None,
      "final_test_loss": last_eval["test_loss"] if last_eval else None,
      "best_accuracy": max((x["accuracy"] for x in records if "accuracy" in x),
                           default=None),
      "compile_seconds": compile_s,
      "median_round_seconds": float(np.median(steady)) if steady else None,
      "wall_seconds": wall_seconds,
      "num_params": num_params,
      "uplink_bits_total": sum(x["uplink_bits"] for x in records),
      "downlink_bits_total": sum(x["downlink_bits"] for x in records),
      "mean_tpr": _mean([x.get("tpr") for x in records if x.get("attack_active")]),
      "mean_fpr": _mean([x.get("fpr") for x in records if x.get("attack_active")]),
      # Rounds in which the attack acted (None: no attack configured), so
      # that a defence cannot seem to hold against an attack that never ran.
      "attack_rounds": (None if cfg.attack == "none" else
                        sum(1 for x in records if x.get("attack_active"))),
      "backend": jax.default_backend(),
  }
