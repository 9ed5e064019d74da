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

# Data attacks whose success is an ASR on a triggered test set.
BACKDOOR_ATTACKS = ("pixel_backdoor", "dba", "semantic_backdoor")


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


def _defaults(attack: str) -> dict:
  from fedjax_sparse import attacks as attacks_lib
  sig = inspect.signature(attacks_lib.get_data_attack(attack))
  return {n: p.default for n, p in sig.parameters.items()
          if p.default is not inspect.Parameter.empty}


def backdoor_eval_set(attack: str, attack_kwargs: dict, x: np.ndarray,
                      y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The ASR test set of a backdoor attack built as the attack is configured.

  * ``pixel_backdoor``: the non-target samples stamped with the attack's
    trigger (by default DBA's global trigger) and labelled ``target_label``;
  * ``dba``: the same with the global trigger, the union of the local ones;
  * ``semantic_backdoor``: the samples of class ``source`` labelled
    ``target``.

  The accuracy on the returned set is the ASR.

  Args:
    attack: one of :data:`BACKDOOR_ATTACKS`.
    attack_kwargs: the attack's keyword arguments (``--attack_args``);
      missing ones take the attack factory's defaults.
    x: test examples ``[N, ...]``.
    y: test labels ``int[N]``.

  Returns:
    ``(x_asr, y_target int32)`` numpy arrays (possibly empty).
  """
  from fedjax_sparse.attacks import data as data_attacks
  if attack not in BACKDOOR_ATTACKS:
    raise ValueError(f"{attack!r} is not a backdoor attack; choose one of "
                     f"{', '.join(BACKDOOR_ATTACKS)}")
  kw = {**_defaults(attack), **attack_kwargs}
  x = np.asarray(x)
  y = np.asarray(y)
  if attack == "semantic_backdoor":
    keep = y == kw["source"]
    return x[keep], np.full((int(keep.sum()),), kw["target"], np.int32)
  if attack == "pixel_backdoor":
    trigger = kw.get("trigger")
    if trigger is None:
      trigger = data_attacks.global_trigger(data_attacks.dba_triggers(x.shape[1:]))
  else:
    triggers = kw.get("triggers")
    if triggers is None:
      triggers = data_attacks.dba_triggers(x.shape[1:], kw["num_triggers"])
    trigger = data_attacks.global_trigger(triggers)
  return data_attacks.backdoor_test_set(x, y, trigger, kw["target_label"])
