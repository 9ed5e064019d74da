"""Name -> mask method registry and one entry point, :func:`compute_mask`.

Names follow the hybrid paper's notation (Table XI): ``Pi_r`` ``"random"``,
``Pi_r^+`` ``"random_plus"``, ``Pi_ERK^+`` ``"erk_plus"``, ``Pi_F`` ``"force"``,
``Pi_F^+`` ``"force_plus"``, and SNIP (App. B.2) ``"snip"``/``"snip_plus"``;
``"+"`` keeps every critical parameter (biases, norms) in the mask.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

from fedjax_sparse.layout import Layout, layout_of
from fedjax_sparse.saliency import masks as _masks
from fedjax_sparse.saliency import pruning as _pruning

_DATA_FREE = {
    "random": functools.partial(_masks.random_mask, include_critical=False),
    "random_plus": functools.partial(_masks.random_mask, include_critical=True),
    "erk": functools.partial(_masks.erk_mask, include_critical=False),
    "erk_plus": functools.partial(_masks.erk_mask, include_critical=True),
}
_DATA = {
    "snip": functools.partial(_pruning.snip_mask, include_critical=False),
    "snip_plus": functools.partial(_pruning.snip_mask, include_critical=True),
    "force": functools.partial(_pruning.force_mask, include_critical=False),
    "force_plus": functools.partial(_pruning.force_mask, include_critical=True),
}


def names() -> list[str]:
  """The registered mask methods."""
  return sorted(set(_DATA_FREE) | set(_DATA))


def needs_data(method: str) -> bool:
  _check(method)
  return method in _DATA


def _check(method: str) -> None:
  if method not in _DATA_FREE and method not in _DATA:
    raise ValueError(f"unknown mask method {method!r}; known mask methods: "
                     f"{', '.join(names())}")


def compute_mask(method: str, delta: float, *, params: Any = None,
                 layout: Optional[Layout] = None,
                 loss_fn: Optional[Callable] = None, x=None, y=None,
                 seed: int = 0, layer_caps: Optional[Mapping[str, float]] = None,
                 steps: int = 100, num_batches: int = 3, fresh_batches: bool = True,
                 batch_size: Optional[int] = None) -> _masks.MaskResult:
  """Builds HSA's sparse mask ``c`` with a registered method.

  Args:
    method: one of :func:`names`.
    delta: kept fraction of the prunable parameters (``"random"``: of all).
    params: the initial model pytree (needed by ``snip*``/``force*``; the
      layout is taken from it when ``layout`` is None).
    layout: the model's layout (enough for ``random*``/``erk*``).
    loss_fn, x, y: ``loss_fn(params, x, y)`` and the attackers' batches
      (``snip*``/``force*``).
    seed: numpy seed of the random positions (``random*``/``erk*``) and of
      FORCE's fresh batches (``force*``).
    layer_caps: per-layer maximum densities (``snip*``/``force*``).
    steps, num_batches: FORCE's T and batches averaged per step.
    fresh_batches, batch_size: ``force*`` only (see
      :func:`~fedjax_sparse.saliency.force_mask`): True (default) draws
      ``num_batches`` fresh batches of ``batch_size`` (None: the size of the
      given batches) from the examples of ``x``, ``y`` at every step, as
      Alg. 4 line 7; False cycles through the given batches.

  Returns:
    :class:`~fedjax_sparse.saliency.MaskResult`.
  """
  _check(method)
  if method in _DATA_FREE:
    if layer_caps:
      raise ValueError(f"layer_caps apply to saliency methods (snip, force), not {method!r}")
    if layout is None:
      if params is None:
        raise ValueError(f"{method!r} needs a layout or params")
      layout = layout_of(params)
    return _DATA_FREE[method](layout, delta, seed=seed)
  if params is None or loss_fn is None or x is None or y is None:
    raise ValueError(f"{method!r} needs params, loss_fn, x and y (the attackers' batches)")
  if method.startswith("snip"):
    return _DATA[method](loss_fn, params, x, y, delta, layer_caps=layer_caps)
  return _DATA[method](loss_fn, params, x, y, delta, steps=steps,
                       num_batches=num_batches, layer_caps=layer_caps,
                       fresh_batches=fresh_batches, batch_size=batch_size, seed=seed)
