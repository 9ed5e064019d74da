"""Atomic result files and resumable checkpoints.

Every file is written to a temporary sibling and renamed into place, so a run
killed at any moment leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str, records: list[dict]) -> None:
  atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                  for r in records))


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _to_host(leaf):
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(leaf))
  return np.asarray(leaf)


def save_checkpoint(path: str, state: Any) -> None:
  """Saves a pytree of arrays (PRNG keys included) atomically as ``.npz``."""
  leaves = jax.tree.leaves(state)
  buf = io.BytesIO()
  np.savez(buf, **{f"leaf_{i}": _to_host(l) for i, l in enumerate(leaves)})
  atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, like: Any) -> Any:
  """Loads a checkpoint written by :func:`save_checkpoint` into ``like``'s structure."""
  leaves, treedef = jax.tree.flatten(like)
  with np.load(path) as z:
    if len(z.files) != len(leaves):
      raise ValueError(f"checkpoint {path} has {len(z.files)} arrays, expected "
                       f"{len(leaves)}: it was written by another configuration")
    out = []
    for i, ref in enumerate(leaves):
      arr = z[f"leaf_{i}"]
      if isinstance(ref, jax.Array) and jax.dtypes.issubdtype(
          ref.dtype, jax.dtypes.prng_key):
        out.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(ref)))
      else:
        if arr.shape != np.shape(ref):
          raise ValueError(f"checkpoint {path} does not match this "
                           f"configuration (leaf {i}: {arr.shape} vs "
                           f"{np.shape(ref)})")
        out.append(jax.numpy.asarray(arr, dtype=ref.dtype))
  return jax.tree.unflatten(treedef, out)
