"""Targeted model poisoning with PGD (sparsefed.txt 3.2, B.1.2, Alg. 6).

The attackers hold an auxiliary set of ``s`` test points whose labels were
flipped to a wrong class (:func:`make_auxiliary_set`). Each round they start
from the global model, take PGD steps on minibatches of that set and, after
every step, project the accumulated change onto the L2 ball of the server's
clipping norm ``L`` (``M <- M_0 - CLIP(M_0 - M)``, Alg. 6 line 5), so the
update survives norm clipping untouched. All colluding attackers upload the
same update ("colluding attack", section 3.2).

How it plugs in. Training needs the model, so the update is computed from
the flat global model:

* give the factory ``loss_fn(params, x, y) -> scalar``, ``unravel`` (flat ->
  params pytree, from ``jax.flatten_util.ravel_pytree``) and the auxiliary
  arrays; ``apply`` then runs :func:`pgd_update` on
  ``unravel(ctx.global_params)`` inside the jitted round step; or
* compute the update yourself with :func:`pgd_update` and pass it as
  ``ctx.targeted_update`` (factory called without ``loss_fn``).

Either way the malicious rows are replaced by that single update
(``u = global - local``, the same sign convention as honest updates).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np

from fedjax_sparse.attacks.base import UpdateAttack, no_state, replace_malicious
from fedjax_sparse.attacks.registry import register_update
from fedjax_sparse.requirements import AUX_SET, declare

Array = jax.Array
PyTree = Any
PROJECTIONS = ("ball", "sphere")


def project_l2_ball(v: Array, radius: float, onto: str = "ball") -> Array:
  """Euclidean projection of ``v`` onto the L2 ball (or sphere) of ``radius``.

  ``"ball"``: ``v * min(1, radius / ||v||)`` (the clipping of SparseFed Alg. 1,
  ALGORITHMS.md section 5). ``"sphere"``: ``v * radius / ||v||``, the
  "perimeter" of Alg. 6 line 5 (0 stays 0).
  """
  if onto not in PROJECTIONS:
    raise ValueError(f"unknown projection {onto!r}; choose one of {', '.join(PROJECTIONS)}")
  norm = jnp.linalg.norm(v)
  safe = jnp.where(norm > 0, norm, 1.0)
  if onto == "ball":
    return v * jnp.minimum(1.0, radius / safe)
  return jnp.where(norm > 0, v * (radius / safe), v)


def pgd_update(loss_fn: Callable[[PyTree, Array, Array], Array], params: PyTree,
               aux_x: Array, aux_y: Array, *, clip_norm: float, lr: float = 0.1,
               steps: int = 10, batch_size: Optional[int] = None,
               key: Optional[Array] = None, onto: str = "ball") -> Array:
  """Runs Alg. 6 and returns the flat update ``u = params - local``.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar`` mean loss on a batch.
    params: the global model (pytree).
    aux_x, aux_y: the auxiliary set ``[s, ...]``, ``int32[s]`` (flipped labels).
    clip_norm: L, the server's L2 clipping norm.
    lr: eta, the attacker's step size.
    steps: PGD steps ("PGD epochs" of Alg. 6: one minibatch each).
    batch_size: minibatch size l (None: the whole auxiliary set). Step ``t``
      uses rows ``[t l, (t+1) l)`` of a permutation of the set (wrapping).
    key: PRNG key of the permutation (None: the set's order).
    onto: ``"ball"`` or ``"sphere"`` (:func:`project_l2_ball`).

  Returns:
    ``f32[d]`` flat update, ``||u|| <= clip_norm`` (``== clip_norm`` for
    ``"sphere"``).
  """
  flat0, unravel = ravel_pytree(params)
  aux_x = jnp.asarray(aux_x)
  aux_y = jnp.asarray(aux_y)
  s = aux_x.shape[0]
  bs = s if batch_size is None else int(batch_size)
  if not 1 <= bs <= s:
    raise ValueError(f"batch_size must be in [1, {s}], got {bs}")
  order = jnp.arange(s) if key is None else jax.random.permutation(key, s)
  grad_fn = jax.grad(lambda f, x, y: loss_fn(unravel(f), x, y))

  def body(t, flat):
    idx = jnp.take(order, (t * bs + jnp.arange(bs)) % s)
    g = grad_fn(flat, aux_x[idx], aux_y[idx])
    stepped = flat - lr * g
    return flat0 + project_l2_ball(stepped - flat0, clip_norm, onto)

  local = jax.lax.fori_loop(0, steps, body, flat0)
  return flat0 - local


def make_auxiliary_set(x: np.ndarray, y: np.ndarray, size: int, num_classes: int,
                       seed: int = 0, return_index: bool = False):
  """The auxiliary set of targeted poisoning (sparsefed.txt 3.2).

  Samples ``size`` points of ``x, y`` (the paper: of the test split) without
  replacement and flips each label to a class drawn uniformly from the
  ``num_classes - 1`` wrong ones.

  Returns:
    ``(x [size, ...], y_flipped int32[size])`` numpy arrays, and with
    ``return_index`` also the sampled rows' positions ``int[size]`` in ``x``.
  """
  if not 1 <= size <= len(y):
    raise ValueError(f"size must be in [1, {len(y)}], got {size}")
  if num_classes < 2:
    raise ValueError("label flipping needs at least 2 classes")
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(y), size=size, replace=False)
  y0 = np.asarray(y)[idx].astype(np.int32)
  shift = rng.integers(1, num_classes, size=size)
  out = (np.asarray(x)[idx], ((y0 + shift) % num_classes).astype(np.int32))
  return (*out, idx) if return_index else out


@register_update("targeted_pgd")
@declare(AUX_SET)
def targeted_pgd(loss_fn: Optional[Callable] = None, unravel: Optional[Callable] = None,
                 aux_x: Optional[Array] = None, aux_y: Optional[Array] = None,
                 clip_norm: float = 1.0, lr: float = 0.1, steps: int = 10,
                 batch_size: Optional[int] = None, onto: str = "ball") -> UpdateAttack:
  """Targeted model poisoning (sparsefed.txt B.1.2; see the module docstring).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``; None to read
      ``ctx.targeted_update`` instead.
    unravel: flat ``f32[d]`` -> params pytree (needed with ``loss_fn``).
    aux_x, aux_y: the auxiliary set (needed with ``loss_fn``).
    clip_norm, lr, steps, batch_size, onto: as in :func:`pgd_update`.
  """
  if loss_fn is not None and (unravel is None or aux_x is None or aux_y is None):
    raise ValueError("targeted_pgd with loss_fn needs unravel, aux_x and aux_y")
  if aux_x is not None:
    aux_x, aux_y = jnp.asarray(aux_x), jnp.asarray(aux_y)
  if onto not in PROJECTIONS:
    raise ValueError(f"unknown projection {onto!r}; choose one of {', '.join(PROJECTIONS)}")

  def apply(state, updates, is_malicious, key, ctx):
    if loss_fn is None:
      if ctx.targeted_update is None:
        raise ValueError("targeted_pgd without loss_fn reads "
                         "ctx.targeted_update (f32[d]); it is missing")
      u = ctx.targeted_update
    else:
      params = unravel(ctx.global_params)
      u = pgd_update(loss_fn, params, aux_x, aux_y, clip_norm=clip_norm, lr=lr,
                     steps=steps, batch_size=batch_size, key=key, onto=onto)
    return replace_malicious(updates, is_malicious, u), state

  return UpdateAttack(no_state, apply)
