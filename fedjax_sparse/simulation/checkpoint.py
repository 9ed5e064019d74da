"""Resumable checkpoints: Orbax directories written atomically, verified on load.

Checkpoints are Orbax checkpoint directories with the guarantee of the
result files (:mod:`fedjax_sparse.simulation.files`): a step is written
under a temporary name and renamed into place once complete, and the
previous step is deleted only after that. Beside each, ``<path>.sha256``
(:mod:`fedjax_sparse.simulation.checksums`) holds the sha256 of its files
and which leaves were non-finite when it was saved; a checkpoint whose
bytes changed, or whose state holds nan or inf where the saved one did not,
is refused (ValueError), never trained on. A path ending in ``.npz`` is the
one-file format of earlier versions.

Import these through :mod:`fedjax_sparse.simulation.io`.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse.simulation.checksums import (SUM_FORMAT, check_digests,
                                                check_finite, checksum_path,
                                                file_digest, is_key,
                                                nonfinite_leaves,
                                                read_checksums, tree_digests,
                                                verified_nonfinite)
from fedjax_sparse.simulation.files import (atomic_write_bytes,
                                            atomic_write_json, unwritable)


# Version of the checkpoint layout (the leaf names and the metadata).
_FORMAT = 1


def _leaf_name(i: int) -> str:
  return f"leaf_{i:05d}"


def _is_npz(path) -> bool:
  return os.fspath(path).endswith(".npz")


def _leaf_specs(state: Any) -> tuple[list, list[dict]]:
  """Leaves of ``state`` (PRNG keys as their data) and their descriptions."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  leaves, specs = [], []
  for key_path, leaf in flat:
    spec = {"path": jax.tree_util.keystr(key_path)}
    if is_key(leaf):
      spec["key_impl"] = str(jax.random.key_impl(leaf))
      leaf = jax.random.key_data(leaf)
    elif not isinstance(leaf, jax.Array):
      leaf = np.asarray(leaf)
    spec["shape"] = list(leaf.shape)
    spec["dtype"] = np.dtype(leaf.dtype).name
    leaves.append(leaf)
    specs.append(spec)
  return leaves, specs


def _describe(spec: dict) -> str:
  """``"['params']['w']: float32[784, 200]"`` (keys: ``key<impl>[...]``)."""
  kind = (f"key<{spec['key_impl']}> data " if "key_impl" in spec else "")
  shape = ", ".join(map(str, spec["shape"]))
  return f"{spec['path'] or 'the root'}: {kind}{spec['dtype']}[{shape}]"


def _check_specs(path, saved: Optional[list], expected: list[dict]) -> None:
  """Raises ValueError unless a checkpoint's leaves are the expected ones."""
  if saved is None:
    raise ValueError(f"{path} holds no leaf descriptions: it was not written "
                     "by save_checkpoint")
  if saved == expected:
    return
  where = []
  if len(saved) != len(expected):
    where.append(f"{len(saved)} arrays where {len(expected)} are expected")
  diff = next(((g, w) for g, w in zip(saved, expected) if g != w), None)
  if diff:
    where.append(f"saved {_describe(diff[0])} where {_describe(diff[1])} is "
                 "expected")
  where = "; ".join(where)
  raise ValueError(f"checkpoint {path} was written by another configuration "
                   f"({where}); choose a new output directory or delete it")


def _manager(path, create: bool = False):
  """An Orbax manager of the numbered steps in the directory ``path``."""
  import orbax.checkpoint as ocp
  # Orbax's OCDBT storage refuses relative paths.
  path = os.path.abspath(os.fspath(path))
  if jax.process_count() > 1:
    _check_same_path(path)
  options = ocp.CheckpointManagerOptions(
      # One committed step is enough: a new one replaces it only once it is
      # complete (renamed from its temporary directory).
      preservation_policy=ocp.checkpoint_managers.LatestN(1),
      enable_async_checkpointing=False,
      # Temporary directories of saves killed half-way go at the next save.
      cleanup_tmp_directories=create,
      create=create,
      save_root_metadata=False,
      lightweight_initialize=True)
  return ocp.CheckpointManager(path, options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def _check_same_path(path: str) -> None:
  """Under ``jax.distributed`` Orbax reads and writes checkpoints together
  with all processes, in one directory: fail where they name different ones
  (it would hang)."""
  import hashlib
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(path.encode()).digest(), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(digest))
  if not (every == digest).all():
    raise ValueError(
        f"process {jax.process_index()} checkpoints to {path}, another "
        "process elsewhere: under jax.distributed every process must use the "
        "same checkpoint directory (the same --output_dir), on storage they "
        "share")


def checkpoint_exists(path: str) -> bool:
  """Whether ``path`` holds a complete checkpoint to resume from.

  Temporary directories left by a save killed half-way do not count.
  """
  if _is_npz(path):
    return os.path.isfile(path)
  if jax.process_count() > 1:
    _check_same_path(os.path.abspath(os.fspath(path)))
  if not os.path.isdir(path):
    return False
  with _manager(path) as mngr:
    return mngr.latest_step() is not None


def save_checkpoint(path: str, state: Any) -> None:
  """Saves a pytree of arrays (typed PRNG keys included) atomically.

  ``path`` is a directory managed by Orbax. Every save writes a new step
  (numbered by a save counter) under a temporary name, renames it into place
  once complete, then deletes the older step, so a run killed at any moment leaves a complete
  checkpoint (the old or the new one). The save is synchronous: the
  checkpoint is committed when this returns, and ``state`` may be donated
  afterwards. Under ``jax.distributed`` every process must call it, with
  the same ``path`` on storage they share: they write one checkpoint
  together (a ValueError says so where they give different paths).

  A ``path`` ending in ``.npz`` writes one ``.npz`` file instead (the format
  of earlier versions; also atomic).

  Beside the checkpoint, ``<path>.sha256`` (:func:`checksum_path`) records
  the sha256 of its files and which leaves held nan or inf;
  :func:`load_checkpoint` verifies both.

  Args:
    path: the checkpoint directory (or ``.npz`` file).
    state: a pytree of ``jax.Array`` (any sharding; typed keys of
      ``jax.random.key`` included), numpy arrays or scalars.
  """
  try:
    _save(path, state)
  except OSError as e:
    raise unwritable(os.fspath(path), e) from e


def _save(path: str, state: Any) -> None:
  if _is_npz(path):
    _save_npz(path, state)
    return
  import orbax.checkpoint as ocp
  nonfinite = nonfinite_leaves(state)
  leaves, specs = _leaf_specs(state)
  if jax.process_count() > 1:
    # Orbax writes the arrays that span all processes' devices together with
    # the other processes; it refuses the arrays of one process's devices,
    # which the simulation keeps identical in every process: process 0
    # writes them from the host.
    leaves = [l if not isinstance(l, jax.Array) or not l.is_fully_addressable
              else np.asarray(l) for l in leaves]
  # Orbax refuses zero-size arrays (load_checkpoint rebuilds them from
  # ``like``) and empty trees (a state without data saves a placeholder).
  items = {_leaf_name(i): leaf for i, leaf in enumerate(leaves) if leaf.size}
  items = items or {"empty": np.zeros((1,), np.uint8)}
  with _manager(path, create=True) as mngr:
    latest = mngr.latest_step()
    step = 0 if latest is None else latest + 1
    mngr.save(step, args=ocp.args.StandardSave(items),
              custom_metadata={"format": _FORMAT, "leaves": specs},
              force=True)
    mngr.wait_until_finished()
  if jax.process_index() == 0:
    # After the commit: a checksum never names a step that is not complete.
    step_dir = os.path.join(os.fspath(path), str(step))
    atomic_write_json(checksum_path(path), {
        "format": SUM_FORMAT, "step": step,
        "files": tree_digests(step_dir), "nonfinite": nonfinite})


def load_checkpoint(path: str, like: Any) -> Any:
  """Loads the latest checkpoint of :func:`save_checkpoint` into ``like``.

  Args:
    path: what was given to :func:`save_checkpoint`.
    like: a pytree with the saved structure, shapes and dtypes (e.g. a
      freshly initialised state).

  Returns:
    A pytree of ``like``'s structure and leaf types: ``jax.Array`` leaves
    placed as ``like``'s (committed ones with their shardings, uncommitted
    ones uncommitted on the default device), PRNG keys rewrapped with
    ``like``'s implementation, bit for bit, and numpy arrays where ``like``
    holds numpy arrays or scalars.

  Raises:
    FileNotFoundError: ``path`` holds no complete checkpoint.
    ValueError: the checkpoint holds another structure, shape or dtype (it
      was written by another configuration); or it is corrupt: its files do
      not match their checksum (``<path>.sha256``), or a float leaf holds
      nan or inf that it did not hold when saved (without a checksum, of an
      earlier version: any nan or inf). The message names ``path``.
  """
  if _is_npz(path):
    return _load_npz(path, like)
  import orbax.checkpoint as ocp
  if not checkpoint_exists(path):
    raise FileNotFoundError(f"no complete checkpoint in {path}")
  leaves, treedef = jax.tree.flatten(like)
  _, specs = _leaf_specs(like)
  with _manager(path) as mngr:
    step = mngr.latest_step()
    allowed = verified_nonfinite(path, step)
    saved = mngr.metadata(step).custom_metadata or {}
    _check_specs(path, saved.get("leaves"), specs)
    target = {}
    for i, (ref, spec) in enumerate(zip(leaves, specs)):
      shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
      if not np.prod(shape, dtype=int):
        continue
      if isinstance(ref, jax.Array) and ref.committed:
        sharding = (jax.random.key_data(ref) if is_key(ref) else ref).sharding
        target[_leaf_name(i)] = jax.ShapeDtypeStruct(shape, dtype,
                                                     sharding=sharding)
      else:
        # Read to the host. An uncommitted ``like`` leaf (made by jnp without
        # a device) gives an uncommitted array, which a jitted function may
        # move to its devices, as it may not a committed one.
        target[_leaf_name(i)] = np.empty(shape, dtype)
    restored = (mngr.restore(step, args=ocp.args.StandardRestore(target))
                if target else {})
  out = []
  for i, ref in enumerate(leaves):
    name = _leaf_name(i)
    if name not in restored:
      # A zero-size leaf holds no data: a copy of ``like``'s is the saved one
      # (a copy, as the round step donates its state).
      arr = ref.copy() if hasattr(ref, "copy") else np.asarray(ref)
    else:
      arr = restored[name]
      if isinstance(ref, jax.Array) and not ref.committed:
        arr = jnp.asarray(arr)
      if is_key(ref):
        arr = jax.random.wrap_key_data(arr, impl=jax.random.key_impl(ref))
    out.append(arr)
  state = jax.tree.unflatten(treedef, out)
  check_finite(path, state, allowed)
  return state


def checkpoint_arrays(path: str) -> dict[str, np.ndarray]:
  """The arrays of the latest checkpoint at ``path``, without a ``like``.

  For inspection and tests: numpy arrays keyed by their leaf's path in the
  saved pytree (``"['params']['Dense_0']['kernel']"``), PRNG keys as their
  key data. A ``.npz`` checkpoint gives its arrays as ``leaf_<i>``.
  """
  if _is_npz(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  import orbax.checkpoint as ocp
  if not checkpoint_exists(path):
    raise FileNotFoundError(f"no complete checkpoint in {path}")
  with _manager(path) as mngr:
    step = mngr.latest_step()
    specs = (mngr.metadata(step).custom_metadata or {}).get("leaves")
    if specs is None:
      raise ValueError(f"{path} holds no leaf descriptions: it was not "
                       "written by save_checkpoint")
    empty = {_leaf_name(i): np.empty(s["shape"], s["dtype"])
             for i, s in enumerate(specs)}
    target = {k: v for k, v in empty.items() if v.size}
    restored = (mngr.restore(step, args=ocp.args.StandardRestore(target))
                if target else {})
  return {s["path"]: restored.get(k, empty[k])
          for k, s in zip(empty, specs)}


def _save_npz(path: str, state: Any) -> None:
  """The ``.npz`` format of earlier versions: one array per leaf.

  Its checksum is written first and keeps the previous file's digest too,
  so that a kill between the two writes leaves a verifiable pair.
  """
  leaves, _ = _leaf_specs(state)
  buf = io.BytesIO()
  np.savez(buf, **{f"leaf_{i}": np.asarray(l) for i, l in enumerate(leaves)})
  data = buf.getvalue()
  try:
    old = read_checksums(path)
  except ValueError:
    old = None
  previous = None if old is None else {"files": old["files"],
                                       "nonfinite": old["nonfinite"]}
  atomic_write_json(checksum_path(path), {
      "format": SUM_FORMAT, "step": None,
      "files": {os.path.basename(path): hashlib.sha256(data).hexdigest()},
      "nonfinite": nonfinite_leaves(state), "previous": previous})
  atomic_write_bytes(path, data)


def _load_npz(path: str, like: Any) -> Any:
  import zipfile
  allowed = None
  record = read_checksums(path)
  if record is not None:
    got = {os.path.basename(path): file_digest(path)}
    if record.get("previous") and got == record["previous"]["files"]:
      record = record["previous"]  # killed between the two writes
    check_digests(path, record["files"], got, os.path.dirname(path))
    allowed = set(record["nonfinite"])
  leaves, treedef = jax.tree.flatten(like)
  try:
    with np.load(path) as z:
      arrays = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise ValueError(f"checkpoint {path} cannot be read ({e}): it is "
                     "corrupt; delete it (and restart the run from the "
                     "beginning) or restore it from a copy") from None
  if len(arrays) != len(leaves):
    raise ValueError(f"checkpoint {path} has {len(arrays)} arrays, expected "
                     f"{len(leaves)}: it was written by another configuration")
  out = []
  for i, ref in enumerate(leaves):
    arr = arrays[f"leaf_{i}"]
    if is_key(ref):
      out.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(ref)))
    else:
      if arr.shape != np.shape(ref):
        raise ValueError(f"checkpoint {path} does not match this "
                         f"configuration (leaf {i}: {arr.shape} vs "
                         f"{np.shape(ref)})")
      out.append(jnp.asarray(arr, dtype=ref.dtype))
  state = jax.tree.unflatten(treedef, out)
  check_finite(path, state, allowed)
  return state
