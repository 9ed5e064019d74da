"""Static description of a flattened parameter pytree.

Updates travel through aggregators, attacks and sparsifiers as flat ``f32[d]``
vectors (``jax.flatten_util.ravel_pytree`` order). Rules that work per layer
(LASA, FLGuardian, FORCE's layer-wise constraint, layer-aware masks) need to
know where each leaf lives in that vector; a :class:`Layout` says so. It is a
hashable, static Python object: close over it, never pass it as a traced value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np


def _path_name(path) -> str:
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      parts.append(str(p.key))
    elif isinstance(p, jax.tree_util.GetAttrKey):
      parts.append(str(p.name))
    elif isinstance(p, jax.tree_util.SequenceKey):
      parts.append(str(p.idx))
    else:
      parts.append(str(p))
  return "/".join(parts)


def _leaf_kind(name: str, shape: tuple[int, ...]) -> str:
  """Classifies a leaf as 'conv', 'dense', 'bias', 'scale' or 'other'."""
  last = name.rsplit("/", 1)[-1]
  if last == "kernel":
    return "conv" if len(shape) == 4 else "dense"
  if last == "bias":
    return "bias"
  if last == "scale":
    return "scale"
  return "other"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each leaf of a parameter pytree lives in its flat vector.

  Attributes:
    names: leaf paths such as ``"Dense_0/kernel"``, in ravel order.
    shapes: leaf shapes.
    offsets: start of each leaf in the flat vector.
    sizes: number of parameters per leaf.
    kinds: ``"conv"``, ``"dense"`` (prunable kernels), ``"bias"``, ``"scale"``
      (normalisation) or ``"other"``.
  """

  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  offsets: tuple[int, ...]
  sizes: tuple[int, ...]
  kinds: tuple[str, ...]

  @property
  def d(self) -> int:
    return int(sum(self.sizes))

  @property
  def num_leaves(self) -> int:
    return len(self.names)

  def prunable(self) -> np.ndarray:
    """bool[num_leaves]: convolution and dense kernels (HSA section 3.2)."""
    return np.array([k in ("conv", "dense") for k in self.kinds])

  def segment_ids(self) -> np.ndarray:
    """int32[d]: the leaf index of every coordinate of the flat vector."""
    return np.repeat(np.arange(self.num_leaves, dtype=np.int32),
                     np.asarray(self.sizes, dtype=np.int64))

  def slices(self) -> list[slice]:
    return [slice(o, o + s) for o, s in zip(self.offsets, self.sizes)]


def layout_of(params: Any) -> Layout:
  """Builds the :class:`Layout` of a parameter pytree (ravel_pytree order)."""
  leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  names, shapes, offsets, sizes, kinds = [], [], [], [], []
  offset = 0
  for path, leaf in leaves_with_path:
    shape = tuple(int(s) for s in np.shape(leaf))
    size = int(math.prod(shape))
    name = _path_name(path)
    names.append(name)
    shapes.append(shape)
    offsets.append(offset)
    sizes.append(size)
    kinds.append(_leaf_kind(name, shape))
    offset += size
  return Layout(tuple(names), tuple(shapes), tuple(offsets), tuple(sizes),
                tuple(kinds))
