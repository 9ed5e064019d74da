"""Class-aware gradient masking (class_aware_masking.txt Alg. 1, eqs. 3.3-3.11).

ALGORITHMS.md section 4. The server holds a validation set split by class,
``V_c`` for ``c = 1..C``. For every sampled client ``i`` with local model
``LM_i = global - u_i``:

1. Class assignment (eq. 3.3, Alg. 1 "Method 2"): ``c*_i = argmax_c
   Accuracy(LM_i, V_c)`` (ties: the lowest class).
2. Mask generation (eqs. 3.4-3.7): ``G_i = grad L(LM_i, V_{c*_i})`` (mean
   softmax cross-entropy over the class's validation samples);
   ``M_new = 1`` on the top ``p`` fraction of ``|G_i|`` (exactly
   ``ceil(p * d)`` coordinates, ties to the lower index) and ``gamma``
   elsewhere. (Eq. 3.7 writes ``|G| > tau`` with ``tau`` the k-th largest
   value, which would keep ``k - 1``; the text says the top ``p`` are kept.)
3. Incremental update (eq. 3.8): ``M_i = (1 - beta) M_new + beta M_prev``,
   with ``M_prev`` the client's mask from the last round it took part in
   (all ones before its first round).
4. Weighted aggregation (eqs. 3.9-3.11): ``omega_i = sum_theta M_i(theta)``,
   ``GM = sum_i omega_i (LM_i * M_i) / sum_i omega_i``.

The aggregator returns ``update = global - GM``: the server's step
``theta - server_lr * update`` lands on ``GM`` only with ``server_lr = 1`` and a
plain SGD server optimiser (no momentum), which is the paper's behaviour
(Alg. 1 line 20: ``GM^{r+1} <- GM^r``). Note that the paper masks whole
models, so every parameter outside a client's top ``p`` is shrunk towards 0
by ``gamma``. ``mode="delta"`` (ours) masks the updates instead:
``update = sum_i omega_i (u_i * M_i) / sum_i omega_i``, which leaves the
global model where nobody moves it and works with any server optimiser.

State: the per-client masks ``f32[num_clients, d]`` (all clients of the
federation, touched only at the sampled rows ``ctx.clients``).
Acceptance: the soft weight ``omega_i / max_j omega_j``. Choices the paper
leaves open (ours): the clients' dataset sizes (``weights``) are not used
(the method's point is to need no client metadata), nor are the sparse upload
masks (under sparsification ``LM_i`` equals the global model off the
client's upload mask); a row with inf/nan gets ``omega_i = 0`` and keeps its
previous mask.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_sparse.aggregators import _common, _order_stats
from fedjax_sparse.aggregators.base import AggOut, Aggregator
from fedjax_sparse.aggregators.registry import register
from fedjax_sparse.requirements import MODEL, declare
from fedjax_sparse.sparsify.topk import topk_mask

Array = jax.Array
MODES = ("model", "delta")


class ClassAwareState(NamedTuple):
  """Aggregator state.

  Attributes:
    masks: ``f32[num_clients, d]`` every client's mask ``M_i`` from the last
      round it took part in (ones before that).
  """

  masks: Array


def num_retained(d: int, p: float) -> int:
  """``ceil(p * d)`` coordinates kept at 1 (eq. 3.6), between 1 and ``d``.

  The product is rounded to 9 decimals first so that e.g. ``p = 0.1`` of
  ``d = 30`` keeps 3, not 4.
  """
  return min(max(math.ceil(round(p * d, 9)), 1), d)


def _check(p, beta, gamma, mode, num_clients, val_x, val_y):
  if not 0.0 < p <= 1.0:
    raise ValueError(f"class_aware_masking: the zip percentage p must be in "
                     f"(0, 1], got {p}")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"class_aware_masking: beta must be in [0, 1], got {beta}")
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"class_aware_masking: gamma must be in [0, 1], got {gamma}")
  if mode not in MODES:
    raise ValueError(f"class_aware_masking: unknown mode {mode!r}; known: "
                     f"{', '.join(MODES)}")
  if num_clients < 1:
    raise ValueError(f"class_aware_masking: num_clients must be >= 1, got "
                     f"{num_clients}")
  if val_y.ndim != 2 or tuple(val_x.shape[:2]) != tuple(val_y.shape):
    raise ValueError(
        "class_aware_masking: val_x must be [num_classes, n_per_class, ...] and "
        f"val_y [num_classes, n_per_class]; got {tuple(val_x.shape)} and "
        f"{tuple(val_y.shape)} (build them with "
        "fedjax_sparse.data.per_class_validation)")


@register("class_aware_masking")
@declare(MODEL)
def class_aware_masking(apply_fn: Callable[..., Array],
                        unravel: Callable[[Array], Any],
                        val_x, val_y, num_clients: int, p: float = 0.5,
                        beta: float = 0.4, gamma: float = 0.5,
                        mode: str = "model",
                        model_state: Optional[dict] = None,
                        client_batch: Optional[int] = None) -> Aggregator:
  """Class-aware gradient masking (class_aware_masking.txt Alg. 1).

  Args:
    apply_fn: a Linen ``module.apply``, called as
      ``apply_fn({"params": params, **model_state}, x, train=False)``.
    unravel: ``f32[d] -> params`` pytree (from ``ravel_pytree``).
    val_x: ``f32[num_classes, n_per_class, ...]`` the server's validation
      inputs by class (:func:`fedjax_sparse.data.per_class_validation`).
    val_y: ``int32[num_classes, n_per_class]`` their labels.
    num_clients: clients in the federation (rows of the mask state).
    p: zip percentage, the fraction of parameters kept at 1 (0.5).
    beta: mask update factor, the weight of the previous mask (0.4).
    gamma: scale-down factor of the other parameters (0.5).
    mode: ``"model"`` (the paper: mask local models, needs ``server_lr = 1``
      and plain SGD on the server) or ``"delta"`` (ours: mask the updates).
    model_state: non-parameter collections for ``apply_fn`` (e.g.
      ``{"batch_stats": ...}``), fixed; ``None`` for models without any.
    client_batch: evaluate this many clients at once (``lax.map`` with
      ``batch_size``); ``None`` vmaps all K clients together.

  Returns:
    An :class:`Aggregator` whose state is a :class:`ClassAwareState`; it
    reads ``ctx.clients`` and ``ctx.global_params``. Diagnostics:
    ``dominant_class int32[K]``, ``class_accuracy f32[K]`` (accuracy on the
    dominant class), ``omega f32[K]``.
  """
  val_x = jnp.asarray(val_x, jnp.float32)
  val_y = jnp.asarray(val_y, jnp.int32)
  _check(p, beta, gamma, mode, num_clients, val_x, val_y)
  num_classes, per_class = val_y.shape
  flat_x = val_x.reshape((num_classes * per_class,) + val_x.shape[2:])
  flat_y = val_y.reshape(-1)
  fixed_state = dict(model_state or {})

  def logits_of(theta, variables, x):
    return apply_fn({"params": unravel(theta), **variables}, x, train=False)

  def class_loss(theta, variables, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits_of(theta, variables, x), y))

  def evaluate(args):
    """Dominant class (eq. 3.3) and the loss gradient on it (eq. 3.4)."""
    theta, variables = args
    correct = jnp.argmax(logits_of(theta, variables, flat_x), axis=-1) == flat_y
    accuracy = jnp.mean(correct.reshape(num_classes, per_class)
                        .astype(jnp.float32), axis=1)
    c_star = jnp.argmax(accuracy).astype(jnp.int32)
    grad = jax.grad(class_loss)(theta, variables, val_x[c_star], val_y[c_star])
    return c_star, accuracy[c_star], grad

  def init(d):
    return ClassAwareState(masks=jnp.ones((num_clients, d), jnp.float32))

  def apply(state, updates, masks, weights, key, ctx):
    del masks, weights, key
    d = updates.shape[1]
    if ctx.clients is None:
      raise ValueError(
          "class_aware_masking needs the sampled client ids in "
          "ctx.clients (int32[K]) to index its per-client masks")
    if ctx.global_params is None:
      raise ValueError("class_aware_masking needs ctx.global_params (the flat "
                       "global model) to rebuild the local models")
    if state.masks.shape[1] != d:
      raise ValueError(f"class_aware_masking: state masks have d = "
                       f"{state.masks.shape[1]}, updates d = {d}")
    clients = ctx.clients
    ok = _common.finite_rows(updates)
    x = _common.zero_rows(updates, ok)
    local = ctx.global_params.astype(x.dtype)[None, :] - x  # LM_i
    # Each local model LM_i with its own BatchNorm statistics when the round
    # step provides them; otherwise the statistics given at construction.
    if ctx.client_model_state is not None:
      per_client = dict(ctx.client_model_state)
    else:
      per_client = jax.tree.map(
          lambda a: jnp.broadcast_to(a, (local.shape[0],) + a.shape), fixed_state)
    if client_batch is None:
      c_star, acc, grads = jax.vmap(evaluate)((local, per_client))
    else:
      c_star, acc, grads = jax.lax.map(evaluate, (local, per_client),
                                       batch_size=client_batch)
    # Eqs. 3.6-3.7: 1 on the top p fraction of |G_i|, gamma elsewhere.
    top = topk_mask(jnp.abs(grads), num_retained(d, p))
    new = jnp.where(top, jnp.float32(1.0), jnp.float32(gamma))
    prev = state.masks[clients]
    mask = (1.0 - beta) * new + beta * prev  # eq. 3.8
    mask = jnp.where(ok[:, None], mask, prev)
    omega = jnp.where(ok, jnp.sum(mask, axis=1), 0.0)  # eq. 3.11
    total = jnp.sum(omega)
    coeff = _common.divide(omega, total)
    # Eq. 3.10 (or its update form): sum_i coeff_i (v_i * M_i).
    if mode == "model":
      gm = _order_stats.sum_rows(coeff[:, None] * (local * mask))
      update = jnp.where(total > 0, ctx.global_params.astype(x.dtype) - gm, 0.0)
    else:
      update = _order_stats.sum_rows(coeff[:, None] * (x * mask))
    acceptance = _common.divide(omega, jnp.max(omega))
    new_state = ClassAwareState(masks=state.masks.at[clients].set(mask))
    diagnostics = {"dominant_class": c_star, "class_accuracy": acc,
                   "omega": omega}
    return AggOut(update, acceptance, diagnostics), new_state

  return Aggregator(init, apply)

