"""Jitted test evaluation of a model: loss, top-1 and top-5 accuracy."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def make_evaluate(apply_fn: Callable, batch_size: int = 1000,
                  jit: bool = True) -> Callable:
  """Builds ``evaluate(params, model_state, x, y) -> dict`` (loss, top-1, top-5).

  Evaluates in fixed-size batches with ``lax.map``; a ragged tail is padded
  and masked, so one compilation serves any test-set size.
  """

  def evaluate(params, model_state, x, y):
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    yp = jnp.pad(y, (0, pad))
    mask = jnp.arange(nb * batch_size) < n
    variables = {"params": params, **model_state}

    def one(batch):
      xb, yb, mb = batch
      logits = apply_fn(variables, xb, train=False)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      top1 = jnp.argmax(logits, -1) == yb
      kk = min(5, logits.shape[-1])
      top5 = jnp.any(jax.lax.top_k(logits, kk)[1] == yb[:, None], axis=-1)
      mf = mb.astype(jnp.float32)
      return jnp.stack([jnp.sum(loss * mf), jnp.sum(top1 * mf),
                        jnp.sum(top5 * mf)])

    sums = jax.lax.map(one, (xp.reshape(nb, batch_size, *x.shape[1:]),
                             yp.reshape(nb, batch_size),
                             mask.reshape(nb, batch_size)))
    tot = jnp.sum(sums, axis=0) / n
    return {"loss": tot[0], "accuracy": tot[1], "top5_accuracy": tot[2]}

  return jax.jit(evaluate) if jit else evaluate
