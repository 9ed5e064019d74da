"""Atomic result files and resumable checkpoints.

Every result file is written to a temporary sibling and renamed into place,
so a run killed at any moment leaves either the old or the new file, never
half of one; it gets the mode ``open`` would give it (0644 under umask 022),
JSON writers write nan and inf as null (never a bare ``NaN``), and a file or
directory that cannot be written (read-only, full) raises a ValueError that
names it. Readers name the file they cannot parse.

Checkpoints are Orbax checkpoint directories with the same guarantee: a step
is written under a temporary name and renamed into place once complete, and
the previous step is deleted only after that. Beside each, ``<path>.sha256``
holds the sha256 of its files and which leaves were non-finite when it was
saved; a checkpoint whose bytes changed, or whose state holds nan or inf
where the saved one did not, is refused (ValueError), never trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _umask() -> int:
  """The process's file-mode creation mask (read, not set: setting it would
  race with threads that create files, Orbax's among them)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return 0o022


def unwritable(path: str, error: OSError) -> ValueError:
  """The error of a result file or directory that cannot be written (read-only,
  full, not a directory, ...), naming it: a ValueError, so that the binaries
  report it as ``error: ...`` (exit 2) instead of a traceback."""
  reason = error.strerror or str(error)
  return ValueError(f"cannot write {path}: {reason}; the output directory "
                    "must be a writable directory with free space")


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``path`` atomically, with the mode ``open`` would give it (0644
  under the usual umask 022; ``mkstemp`` alone leaves 0600).

  Raises:
    ValueError: the file or its directory cannot be written (see
      :func:`unwritable`).
  """
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  except OSError as e:
    raise unwritable(path, e) from e
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~_umask())
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise unwritable(path, e) from e
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def finite_json(obj: Any) -> Any:
  """``obj`` with every non-finite float (nan, inf) replaced by None, in
  nested dicts, lists and tuples (tuples become lists, as JSON has them):
  JSON has no NaN, and a bare ``NaN`` breaks strict readers."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def _dumps(obj: Any, **kwargs) -> str:
  return json.dumps(finite_json(obj), allow_nan=False, sort_keys=True,
                    **kwargs)


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON, atomically; nan and inf are written as null."""
  atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def write_jsonl(path: str, records: list[dict]) -> None:
  """Writes one JSON record per line, atomically; nan and inf as null."""
  atomic_write_text(path, "".join(_dumps(r) + "\n" for r in records))


def append_jsonl(path: str, records: list[dict]) -> None:
  """Appends one JSON line per record to ``path`` and syncs it; nan and inf
  as null.

  The lines already in the file are left as they are, so a run writes each
  round's record once (rewriting the whole file each round costs O(R^2) over
  a run of R rounds). A kill during the append leaves at most an
  unterminated last line, which :func:`read_jsonl` skips.
  """
  data = "".join(_dumps(r) + "\n" for r in records).encode()
  try:
    with open(path, "ab") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise unwritable(path, e) from e


def read_json(path: str) -> Any:
  """The JSON in ``path``.

  Raises:
    FileNotFoundError: there is no ``path``.
    ValueError: it cannot be read or parsed (the message names it).
  """
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    raise
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): it was damaged or "
                     "written by something else") from None


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file.

  An unterminated last line that is not JSON (an append cut short by a
  kill, see :func:`append_jsonl`) is skipped.

  Raises:
    FileNotFoundError: there is no ``path``.
    ValueError: it cannot be read, or a line is not a JSON object (the
      message names the file and the line).
  """
  try:
    with open(path) as f:
      lines = f.read().split("\n")
  except FileNotFoundError:
    raise
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e
  records = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except ValueError as e:
      if i == len(lines):
        # Unterminated: an append (append_jsonl) cut short by a kill; every
        # complete line ends with a newline.
        break
      raise ValueError(f"{path} line {i} is not valid JSON ({e}): it was "
                       "damaged or written by something else") from None
    if not isinstance(rec, dict):
      raise ValueError(f"{path} line {i} is not a JSON object: it was "
                       "damaged or written by something else")
    records.append(rec)
  return records


# Version of the checkpoint layout (the leaf names and the metadata).
_FORMAT = 1


def _leaf_name(i: int) -> str:
  return f"leaf_{i:05d}"


def _is_key(leaf) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.prng_key)


def _is_npz(path) -> bool:
  return os.fspath(path).endswith(".npz")


def _leaf_specs(state: Any) -> tuple[list, list[dict]]:
  """Leaves of ``state`` (PRNG keys as their data) and their descriptions."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  leaves, specs = [], []
  for key_path, leaf in flat:
    spec = {"path": jax.tree_util.keystr(key_path)}
    if _is_key(leaf):
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


# The checksum file beside a checkpoint, ``<path>.sha256``: JSON with the
# sha256 of every file of the checkpoint's latest step (of the ``.npz`` file)
# and the leaves that held nan or inf when it was saved. It is written
# (atomically) after the step is committed, so a kill in between leaves a
# checkpoint newer than its checksum: that checkpoint loads unverified.
_SUM_FORMAT = 1


def checksum_path(path: str) -> str:
  """The checksum file of the checkpoint ``path``: ``<path>.sha256``."""
  return os.fspath(path).rstrip(os.sep) + ".sha256"


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _tree_digests(directory: str) -> dict[str, str]:
  """sha256 of every file under ``directory``, by relative path."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      out[os.path.relpath(full, directory)] = _file_digest(full)
  return out


def _nonfinite_leaves(state: Any) -> list[str]:
  """The paths of the float leaves of ``state`` that hold nan or inf."""
  out = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if _is_key(leaf):
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


def _read_checksums(path: str) -> Optional[dict]:
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


def _check_digests(path: str, want: dict, got: dict, base: str) -> None:
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


def _verified_nonfinite(path: str, step: int) -> Optional[set]:
  """Verifies the files of the Orbax step ``step`` against the checksum.

  Returns:
    The leaves that were non-finite when it was saved, or None where no
    checksum covers this step (a checkpoint of an earlier version, or one
    whose save was killed before its checksum was written).
  """
  record = _read_checksums(path)
  step_dir = os.path.join(os.fspath(path), str(step))
  if record is None or record.get("step") != step or not os.path.isdir(
      step_dir):
    return None
  _check_digests(path, record["files"], _tree_digests(step_dir), step_dir)
  return set(record["nonfinite"])


def _check_finite(path: str, state: Any, allowed: Optional[set]) -> None:
  """Refuses a loaded state with nan or inf where it was saved finite."""
  bad = [p for p in _nonfinite_leaves(state)
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
  nonfinite = _nonfinite_leaves(state)
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
        "format": _SUM_FORMAT, "step": step,
        "files": _tree_digests(step_dir), "nonfinite": nonfinite})


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
    allowed = _verified_nonfinite(path, step)
    saved = mngr.metadata(step).custom_metadata or {}
    _check_specs(path, saved.get("leaves"), specs)
    target = {}
    for i, (ref, spec) in enumerate(zip(leaves, specs)):
      shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
      if not np.prod(shape, dtype=int):
        continue
      if isinstance(ref, jax.Array) and ref.committed:
        sharding = (jax.random.key_data(ref) if _is_key(ref) else ref).sharding
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
      if _is_key(ref):
        arr = jax.random.wrap_key_data(arr, impl=jax.random.key_impl(ref))
    out.append(arr)
  state = jax.tree.unflatten(treedef, out)
  _check_finite(path, state, allowed)
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
    old = _read_checksums(path)
  except ValueError:
    old = None
  previous = None if old is None else {"files": old["files"],
                                       "nonfinite": old["nonfinite"]}
  atomic_write_json(checksum_path(path), {
      "format": _SUM_FORMAT, "step": None,
      "files": {os.path.basename(path): hashlib.sha256(data).hexdigest()},
      "nonfinite": _nonfinite_leaves(state), "previous": previous})
  atomic_write_bytes(path, data)


def _load_npz(path: str, like: Any) -> Any:
  import zipfile
  allowed = None
  record = _read_checksums(path)
  if record is not None:
    got = {os.path.basename(path): _file_digest(path)}
    if record.get("previous") and got == record["previous"]["files"]:
      record = record["previous"]  # killed between the two writes
    _check_digests(path, record["files"], got, os.path.dirname(path))
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
    if _is_key(ref):
      out.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(ref)))
    else:
      if arr.shape != np.shape(ref):
        raise ValueError(f"checkpoint {path} does not match this "
                         f"configuration (leaf {i}: {arr.shape} vs "
                         f"{np.shape(ref)})")
      out.append(jnp.asarray(arr, dtype=ref.dtype))
  state = jax.tree.unflatten(treedef, out)
  _check_finite(path, state, allowed)
  return state
