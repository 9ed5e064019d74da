"""One federated experiment from a config: data, model, round loop, results.

:class:`ExperimentConfig` is what the ``experiments.run`` binary builds from
its flags; a user can build the same dataclass in Python and call
:func:`run_experiment`. :meth:`ExperimentConfig.validate` checks everything it
can (names, ranges, that the dataset exists) before anything is compiled.

Outputs in ``output_dir`` (all written atomically):

* ``config.json``: the configuration;
* ``rounds.jsonl``: one JSON record per round (round, loss, seconds, and test
  loss/accuracy on evaluation rounds; ``asr``, the attack success rate, on
  evaluation rounds of a backdoor data attack; ``targeted_accuracy`` and
  ``oif``, the outsized impact factor, on evaluation rounds of
  ``targeted_pgd``; with ``twin=True``, ``l1_to_twin`` and ``twin_loss``
  every round and ``twin_accuracy`` (and ``twin_targeted_accuracy``) on
  evaluation rounds);
* ``summary.json``: final metrics and timings (``final_asr`` for backdoor
  attacks, ``final_targeted_accuracy`` and ``final_oif`` for
  ``targeted_pgd``, ``final_l1_to_twin`` and ``final_twin_accuracy`` with
  the twin);
* ``checkpoint/``: the server state after the last finished round, an Orbax
  checkpoint directory written atomically. A killed run started again with
  the same configuration and output directory resumes from it without
  losing finished rounds (runs of earlier versions from their
  ``checkpoint.npz``). With ``twin=True`` it holds both the attacked
  run's and the twin's state;
* ``checkpoint.sha256``: the checkpoint's checksum, verified on resume (a
  corrupt checkpoint is refused, never trained on);
* ``.lock``: locked (``flock``) by the run using the directory, and holding
  its pid: a second run there is refused
  (:mod:`fedjax_sparse.simulation.run_safety`).

Targeted model poisoning (``targeted_pgd``): the attackers' auxiliary set is
drawn once (:func:`fedjax_sparse.attacks.builder.targeted_auxiliary_data`)
and serves both the attack and the targeted accuracy. By default
(``aux_source=test``) it is ``aux_size`` test points, as in sparsefed.txt
3.2, and those points are left out of the test accuracy, loss and top-5 of
the run (and of its twin), which the paper measures on "the validation set
not including the auxiliary set" (B.5, Table 11); ``summary.json`` then
says how many test points were evaluated (``test_size``). Runs without
``targeted_pgd`` (the ``none`` cells of a sweep) evaluate on the whole test
split. ``aux_source=train`` draws the set from the attackers' training data
and evaluates on the whole test split. Likewise, the test rows an attack's
``held_out_test_rows`` hook names (the edge-case backdoor's edge cases) are
left out of the test metrics.

The unattacked twin (``twin=True``, ALGORITHMS.md section 7) is trained in
the same jitted step as the attacked run, from the same initial state and
PRNG key, with the same rule and settings but no attack and nobody
malicious (:func:`fedjax_sparse.simulation.round.make_twin_round_step`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse import aggregators as aggregators_lib
from fedjax_sparse import data as data_lib
from fedjax_sparse import metrics as metrics_lib
from fedjax_sparse import models as models_lib
from fedjax_sparse import requirements
from fedjax_sparse.layout import layout_of
from fedjax_sparse.simulation import run_safety
from fedjax_sparse.simulation.config import (MALICIOUS_MODES, PARTITIONS,
                                             ExperimentConfig, config_dict,
                                             config_differences, parse_kwargs,
                                             parse_width)
from fedjax_sparse.simulation.evaluation import make_evaluate
from fedjax_sparse.simulation.records import round_record, run_summary
from fedjax_sparse.simulation.round import make_round_step
from fedjax_sparse.simulation.round_state import RoundData, init_server_state
from fedjax_sparse.simulation.single_runner import SingleRunner
from fedjax_sparse.simulation.twin import (TwinState, init_twin_state,
                                           make_twin_round_step)

# Names of the experiment's modules, importable from here as before.
_config_dict = config_dict
_config_differences = config_differences
__all__ = ["MALICIOUS_MODES", "PARTITIONS", "Experiment", "ExperimentConfig",
           "SingleRunner", "build_data", "parse_kwargs", "parse_width",
           "round_record", "run_experiment", "run_summary"]


def _build(factory, kwargs: dict, what: str, name: str, **fixed):
  try:
    return factory(**fixed, **kwargs)
  except TypeError as e:
    raise ValueError(f"cannot build {what} {name!r} with arguments {kwargs}: "
                     f"{e}; set them with --{what.split()[0]}_args") from None


def build_data(cfg: ExperimentConfig):
  return data_lib.build(cfg.dataset, cfg.num_clients, cfg.partition,
                        alpha=cfg.alpha, shards_per_client=cfg.shards_per_client,
                        min_samples=cfg.min_samples, val_size=cfg.val_size,
                        data_dir=cfg.data_dir, seed=cfg.effective_data_seed,
                        max_train=cfg.max_train or None,
                        allow_empty=cfg.allow_empty_clients)


class Experiment:
  """Data, model, compiled round step and evaluation of one configuration."""

  def __init__(self, cfg: ExperimentConfig, fd=None):
    cfg.validate(check_data=fd is None)
    self.cfg = cfg
    self.fd = fd if fd is not None else build_data(cfg)
    if self.fd.clients.idx.shape[0] != cfg.num_clients:
      raise ValueError("the federated data has a different number of clients "
                       "than the configuration")
    self.model = models_lib.get_model(cfg.model, self.fd.num_classes,
                                      conv_impl=cfg.conv_impl, norm=cfg.norm,
                                      width=parse_width(cfg.model_width))
    key = jax.random.key(cfg.seed)
    k_init, self.k_state = jax.random.split(key)
    self.variables = self.model.init(k_init, jnp.asarray(self.fd.x_train[:1]),
                                     train=False)
    self.has_model_state = len(self.variables) > 1
    self.layout = layout_of(self.variables["params"])
    agg_kwargs = parse_kwargs(cfg.aggregator_args)
    rule_needs = requirements.aggregator_needs(cfg.aggregator)
    server_data = requirements.SERVER_DATA in rule_needs
    if requirements.MODEL in rule_needs:
      agg_kwargs = {**self._model_aware_args(), **agg_kwargs}
    if requirements.POPULATION in rule_needs:
      agg_kwargs = {"num_clients": cfg.num_clients, **agg_kwargs}
    if requirements.SERVER in rule_needs:
      agg_kwargs = {**requirements.server_arguments(cfg), **agg_kwargs}
    self.aggregator = _build(aggregators_lib.get(cfg.aggregator), agg_kwargs,
                             "aggregator", cfg.aggregator)
    from fedjax_sparse import attacks as attacks_lib
    self.update_attack = self.data_attack = None
    attack_kwargs = parse_kwargs(cfg.attack_args)
    if requirements.SPARSIFIER in requirements.attack_needs(cfg.attack):
      attack_kwargs.setdefault(
          "topk_ratio", cfg.topk_ratio if cfg.sparsify == "topk" else 1.0)
    if requirements.AGGREGATOR in requirements.attack_needs(cfg.attack):
      attack_kwargs.setdefault("aggregator", self.aggregator)
      attack_kwargs.setdefault("num_byzantine", cfg.byzantine)
      attack_kwargs.setdefault(
          "topk_ratio", cfg.topk_ratio if cfg.sparsify == "topk" else 1.0)
      attack_kwargs.setdefault("pack_size", cfg.pack_size)
    malicious = attacks_lib.choose_malicious(cfg.num_clients, cfg.num_malicious,
                                             cfg.malicious_mode, cfg.seed)
    # targeted_pgd's auxiliary set, drawn once for the attack and for the
    # targeted accuracy (test points by default; see the module docstring).
    self.targeted_aux = None
    if cfg.attack != "none":
      if attacks_lib.is_update_attack(cfg.attack):
        from fedjax_sparse.attacks.builder import (build_update_attack,
                                                   targeted_auxiliary_data)
        rows = self.fd.clients.idx[malicious]
        counts = self.fd.clients.counts[malicious]
        pool = np.concatenate([r[:c] for r, c in zip(rows, counts)])
        if requirements.AUX_SET in requirements.attack_needs(cfg.attack):
          self.targeted_aux = targeted_auxiliary_data(
              attack_kwargs, num_classes=self.fd.num_classes,
              attacker_x=self.fd.x_train[pool],
              attacker_y=self.fd.y_train[pool], test_x=self.fd.x_test,
              test_y=self.fd.y_test)
        self.update_attack = build_update_attack(
            cfg.attack, attack_kwargs, layout=self.layout,
            params=self.variables["params"], apply_fn=self.model.apply,
            attacker_x=self.fd.x_train[pool], attacker_y=self.fd.y_train[pool],
            key=jax.random.fold_in(key, 1), num_classes=self.fd.num_classes,
            model_state={k: v for k, v in self.variables.items()
                         if k != "params"},
            output_dir=cfg.output_dir or None,
            test_x=self.fd.x_test, test_y=self.fd.y_test,
            targeted_aux=self.targeted_aux)
      else:
        fixed = {"num_classes": self.fd.num_classes}
        if requirements.TEST_SPLIT in requirements.attack_needs(cfg.attack):
          fixed.update(test_x=self.fd.x_test, test_y=self.fd.y_test)
        self.data_attack = _build(attacks_lib.get_data_attack(cfg.attack),
                                  attack_kwargs, "attack", cfg.attack, **fixed)
    self.round_config = cfg.round_config()
    self.round_config.validate(self.layout.d)
    # Rules and attacks check their settings against d in init (k > d, ...):
    # trace them abstractly now, before anything is compiled.
    jax.eval_shape(lambda: self.aggregator.init(self.layout.d))
    if self.update_attack is not None:
      jax.eval_shape(lambda: self.update_attack.init(self.layout.d))
    make_step = make_twin_round_step if cfg.twin else make_round_step
    self.round_step = make_step(
        self.round_config, self.model.apply, self.aggregator, self.layout,
        n_max=self.fd.clients.idx.shape[1],
        has_model_state=self.has_model_state,
        update_attack=self.update_attack, data_attack=self.data_attack,
        server_size=len(self.fd.y_val) if server_data else 0)
    self.evaluate = make_evaluate(self.model.apply, cfg.eval_batch_size)
    self.data = RoundData(jnp.asarray(self.fd.x_train),
                          jnp.asarray(self.fd.y_train),
                          jnp.asarray(self.fd.clients.idx),
                          jnp.asarray(self.fd.clients.counts),
                          jnp.asarray(malicious),
                          jnp.asarray(attacks_lib.malicious_rank(malicious)),
                          *((jnp.asarray(self.fd.x_val), jnp.asarray(self.fd.y_val))
                            if server_data else ()))
    x_test, y_test = self.fd.x_test, self.fd.y_test
    keep = np.ones(len(y_test), bool)
    if self.targeted_aux is not None and self.targeted_aux.test_index is not None:
      # The auxiliary test points are the attack's, not the test set's
      # (sparsefed.txt B.5: test accuracy "not including the auxiliary set").
      keep[self.targeted_aux.test_index] = False
    taken = requirements.attack_hook(cfg.attack, "held_out_test_rows")
    if taken is not None:  # e.g. the edge-case backdoor's edge cases
      keep[taken(attack_kwargs, x_test, y_test)] = False
    if not keep.all():
      x_test, y_test = x_test[keep], y_test[keep]
    self.x_test = jnp.asarray(x_test)
    self.y_test = jnp.asarray(y_test)
    # Backdoor data attacks: the triggered non-target test set whose accuracy
    # (labels = the target) is the attack success rate (ALGORITHMS.md s. 7).
    self.x_asr = self.y_asr = None
    if metrics_lib.is_backdoor(cfg.attack):
      x_asr, y_asr = metrics_lib.backdoor_eval_set(
          cfg.attack, attack_kwargs, self.fd.x_test, self.fd.y_test)
      if len(y_asr):
        self.x_asr, self.y_asr = jnp.asarray(x_asr), jnp.asarray(y_asr)
    # Targeted model poisoning: the attack's own auxiliary set with its
    # flipped labels, for the targeted attack accuracy and the outsized
    # impact factor (ALGORITHMS.md s. 7).
    self.x_aux = self.y_aux = None
    if self.targeted_aux is not None:
      self.x_aux = jnp.asarray(self.targeted_aux.x)
      self.y_aux = jnp.asarray(self.targeted_aux.y)
    # n of the OIF: the training points held by all clients together.
    self.num_datapoints = int(np.sum(self.fd.clients.counts))

  def _model_aware_args(self) -> dict:
    """What class-aware masking needs: the model and per-class validation data."""
    from jax.flatten_util import ravel_pytree
    # Every class gets as many examples as the rarest class has.
    counts = np.bincount(np.asarray(self.fd.y_val),
                         minlength=self.fd.num_classes)
    if counts.min() == 0:
      raise ValueError(f"--aggregator={self.cfg.aggregator} needs validation "
                       "examples of every "
                       f"class; raise --val_size (now {self.cfg.val_size})")
    per_class = int(counts.min())
    val_x, val_y = data_lib.per_class_validation(self.fd, per_class)
    return {"apply_fn": self.model.apply,
            "unravel": ravel_pytree(self.variables["params"])[1],
            "val_x": jnp.asarray(val_x), "val_y": jnp.asarray(val_y),
            "num_clients": self.cfg.num_clients,
            "model_state": {k: v for k, v in self.variables.items()
                            if k != "params"}}

  def init_state(self):
    """The round-0 state: a ServerState, or a TwinState with ``twin``."""
    init = init_twin_state if self.cfg.twin else init_server_state
    return init(self.round_config, self.variables, self.aggregator,
                self.k_state, self.update_attack)

  def main_state(self, state):
    """The attacked run's ServerState of ``state``."""
    return state.main if self.cfg.twin else state

  def twin_state(self, state):
    """The unattacked twin's ServerState of ``state`` (``twin`` only)."""
    if not self.cfg.twin:
      raise ValueError("this experiment has no twin: set twin=True (--twin)")
    return state.twin

  def eval_state(self, state) -> dict:
    """Test loss and top-1/top-5 accuracy of a ServerState's model.

    Given a TwinState, evaluates the attacked run's model.
    """
    if isinstance(state, TwinState):
      state = state.main
    out = self.evaluate(state.params, state.model_state, self.x_test,
                        self.y_test)
    return {k: float(v) for k, v in out.items()}

  @property
  def has_asr(self) -> bool:
    return self.x_asr is not None

  def asr_state(self, state) -> float:
    """Attack success rate: the jitted evaluation's accuracy on the
    triggered non-target test set labelled with the target."""
    out = self.evaluate(state.params, state.model_state, self.x_asr,
                        self.y_asr)
    return float(out["accuracy"])

  @property
  def has_targeted(self) -> bool:
    return self.x_aux is not None

  @property
  def aux_size(self) -> int:
    """s, the size of the targeted attack's auxiliary set (0 if none)."""
    return 0 if self.y_aux is None else int(self.y_aux.shape[0])

  def targeted_accuracy_state(self, state) -> float:
    """Targeted attack accuracy (ALGORITHMS.md s. 7): the fraction of the
    auxiliary set that a ServerState's model classifies as the flipped
    labels."""
    out = self.evaluate(state.params, state.model_state, self.x_aux,
                        self.y_aux)
    return float(out["accuracy"])

  def oif(self, targeted_accuracy: float) -> float:
    """Outsized impact factor of sparsefed.txt B.1.6.

    ``|X_m| / (I n)`` with ``|X_m| = targeted_accuracy * s`` the auxiliary
    points poisoned, ``I = num_malicious / num_clients`` and ``n`` the
    training points held by all clients.
    """
    return float(metrics_lib.outsized_impact_factor(
        targeted_accuracy * self.aux_size, self.cfg.num_malicious,
        self.cfg.num_clients, self.num_datapoints))


def run_experiment(cfg: ExperimentConfig, progress: bool = True,
                   fd=None, on_round=None) -> dict:
  """Runs (or resumes) an experiment and returns its summary dict.

  With an ``output_dir`` the run holds its lock
  (:func:`fedjax_sparse.simulation.run_safety.output_lock`) throughout, and
  resumes only what it can resume exactly: a ValueError says why not where
  another run holds the directory, it holds another configuration, a
  corrupt checkpoint (:func:`fedjax_sparse.simulation.io.load_checkpoint`),
  more rounds than ``cfg.rounds``, or round records that do not cover its
  checkpoint, or it cannot be written. Nothing is written before these
  checks.

  ``on_round(record)`` (optional) is called after each round with the
  round's record, as written to ``rounds.jsonl`` (e.g. to drive a sweep's
  overall progress display).
  """
  started = time.perf_counter()
  exp = Experiment(cfg, fd)
  if not cfg.output_dir:
    return _run_experiment(exp, cfg, progress, on_round, started)
  with run_safety.output_lock(cfg.output_dir):
    return _run_experiment(exp, cfg, progress, on_round, started)


def _run_experiment(exp: Experiment, cfg: ExperimentConfig, progress: bool,
                    on_round=None, started=None) -> dict:
  from fedjax_sparse.simulation.loop import run_loop
  return run_loop(SingleRunner(exp), progress=progress,
                  on_round=(None if on_round is None
                            else lambda i, rec: on_round(rec)),
                  started=started)[0]
