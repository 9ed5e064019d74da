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
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from fedjax_sparse import saliency
from fedjax_sparse.attacks.base import UpdateAttack
from fedjax_sparse.attacks.registry import get_update_attack
from fedjax_sparse.layout import Layout

PyTree = Any

# Options of mask-taking attacks, popped before the factory is called, with
# their defaults: FORCE (Pi_F), delta = 5e-3, T = 100 steps and gradients
# averaged over 3 batches (ALGORITHMS.md section 6; hybrid paper App. B.3).
# The batch size of the saliency batches (64) is ours. ``fresh_batches``
# (FORCE only): True draws 3 fresh batches at every one of the T steps
# (hybrid paper Alg. 4 line 7); the default False keeps the earlier
# behaviour, 3 batches drawn once and reused at every step, so that the
# committed results reproduce (ours).
MASK_OPTIONS: dict[str, Any] = {
    "mask_method": "force",
    "delta": 5e-3,
    "caps": None,
    "force_steps": 100,
    "num_batches": 3,
    "batch_size": 64,
    "fresh_batches": False,
}

# Options of ``targeted_pgd`` made here, with their defaults: s = 50 is the
# cross-silo auxiliary set size of sparsefed.txt Table 1; the seed is ours;
# the auxiliary points are test points (sparsefed.txt 3.2, B.5, B.8: "All
# auxiliary datapoints are drawn from the CIFAR validation set"), or with
# aux_source="train" the attackers' own training examples (what this
# library did before the option existed).
TARGETED_OPTIONS: dict[str, Any] = {"aux_size": 50, "aux_seed": 0,
                                    "aux_source": "test"}
AUX_SOURCES = ("test", "train")
# Factory arguments of ``targeted_pgd`` the builder supplies itself.
_TARGETED_MADE = ("loss_fn", "unravel", "aux_x", "aux_y")

MASK_DENSITIES_JSON = "mask_densities.json"
MASK_DENSITIES_PNG = "mask_densities.png"


def parse_caps(caps: Any) -> Optional[dict[str, float]]:
  """Parses per-layer density caps (Alg. 5-7) from a flag value.

  ``"last_dense:0.25,first_conv:0.2"`` -> ``{"last_dense": 0.25,
  "first_conv": 0.2}``. Pairs may also be separated by ``;``, ``+``, ``|``
  or spaces (ours): a comma already separates ``--attack_args`` entries, so
  write ``caps=last_dense:0.25;first_conv:0.2`` there. Names are leaf
  names, module prefixes or the aliases of
  :func:`fedjax_sparse.saliency.resolve_layer_caps`; the names are checked
  against the model when the mask is built.

  Args:
    caps: a string as above, a mapping (returned as a dict of floats), or
      None / ``""`` / ``"none"`` (no caps).

  Returns:
    ``{name: max density}`` or None.
  """
  if caps is None:
    return None
  if isinstance(caps, Mapping):
    items = list(caps.items())
  elif isinstance(caps, str):
    text = caps.strip()
    if text.lower() in ("", "none"):
      return None
    items = []
    for part in filter(None, re.split(r"[,;+|\s]+", text)):
      if ":" not in part:
        raise ValueError(f"bad layer cap {part!r} in {caps!r}: write name:density "
                         "pairs, e.g. 'last_dense:0.25,first_conv:0.2'")
      name, value = part.rsplit(":", 1)
      items.append((name.strip(), value))
  else:
    raise ValueError(f"layer caps must be a string such as 'last_dense:0.25' or a "
                     f"dict, got {caps!r}")
  out = {}
  for name, value in items:
    try:
      v = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"layer cap {name!r}: {value!r} is not a number") from None
    if not name or not 0.0 < v <= 1.0:
      raise ValueError(f"layer cap {name!r}:{value} must name a layer and have a "
                       "density in (0, 1]")
    out[str(name)] = v
  return out or None


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
    params = [p for p in params if p not in _TARGETED_MADE] + list(TARGETED_OPTIONS)
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


def _check_attacker_data(attacker_x, attacker_y, what: str):
  if attacker_x is None or attacker_y is None:
    raise ValueError(f"{what} needs the attackers' data (attacker_x, attacker_y)")
  x = np.asarray(attacker_x)
  y = np.asarray(attacker_y)
  if x.shape[0] != y.shape[0] or y.ndim != 1:
    raise ValueError(f"attacker_x ({x.shape}) and attacker_y ({y.shape}) must hold "
                     "the same examples, labels int[n]")
  if x.shape[0] == 0:
    raise ValueError(f"{what} needs the attackers' data, got 0 examples")
  return x, y.astype(np.int32)


def attacker_batches(x: np.ndarray, y: np.ndarray, num_batches: int,
                     batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``num_batches`` batches of the attackers' pooled data for the saliency.

  Rows are drawn without replacement when the pool holds
  ``num_batches * batch_size`` examples, with replacement otherwise (ours).

  Returns:
    ``(x [num_batches, batch_size, ...], y int32[num_batches, batch_size])``.
  """
  if num_batches < 1 or batch_size < 1:
    raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches}, "
                     f"{batch_size}")
  n = x.shape[0]
  total = num_batches * batch_size
  rng = np.random.default_rng(seed)
  idx = rng.choice(n, size=total, replace=n < total)
  return (x[idx].reshape((num_batches, batch_size) + x.shape[1:]),
          y[idx].reshape((num_batches, batch_size)))


def _as_bool(value: Any, what: str) -> bool:
  """A flag value as a bool: True/False, 1/0 or their spellings as strings."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)) and value in (0, 1):
    return bool(value)
  if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false",
                                                           "0", "no"):
    return value.strip().lower() in ("true", "1", "yes")
  raise ValueError(f"{what} must be true or false, got {value!r}")


def build_mask(method: str, delta: float, *, layout: Layout, params: PyTree,
               loss_fn: Callable, attacker_x, attacker_y, seed: int,
               caps: Any = None, force_steps: int = 100, num_batches: int = 3,
               batch_size: int = 64, fresh_batches: Any = False) -> saliency.MaskResult:
  """HSA's sparse mask ``c`` on the initial model (hybrid paper 3.2, App. B).

  Data-free methods (``random*``, ``erk*``) use ``layout`` and ``seed``.
  Saliency methods (``snip*``, ``force*``) use the attackers' pooled data:

  * ``fresh_batches=False`` (default, the earlier behaviour): ``num_batches``
    batches of ``batch_size`` are drawn once (:func:`attacker_batches`);
    FORCE averages its gradient over all of them at every one of its
    ``force_steps`` steps, SNIP over all of them once.
  * ``fresh_batches=True`` (``force*`` only; Alg. 4 line 7): the whole pool
    goes to :func:`fedjax_sparse.saliency.force_mask`, which draws
    ``num_batches`` fresh batches of ``batch_size`` at every step (seeded by
    ``seed``). SNIP ignores it.

  Returns:
    :class:`~fedjax_sparse.saliency.MaskResult`.
  """
  layer_caps = parse_caps(caps)
  fresh = _as_bool(fresh_batches, "fresh_batches")
  if not saliency.needs_data(method):
    return saliency.compute_mask(method, float(delta), layout=layout, seed=seed,
                                 layer_caps=layer_caps)
  x, y = _check_attacker_data(attacker_x, attacker_y, f"mask method {method!r}")
  if fresh and method.startswith("force"):
    return saliency.compute_mask(method, float(delta), params=params, layout=layout,
                                 loss_fn=loss_fn, x=x, y=y, seed=seed,
                                 layer_caps=layer_caps, steps=int(force_steps),
                                 num_batches=int(num_batches), fresh_batches=True,
                                 batch_size=int(batch_size))
  xb, yb = attacker_batches(x, y, int(num_batches), int(batch_size), seed)
  return saliency.compute_mask(method, float(delta), params=params, layout=layout,
                               loss_fn=loss_fn, x=xb, y=yb, layer_caps=layer_caps,
                               steps=int(force_steps), num_batches=int(num_batches),
                               fresh_batches=False)


def write_mask_report(output_dir: str, result: saliency.MaskResult,
                      meta: Optional[Mapping] = None) -> None:
  """Writes ``mask_densities.json`` and ``mask_densities.png`` to ``output_dir``."""
  os.makedirs(output_dir, exist_ok=True)
  saliency.write_densities_json(os.path.join(output_dir, MASK_DENSITIES_JSON), result,
                                meta)
  saliency.plot_densities(os.path.join(output_dir, MASK_DENSITIES_PNG), result,
                          title=f"{result.method} mask, delta={result.delta:g}, "
                          f"{result.num_kept} kept")


def targeted_auxiliary_set(pool_x, pool_y, num_classes: int, size: int = 50,
                           seed: int = 0, return_index: bool = False):
  """An auxiliary set of ``targeted_pgd`` drawn from the pool ``pool_x, pool_y``.

  ``size`` points of the pool, each label flipped to a wrong class
  (:func:`~fedjax_sparse.attacks.make_auxiliary_set`); ``size`` is capped
  at the pool size. Which pool: :func:`targeted_auxiliary_data`.

  Returns:
    ``(x [s, ...], y_flipped int32[s])``, and with ``return_index`` the
    drawn rows' positions in the pool, ``int[s]``.
  """
  from fedjax_sparse.attacks.targeted import make_auxiliary_set
  x, y = _check_attacker_data(pool_x, pool_y, "targeted_pgd")
  return make_auxiliary_set(x, y, min(int(size), len(y)), int(num_classes),
                            int(seed), return_index=return_index)


class TargetedAux(NamedTuple):
  """The auxiliary set of ``targeted_pgd`` and where it came from.

  Attributes:
    x: ``[s, ...]`` auxiliary inputs.
    y: ``int32[s]`` their flipped labels (the attack's targets).
    test_index: ``int[s]`` the points' rows in the test split
      (``aux_source="test"``), or None (``"train"``: rows of the attackers'
      pooled training data).
  """

  x: np.ndarray
  y: np.ndarray
  test_index: Optional[np.ndarray]


def check_aux_source(source: Any) -> str:
  """``source`` if it is one of :data:`AUX_SOURCES`, else a ValueError."""
  if source not in AUX_SOURCES:
    raise ValueError(f"targeted_pgd: unknown aux_source {source!r}; choose "
                     f"one of {', '.join(AUX_SOURCES)} (test: the paper's "
                     "auxiliary set of test points)")
  return source


def targeted_auxiliary_data(options: Optional[Mapping[str, Any]] = None, *,
                            num_classes: int, attacker_x=None, attacker_y=None,
                            test_x=None, test_y=None) -> TargetedAux:
  """The auxiliary set of ``targeted_pgd`` for its flag options.

  sparsefed.txt 3.2 (and B.5, B.8): "we sample s points from the test
  distribution. We then flip the label to one of the labels that is not the
  ground truth"; the points are drawn from the test (validation) set, never
  from training data (ALGORITHMS.md section 8, reproduction rules). With
  ``aux_source="test"`` (the default) they are ``aux_size`` rows of
  ``test_x, test_y`` drawn with ``aux_seed``; the experiment then leaves
  them out of its test-accuracy evaluation, as the paper measures stealth
  on "the validation set not including the auxiliary set" (B.5, Table 11).
  ``aux_source="train"`` draws them from the attackers' pooled training
  examples ``attacker_x, attacker_y`` instead (ours; how the committed
  ``experiments/results/sparsefed_targeted*`` runs were made).

  The attack and the targeted-accuracy evaluation must use one set:
  :class:`~fedjax_sparse.simulation.experiment.Experiment` builds it here
  once and hands it to :func:`build_update_attack` (``targeted_aux``).

  Args:
    options: the attack's flag arguments; only ``aux_size``, ``aux_seed``
      and ``aux_source`` (:data:`TARGETED_OPTIONS`) are read.
    num_classes: number of classes (the label flips).
    attacker_x, attacker_y: the attackers' pooled training examples
      (``aux_source="train"``).
    test_x, test_y: the test split (``aux_source="test"``).

  Raises:
    ValueError: an unknown ``aux_source`` or a missing pool.
  """
  opts = {k: (options or {}).get(k, v) for k, v in TARGETED_OPTIONS.items()}
  source = check_aux_source(opts["aux_source"])
  if source == "test":
    if test_x is None or test_y is None:
      raise ValueError("targeted_pgd with aux_source=test needs the test "
                       "split (test_x, test_y); or set aux_source=train")
    x, y, idx = targeted_auxiliary_set(test_x, test_y, num_classes,
                                       opts["aux_size"], opts["aux_seed"],
                                       return_index=True)
    return TargetedAux(x, y, np.asarray(idx))
  x, y = targeted_auxiliary_set(attacker_x, attacker_y, num_classes,
                                opts["aux_size"], opts["aux_seed"])
  return TargetedAux(x, y, None)


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
    opts["fresh_batches"] = _as_bool(opts["fresh_batches"], "fresh_batches")
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
