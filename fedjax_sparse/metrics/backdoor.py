"""Attack success rate of backdoor data attacks (ALGORITHMS.md section 7).

The ASR is the fraction of triggered test samples whose true label is not the
target that the model classifies as the target (class_aware_masking.txt
5.1.4; DBA measures it with the global trigger). For the semantic backdoor
(sparsefed.txt 3.2, "misclassifying the digit 7 as 1") the "triggered"
samples are the test samples of the source class.
"""

from __future__ import annotations

import inspect
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

def attack_success_rate(logits: Array, target: Array | int,
                        mask: Optional[Array] = None) -> Array:
  """Fraction of (triggered, non-target) examples predicted as ``target``.

  Args:
    logits: ``f32[N, C]`` on the triggered non-target test set.
    target: the target label (int) or ``int[N]`` per example.
    mask: ``bool[N]`` examples that count, or None for all.

  Returns:
    f32 scalar in ``[0, 1]`` (nan when no example counts).
  """
  hits = (jnp.argmax(jnp.asarray(logits), axis=-1) == jnp.asarray(target))
  hits = hits.astype(jnp.float32)
  if mask is None:
    return jnp.mean(hits)
  m = jnp.asarray(mask).astype(jnp.float32)
  return jnp.sum(hits * m) / jnp.sum(m)


def is_backdoor(attack: str) -> bool:
  """Whether ``attack``'s success is an ASR on a triggered test set (its
  factory declares an ``asr_eval_set`` hook, see
  :mod:`fedjax_sparse.requirements`)."""
  from fedjax_sparse.requirements import attack_hook
  try:
    return attack_hook(attack, "asr_eval_set") is not None
  except ValueError:
    return False


def backdoor_attacks() -> list[str]:
  """The registered backdoor attacks (:func:`is_backdoor`)."""
  from fedjax_sparse import attacks as attacks_lib
  return [n for n in attacks_lib.names() if is_backdoor(n)]


def _defaults(attack: str) -> dict:
  from fedjax_sparse.requirements import attack_factory
  sig = inspect.signature(attack_factory(attack))
  return {n: p.default for n, p in sig.parameters.items()
          if p.default is not inspect.Parameter.empty}


def backdoor_eval_set(attack: str, attack_kwargs: dict, x: np.ndarray,
                      y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The ASR test set of a backdoor attack built as the attack is configured
  (the attack's ``asr_eval_set`` hook; for the built-in ones: the
  non-target samples stamped with the trigger and labelled the target for
  ``pixel_backdoor`` and ``dba``, the samples of the source class labelled
  the target for ``semantic_backdoor``).

  The accuracy on the returned set is the ASR.

  Args:
    attack: a backdoor attack (:func:`backdoor_attacks`).
    attack_kwargs: the attack's keyword arguments (``--attack_args``);
      missing ones take the attack factory's defaults.
    x: test examples ``[N, ...]``.
    y: test labels ``int[N]``.

  Returns:
    ``(x_asr, y_target int32)`` numpy arrays (possibly empty).
  """
  if not is_backdoor(attack):
    raise ValueError(f"{attack!r} is not a backdoor attack; choose one of "
                     f"{', '.join(backdoor_attacks())}")
  from fedjax_sparse.requirements import attack_hook
  kw = {**_defaults(attack), **attack_kwargs}
  return attack_hook(attack, "asr_eval_set")(kw, np.asarray(x), np.asarray(y))
