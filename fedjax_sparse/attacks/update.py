"""Classic update attacks: GNA, IPM, scaling, sign flip, model replacement,
ALIE, ROP and Mimic (ALGORITHMS.md section 5).

Every attack follows :mod:`fedjax_sparse.attacks.base`: it receives all
sampled clients' honest updates ``f32[K, d]`` and ``is_malicious: bool[K]``
and replaces only the malicious rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.attacks import _stats
from fedjax_sparse.attacks.base import (UpdateAttack, check_knowledge, no_state,
                                        replace_malicious)
from fedjax_sparse.attacks.registry import register_update

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST


def _safe_unit(v: Array) -> Array:
  n = jnp.linalg.norm(v)
  return jnp.where(n > 0, v / jnp.where(n > 0, n, 1.0), 0.0)


def _map_malicious_rows(fn, updates: Array, is_malicious: Array, key: Array) -> Array:
  """Row ``i`` -> ``fn(updates[i], key_i)`` for malicious rows only.

  ``lax.map`` with ``lax.cond``: the work is proportional to the number of
  malicious rows (a ``vmap`` would evaluate ``fn`` on every row).
  """
  k = updates.shape[0]
  keys = jax.random.split(key, k)

  def row(args):
    u, mal, kk = args
    return lax.cond(mal, fn, lambda u_, k_: u_, u, kk)

  return lax.map(row, (updates, is_malicious, keys))


SPACES = ("model", "update")


def check_space(space: str) -> None:
  """Raises a ValueError unless ``space`` is ``"model"`` or ``"update"``."""
  if space not in SPACES:
    raise ValueError(f"unknown space {space!r}; choose one of "
                     f"{', '.join(SPACES)} (model: the attacker crafts the model "
                     "it uploads; update: it crafts its update)")


def _global(ctx, d: int) -> Array:
  """The flat global model of the round (the model space needs it)."""
  if ctx.global_params is None:
    raise ValueError("space='model' needs ctx.global_params, the flat global "
                     "model before this round's update")
  return jnp.asarray(ctx.global_params, jnp.float32).reshape(d)


@register_update("gna")
def gna(space: str = "update") -> UpdateAttack:
  """Gaussian noise attack (safesparse.txt E.1; ALGORITHMS.md section 5).

  ``space="model"`` (the papers' model-upload framework): the attacker
  uploads a Gaussian noise *model* ``N(m_i, s_i^2 I)`` with ``m_i, s_i`` the
  mean and standard deviation of the entries of its local model
  ``w_i = global - u_i``; the update the server sees is ``global - noise``.
  ``space="update"``: the noise has the mean and std of the attacker's own
  update and is sent as the update. Every attacker draws its own vector (one
  key per row).

  Args:
    space: ``"update"`` (default, the simulator's earlier behaviour) or
      ``"model"`` (the SafeSparse/FLARE experiments).
  """
  check_space(space)

  def apply(state, updates, is_malicious, key, ctx):

    def noise(v, k):
      m, s = jnp.mean(v), jnp.std(v)
      return m + s * jax.random.normal(k, v.shape, v.dtype)

    if space == "update":
      return _map_malicious_rows(noise, updates, is_malicious, key), state
    g = _global(ctx, updates.shape[1])
    out = _map_malicious_rows(lambda u, k: g - noise(g - u, k), updates,
                              is_malicious, key)
    return out, state

  return UpdateAttack(no_state, apply)


@register_update("ipm")
def ipm(eps: float = 0.4, knowledge: str = "omniscient") -> UpdateAttack:
  """Inner product manipulation (Xie et al. 2020; hybrid paper 2.3, eq. 14).

  Every attacker sends ``-eps * mu``, ``mu`` the mean of the benign updates
  (``knowledge="partial"``: of the attackers' own honest updates).

  Args:
    eps: scale; 0.4 in the hybrid paper (section 4.1).
    knowledge: ``"omniscient"`` or ``"partial"``.
  """
  check_knowledge(knowledge)

  def apply(state, updates, is_malicious, key, ctx):
    del key, ctx
    mu = _stats.masked_mean(updates, _stats.knowledge_rows(is_malicious, knowledge))
    return replace_malicious(updates, is_malicious, -eps * mu), state

  return UpdateAttack(no_state, apply)


@register_update("scaling")
def scaling(scale: float = 10.0, space: str = "update") -> UpdateAttack:
  """Scaling attack (safesparse.txt E.1, flare.txt V-A; ALGORITHMS.md s. 5).

  ``space="model"`` (the papers' model-upload framework): the attacker
  uploads ``lambda * w_i``, lambda times its local model ``w_i = global -
  u_i``, so the update the server sees is
  ``global - lambda w_i = (1 - lambda) * global + lambda * u_i``. Its top-k
  mask and signs follow the global model and are shared by all attackers:
  this is the scaling of SafeSparse's tables.

  ``space="update"``: ``lambda * u_i``, a boosted honest update (Bagdasaryan
  et al.'s boosting). Its mask and signs are those of an honest update, so
  a filter that reads only masks and signs (SafeSparse) cannot see it: an
  adaptive attack on SafeSparse, not the papers' scaling.

  Args:
    scale: lambda (10 in the papers).
    space: ``"update"`` (default, the simulator's earlier behaviour) or
      ``"model"``.
  """
  check_space(space)

  def apply(state, updates, is_malicious, key, ctx):
    del key
    if space == "update":
      crafted = scale * updates
    else:
      g = _global(ctx, updates.shape[1])
      crafted = (1.0 - scale) * g[None, :] + scale * updates
    return jnp.where(is_malicious[:, None], crafted, updates), state

  return UpdateAttack(no_state, apply)


@register_update("boosted_update")
def boosted_update(scale: float = 10.0) -> UpdateAttack:
  """A boosted honest update: ``lambda * u_i`` (Bagdasaryan et al. 2020).

  The same upload as ``scaling`` with ``space="update"``, under a name of its
  own so that a sweep can run it beside the papers' model-space scaling. An
  adaptive attack on SafeSparse/FLARE (ALGORITHMS.md section 5): the top-k
  mask and the signs of ``lambda * u_i`` are those of the attacker's honest
  update, so a filter that reads only masks and signs cannot tell it from a
  benign client, while Alg. 2's per-pack mean lets the boosted values in.
  Knowledge: none beyond the attacker's own data.

  Args:
    scale: lambda (10).
  """
  return scaling(scale=scale, space="update")


@register_update("sign_flip")
def sign_flip(space: str = "update") -> UpdateAttack:
  """Sign flip ("bit flip" in the hybrid paper, Table VII).

  ``space="update"``: ``-u_i``, the negated honest update.
  ``space="model"``: the attacker uploads ``-w_i``, its negated local model,
  so the server sees ``global + w_i = 2 * global - u_i``.

  Args:
    space: ``"update"`` (default) or ``"model"``.
  """
  check_space(space)

  def apply(state, updates, is_malicious, key, ctx):
    del key
    if space == "update":
      crafted = -updates
    else:
      crafted = 2.0 * _global(ctx, updates.shape[1])[None, :] - updates
    return jnp.where(is_malicious[:, None], crafted, updates), state

  return UpdateAttack(no_state, apply)


@register_update("model_replacement")
def model_replacement(server_lr: float = 1.0, num_clients: Optional[int] = None,
                      at_round: Optional[int] = None,
                      space: str = "update") -> UpdateAttack:
  """Model replacement (Bagdasaryan et al. 2020; sparsefed.txt 3.2, B.6.4).

  The attacker scales its (backdoored) update by ``gamma = K / server_lr``
  so that averaging over K clients with server learning rate ``server_lr``
  replaces the global model by its local one. Combine it with a data attack
  (e.g. ``pixel_backdoor``) on the same clients so the honest update it
  scales is the backdoored one.

  Both spaces give the same upload: Bagdasaryan et al. define the uploaded
  model as ``global + gamma (w_i - global)``, whose update is exactly
  ``gamma * u_i``; ``space`` is accepted for uniformity with the other
  attacks and recorded.

  Args:
    server_lr: the server learning rate eta.
    num_clients: K in the scale; None uses the K of the round.
    at_round: if set, the attack acts only when ``ctx.round == at_round``
      (the paper's single round near the end of training; the round step
      passes its 0-based round counter); otherwise at every round it is
      applied.
    space: ``"update"`` or ``"model"`` (identical, see above).
  """
  check_space(space)
  if server_lr <= 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}")

  def apply(state, updates, is_malicious, key, ctx):
    del key
    k = updates.shape[0] if num_clients is None else num_clients
    gamma = k / server_lr
    mal = is_malicious
    if at_round is not None:
      mal = mal & (jnp.asarray(ctx.round) == at_round)
    return jnp.where(mal[:, None], gamma * updates, updates), state

  return UpdateAttack(no_state, apply)


@register_update("alie")
def alie(z: Optional[float] = None, knowledge: str = "omniscient",
         z_rule: str = "hybrid") -> UpdateAttack:
  """A Little Is Enough (Baruch et al. 2019; hybrid paper 2.3, eqs. 12-13).

  Every attacker sends ``mu - z_max * sigma`` with the benign mean and
  coordinate std, ``s = floor(K/2 + 1) - k_m`` and
  ``z_max = Phi^-1((K - k_m - s) / (K - k_m))`` computed from this round's
  (traced) number of attackers (:func:`fedjax_sparse.attacks.z_max`).

  Args:
    z: a fixed scale instead of ``z_max`` (the hybrid paper's Tables III-VI).
    knowledge: ``"omniscient"`` or ``"partial"``.
    z_rule: ``"hybrid"`` (default; the hybrid paper's eq. 12, used in its
      settings) or ``"baruch"`` (Baruch et al.'s ``Phi^-1((K - s)/K)``), see
      :func:`fedjax_sparse.attacks.z_max`.
  """
  check_knowledge(knowledge)
  if z_rule not in _stats.Z_RULES:
    raise ValueError(f"unknown z_rule {z_rule!r}; choose one of "
                     f"{', '.join(_stats.Z_RULES)}")

  def apply(state, updates, is_malicious, key, ctx):
    del key, ctx
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    mu, sigma = _stats.mean_std(updates, sel)
    zz = (_stats.z_max(updates.shape[0], jnp.sum(is_malicious), z_rule)
          if z is None else jnp.float32(z))
    return replace_malicious(updates, is_malicious, mu - zz * sigma), state

  return UpdateAttack(no_state, apply)


@register_update("rop")
def rop(pi: float = 1.0, theta: float = 270.0, lam: float = 0.9,
        z: Optional[float] = None, knowledge: str = "omniscient") -> UpdateAttack:
  """Relocated orthogonal perturbation (Ozfatura et al. 2023; hybrid paper 2.3).

  ALGORITHMS.md section 5:
  ``malicious = [pi agg_prev + (1 - pi) mu] + z (sin(theta) u_perp + cos(theta) ref_hat)``
  with the reference ``ref = lam agg_prev + (1 - lam) mu`` (``ref = mu`` while
  the previous aggregate is zero, i.e. at the first attacked round, as the
  authors' code does), ``ref_hat = ref / ||ref||`` and ``u_perp`` the unit
  vector of the all-ones direction with its projection on ``ref`` removed.
  ``z`` defaults to ALIE's ``z_max`` (the authors' code); the direction has
  unit norm so ``z`` is the perturbation's L2 norm.

  Args:
    pi: relocation weight of the previous aggregate (1).
    theta: angle in degrees (270).
    lam: reference mixing weight (0.9).
    z: perturbation norm; None for ``z_max``.
    knowledge: ``"omniscient"`` or ``"partial"``.
  """
  check_knowledge(knowledge)
  sin_t, cos_t = math.sin(math.radians(theta)), math.cos(math.radians(theta))

  def apply(state, updates, is_malicious, key, ctx):
    del key
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    mu = _stats.masked_mean(updates, sel)
    prev = ctx.prev_aggregate if ctx.prev_aggregate is not None else jnp.zeros_like(mu)
    first = jnp.all(prev == 0)
    loc = pi * prev + (1.0 - pi) * mu
    ref = jnp.where(first, mu, lam * prev + (1.0 - lam) * mu)
    ref_sq = jnp.dot(ref, ref, precision=_HIGHEST)
    ones = jnp.ones_like(ref)
    coef = jnp.where(ref_sq > 0, jnp.sum(ref) / jnp.where(ref_sq > 0, ref_sq, 1.0), 0.0)
    u_perp = _safe_unit(ones - coef * ref)
    direction = _safe_unit(sin_t * u_perp + cos_t * _safe_unit(ref))
    zz = (_stats.z_max(updates.shape[0], jnp.sum(is_malicious)) if z is None
          else jnp.float32(z))
    return replace_malicious(updates, is_malicious, loc + zz * direction), state

  return UpdateAttack(no_state, apply)


class MimicState(NamedTuple):
  """Running estimate of the benign updates' top principal direction."""

  z: Array


@register_update("mimic")
def mimic() -> UpdateAttack:
  """Mimic (Karimireddy, He and Jaggi 2022, "Byzantine-robust learning on
  heterogeneous datasets via bucketing", section 4).

  All attackers copy one benign client's update, the one that most
  over-represents the direction of largest benign variance. The direction
  ``z`` is refined by one power-iteration step per round,
  ``z <- normalise(sum_i <e_i, z> e_i)`` over the benign ``e_i = x_i - mu``
  (started from a random vector), and carried in the state; the copied
  client is ``argmax_i <e_i, z>`` among this round's benign clients. The
  paper fixes the copied worker after a warm-up phase; with clients sampled
  anew every round we choose among the sampled benign clients each round
  (ours).
  """

  def init(d):
    return MimicState(jnp.zeros((d,), jnp.float32))

  def apply(state, updates, is_malicious, key, ctx):
    del ctx
    sel = _stats.knowledge_rows(is_malicious, "omniscient")
    mu = _stats.masked_mean(updates, sel)
    z0 = lax.cond(jnp.any(state.z != 0), lambda: state.z,
                  lambda: jax.random.normal(key, state.z.shape, state.z.dtype))
    # E z and E^T v without forming E = x - mu.
    ez = jnp.matmul(updates, z0, precision=_HIGHEST) - jnp.dot(mu, z0, precision=_HIGHEST)
    v = sel * ez
    z = _safe_unit(jnp.matmul(v, updates, precision=_HIGHEST) - jnp.sum(v) * mu)
    score = jnp.matmul(updates, z, precision=_HIGHEST) - jnp.dot(mu, z, precision=_HIGHEST)
    target = jnp.argmax(jnp.where(sel > 0, score, -jnp.inf))
    return replace_malicious(updates, is_malicious, updates[target]), MimicState(z)

  return UpdateAttack(init, apply)
