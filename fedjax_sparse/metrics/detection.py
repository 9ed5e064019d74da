"""Detection rates of filtering defences (ALGORITHMS.md section 7).

A client is flagged when its acceptance is ``<= 0`` (rejected, or given no
weight), the convention of the round step. Positives are the malicious
clients: the true positive rate is the share of malicious clients flagged, the
false positive rate the share of benign clients flagged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Detection(NamedTuple):
  """Confusion counts and rates of one round.

  Attributes:
    flagged_malicious: true positives (int32).
    flagged_benign: false positives (int32).
    num_malicious: malicious clients (int32).
    num_benign: benign clients (int32).
    tpr: ``flagged_malicious / num_malicious`` (nan without malicious clients).
    fpr: ``flagged_benign / num_benign`` (nan without benign clients).
  """

  flagged_malicious: Array
  flagged_benign: Array
  num_malicious: Array
  num_benign: Array
  tpr: Array
  fpr: Array


def flagged(acceptance: Array) -> Array:
  """``bool[K]``: clients the defence rejected (acceptance ``<= 0``)."""
  return jnp.asarray(acceptance) <= 0


def _rate(num: Array, den: Array) -> Array:
  return jnp.where(den > 0, num / jnp.maximum(den, 1), jnp.nan).astype(jnp.float32)


def detection(acceptance: Array, malicious: Array) -> Detection:
  """Counts and rates from the per-client acceptance and malicious flags.

  Args:
    acceptance: ``f32[K]`` (an ``AggOut.acceptance``).
    malicious: ``bool[K]`` which clients are malicious.
  """
  f = flagged(acceptance)
  m = jnp.asarray(malicious).astype(bool)
  tp = jnp.sum((f & m).astype(jnp.int32))
  fp = jnp.sum((f & ~m).astype(jnp.int32))
  n_mal = jnp.sum(m.astype(jnp.int32))
  n_ben = jnp.sum((~m).astype(jnp.int32))
  return Detection(tp, fp, n_mal, n_ben, _rate(tp, n_mal), _rate(fp, n_ben))


def detection_rates(acceptance: Array, malicious: Array) -> tuple[Array, Array]:
  """``(tpr, fpr)`` of :func:`detection`."""
  d = detection(acceptance, malicious)
  return d.tpr, d.fpr
