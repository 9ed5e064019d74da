"""Builds an update attack from its name and flag arguments.

The one place the experiment layer turns ``--attack=hsa
--attack_args="z2=1.5,mask_method=force,delta=0.005"`` into an
:class:`~fedjax_sparse.attacks.UpdateAttack` (ALGORITHMS.md sections 5-6)::

  attack = build_update_attack(
      "hsa", {"z2": 1.5, "mask_method": "force", "delta": 5e-3},
      layout=layout, params=params, apply_fn=model.apply,
      attacker_x=x_mal, attacker_y=y_mal, key=key, num_classes=10,
      output_dir=run_dir)

Three kinds of attack:

* Attacks that take a sparse mask ``c`` (a factory parameter named ``mask``:
  ``hsa``, ``dhsa``). The mask options are popped from the arguments
  (:data:`MASK_OPTIONS`), the mask is computed once, on the initial model
  ``params``, from the attackers' pooled data, with
  :func:`fedjax_sparse.saliency.compute_mask` (hybrid_sparse_attack.txt
  section 3.2, App. B: "computed once, before training"), and handed to the
  factory. With ``output_dir`` the per-layer densities are written to
  ``mask_densities.json`` and ``mask_densities.png`` (Fig. 8 of the paper).
  ``c_lasa`` computes its locations every round from the updates (Alg. 10)
  and takes no mask: its own ``delta`` is the fraction of smallest
  magnitudes, not a mask density.
* ``targeted_pgd`` (sparsefed.txt B.1.2, Alg. 6) trains inside the round
  step, so it needs the loss, the flat-to-pytree ``unravel`` and an
  auxiliary set: all are made here (:func:`targeted_auxiliary_data`; the
  auxiliary set comes from test points, as in the paper, unless
  ``aux_source=train``).
* Every other attack: ``factory(**kwargs)``.

Unknown arguments raise a ValueError naming the attack and the arguments it
accepts (its factory's signature plus the options popped here).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from fedjax_sparse.attacks._masks import (MASK_DENSITIES_JSON,
                                          MASK_DENSITIES_PNG, MASK_OPTIONS,
                                          as_bool, attacker_batches,
                                          build_mask, parse_caps,
                                          write_mask_report)
from fedjax_sparse.attacks._targeted_aux import (AUX_SOURCES, TARGETED_MADE,
                                                 TARGETED_OPTIONS, TargetedAux,
                                                 check_aux_source,
                                                 targeted_auxiliary_data,
                                                 targeted_auxiliary_set)
from fedjax_sparse.attacks.base import UpdateAttack
from fedjax_sparse.attacks.registry import get_update_attack
from fedjax_sparse.layout import Layout

# The masks' and the auxiliary set's names are importable from here too.
__all__ = ["AUX_SOURCES", "MASK_DENSITIES_JSON", "MASK_DENSITIES_PNG",
           "MASK_OPTIONS", "TARGETED_OPTIONS", "TargetedAux",
           "accepted_arguments", "attack_space", "attacker_batches",
           "build_mask", "build_update_attack", "check_aux_source",
           "cross_entropy", "parse_caps", "takes_mask",
           "targeted_auxiliary_data", "targeted_auxiliary_set",
           "write_mask_report"]

PyTree = Any


def _factory_params(factory: Callable) -> list[str]:
  return [p.name for p in inspect.signature(factory).parameters.values()
          if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                        inspect.Parameter.KEYWORD_ONLY)]


def takes_mask(name: str) -> bool:
  """Whether update attack ``name`` takes a sparse mask ``c`` (``mask``)."""
  return "mask" in _factory_params(get_update_attack(name))


def accepted_arguments(name: str) -> list[str]:
  """The flag arguments :func:`build_update_attack` accepts for ``name``."""
  params = _factory_params(get_update_attack(name))
  if "mask" in params:
    params = [p for p in params if p != "mask"] + list(MASK_OPTIONS)
  if name == "targeted_pgd":
    params = [p for p in params if p not in TARGETED_MADE] + list(TARGETED_OPTIONS)
  return params


def _check_arguments(name: str, kwargs: Mapping[str, Any]) -> None:
  accepted = accepted_arguments(name)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(
        f"update attack {name!r} takes no argument(s) {', '.join(unknown)}; it "
        f"accepts: {', '.join(accepted) if accepted else '(none)'}")


def _seed(key: jax.Array) -> int:
  """A numpy seed drawn from a JAX key (typed or raw)."""
  return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def cross_entropy(apply_fn: Callable, model_state: Optional[PyTree] = None) -> Callable:
  """``loss_fn(params, x, y)``: mean softmax cross-entropy, inference mode.

  ``apply_fn({"params": params, **model_state}, x, train=False)``: the
  normalisation statistics, if any, are those of ``model_state`` (the
  initial model's, ours: the mask and the attack are built once, before
  training).
  """
  state = dict(model_state or {})

  def loss_fn(params, x, y):
    logits = apply_fn({"params": params, **state}, x, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return loss_fn


def attack_space(name: str, kwargs: Optional[Mapping[str, Any]] = None) -> Optional[str]:
  """The threat model an update attack runs in: ``"model"`` or ``"update"``.

  For attacks whose factory takes ``space`` (ALGORITHMS.md section 5), the
  value in ``kwargs`` or the factory's default; None for every other attack
  (data attacks included).
  """
  from fedjax_sparse.attacks.registry import is_update_attack
  if not is_update_attack(name):
    return None
  params = inspect.signature(get_update_attack(name)).parameters
  if "space" not in params:
    return None
  return str((kwargs or {}).get("space", params["space"].default))


def build_update_attack(name: str, kwargs: Optional[Mapping[str, Any]] = None, *,
                        layout: Layout, params: PyTree, apply_fn: Callable,
                        attacker_x, attacker_y, key: jax.Array, num_classes: int,
                        model_state: Optional[PyTree] = None,
                        output_dir: Optional[str] = None,
                        test_x=None, test_y=None,
                        targeted_aux: Optional[TargetedAux] = None
                        ) -> UpdateAttack:
  """Builds update attack ``name`` from flag arguments (see module docstring).

  Args:
    name: a registered update attack (``hsa``, ``alie``, ...).
    kwargs: its arguments as Python values, e.g. parsed from
      ``"z2=1.5,mask_method=force,delta=0.005,caps=last_dense:0.25"``. For
      mask-taking attacks (``hsa``, ``dhsa``) also the mask options
      (:data:`MASK_OPTIONS`): ``mask_method`` (a
      :func:`fedjax_sparse.saliency.names` method, default ``"force"``),
      ``delta`` (kept fraction, 5e-3), ``caps`` (per-layer caps, a string
      for :func:`parse_caps` or a dict; None), ``force_steps`` (FORCE's T,
      100), ``num_batches`` (3, averaged per step) and ``batch_size`` (64)
      of the saliency batches, ``fresh_batches`` (False: the batches are
      drawn once and reused at every FORCE step; True: fresh ones at every
      step, hybrid paper Alg. 4; see :func:`build_mask`). For
      ``targeted_pgd``: ``aux_size`` (s, 50), ``aux_seed`` (0) and
      ``aux_source`` (``"test"``, the paper's test points, or ``"train"``,
      the attackers' data) of :func:`targeted_auxiliary_data`, plus the
      factory's
      ``clip_norm`` (set it to the server's clipping norm), ``lr``,
      ``steps``, ``batch_size``, ``onto``.
    layout: the layout of the flat updates (of ``params``).
    params: the initial global model (pytree); the mask is computed on it.
    apply_fn: ``apply_fn(variables, x, train=False) -> logits``.
    attacker_x, attacker_y: numpy arrays of all malicious clients' training
      examples (pooled); unused by attacks that need no data.
    key: PRNG key of the builder's random choices (mask positions of
      ``random*``/``erk*``, the saliency batches).
    num_classes: number of classes (the auxiliary set's label flips).
    model_state: the model's non-parameter collections (BatchNorm
      statistics), or None.
    output_dir: where to write the mask reports, or None.
    test_x, test_y: the test split, the pool of ``targeted_pgd``'s
      auxiliary set with ``aux_source="test"``.
    targeted_aux: ``targeted_pgd``'s auxiliary set, already drawn
      (:func:`targeted_auxiliary_data`), so that the caller evaluates on the
      very set the attack uses; None: drawn here from the options.

  Returns:
    The :class:`~fedjax_sparse.attacks.UpdateAttack`.

  Raises:
    ValueError: unknown attack or arguments (the message lists the accepted
      ones), bad mask options, missing attacker data where it is needed.
  """
  factory = get_update_attack(name)
  kwargs = dict(kwargs or {})
  _check_arguments(name, kwargs)
  d = ravel_pytree(params)[0].shape[0] if params is not None else layout.d
  if layout.d != d:
    raise ValueError(f"layout has d={layout.d} but params have d={d}")

  if takes_mask(name):
    opts = {k: kwargs.pop(k, v) for k, v in MASK_OPTIONS.items()}
    opts["fresh_batches"] = as_bool(opts["fresh_batches"], "fresh_batches")
    seed = _seed(key)
    result = build_mask(opts["mask_method"], opts["delta"], layout=layout,
                        params=params, loss_fn=cross_entropy(apply_fn, model_state),
                        attacker_x=attacker_x, attacker_y=attacker_y, seed=seed,
                        caps=opts["caps"], force_steps=opts["force_steps"],
                        num_batches=opts["num_batches"],
                        batch_size=opts["batch_size"],
                        fresh_batches=opts["fresh_batches"])
    if output_dir is not None:
      meta = {"attack": name, "d": int(layout.d), "seed": seed, **opts,
              "caps": parse_caps(opts["caps"])}
      write_mask_report(output_dir, result, meta)
    return factory(mask=result, **kwargs)

  if name == "targeted_pgd":
    opts = {k: kwargs.pop(k, v) for k, v in TARGETED_OPTIONS.items()}
    aux = targeted_aux
    if aux is None:
      aux = targeted_auxiliary_data(opts, num_classes=num_classes,
                                    attacker_x=attacker_x,
                                    attacker_y=attacker_y, test_x=test_x,
                                    test_y=test_y)
    else:
      check_aux_source(opts["aux_source"])
    aux_x, aux_y = aux.x, aux.y
    unravel = ravel_pytree(params)[1]
    return factory(loss_fn=cross_entropy(apply_fn, model_state), unravel=unravel,
                   aux_x=aux_x, aux_y=aux_y, **kwargs)

  return factory(**kwargs)
