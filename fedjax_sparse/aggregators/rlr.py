"""Robust learning rate, RLR (Ozdayi, Kantarcioglu and Gel, "Defending
against Backdoors in Federated Learning with Robust Learning Rate", AAAI
2021, the robust learning rate and the update rule that uses it;
arXiv:2007.03767).

A backdoor needs coordinates on which the attackers push a direction that
most honest clients do not. Per coordinate ``j``, the server counts the
sign agreement of the ``K`` updates and flips its learning rate where the
agreement is too weak:

  ``eta_theta(j) = eta``  if ``|sum_i sign(u_i(j))| >= theta``,
  ``eta_theta(j) = -eta`` otherwise,

and the aggregate is ``eta_theta * sum_i w_i u_i / sum_i w_i`` (``w_i`` the
dataset sizes, or ones), element-wise.

Defaults: ``theta = 4``, the authors' threshold for Fashion-MNIST with 10
agents per round (their repository's ``--robustLR_threshold=4``; 8 for
CIFAR-10 with 40 agents and for FEMNIST with about 34 per round); choose it
for ``K`` (it should exceed the number of attackers and stay below the
honest agreement; ``theta > K`` flips every coordinate). ``eta = 1``: the
server applies ``global - server_lr * update``, so ``--server_lr`` is the
paper's server learning rate and ``eta`` an extra factor.

Sparse uploads (ours; the paper's uploads are dense): only the clients
whose mask selects a coordinate vote on it (the dense view is 0 off-mask and
``sign(0) = 0``, as a zero entry votes 0 in the authors' code), and the mean
is FLARE's Alg. 2 over those clients; a coordinate that nobody sent has no
votes, its rate is ``-eta`` and its mean 0.

Rows with inf/nan are absent: they neither vote nor enter the mean
(acceptance 0; everyone else 1). Huge finite rows vote with their signs and
enter the mean as sent (the output is finite, not bounded by the honest
rows). Diagnostics: ``flipped_fraction``, the share of coordinates whose rate
is ``-eta``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sparse.aggregators import _common
from fedjax_sparse.aggregators.base import AggOut, Aggregator, stateless
from fedjax_sparse.aggregators.registry import register

Array = jax.Array


def sign_votes(updates: Array) -> Array:
  """``f32[d]`` ``|sum_i sign(u_i)|``; a zero entry (off-mask in the dense
  view of a sparse upload) votes 0."""
  s = jnp.sign(updates).astype(jnp.int8)
  return jnp.abs(jnp.sum(s, axis=0, dtype=jnp.int32)).astype(jnp.float32)


@register("rlr")
def rlr(theta: float = 4.0, eta: float = 1.0) -> Aggregator:
  """Robust learning rate: flip the rate where sign agreement is below theta.

  Args:
    theta: agreement threshold (paper: 4 for 10 agents per round, 8 for 40).
    eta: the rate's magnitude, a factor on top of ``--server_lr`` (1).

  Returns:
    An :class:`Aggregator` (stateless); acceptance 1 for every finite row.
  """
  if theta < 0:
    raise ValueError(f"rlr: theta must be >= 0, got {theta}")
  if eta <= 0:
    raise ValueError(f"rlr: eta must be > 0, got {eta}")

  def apply(updates, masks, weights, key, ctx):
    del key
    k = updates.shape[0]
    ok = _common.usable_rows(updates, ctx)
    x = _common.zero_rows(updates, ok)
    votes = sign_votes(x)
    rate = jnp.where(votes >= theta, jnp.float32(eta), jnp.float32(-eta))
    acceptance = ok.astype(jnp.float32)
    mean = _common.combine_accepted(updates, masks, weights, acceptance,
                                    ctx.pack_size, ctx.finite_uploads)
    update = rate.astype(mean.dtype) * mean
    return AggOut(update, acceptance,
                  {"flipped_fraction": jnp.mean((rate < 0).astype(jnp.float32))})

  return stateless(apply)
