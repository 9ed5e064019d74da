"""Fang et al.'s local model poisoning attacks on trimmed mean, median and Krum.

M. Fang, X. Cao, J. Jia and N. Gong, "Local Model Poisoning Attacks to
Byzantine-Robust Federated Learning", USENIX Security 2020, section 4
("Our Local Model Poisoning Attacks"). The attacker wants the global model
to move against the direction it would take without attack: ``s_j`` is the
*changing direction* of parameter ``j`` in this round, and the crafted
uploads push parameter ``j`` the other way as far as the rule lets them.

Conventions here (ALGORITHMS.md section 5): the updates are ``u_i = global -
local``, so a parameter whose benign mean update ``mu_j`` is positive
decreases. In update space the estimated changing direction is taken on the
updates, ``s = sign(mu)`` (the benign mean, or under partial knowledge the
mean of the attackers' own honest updates), and the crafted updates push
against it, i.e. the model against its own changing direction
``sign(-mu)``.

* :func:`fang_trmean` (section 4.3, "Attacking trimmed mean", also the
  paper's attack on the median): every coordinate is sampled beyond the
  benign extremes, on the side opposite to ``s_j``.
* :func:`fang_krum` (section 4.2, "Attacking Krum"): every attacker uploads
  ``-lambda s``, with ``lambda`` the largest value of a halving sequence for
  which Krum selects the crafted update.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.attacks import _stats
from fedjax_sparse.attacks.base import (UpdateAttack, check_knowledge, no_state,
                                        replace_malicious)
from fedjax_sparse.attacks.registry import register_update
from fedjax_sparse.attacks.update import check_space

Array = jax.Array


def _beyond_extremes(x_max: Array, x_min: Array, direction: Array, b: float):
  """Fang et al.'s full-knowledge sampling interval ``[lo, hi]`` per coordinate.

  ``direction = -1`` (the quantity decreases without attack): above the
  largest benign value, ``[x_max, b x_max]`` if ``x_max > 0`` else
  ``[x_max, x_max / b]``. ``direction = +1``: below the smallest,
  ``[x_min / b, x_min]`` if ``x_min > 0`` else ``[b x_min, x_min]``.
  """
  up_lo = x_max
  up_hi = jnp.where(x_max > 0, b * x_max, x_max / b)
  down_lo = jnp.where(x_min > 0, x_min / b, b * x_min)
  down_hi = x_min
  up = direction < 0
  return jnp.where(up, up_lo, down_lo), jnp.where(up, up_hi, down_hi)


@register_update("fang_trmean")
def fang_trmean(b: float = 2.0, knowledge: str = "omniscient",
                space: str = "update") -> UpdateAttack:
  """Fang et al.'s attack on trimmed mean and median (USENIX Security 2020,
  section 4.3 "Attacking trimmed mean"; the same attack is their median
  attack).

  Full knowledge (``knowledge="omniscient"``; the paper's "full knowledge":
  the benign uploads of the round are visible). With ``x`` the benign
  vectors (updates, or with ``space="model"`` the local models ``global -
  u_i``), ``x_max,j`` / ``x_min,j`` their coordinate-wise maximum / minimum
  and ``s_j`` the sign of their mean's change (update space: ``sign(mu_j)``;
  model space: ``sign(-mu_j)``, the change of the global model), each
  attacker samples, independently and uniformly per coordinate,

  * ``s_j = -1``: in ``[x_max,j, b x_max,j]`` if ``x_max,j > 0``, else in
    ``[x_max,j, x_max,j / b]`` (above every benign value);
  * ``s_j = +1``: in ``[x_min,j / b, x_min,j]`` if ``x_min,j > 0``, else in
    ``[b x_min,j, x_min,j]`` (below every benign value).

  ``s_j = 0`` (a coordinate no benign client moves on average) counts as
  ``+1`` (ours; the paper's ``s_j`` is never 0).

  Partial knowledge (``knowledge="partial"``: only the attackers' own
  honest updates): ``m_j, sigma_j`` their mean and coordinate std (ddof 1)
  and ``s_j`` the sign of that mean's change; each attacker samples in
  ``[m_j + 3 sigma_j, m_j + 4 sigma_j]`` if ``s_j = -1`` and in
  ``[m_j - 4 sigma_j, m_j - 3 sigma_j]`` if ``s_j = +1``. This rule is
  translation invariant, so both spaces give the same uploads.

  Simplification (ours): the paper estimates ``s`` under full knowledge
  with the aggregation rule applied to the before-attack local models; here
  ``s`` is the sign of the benign mean (the estimate it uses under partial
  knowledge). The default ``space="update"`` applies the construction to
  the updates; ``space="model"`` is the paper's (the intervals ``[x, b x]``
  are not translation invariant, so the two differ under full knowledge).

  Args:
    b: the interval factor (``b = 2`` in the paper), > 1.
    knowledge: ``"omniscient"`` (full knowledge) or ``"partial"``.
    space: ``"update"`` (default) or ``"model"``.
  """
  check_knowledge(knowledge)
  check_space(space)
  if not b > 1:
    raise ValueError(f"fang_trmean: b must be > 1, got {b}")

  def apply(state, updates, is_malicious, key, ctx):
    k, d = updates.shape
    sel = _stats.knowledge_rows(is_malicious, knowledge)
    if space == "model":
      if ctx.global_params is None:
        raise ValueError("fang_trmean with space='model' needs ctx.global_params")
      g = jnp.asarray(ctx.global_params, updates.dtype).reshape(d)
      x, sgn = g[None, :] - updates, -1.0     # local models; mean change = -mu
    else:
      g, x, sgn = None, updates, 1.0
    r = jax.random.uniform(key, (k, d), updates.dtype)
    if knowledge == "omniscient":
      mu = _stats.masked_mean(updates, sel)
      direction = jnp.where(sgn * mu < 0, -1.0, 1.0)
      rows = sel[:, None] > 0
      # (0 where no row is benign, so that the output stays finite.)
      x_max = jnp.max(jnp.where(rows, x, -jnp.inf), axis=0)
      x_min = jnp.min(jnp.where(rows, x, jnp.inf), axis=0)
      x_max = jnp.where(jnp.isfinite(x_max), x_max, 0.0)
      x_min = jnp.where(jnp.isfinite(x_min), x_min, 0.0)
      lo, hi = _beyond_extremes(x_max, x_min, direction, b)
    else:
      mu, sigma = _stats.mean_std(updates, sel)
      m = mu if space == "update" else g - mu
      direction = jnp.where(sgn * mu < 0, -1.0, 1.0)
      lo = jnp.where(direction < 0, m + 3.0 * sigma, m - 4.0 * sigma)
      hi = jnp.where(direction < 0, m + 4.0 * sigma, m - 3.0 * sigma)
    crafted = lo[None, :] + r * (hi - lo)[None, :]
    if space == "model":
      crafted = g[None, :] - crafted
    return replace_malicious(updates, is_malicious, crafted), state

  return UpdateAttack(no_state, apply)


def _smallest_sum(values: Array, count: Array) -> Array:
  """Row-wise sum of the ``count`` smallest entries (``+inf`` entries last)."""
  srt = jnp.sort(values, axis=1)
  take = jnp.arange(values.shape[1])[None, :] < count
  return jnp.sum(jnp.where(take, srt, 0.0), axis=1)


def krum_selects_crafted(benign_sq: Array, crafted_sq: Array,
                         is_malicious: Array, f: Array) -> Array:
  """Whether Krum picks a crafted row when every attacker sends one vector.

  Krum as :func:`fedjax_sparse.aggregators.get` ``("krum")`` computes it:
  ``score_i`` the sum of the ``K - f - 2`` smallest squared distances from
  row ``i`` to the others, the lowest score wins, ties to the lower index.

  Args:
    benign_sq: ``f32[K, K]`` squared distances between rows (only the
      benign-benign entries are read).
    crafted_sq: ``f32[K]`` squared distance of each row to the crafted
      vector (only the benign entries are read).
    is_malicious: ``bool[K]``.
    f: Krum's number of Byzantine clients (traced or static).

  Returns:
    bool scalar.
  """
  k = is_malicious.shape[0]
  mal = is_malicious
  both_mal = mal[:, None] & mal[None, :]
  one_mal = mal[:, None] != mal[None, :]
  cross = jnp.where(mal[:, None], crafted_sq[None, :], crafted_sq[:, None])
  d2 = jnp.where(both_mal, 0.0, jnp.where(one_mal, cross, benign_sq))
  d2 = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, d2)
  scores = _smallest_sum(d2, jnp.maximum(k - f - 2, 1))
  return mal[jnp.argmin(scores)]


@register_update("fang_krum")
def fang_krum(f: Optional[int] = None, threshold: float = 1e-5,
              max_halvings: int = 64) -> UpdateAttack:
  """Fang et al.'s attack on Krum (USENIX Security 2020, section 4.2
  "Attacking Krum", full knowledge).

  The paper crafts the model ``w'_1 = w_Re - lambda s`` (``w_Re`` the global
  model, ``s`` the changing direction) and makes the other attackers send
  copies of it; in update space that is the update ``u' = -lambda s`` with
  ``s = sign(mu)``, the sign of the benign mean update (``sign(0) = 0``:
  coordinates that no client moves on average are left alone, ours). Every
  attacker uploads the same ``u'``. ``lambda`` starts at the paper's upper
  bound, with ``m = K`` sampled clients, ``c = k_m`` attackers and ``d``
  replaced by ``||s||^2`` (= d when no ``mu_j`` is 0)::

    lambda_0 = 1 / ((m - 2c - 1) ||s||) * min_{i benign} sum_{l in G_i} ||u_l - u_i||
               + 1 / ||s|| * max_{i benign} ||u_i||

  (``G_i``: the ``m - c - 2`` benign updates nearest to ``u_i``;
  ``||u_i|| = D(w_i, w_Re)``; ``m - 2c - 1`` clamped at 1), and is halved
  until Krum with ``f`` Byzantine clients selects ``u'``
  (:func:`krum_selects_crafted`) or ``lambda`` falls below ``threshold``
  (1e-5; the paper stops there and the attackers send ``-lambda s`` with that
  last ``lambda``). Jittable: a bounded ``lax.while_loop`` of at most
  ``max_halvings`` halvings (64 covers any ``lambda_0`` below ``threshold *
  2^64``); each step costs O(K^2 log K) from one O(K^2 d) pass over the
  updates (a Gram matrix, :func:`fedjax_sparse.attacks._stats.centered_pass`).

  Knowledge: full knowledge (the benign updates of the round). The check is
  on the dense uploads; under top-k sparsification Krum sees the attackers'
  sparsified ``-lambda s`` (all magnitudes equal: the sparsifier keeps the
  lowest-index packs), which the check does not model.

  Args:
    f: Krum's ``f``; None uses this round's number of attackers ``k_m``
      (the run's ``f`` when every client takes part in every round; set it
      to ``--num_byzantine`` otherwise).
    threshold: the smallest ``lambda`` tried (1e-5).
    max_halvings: bound of the halving loop.
  """
  if threshold <= 0:
    raise ValueError(f"fang_krum: threshold must be > 0, got {threshold}")
  if f is not None and f < 0:
    raise ValueError(f"fang_krum: f must be >= 0, got {f}")

  def apply(state, updates, is_malicious, key, ctx):
    del key, ctx
    k = updates.shape[0]
    sel = _stats.knowledge_rows(is_malicious, "omniscient")
    benign = sel > 0
    mu = _stats.masked_mean(updates, sel)
    out = _stats.centered_pass(
        updates, mu, sel, want_gram=True,
        vec_fn=lambda m, _: jnp.stack([jnp.sign(m), m]), vec_uses_sigma=False)
    # e_i = u_i - mu; V = [s; mu].
    pair_sq = _stats.pair_sq_dists(out.gram)
    e_s, e_mu = out.proj[:, 0], out.proj[:, 1]
    ss, s_mu, mumu = out.vv[0, 0], out.vv[0, 1], out.vv[1, 1]
    norm_sq = jnp.maximum(out.row_sq + 2.0 * e_mu + mumu, 0.0)   # ||u_i||^2

    def crafted_sq(lam):
      # ||u_i + lam s||^2 = ||u_i||^2 + 2 lam <e_i + mu, s> + lam^2 ||s||^2
      return jnp.maximum(norm_sq + 2.0 * lam * (e_s + s_mu) + lam * lam * ss, 0.0)

    k_m = jnp.sum(is_malicious, dtype=jnp.int32)
    c = k_m.astype(jnp.float32)
    pair = benign[:, None] & benign[None, :] & ~jnp.eye(k, dtype=bool)
    dist = jnp.where(pair, jnp.sqrt(pair_sq), jnp.inf)
    near = _smallest_sum(dist, jnp.maximum(k - k_m - 2, 0))
    s_norm = jnp.sqrt(ss)
    inv = jnp.where(s_norm > 0, 1.0 / jnp.where(s_norm > 0, s_norm, 1.0), 0.0)
    lam0 = (inv / jnp.maximum(k - 2.0 * c - 1.0, 1.0)
            * jnp.min(jnp.where(benign, near, jnp.inf))
            + inv * jnp.sqrt(jnp.max(jnp.where(benign, norm_sq, 0.0))))
    lam0 = jnp.where(jnp.isfinite(lam0), lam0, 0.0)
    f_ = k_m if f is None else jnp.int32(f)

    def cond(carry):
      lam, it, done = carry
      return (~done) & (lam >= threshold) & (it < max_halvings)

    def body(carry):
      lam, it, _ = carry
      ok = krum_selects_crafted(pair_sq, crafted_sq(lam), is_malicious, f_)
      return jnp.where(ok, lam, lam / 2.0), it + 1, ok

    lam, _, _ = lax.while_loop(cond, body, (lam0, jnp.int32(0), jnp.array(False)))
    crafted = -lam * jnp.sign(mu)
    return replace_malicious(updates, is_malicious, crafted), state

  return UpdateAttack(no_state, apply)
