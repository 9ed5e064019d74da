"""Neurotoxin: a durable backdoor in the coordinates benign clients rarely
update (Zhang et al., ICML 2022, Alg. 1).

The attacker trains on backdoored batches (the pixel trigger of
``pixel_backdoor``: DBA's global trigger by default, ``poison_fraction`` of
each batch stamped and relabelled ``target_label``) by projected gradient
descent: at every local step its gradient is multiplied by a mask that is 0
on the ``top_fraction`` of coordinates with the largest ``|g_{t-1}|`` and 1
elsewhere, where ``g_{t-1}`` is the previous round's global update (the
aggregate the server applied: Alg. 1's "benign gradient" estimate from the
two last global models; ``prev_aggregate`` of the round state). The
backdoor then lives where the benign clients' next updates do not
overwrite it.

Knowledge: the attacker sees the global models it downloads (no other
client's update). Conventions (ours, where the paper is silent):

* ``top_fraction = 0.01``: the paper evaluates several mask ratios; the
  authors' code calls ``1 - top_fraction`` ``gradmask_ratio`` and
  BackFed's default keeps the bottom 99%, as this default does.
* Before the first aggregate exists (``g_{t-1} = 0``) nothing is masked.
* The mask is taken over the whole flat vector (BackFed's
  ``aggregate_all_layers``), ties to the lower index (exactly ``ceil(top_fraction
  d)`` coordinates masked).
* The optional L2-ball projection of the authors' code (``PGD`` flag, off
  there by default) is not applied; combine with a norm-bounded defence to
  study it.

Under sparse uploads the attacker's update goes through the same pack top-k
as every client's: the sparse-aware backdoor the issue asks for is the
combination ``--attack=neurotoxin --sparsify=topk``. The ASR is measured on
the trigger's test set (non-target test images stamped with the trigger).
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp

from fedjax_sparse.attacks.base import DataAttack
from fedjax_sparse.attacks.data import (Trigger, _check_fraction, _check_label,
                                        _pixel_asr_set, pixel_backdoor)
from fedjax_sparse.attacks.registry import register_data
from fedjax_sparse.requirements import declare
from fedjax_sparse.sparsify.topk import topk_mask


def neurotoxin_mask(prev_update, top_fraction: float):
  """``f32[d]``: 0 on the ``ceil(top_fraction d)`` largest ``|prev_update|``
  (ties to the lower index), 1 elsewhere; all ones when ``prev_update`` is
  zero or ``top_fraction`` is 0."""
  d = prev_update.shape[-1]
  k = min(math.ceil(round(top_fraction * d, 9)), d)
  if k == 0:
    return jnp.ones((d,), jnp.float32)
  top = topk_mask(jnp.abs(prev_update), k)
  mask = jnp.where(top, 0.0, 1.0).astype(jnp.float32)
  return jnp.where(jnp.any(prev_update != 0), mask, jnp.ones_like(mask))


@register_data("neurotoxin")
@declare(asr_eval_set=_pixel_asr_set)
def neurotoxin(num_classes: int, target_label: int = 0,
               poison_fraction: float = 0.2, top_fraction: float = 0.01,
               trigger: Optional[Trigger] = None) -> DataAttack:
  """Neurotoxin: the pixel backdoor trained off the benign top coordinates.

  Args:
    num_classes: C.
    target_label: the backdoor's target class.
    poison_fraction: fraction of each batch poisoned.
    top_fraction: fraction of the coordinates (largest ``|g_{t-1}|``) whose
      gradient the attacker zeroes, in ``[0, 1)``.
    trigger: the pattern; None for DBA's global trigger (as
      ``pixel_backdoor``).

  Returns:
    A :class:`DataAttack` whose ``grad_mask`` reads
    ``ctx.prev_aggregate``.
  """
  _check_label("target_label", target_label, num_classes)
  _check_fraction("poison_fraction", poison_fraction)
  if not 0.0 <= top_fraction < 1.0:
    raise ValueError(f"neurotoxin: top_fraction must be in [0, 1), got "
                     f"{top_fraction}")
  base = pixel_backdoor(num_classes, target_label, poison_fraction, trigger)

  def grad_mask(ctx):
    if ctx is None or ctx.prev_aggregate is None:
      raise ValueError("neurotoxin needs the previous global update "
                       "(AttackContext.prev_aggregate)")
    return neurotoxin_mask(ctx.prev_aggregate, top_fraction)

  return DataAttack(base.apply, num_classes, grad_mask)
