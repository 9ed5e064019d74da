"""Top-1 and top-k accuracy from logits (ALGORITHMS.md section 7).

FLARE reports top-5 accuracy for CIFAR-100 (flare.txt V-A); the other papers
report top-1. Both are fractions in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def top_k_correct(logits: Array, labels: Array, k: int = 1) -> Array:
  """``bool[N]``: whether each label is among the ``k`` largest logits.

  Ties are broken as :func:`jax.lax.top_k` breaks them (lower index first).
  ``k`` larger than the number of classes counts every example as correct.

  Args:
    logits: ``f32[N, C]``.
    labels: ``int[N]``.
    k: how many of the best classes count (1: top-1).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  kk = min(int(k), logits.shape[-1])
  if kk == 1:
    return jnp.argmax(logits, axis=-1) == labels
  top = jax.lax.top_k(logits, kk)[1]
  return jnp.any(top == labels[:, None], axis=-1)


def _masked_mean(hits: Array, mask: Optional[Array]) -> Array:
  hits = hits.astype(jnp.float32)
  if mask is None:
    return jnp.mean(hits)
  m = jnp.asarray(mask).astype(jnp.float32)
  return jnp.sum(hits * m) / jnp.sum(m)


def top_k_accuracy(logits: Array, labels: Array, k: int = 1,
                   mask: Optional[Array] = None) -> Array:
  """Fraction of examples whose label is among the ``k`` largest logits.

  Args:
    logits: ``f32[N, C]``.
    labels: ``int[N]``.
    k: 1 for top-1, 5 for the CIFAR-100 top-5 of flare.txt.
    mask: ``bool[N]`` examples that count (padding excluded), or None.

  Returns:
    f32 scalar in ``[0, 1]`` (nan when no example counts).
  """
  return _masked_mean(top_k_correct(logits, labels, k), mask)


def accuracy(logits: Array, labels: Array,
             mask: Optional[Array] = None) -> Array:
  """Top-1 accuracy: :func:`top_k_accuracy` with ``k = 1``."""
  return top_k_accuracy(logits, labels, 1, mask)
