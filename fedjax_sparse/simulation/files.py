"""Atomic result files: JSON and JSON lines.

Every result file is written to a temporary sibling and renamed into place,
so a run killed at any moment leaves either the old or the new file, never
half of one; it gets the mode ``open`` would give it (0644 under umask 022),
JSON writers write nan and inf as null (never a bare ``NaN``), and a file or
directory that cannot be written (read-only, full) raises a ValueError that
names it. Readers name the file they cannot parse.

Import these through :mod:`fedjax_sparse.simulation.io`, which also holds
the checkpoints (:mod:`fedjax_sparse.simulation.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any


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
