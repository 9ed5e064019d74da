"""The checksum file beside a checkpoint: its sha256 and its non-finite leaves.

``<path>.sha256`` (:func:`checksum_path`) holds the sha256 of the files of a
checkpoint's latest step and which leaves held nan or inf when it was
saved; :func:`fedjax_sparse.simulation.checkpoint.load_checkpoint` refuses
a checkpoint whose bytes changed, or whose state holds nan or inf where the
saved one did not (ValueError), so a corrupt checkpoint is never trained on.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.simulation.files import read_json


def is_key(leaf) -> bool:
  """Whether ``leaf`` is an array of typed PRNG keys."""
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.prng_key)


# The checksum file beside a checkpoint, ``<path>.sha256``: JSON with the
# sha256 of every file of the checkpoint's latest step (of the ``.npz`` file)
# and the leaves that held nan or inf when it was saved. It is written
# (atomically) after the step is committed, so a kill in between leaves a
# checkpoint newer than its checksum: that checkpoint loads unverified.
SUM_FORMAT = 1


def checksum_path(path: str) -> str:
  """The checksum file of the checkpoint ``path``: ``<path>.sha256``."""
  return os.fspath(path).rstrip(os.sep) + ".sha256"


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def tree_digests(directory: str) -> dict[str, str]:
  """sha256 of every file under ``directory``, by relative path."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      out[os.path.relpath(full, directory)] = file_digest(full)
  return out


def nonfinite_leaves(state: Any) -> list[str]:
  """The paths of the float leaves of ``state`` that hold nan or inf."""
  out = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if is_key(leaf):
      continue
    if not isinstance(leaf, jax.Array):
      leaf = np.asarray(leaf)
    if not np.issubdtype(leaf.dtype, np.inexact) or not leaf.size:
      continue
    if isinstance(leaf, np.ndarray):
      finite = bool(np.isfinite(leaf).all())
    else:
      # Under jax.distributed every process computes it (the leaf may span
      # them all); the result is replicated, each reads its own copy.
      ok = jnp.isfinite(leaf).all()
      finite = bool(np.asarray(ok.addressable_data(0)))
    if not finite:
      out.append(jax.tree_util.keystr(key_path))
  return out


def _bad_checksums(path: str, side: str, detail: str) -> ValueError:
  return ValueError(
      f"checkpoint {path} cannot be verified: its checksum file {side} "
      f"{detail}; refusing to train on it. Delete {path} and {side} (and "
      "restart the run from the beginning) or restore them from a copy")


def read_checksums(path: str) -> Optional[dict]:
  """The checksum record of the checkpoint ``path`` (None: there is none)."""
  side = checksum_path(path)
  if not os.path.exists(side):
    return None
  try:
    record = read_json(side)
  except ValueError as e:
    raise _bad_checksums(path, side, f"is damaged ({e})") from None

  def valid(r):
    return (isinstance(r, dict) and isinstance(r.get("files"), dict)
            and all(isinstance(v, str) for v in r["files"].values())
            and isinstance(r.get("nonfinite"), list))

  if not valid(record) or (record.get("previous") is not None
                           and not valid(record["previous"])):
    raise _bad_checksums(path, side, "is not a checksum record")
  return record


def check_digests(path: str, want: dict, got: dict, base: str) -> None:
  """Raises ValueError naming the files whose digests differ."""
  differ = sorted(k for k in want.keys() | got.keys()
                  if want.get(k) != got.get(k))
  if not differ:
    return
  names = [os.path.join(base, k) + ("" if k in got else " (missing)")
           + ("" if k in want else " (not in the checksum)")
           for k in differ]
  more = f" and {len(names) - 3} more" if len(names) > 3 else ""
  side = checksum_path(path)
  raise ValueError(
      f"checkpoint {path} does not match its checksum in {side} (changed: "
      f"{', '.join(names[:3])}{more}): it is corrupt; refusing to train on "
      f"it. Delete {path} and {side} (and restart the run from the "
      "beginning) or restore them from a copy")


def verified_nonfinite(path: str, step: int) -> Optional[set]:
  """Verifies the files of the Orbax step ``step`` against the checksum.

  Returns:
    The leaves that were non-finite when it was saved, or None where no
    checksum covers this step (a checkpoint of an earlier version, or one
    whose save was killed before its checksum was written).
  """
  record = read_checksums(path)
  step_dir = os.path.join(os.fspath(path), str(step))
  if record is None or record.get("step") != step or not os.path.isdir(
      step_dir):
    return None
  check_digests(path, record["files"], tree_digests(step_dir), step_dir)
  return set(record["nonfinite"])


def check_finite(path: str, state: Any, allowed: Optional[set]) -> None:
  """Refuses a loaded state with nan or inf where it was saved finite."""
  bad = [p for p in nonfinite_leaves(state)
         if allowed is None or p not in allowed]
  if not bad:
    return
  why = ("were finite when it was saved" if allowed is not None else
         "have no checksum saying it was saved so (a checkpoint of an "
         "earlier version, or one whose save was killed before its "
         "checksum)")
  more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
  raise ValueError(
      f"checkpoint {path} holds non-finite values (nan or inf) in "
      f"{', '.join(bad[:5])}{more}, which {why}: it is corrupt; refusing to "
      f"train on it. Delete {path} (and restart the run from the "
      "beginning) or restore it from a copy")
