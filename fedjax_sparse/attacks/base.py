"""The attack contract shared by every data and update attack.

Two kinds of attack, each a small NamedTuple of pure functions in the spirit
of optax (ALGORITHMS.md section 5)::

  attack = fedjax_sparse.attacks.get_update_attack("alie")()
  state = attack.init(d)
  updates, state = attack.apply(state, updates, is_malicious, key, ctx)

  poison = fedjax_sparse.attacks.get_data_attack("label_flip")(num_classes=10)
  x, y = poison.apply(x, y, key, ctx)

Update attacks (:class:`UpdateAttack`):

* ``updates``: ``f32[K, d]``, every sampled client's *honest* update
  (``global - local``). The rows of malicious clients hold what they would
  honestly send, computed on their own data: "partial knowledge" attacks
  estimate the benign statistics from these rows.
* ``is_malicious``: ``bool[K]``. How many of the K sampled clients are
  malicious varies from round to round (``k_m = sum(is_malicious)`` is a
  traced value), so every statistic is a masked reduction over fixed shapes,
  never a boolean index.
* ``apply`` returns the full ``f32[K, d]`` matrix in which only the malicious
  rows are replaced; benign rows are returned bit for bit.
* Knowledge (factory argument where the paper supports it):
  ``"omniscient"`` computes the mean ``mu`` and coordinate standard deviation
  ``sigma`` over the benign rows, ``"partial"`` over the malicious rows'
  honest updates (hybrid_sparse_attack.txt App. C.3).
* Colluding attackers send the same vector unless the attack says otherwise
  (ALGORITHMS.md section 5).

Data attacks (:class:`DataAttack`) transform one malicious client's minibatch
``(x f32[B, ...], y int32[B])``; the factory takes ``num_classes``.
``ctx.client_rank`` (the client's index among the malicious set) picks a DBA
trigger.

The start round (paper default 10, ALGORITHMS.md section 5) is applied by the
round step (``round >= start_round``); ``apply`` does not gate on it.

Wiring into a round step (a sketch)::

  # once: attack_state = attack.init(d), carried in the round state
  attacked, new_state = attack.apply(attack_state, updates, is_mal, key, ctx)
  on = ctx.round >= start_round
  updates = jnp.where(on, attacked, updates)   # or lax.cond on ``on``
  attack_state = jax.tree.map(lambda a, b: jnp.where(on, a, b), new_state, attack_state)

  # data attacks, inside local training of client i, per minibatch:
  ctx_i = ctx.replace(client_rank=malicious_rank[i])
  xp, yp = data_attack.apply(x, y, key_i, ctx_i)
  x, y = jnp.where(is_mal[i] & on, xp, x), jnp.where(is_mal[i] & on, yp, y)

Update attacks run after local training and before sparsification (the
sparsifier then derives the attackers' masks from their crafted updates, as
index poisoning relies on). Donate or reuse the ``updates`` buffer where
possible: the malicious rows are then written in place (a fresh K x d
output costs page faults of the order of a full pass).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.context import RoundContext

Array = jax.Array
PyTree = Any

KNOWLEDGE = ("omniscient", "partial")
CHOOSE_MODES = ("first", "random")


# The typed round context under the name of the attack contract (one class
# for rules and attacks; see fedjax_sparse/context.py for its fields). Attacks
# read ``round``, ``global_params``, ``prev_aggregate``, ``weights``,
# ``layout``, ``num_clients``, ``pack_size`` and the side inputs
# ``client_rank`` (data attacks), ``targeted_update`` and ``agg_state``.
AttackContext = RoundContext


InitFn = Callable[[int], PyTree]
UpdateApplyFn = Callable[..., tuple[Array, PyTree]]
DataApplyFn = Callable[..., tuple[Array, Array]]


class UpdateAttack(NamedTuple):
  """A pure ``init``/``apply`` pair over the stacked updates.

  ``init(d) -> state``;
  ``apply(state, updates f32[K, d], is_malicious bool[K], key, ctx)
  -> (updates f32[K, d], state)`` with only the malicious rows replaced.
  """

  init: InitFn
  apply: UpdateApplyFn


class DataAttack(NamedTuple):
  """``apply(x f32[B, ...], y int32[B], key, ctx) -> (x, y)`` for one client.

  Attributes:
    apply: the batch transformation.
    num_classes: number of classes it was built for.
    grad_mask: optional ``grad_mask(ctx) -> f32[d]``, a multiplier on the
      poisoning client's flat gradient at every local step (projected
      gradient descent onto the coordinates it leaves nonzero, as
      Neurotoxin's); ``ctx`` is the client's :class:`AttackContext` with
      ``prev_aggregate`` (last round's aggregated update). None: gradients
      as they are.
    project: optional ``project(params, global_params, ctx) -> params``
      (pytrees), applied to the poisoning client's model after every local
      step (the edge-case backdoor's PGD onto a ball around the global
      model). None: no projection.
  """

  apply: DataApplyFn
  num_classes: int
  grad_mask: Optional[Callable[..., Array]] = None
  project: Optional[Callable[..., PyTree]] = None


def no_state(d: int) -> tuple:
  """``init`` of stateless attacks."""
  del d
  return ()


def check_knowledge(knowledge: str) -> None:
  if knowledge not in KNOWLEDGE:
    raise ValueError(f"unknown knowledge {knowledge!r}; choose one of "
                     f"{', '.join(KNOWLEDGE)}")


def replace_malicious(updates: Array, is_malicious: Array, malicious: Array) -> Array:
  """Rows of ``updates`` where ``is_malicious``, replaced by ``malicious``.

  Args:
    updates: ``f32[K, d]``.
    is_malicious: ``bool[K]``.
    malicious: ``f32[d]`` (every attacker sends it) or ``f32[K, d]`` (row i
      is attacker i's vector).

  Returns:
    ``f32[K, d]``; benign rows are the input rows unchanged.
  """
  malicious = jnp.asarray(malicious, updates.dtype)
  if malicious.ndim == 1:
    malicious = malicious[None, :]
  return jnp.where(is_malicious[:, None], malicious, updates)


def choose_malicious(num_clients: int, num_malicious: int, mode: str = "first",
                     seed: int = 0) -> np.ndarray:
  """Which of the ``C`` clients are malicious, fixed for a whole run.

  Args:
    num_clients: C, the client population.
    num_malicious: how many are malicious, ``0 <= num_malicious <= C``.
    mode: ``"first"`` (clients ``0..num_malicious-1``, the usual convention
      of the papers' code) or ``"random"`` (uniform without replacement).
    seed: numpy seed for ``"random"``.

  Returns:
    ``bool[C]`` numpy array.
  """
  if mode not in CHOOSE_MODES:
    raise ValueError(f"unknown mode {mode!r}; choose one of "
                     f"{', '.join(CHOOSE_MODES)}")
  if not 0 <= num_malicious <= num_clients:
    raise ValueError(f"num_malicious must be in [0, num_clients={num_clients}], "
                     f"got {num_malicious}")
  out = np.zeros((num_clients,), bool)
  if mode == "first":
    out[:num_malicious] = True
  else:
    rng = np.random.default_rng(seed)
    out[rng.choice(num_clients, size=num_malicious, replace=False)] = True
  return out


def malicious_rank(is_malicious: np.ndarray) -> np.ndarray:
  """``int32[C]``: each client's index among the malicious set (-1 if benign).

  The value to put in ``ctx.client_rank`` for DBA.
  """
  is_malicious = np.asarray(is_malicious, bool)
  rank = np.cumsum(is_malicious) - 1
  return np.where(is_malicious, rank, -1).astype(np.int32)
