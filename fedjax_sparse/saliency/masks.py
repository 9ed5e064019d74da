"""Sparse masks for HSA: common pieces, random masks and ERK.

hybrid_sparse_attack.txt section 3.2, App. B.1, B.3; ALGORITHMS.md section 6.

* Prunable parameters are the convolution and dense kernels (Layout kinds
  ``"conv"``, ``"dense"``). "Critical" parameters (biases, normalisation
  scales and offsets: kinds ``"bias"``, ``"scale"``, ``"other"``) are always 1
  in ``c`` for the ``"+"`` variants (``include_critical=True``) and 0
  otherwise; they never count towards the kept number, which is
  ``floor(delta * d_prunable)`` for every method except ``"random"``.
* Every method returns a :class:`MaskResult`: the flat ``bool[d]`` mask (in
  ``ravel_pytree`` order) and the per-leaf densities.
* Layer caps (Alg. 5-7) are given as ``{name: max_density}``: a leaf name
  (``"Dense_1/kernel"``), a module prefix (``"Dense_1"``) or an alias:
  ``"first_conv"`` / ``"last_dense"`` (the first convolution and the last
  dense kernel in ravel order, the paper's ``delta_cw1^max`` and
  ``delta_FC^max``), ``"first"`` / ``"last"`` (first/last prunable kernel),
  ``"all"`` (every prunable kernel, the paper's uniform ``delta^max``).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional

import numpy as np

from fedjax_sparse.layout import Layout

CRITICAL_KINDS = ("bias", "scale", "other")
CAP_ALIASES = ("first_conv", "last_dense", "first", "last", "all")


class MaskResult(NamedTuple):
  """A sparse mask and how it spreads over the layers.

  Attributes:
    mask: ``bool[d]`` numpy mask ``c`` (ravel order).
    densities: ``{leaf name: kept / size}`` for every leaf.
    counts: ``{leaf name: kept}`` for every leaf.
    method: the method's registered name.
    delta: the target density of the prunable parameters.
  """

  mask: np.ndarray
  densities: dict
  counts: dict
  method: str
  delta: float

  @property
  def num_kept(self) -> int:
    return int(self.mask.sum())


def critical_mask(layout: Layout) -> np.ndarray:
  """``bool[d]``: coordinates of critical parameters (biases, norm scales)."""
  crit = np.array([k in CRITICAL_KINDS for k in layout.kinds])
  return np.repeat(crit, layout.sizes)


def prunable_mask(layout: Layout) -> np.ndarray:
  """``bool[d]``: coordinates of prunable kernels (conv and dense)."""
  return np.repeat(layout.prunable(), layout.sizes)


def prunable_leaves(layout: Layout) -> list[int]:
  """Indices of the prunable leaves, in ravel order."""
  return [i for i, p in enumerate(layout.prunable()) if p]


def num_target(d_prunable: int, delta: float) -> int:
  """``floor(delta * d_prunable)``, checked to be in ``[1, d_prunable]``."""
  if not 0.0 < delta <= 1.0:
    raise ValueError(f"delta (the kept fraction) must be in (0, 1], got {delta}")
  n = int(math.floor(delta * d_prunable + 1e-9))
  if n < 1:
    raise ValueError(f"delta={delta} keeps no parameter of {d_prunable} prunable "
                     "ones; raise delta")
  return n


def resolve_layer_caps(layout: Layout,
                       caps: Optional[Mapping[str, float]]) -> np.ndarray:
  """Per prunable leaf maximum density ``delta_l`` (1 when not capped).

  Args:
    layout: the model's layout.
    caps: ``{name or alias: max density in (0, 1]}`` (see module docstring);
      later keys override earlier ones.

  Returns:
    ``f64[L_prunable]`` in the order of :func:`prunable_leaves`.
  """
  leaves = prunable_leaves(layout)
  out = np.ones((len(leaves),))
  if not caps:
    return out
  names = [layout.names[i] for i in leaves]
  kinds = [layout.kinds[i] for i in leaves]
  for key, value in caps.items():
    value = float(value)
    if not 0.0 < value <= 1.0:
      raise ValueError(f"layer cap {key!r}={value} must be in (0, 1]")
    if key == "all":
      hit = list(range(len(leaves)))
    elif key == "first":
      hit = [0]
    elif key == "last":
      hit = [len(leaves) - 1]
    elif key == "first_conv":
      hit = [j for j, k in enumerate(kinds) if k == "conv"][:1]
    elif key == "last_dense":
      hit = [j for j, k in enumerate(kinds) if k == "dense"][-1:]
    else:
      hit = [j for j, n in enumerate(names) if n == key or n.startswith(key + "/")]
    if not hit:
      raise ValueError(f"layer cap {key!r} matches no prunable kernel; known: "
                       f"{', '.join(names)} and the aliases {', '.join(CAP_ALIASES)}")
    out[hit] = value
  return out


def densities_of(layout: Layout, mask: np.ndarray) -> tuple[dict, dict]:
  """``({leaf: density}, {leaf: count})`` of a flat mask."""
  dens, cnt = {}, {}
  for name, sl, size in zip(layout.names, layout.slices(), layout.sizes):
    c = int(mask[sl].sum())
    cnt[name] = c
    dens[name] = c / size if size else 0.0
  return dens, cnt


def make_result(layout: Layout, mask: np.ndarray, method: str, delta: float) -> MaskResult:
  mask = np.asarray(mask, bool)
  dens, cnt = densities_of(layout, mask)
  return MaskResult(mask, dens, cnt, method, float(delta))


def assemble(layout: Layout, prunable_part: np.ndarray,
             include_critical: bool) -> np.ndarray:
  """Full ``bool[d]`` mask from the concatenated prunable-leaf mask."""
  mask = np.zeros((layout.d,), bool)
  if include_critical:
    mask |= critical_mask(layout)
  pm = prunable_mask(layout)
  mask[pm] = np.asarray(prunable_part, bool)
  return mask


def schedule(d_prunable: int, delta: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """FORCE's exponential sparsity schedule (App. B.3, eq. 32).

  ``n_t = exp(alpha log(floor(delta d)) + (1 - alpha) log d)``, ``alpha = t/T``,
  ``t = 1..T``, floored (``n_T = floor(delta d)`` exactly).

  Returns:
    ``(counts int64[T], fractions f64[T])`` with ``fractions = counts / d``.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  n_final = num_target(d_prunable, delta)
  t = np.arange(1, steps + 1) / steps
  val = np.exp(t * math.log(n_final) + (1 - t) * math.log(d_prunable))
  counts = np.floor(val * (1 + 1e-12)).astype(np.int64)
  counts = np.clip(counts, n_final, d_prunable)
  counts[-1] = n_final
  return counts, counts / d_prunable


def scheduled_caps(sizes: np.ndarray, caps: np.ndarray, fractions: np.ndarray) -> np.ndarray:
  """Per step and layer cap counts, ``floor(d_l min(delta_t / delta * delta_l, 1))``.

  eq. 33. ``delta`` is taken as the final scheduled density ``delta_T =
  floor(delta d) / d`` so that the last step's caps are exactly
  ``floor(d_l delta_l)``.

  Returns:
    ``int64[T, L]``.
  """
  ratio = fractions / fractions[-1]
  dens = np.minimum(ratio[:, None] * caps[None, :], 1.0)
  return np.floor(dens * np.asarray(sizes)[None, :] + 1e-9).astype(np.int64)


def random_mask(layout: Layout, delta: float, seed: int = 0,
                include_critical: bool = False) -> MaskResult:
  """Random masks (hybrid paper eq. 22, Table XI ``Pi_r``, ``Pi_r^+``).

  ``include_critical=False`` (``"random"``): ``floor(delta d)`` positions drawn
  uniformly over all parameters. ``True`` (``"random_plus"``): every critical
  parameter, plus ``floor(delta d_prunable)`` positions uniform over the
  prunable kernels. The paper draws each position independently with
  probability ``delta``; an exact count is drawn here (ours).
  """
  rng = np.random.default_rng(seed)
  if include_critical:
    pm = prunable_mask(layout)
    n = num_target(int(pm.sum()), delta)
    part = np.zeros((int(pm.sum()),), bool)
    part[rng.choice(part.size, size=n, replace=False)] = True
    return make_result(layout, assemble(layout, part, True), "random_plus", delta)
  n = num_target(layout.d, delta)
  mask = np.zeros((layout.d,), bool)
  mask[rng.choice(layout.d, size=n, replace=False)] = True
  return make_result(layout, mask, "random", delta)


def erk_densities(layout: Layout, delta: float) -> np.ndarray:
  """ERK per-layer densities (App. B.1, eqs. 24-25; Evci et al. 2020).

  Density of prunable kernel ``l`` is ``eps * sum(shape_l) / prod(shape_l)``
  (``(n_in + n_out + w + h) / (n_in n_out w h)`` for a convolution), with
  ``eps`` solved so that ``sum_l density_l * size_l = floor(delta d_prunable)``;
  layers whose density would exceed 1 are made dense and ``eps`` is solved
  again for the others.

  Returns:
    ``f64[L_prunable]`` in the order of :func:`prunable_leaves`.
  """
  leaves = prunable_leaves(layout)
  sizes = np.array([layout.sizes[i] for i in leaves], np.float64)
  raw = np.array([sum(layout.shapes[i]) / math.prod(layout.shapes[i]) for i in leaves])
  total = num_target(int(sizes.sum()), delta)
  dense = np.zeros((len(leaves),), bool)
  while True:
    rem = total - sizes[dense].sum()
    denom = float((raw * sizes)[~dense].sum())
    if denom <= 0:
      break
    eps = rem / denom
    over = ~dense & (eps * raw > 1.0)
    if not over.any():
      break
    dense |= over
  dens = np.where(dense, 1.0, eps * raw if denom > 0 else 0.0)
  return np.minimum(dens, 1.0)


def exact_counts(sizes: np.ndarray, densities: np.ndarray, total: int) -> np.ndarray:
  """Integer per-layer counts near ``densities * sizes`` summing to ``total``.

  Largest-remainder rounding, never above a layer's size.
  """
  sizes = np.asarray(sizes, np.int64)
  real = np.minimum(densities * sizes, sizes)
  cnt = np.floor(real).astype(np.int64)
  left = int(total - cnt.sum())
  order = np.argsort(-(real - cnt), kind="stable")
  i = 0
  while left > 0 and i < 10 * len(order) + 10:
    j = order[i % len(order)]
    if cnt[j] < sizes[j]:
      cnt[j] += 1
      left -= 1
    i += 1
  return cnt


def erk_mask(layout: Layout, delta: float, seed: int = 0,
             include_critical: bool = False) -> MaskResult:
  """ERK mask: per-layer ERK densities, random positions within each layer.

  Exactly ``floor(delta d_prunable)`` prunable parameters are kept (the
  per-layer counts are rounded by largest remainder).
  """
  leaves = prunable_leaves(layout)
  sizes = np.array([layout.sizes[i] for i in leaves], np.int64)
  total = num_target(int(sizes.sum()), delta)
  cnt = exact_counts(sizes, erk_densities(layout, delta), total)
  rng = np.random.default_rng(seed)
  parts = []
  for size, c in zip(sizes, cnt):
    p = np.zeros((int(size),), bool)
    p[rng.choice(int(size), size=int(c), replace=False)] = True
    parts.append(p)
  part = np.concatenate(parts) if parts else np.zeros((0,), bool)
  name = "erk_plus" if include_critical else "erk"
  return make_result(layout, assemble(layout, part, include_critical), name, delta)
