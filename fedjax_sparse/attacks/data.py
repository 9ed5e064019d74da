"""Data attacks: label flipping, pixel-pattern and distributed backdoors,
semantic backdoor and convergence prevention (ALGORITHMS.md section 5).

Each factory takes ``num_classes`` and returns a
:class:`~fedjax_sparse.attacks.base.DataAttack` whose ``apply(x, y, key,
ctx)`` transforms one malicious client's minibatch (``x: f32[B, ...]``,
``y: int32[B]``) inside jit. Where only a fraction of the batch is poisoned,
exactly ``round(fraction * B)`` examples are chosen, deterministically from
``key`` (a random permutation). Triggers are fixed pixel masks built from the
example shape; a pixel of a trigger is set to ``value`` on every channel
(``value=None``: the largest value of the batch, i.e. "white" whatever the
normalisation).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.attacks.base import DataAttack
from fedjax_sparse.attacks.registry import register_data
from fedjax_sparse.requirements import declare

Array = jax.Array

LABEL_MAPPINGS = ("reverse", "circular")


class Trigger(NamedTuple):
  """A pixel-pattern trigger.

  Attributes:
    mask: bool numpy array over one example's pixels: ``[H, W]`` for images
      ``[H, W, C]`` (every channel is set), otherwise the example's shape.
    value: the value written, or None for the batch's maximum.
  """

  mask: np.ndarray
  value: Optional[float] = None


def _spatial(shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  return shape[:2] if len(shape) == 3 else shape


def dba_triggers(example_shape: Sequence[int], num_triggers: int = 4,
                 bar_len: int = 4, gap: int = 2, row_gap: int = 3,
                 origin: tuple[int, int] = (0, 0),
                 value: Optional[float] = None) -> list[Trigger]:
  """The local triggers of DBA (Xie et al. 2020; class_aware_masking.txt 4).

  The global trigger is made of horizontal bars of ``bar_len`` pixels near
  the top-left corner, as in DBA's MNIST setting: bar ``i`` lies on row
  ``origin_r + (i // 2) * row_gap`` starting at column
  ``origin_c + (i % 2) * (bar_len + gap)``. With the defaults on 28x28: rows
  0 and 3, columns 0-3 and 6-9. Images narrower than
  ``2 * bar_len + gap`` columns get shorter bars.

  Args:
    example_shape: ``[H, W, C]`` or ``[H, W]``.
    num_triggers: number of local triggers (4 in the papers).
    bar_len, gap, row_gap, origin: geometry.
    value: pixel value (None: batch maximum).

  Returns:
    ``num_triggers`` disjoint :class:`Trigger` s.
  """
  sp = _spatial(example_shape)
  if len(sp) != 2:
    raise ValueError(f"DBA triggers need image examples [H, W(, C)], got {example_shape}")
  h, w = sp
  r0, c0 = origin
  n_rows = -(-num_triggers // 2)
  bar = bar_len
  if c0 + 2 * bar + gap > w:
    bar = max(1, (w - c0 - gap) // 2)
  rg = row_gap if r0 + (n_rows - 1) * row_gap < h else max(1, (h - 1 - r0) // max(n_rows - 1, 1))
  if c0 + 2 * bar + gap > w or r0 + (n_rows - 1) * rg >= h or rg < 1:
    raise ValueError(f"{num_triggers} DBA triggers do not fit in a {h}x{w} image; "
                     "lower bar_len, gap or row_gap")
  out = []
  for i in range(num_triggers):
    m = np.zeros((h, w), bool)
    r = r0 + (i // 2) * rg
    c = c0 + (i % 2) * (bar + gap)
    m[r, c:c + bar] = True
    out.append(Trigger(m, value))
  return out


def global_trigger(triggers: Sequence[Trigger]) -> Trigger:
  """The union of local triggers (DBA's global trigger, used for the ASR)."""
  mask = np.zeros_like(triggers[0].mask)
  for t in triggers:
    mask |= t.mask
  return Trigger(mask, triggers[0].value)


def square_trigger(example_shape: Sequence[int], size: int = 3, margin: int = 1,
                   value: Optional[float] = None) -> Trigger:
  """A ``size x size`` square in the bottom-right corner (BadNets style)."""
  h, w = _spatial(example_shape)[:2]
  if size + margin > min(h, w):
    raise ValueError(f"a {size}x{size} trigger does not fit in {h}x{w}")
  m = np.zeros((h, w), bool)
  m[h - margin - size:h - margin, w - margin - size:w - margin] = True
  return Trigger(m, value)


def _broadcast_mask(mask, x: Array) -> Array:
  mask = jnp.asarray(mask)
  if x.ndim == 4 and mask.ndim == 2:
    return mask[None, :, :, None]
  return mask.reshape((1,) + mask.shape)


def apply_trigger(x: Array, trigger: Trigger, rows: Optional[Array] = None) -> Array:
  """Stamps ``trigger`` on the examples of ``x`` (``rows``: ``bool[B]`` subset).

  Args:
    x: ``f32[B, ...]`` examples.
    trigger: the :class:`Trigger`.
    rows: which examples to stamp (all when None).

  Returns:
    ``f32[B, ...]``.
  """
  x = jnp.asarray(x)
  m = _broadcast_mask(trigger.mask, x)
  value = jnp.max(x) if trigger.value is None else jnp.asarray(trigger.value, x.dtype)
  if rows is not None:
    m = m & rows.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(m, value, x)


def backdoor_test_set(x: np.ndarray, y: np.ndarray, trigger: Trigger,
                      target_label: int) -> tuple[np.ndarray, np.ndarray]:
  """The triggered test set of the attack success rate (ALGORITHMS.md s. 7).

  Keeps the test samples whose label is not the target, stamps the (global)
  trigger on them and labels them with the target; the ASR is the accuracy
  on this set. ``value=None`` triggers use the maximum of ``x``.

  Returns:
    ``(x_triggered, y_target int32)`` numpy arrays.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  keep = y != target_label
  xs = x[keep].copy()
  value = float(x.max()) if trigger.value is None else trigger.value
  m = trigger.mask
  if xs.ndim == 4 and m.ndim == 2:
    xs[:, m, :] = value
  else:
    xs[:, m] = value
  return xs, np.full((xs.shape[0],), target_label, np.int32)


def choose_rows(key: Array, batch: int, fraction: float) -> Array:
  """``bool[B]`` with exactly ``round(fraction * B)`` True, chosen from ``key``."""
  n = int(round(float(fraction) * batch))
  if n <= 0:
    return jnp.zeros((batch,), bool)
  if n >= batch:
    return jnp.ones((batch,), bool)
  perm = jax.random.permutation(key, batch)
  return jnp.zeros((batch,), bool).at[perm[:n]].set(True)


def _check_fraction(name: str, f: float) -> None:
  if not 0.0 <= f <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {f}")


def _check_label(name: str, label: int, num_classes: int) -> None:
  if not 0 <= label < num_classes:
    raise ValueError(f"{name}={label} is not a class of {num_classes}")


@register_data("label_flip")
def label_flip(num_classes: int, mapping: str = "reverse",
               fraction: float = 1.0) -> DataAttack:
  """Label flipping attack (LFA).

  ``"reverse"``: ``l -> C - 1 - l`` (safesparse.txt E.1, flare);
  ``"circular"``: ``l -> (l + 1) mod C`` (hybrid_sparse_attack.txt).

  Args:
    num_classes: C.
    mapping: ``"reverse"`` or ``"circular"``.
    fraction: fraction of each batch flipped (1: all, as in the papers).
  """
  if mapping not in LABEL_MAPPINGS:
    raise ValueError(f"unknown label mapping {mapping!r}; choose one of "
                     f"{', '.join(LABEL_MAPPINGS)}")
  _check_fraction("fraction", fraction)

  def apply(x, y, key, ctx):
    del ctx
    flipped = (num_classes - 1 - y) if mapping == "reverse" else (y + 1) % num_classes
    rows = choose_rows(key, y.shape[0], fraction)
    return x, jnp.where(rows, flipped, y).astype(y.dtype)

  return DataAttack(apply, num_classes)


def _pixel_asr_set(kw: dict, x: np.ndarray, y: np.ndarray):
  """The ASR test set of ``pixel_backdoor``: non-target samples stamped with
  its trigger (by default DBA's global trigger), labelled the target."""
  trigger = kw.get("trigger")
  if trigger is None:
    trigger = global_trigger(dba_triggers(x.shape[1:]))
  return backdoor_test_set(x, y, trigger, kw["target_label"])


def _dba_asr_set(kw: dict, x: np.ndarray, y: np.ndarray):
  """The ASR test set of ``dba``: with the global trigger, the union of the
  local ones."""
  triggers = kw.get("triggers")
  if triggers is None:
    triggers = dba_triggers(x.shape[1:], kw["num_triggers"])
  return backdoor_test_set(x, y, global_trigger(triggers), kw["target_label"])


def _semantic_asr_set(kw: dict, x: np.ndarray, y: np.ndarray):
  """The ASR test set of ``semantic_backdoor``: the samples of class
  ``source`` labelled ``target``."""
  keep = y == kw["source"]
  return x[keep], np.full((int(keep.sum()),), kw["target"], np.int32)


@register_data("pixel_backdoor")
@declare(asr_eval_set=_pixel_asr_set)
def pixel_backdoor(num_classes: int, target_label: int = 0,
                   poison_fraction: float = 0.2,
                   trigger: Optional[Trigger] = None) -> DataAttack:
  """Pixel-pattern backdoor: stamp a fixed trigger and relabel as the target.

  Args:
    num_classes: C.
    target_label: the backdoor's target class.
    poison_fraction: fraction of each batch poisoned.
    trigger: the pattern; None for DBA's global trigger (the union of
      :func:`dba_triggers`), built from the example shape, so that the
      centralised and distributed backdoors share one ASR test set.
  """
  _check_label("target_label", target_label, num_classes)
  _check_fraction("poison_fraction", poison_fraction)

  def apply(x, y, key, ctx):
    del ctx
    trig = trigger if trigger is not None else global_trigger(dba_triggers(x.shape[1:]))
    rows = choose_rows(key, y.shape[0], poison_fraction)
    return apply_trigger(x, trig, rows), jnp.where(rows, target_label, y).astype(y.dtype)

  return DataAttack(apply, num_classes)


@register_data("dba")
@declare(asr_eval_set=_dba_asr_set)
def dba(num_classes: int, target_label: int = 0, poison_fraction: float = 0.2,
        num_triggers: int = 4, triggers: Optional[Sequence[Trigger]] = None) -> DataAttack:
  """Distributed backdoor attack (Xie et al. 2020; class_aware_masking.txt 4, 5.1.3).

  Malicious client ``r`` (``ctx.client_rank``, its index among the
  malicious clients, 0 if absent) stamps local trigger ``r % num_triggers``
  on ``round(poison_fraction * B)`` examples of each batch and relabels them
  as the target. The ASR is measured with :func:`global_trigger`.

  Args:
    num_classes: C.
    target_label: the target class.
    poison_fraction: 0.2 in class_aware_masking 5.1.3.
    num_triggers: 4 distinct triggers.
    triggers: explicit local triggers (None: :func:`dba_triggers`).
  """
  _check_label("target_label", target_label, num_classes)
  _check_fraction("poison_fraction", poison_fraction)
  if triggers is not None and len(triggers) != num_triggers:
    raise ValueError(f"got {len(triggers)} triggers for num_triggers={num_triggers}")

  def apply(x, y, key, ctx):
    trigs = list(triggers) if triggers is not None else dba_triggers(x.shape[1:], num_triggers)
    values = {t.value for t in trigs}
    if len(values) != 1:
      raise ValueError("all DBA triggers must share one value")
    rank = getattr(ctx, "client_rank", None)
    rank = jnp.asarray(0 if rank is None else rank, jnp.int32)
    masks = jnp.asarray(np.stack([t.mask for t in trigs]))
    mask = jnp.take(masks, jnp.mod(rank, num_triggers), axis=0)
    rows = choose_rows(key, y.shape[0], poison_fraction)
    x = apply_trigger(x, Trigger(mask, trigs[0].value), rows)
    return x, jnp.where(rows, target_label, y).astype(y.dtype)

  return DataAttack(apply, num_classes)


@register_data("semantic_backdoor")
@declare(asr_eval_set=_semantic_asr_set)
def semantic_backdoor(num_classes: int, source: int = 7, target: int = 1,
                      fraction: float = 1.0) -> DataAttack:
  """Semantic backdoor: relabel class ``source`` as ``target`` (sparsefed.txt 3.2,
  "misclassifying the digit 7 as 1").

  Args:
    num_classes: C.
    source, target: the classes a and b.
    fraction: fraction of the batch eligible (1: every ``source`` example).
  """
  _check_label("source", source, num_classes)
  _check_label("target", target, num_classes)
  _check_fraction("fraction", fraction)

  def apply(x, y, key, ctx):
    del ctx
    rows = choose_rows(key, y.shape[0], fraction) & (y == source)
    return x, jnp.where(rows, target, y).astype(y.dtype)

  return DataAttack(apply, num_classes)


@register_data("convergence_prevention")
def convergence_prevention(num_classes: int, fraction: float = 0.4) -> DataAttack:
  """Convergence prevention (class_aware_masking.txt 4, 5.1.3).

  ``round(fraction * B)`` examples of each batch (40% in the paper) get a
  random label, drawn uniformly from the ``C - 1`` classes other than the
  true one so that every chosen label changes (ours; the paper says the
  labels are flipped "randomly").
  """
  _check_fraction("fraction", fraction)
  if num_classes < 2:
    raise ValueError("convergence_prevention needs at least 2 classes")

  def apply(x, y, key, ctx):
    del ctx
    k_rows, k_lab = jax.random.split(key)
    rows = choose_rows(k_rows, y.shape[0], fraction)
    shift = jax.random.randint(k_lab, y.shape, 1, num_classes, dtype=y.dtype)
    return x, jnp.where(rows, (y + shift) % num_classes, y).astype(y.dtype)

  return DataAttack(apply, num_classes)
