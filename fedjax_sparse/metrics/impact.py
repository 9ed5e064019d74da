"""Outsized impact factor and model distance (ALGORITHMS.md section 7).

The outsized impact factor (sparsefed.txt B.1.6) compares how many data
points the attackers poisoned with how many their share of the population
"entitles" them to: with influence ``I = |S \\ S_b| / |S|`` (the fraction of
compromised agents), ``|X_m|`` points successfully poisoned and ``n`` points
held by all agents, ``OIF = |X_m| / (I * n)``. An OIF of 1 is the paper's
standard for a successful attack: the attackers poisoned the same fraction of
the data as the fraction of the population they control.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def influence(num_malicious, num_agents):
  """``I = |S \\ S_b| / |S|``: the fraction of compromised agents."""
  if num_agents <= 0:
    raise ValueError(f"num_agents must be > 0, got {num_agents}")
  return num_malicious / num_agents


def outsized_impact_factor(num_poisoned, num_malicious, num_agents,
                           num_datapoints):
  """``|X_m| / (I * n)`` of sparsefed.txt B.1.6.

  Args:
    num_poisoned: ``|X_m|``, the data points successfully poisoned (e.g.
      the attack accuracy times the auxiliary-set size).
    num_malicious: compromised agents ``|S \\ S_b|``.
    num_agents: all agents ``|S|``.
    num_datapoints: ``n``, data points held by all agents together.

  Returns:
    The OIF (inf when there are no attackers but points were poisoned, nan
    when neither). Works on Python numbers and on arrays.
  """
  if num_datapoints <= 0:
    raise ValueError(f"num_datapoints must be > 0, got {num_datapoints}")
  entitled = influence(num_malicious, num_agents) * num_datapoints
  if isinstance(num_poisoned, (int, float)) and isinstance(entitled, (int, float)):
    if entitled == 0:
      return float("nan") if num_poisoned == 0 else float("inf")
    return num_poisoned / entitled
  return jnp.asarray(num_poisoned, jnp.float32) / jnp.float32(entitled)


def l1_distance(a: Array, b: Array) -> Array:
  """``||a - b||_1`` between two flat parameter vectors ``f32[d]``.

  ALGORITHMS.md section 7 uses it between a poisoned model and its unattacked
  twin trained with the same seed (flatten both with
  ``jax.flatten_util.ravel_pytree``).
  """
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"parameter vectors differ in shape: {a.shape} vs {b.shape}")
  return jnp.sum(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
