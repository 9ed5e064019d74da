"""The input checks the distance-matrix clusterings share."""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp


def checked_points(dist: jax.Array,
                   valid: Optional[jax.Array]) -> tuple[int, jax.Array]:
  """``(n, valid)`` for an ``f32[n, n]`` distance matrix.

  Args:
    dist: the pairwise distances, checked to be square.
    valid: ``bool[n]`` or ``None`` (every point valid).

  Returns:
    The number of points and the ``bool[n]`` mask of valid points.
  """
  chex.assert_rank(dist, 2)
  n = dist.shape[0]
  chex.assert_shape(dist, (n, n))
  if valid is None:
    valid = jnp.ones((n,), bool)
  chex.assert_shape(valid, (n,))
  return n, valid
