"""What a rule or an attack needs from the run, declared beside its factory.

The run layer (``simulation/``, ``sweeps/``, ``metrics/``) never names a rule
or an attack: a factory declares what it needs with :func:`declare`, and the
run provides it. A new rule or attack that needs one of these is one file
with one decorator; nothing upstream changes.

Needs:

* :data:`SERVER_DATA`: the server's own labelled examples (the validation
  split, ``--val_size``), passed to the round step in ``RoundData.x_val`` /
  ``y_val``, which trains the server's own update on them and hands it to
  the rule as ``ctx.server_update`` (FLTrust's root data set).
* :data:`MODEL`: the model (``apply_fn``, ``unravel``, ``model_state``), the
  population size ``num_clients`` and per-class validation examples
  (``val_x``, ``val_y``), given to the factory as keyword arguments
  (class-aware masking evaluates each client's model); needs ``--val_size``.
* :data:`POPULATION`: the population size, given to the factory as
  ``num_clients`` (rules that keep per-client state, e.g. FoolsGold's
  update histories).
* :data:`SPARSIFIER`: the run's top-k ratio, given to the factory as
  ``topk_ratio`` (1 for dense uploads) unless the attack arguments set it
  (attacks that choose the exact mask they upload).
* :data:`AGGREGATOR`: the deployed rule as the run builds it (with its
  pre-aggregators), given to an attack's factory as ``aggregator``, with
  ``num_byzantine`` (the f the rule is told) and the run's pack top-k
  (``topk_ratio``, 1 for dense uploads, and ``pack_size``), unless the
  attack arguments set them; the round passes the rule's state in
  ``AttackContext.agg_state`` (attacks that search against the rule:
  ``optimal_ipm``, ``optimal_alie``).
* :data:`AUX_SET`: an attack's auxiliary set drawn by the attack builder,
  on which the run also reports the targeted accuracy and the OIF
  (SparseFed's targeted attack).
* :data:`SERVER`: the server's optimizer and schedule, given to a rule's
  factory as ``server_optimizer``, ``server_lr`` and ``rounds`` (a rule that
  returns the update that lands the server on a model it chose: CRFL).
* :data:`TEST_SPLIT`: the test split, given to a data attack's factory as
  ``test_x``, ``test_y`` (an attack whose poison is held-out data: the
  edge-case backdoor's edge cases).

Per-round side inputs need no declaration: they are typed fields of the
round context (:class:`fedjax_sparse.context.RoundContext`: ``clients``,
``lr``, ``local_steps``, ``malicious``, ``server_update``, ``client_rank``,
``agg_state``) that the round step fills whenever it has them; a rule or
attack that needs one raises when it is None.

Hooks (functions a factory carries for the metrics layer):

* ``asr_eval_set(attack_kwargs, x, y) -> (x_asr, y_target)``: a backdoor
  attack's triggered test set, whose accuracy is the attack success rate.
* ``held_out_test_rows(attack_kwargs, x, y) -> int[n]``: the rows of the
  test split ``x, y`` an attack takes for itself (missing arguments: the
  factory's defaults); the run leaves them out of its clean test metrics.

Example::

  @register("fltrust")
  @declare(SERVER_DATA)
  def fltrust() -> Aggregator: ...
"""

from __future__ import annotations

from typing import Any, Callable, Optional

SERVER_DATA = "server_data"
MODEL = "model"
AUX_SET = "aux_set"
POPULATION = "population"
SPARSIFIER = "sparsifier"
AGGREGATOR = "aggregator"
TEST_SPLIT = "test_split"
SERVER = "server"
NEEDS = (SERVER_DATA, MODEL, AUX_SET, POPULATION, SPARSIFIER, AGGREGATOR,
         TEST_SPLIT, SERVER)
HOOKS = ("asr_eval_set", "held_out_test_rows")

_NEEDS_ATTR = "__fedjax_needs__"
_HOOKS_ATTR = "__fedjax_hooks__"


def server_arguments(cfg) -> dict:
  """The keyword arguments of :data:`SERVER` from an experiment config."""
  return {"server_optimizer": cfg.server_optimizer,
          "server_lr": cfg.server_lr, "rounds": cfg.rounds}


def declare(*needs: str, **hooks: Callable) -> Callable:
  """A decorator that records ``needs`` and ``hooks`` on a factory.

  Raises:
    ValueError: an unknown need or hook name.
  """
  unknown = [n for n in needs if n not in NEEDS] + [
      h for h in hooks if h not in HOOKS]
  if unknown:
    raise ValueError(f"unknown need(s) or hook(s) {unknown}; known needs: "
                     f"{', '.join(NEEDS)}; hooks: {', '.join(HOOKS)}")

  def _do(factory):
    setattr(factory, _NEEDS_ATTR,
            frozenset(getattr(factory, _NEEDS_ATTR, ())) | frozenset(needs))
    setattr(factory, _HOOKS_ATTR,
            {**getattr(factory, _HOOKS_ATTR, {}), **hooks})
    return factory

  return _do


def needs_of(factory: Any) -> frozenset:
  """The needs ``factory`` declared (empty if none)."""
  return getattr(factory, _NEEDS_ATTR, frozenset())


def hook_of(factory: Any, name: str) -> Optional[Callable]:
  """The hook ``name`` of ``factory``, or None."""
  return getattr(factory, _HOOKS_ATTR, {}).get(name)


def aggregator_needs(name: str) -> frozenset:
  """The needs of the aggregation rule ``name`` (or its alias)."""
  from fedjax_sparse import aggregators
  return needs_of(aggregators.get(name))


def attack_factory(name: str):
  """The factory of the attack ``name`` (update or data), or None for
  ``"none"``."""
  if name == "none":
    return None
  from fedjax_sparse import attacks
  if attacks.is_update_attack(name):
    return attacks.get_update_attack(name)
  return attacks.get_data_attack(name)


def attack_needs(name: str) -> frozenset:
  """The needs of the attack ``name`` (empty for ``"none"``)."""
  factory = attack_factory(name)
  return needs_of(factory) if factory is not None else frozenset()


def attack_hook(name: str, hook: str) -> Optional[Callable]:
  """The hook ``hook`` of the attack ``name``, or None."""
  factory = attack_factory(name)
  return hook_of(factory, hook) if factory is not None else None
