"""One experiment as a runner of the run loop (S = 1)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation import run_safety
from fedjax_sparse.simulation.config import config_dict, config_differences
from fedjax_sparse.simulation.loop import final_eval_keys


if TYPE_CHECKING:
  from fedjax_sparse.simulation.experiment import Experiment


class SingleRunner:
  """One :class:`Experiment` as a runner of
  :func:`fedjax_sparse.simulation.loop.run_loop` (S = 1)."""

  def __init__(self, exp: "Experiment"):
    self.exp = exp
    cfg = exp.cfg
    self.cfgs = [cfg]
    self.output_dirs = [cfg.output_dir] if cfg.output_dir else None
    self.checkpoint = (os.path.join(cfg.output_dir, "checkpoint")
                       if cfg.output_dir else None)
    self.data = exp.data
    self.num_params = exp.layout.d
    self.final_eval_keys = final_eval_keys(exp, cfg.twin)

  def init_state(self):
    return self.exp.init_state()

  def resume(self, state):
    """The checkpointed state and its round records (or ``state`` and no
    records); refuses what cannot be resumed exactly (ValueError). Writes
    ``config.json``."""
    cfg = self.exp.cfg
    records: list[dict] = []
    if not cfg.output_dir:
      return state, [records]
    out_dir = cfg.output_dir
    ckpt = self.checkpoint
    cfg_path = os.path.join(out_dir, "config.json")
    rounds_path = os.path.join(out_dir, "rounds.jsonl")
    # Runs of earlier versions left a .npz checkpoint.
    resume_from = ckpt if io.checkpoint_exists(ckpt) else ckpt + ".npz"
    if io.checkpoint_exists(resume_from) and os.path.exists(cfg_path):
      old = io.read_json(cfg_path)
      if not isinstance(old, dict):
        raise ValueError(f"{cfg_path} is not a configuration (a JSON "
                         "object): it was damaged or written by something "
                         "else")
      # Neither changes the results: a run may be extended, or resumed
      # with another checkpoint interval. Under a learning-rate schedule
      # the rounds place the decay, so they must match.
      free = (("checkpoint_every",) if cfg.lr_decay_at
              else ("rounds", "checkpoint_every"))
      for k in free:
        old.pop(k, None)
      new = {k: v for k, v in config_dict(cfg).items() if k not in free}
      diff = config_differences(old, new)
      if diff:
        raise ValueError(f"{out_dir} holds a run of another configuration "
                         f"(it differs in {', '.join(diff)}); choose a new "
                         "--output_dir or delete it")
      state = io.load_checkpoint(resume_from, state)
      done = int(state.round)
      run_safety.check_rounds(done, cfg.rounds, out_dir)
      records = run_safety.resumed_records(rounds_path, done, resume_from)
    io.atomic_write_json(cfg_path, config_dict(cfg))
    return state, [records]

  def compile(self, state):
    return self.exp.round_step.lower(state, self.exp.data).compile()

  def metrics(self, host: dict) -> list[dict]:
    return [host]

  def evaluate(self, state) -> list[dict]:
    exp = self.exp
    main = exp.main_state(state)
    ev = exp.eval_state(main)
    rec = {"test_loss": ev["loss"], "accuracy": ev["accuracy"],
           "top5_accuracy": ev["top5_accuracy"]}
    if exp.has_asr:
      rec["asr"] = exp.asr_state(main)
    if exp.has_targeted:
      rec["targeted_accuracy"] = exp.targeted_accuracy_state(main)
      rec["oif"] = exp.oif(rec["targeted_accuracy"])
    if exp.cfg.twin:
      twin = exp.twin_state(state)
      rec["twin_accuracy"] = exp.eval_state(twin)["accuracy"]
      if exp.has_targeted:
        rec["twin_targeted_accuracy"] = exp.targeted_accuracy_state(twin)
    return [rec]

  def summary_extras(self, i: int, records, last_eval) -> dict:
    if self.exp.has_targeted:
      return {"test_size": int(self.exp.y_test.shape[0])}
    return {}
