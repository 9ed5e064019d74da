"""The sparse mask ``c`` of mask-taking attacks (``hsa``, ``dhsa``), built once.

Computed on the initial model from the attackers' pooled data with
:func:`fedjax_sparse.saliency.compute_mask` (hybrid_sparse_attack.txt
section 3.2, App. B: "computed once, before training"); the per-layer
densities are reported in ``mask_densities.json`` and ``mask_densities.png``
(Fig. 8 of the paper). Used by :mod:`fedjax_sparse.attacks.builder`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

from fedjax_sparse import saliency
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


def check_attacker_data(attacker_x, attacker_y, what: str):
  """The attackers' pooled examples as numpy arrays (labels int32); a
  ValueError naming ``what`` where they are missing or do not match."""
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


def as_bool(value: Any, what: str) -> bool:
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
  fresh = as_bool(fresh_batches, "fresh_batches")
  if not saliency.needs_data(method):
    return saliency.compute_mask(method, float(delta), layout=layout, seed=seed,
                                 layer_caps=layer_caps)
  x, y = check_attacker_data(attacker_x, attacker_y, f"mask method {method!r}")
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
